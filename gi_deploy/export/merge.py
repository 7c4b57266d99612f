"""LoRA and CoLoRA merge maths, once, as pure functions on tensors and state dicts.

For a target layer with frozen weight W, LoRA factors A (r x in) and B (out x r) and scaling
s = alpha / r (alpha / sqrt(r) with rsLoRA), the merged weight is W' = W + s * B @ A. For a
convolution, A is a (r, in, kh, kw) kernel and B a 1x1 (out, r) kernel, and the update is the
kernel of the composed convolution: einsum("or,rihw->oihw", B, A). The merged state dict then
loads strictly into the plain timm model, which costs exactly what the backbone costs.

CoLoRA (seeds/002, eq. 9 and section 3.2, "inception order") constrains the update of a dense
k x k convolution to a pointwise (1x1) kernel K_p (out, in, 1, 1) followed by a depthwise kernel
K_d (out, 1, kh, kw): out = K_d * (K_p * x). Both are linear, so the composition is one dense
kernel, dK[o, i] = K_p[o, i] * K_d[o] (each output filter is the outer product of its channel
weights and its spatial kernel), used with K0's stride, padding and dilation.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from gi_deploy.errors import ConfigError, VerificationError


@dataclass(frozen=True)
class LoraFactors:
    """One adapted layer: ``A`` (r, in[, kh, kw]), ``B`` (out, r[, 1, 1]) and the scaling."""

    A: torch.Tensor
    B: torch.Tensor
    scaling: float


def lora_delta(f: LoraFactors) -> torch.Tensor:
    """The weight update s * B A, computed in fp32. Linear: (out, in); Conv2d: (out, in, kh, kw)."""
    a, b = f.A.float(), f.B.float()
    if a.dim() == 2 and b.dim() == 2:
        return f.scaling * (b @ a)
    if a.dim() == 4 and b.dim() == 4:
        if b.shape[2:] != (1, 1):
            raise ConfigError(f"LoRA B of a convolution must be a 1x1 kernel, got {tuple(b.shape)}")
        return f.scaling * torch.einsum("or,rihw->oihw", b[:, :, 0, 0], a)
    raise ConfigError(f"unsupported LoRA factor shapes A{tuple(a.shape)} B{tuple(b.shape)}")


def colora_delta(pointwise: torch.Tensor, spatial: torch.Tensor) -> torch.Tensor:
    """The dense kernel of CoLoRA's pointwise-then-depthwise update, in fp32.

    ``pointwise`` (out, in, 1, 1) and ``spatial`` (out, 1, kh, kw) -> (out, in, kh, kw) with
    ``delta[o, i, y, x] = pointwise[o, i] * spatial[o, 0, y, x]``. Differentiable (training uses it
    in the fused forward) and the single source of the merge maths for merge-per-epoch and export."""
    if pointwise.dim() != 4 or pointwise.shape[2:] != (1, 1):
        raise ConfigError(f"CoLoRA pointwise kernel must be (out, in, 1, 1), got {tuple(pointwise.shape)}")
    if spatial.dim() != 4 or spatial.shape[1] != 1 or spatial.shape[0] != pointwise.shape[0]:
        raise ConfigError(f"CoLoRA spatial kernel must be (out, 1, kh, kw) with out={pointwise.shape[0]}, "
                          f"got {tuple(spatial.shape)}")
    return pointwise.float() * spatial.float()  # (out, in, 1, 1) * (out, 1, kh, kw) broadcasts to (out, in, kh, kw)


def merge_state_dict(base: dict[str, torch.Tensor], deltas: dict[str, torch.Tensor],
                     replaced: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """A new state dict: ``base`` with each tensor in ``deltas`` added to the tensor of that key
    (``<module>.weight`` / ``<module>.bias``) and the tensors in ``replaced`` (fully trained
    modules such as the new head) swapped in.

    Adds in fp32 and casts back to each tensor's dtype; raises VerificationError naming the
    module when a merged tensor is not finite, and ConfigError for unknown keys or shape
    mismatches. ``base`` is not modified."""
    merged = dict(base)
    for key, delta in deltas.items():
        module = key.rsplit(".", 1)[0]
        if key not in base:
            raise ConfigError(f"an update for {module!r} but the base has no {key!r}")
        w = base[key]
        if delta.shape != w.shape:
            raise ConfigError(f"update for {key!r} has shape {tuple(delta.shape)}, the base tensor {tuple(w.shape)}")
        new = w.float() + delta.float()
        if not torch.isfinite(new).all():
            raise VerificationError(f"merging the adapter into {module!r} produced non-finite weights; "
                                    "the adapter is corrupt or diverged in training")
        merged[key] = new.to(w.dtype)
    for key, t in (replaced or {}).items():
        if key not in base:
            raise ConfigError(f"replacement tensor {key!r} has no counterpart in the base state dict")
        if t.shape != base[key].shape:
            raise ConfigError(f"replacement {key!r} has shape {tuple(t.shape)}, base has {tuple(base[key].shape)}")
        merged[key] = t.detach().clone()
    return merged


def merge_lora_state_dict(base: dict[str, torch.Tensor], factors: dict[str, LoraFactors],
                          replaced: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """:func:`merge_state_dict` with every ``<module>.weight`` in ``factors`` updated by s * B A."""
    return merge_state_dict(base, {f"{module}.weight": lora_delta(f) for module, f in factors.items()}, replaced)


def peft_lora_parts(peft_model: nn.Module, adapter: str = "default",
                    ) -> tuple[dict[str, LoraFactors], dict[str, torch.Tensor]]:
    """Read LoRA factors and fully trained modules (``modules_to_save``) out of a peft model,
    keyed by the plain model's module / state-dict names."""
    from peft.tuners.lora import LoraLayer
    from peft.utils.other import ModulesToSaveWrapper

    config = peft_model.peft_config[adapter]
    if getattr(config, "use_dora", False):
        raise ConfigError("DoRA adapters are not supported by the LoRA merge; retrain without use_dora")
    inner = peft_model.get_base_model()
    factors: dict[str, LoraFactors] = {}
    replaced: dict[str, torch.Tensor] = {}
    for name, module in inner.named_modules():
        if isinstance(module, LoraLayer) and adapter in module.lora_A:
            factors[name] = LoraFactors(A=module.lora_A[adapter].weight.detach(),
                                        B=module.lora_B[adapter].weight.detach(),
                                        scaling=float(module.scaling[adapter]))
        elif isinstance(module, ModulesToSaveWrapper):
            trained = module.modules_to_save[adapter]
            replaced.update({f"{name}.{k}": v for k, v in trained.state_dict().items()})
    if not factors:
        raise ConfigError(f"peft model has no LoRA layers for adapter {adapter!r}")
    return factors, replaced


def merge_into_plain(plain: nn.Module, trained: nn.Module, adapter: str = "default") -> nn.Module:
    """A copy of the plain timm model with every adapter of ``trained`` merged in: peft LoRA
    (factors and ``modules_to_save``), CoLoRA layers (accumulated merges + live factors, and the
    trained classifier when there is no peft wrapper), or both. The strict load guarantees the
    result has exactly the plain architecture. ``plain`` must hold the base ``trained`` started from."""
    from gi_deploy.training.colora import colora_parts  # the layer lives with training
    from gi_deploy.training.model import classifier_name, head_state

    is_peft = hasattr(trained, "peft_config")
    deltas: dict[str, torch.Tensor] = {}
    replaced: dict[str, torch.Tensor] = {}
    inner = trained
    if is_peft:
        factors, replaced = peft_lora_parts(trained, adapter)
        deltas = {f"{module}.weight": lora_delta(f) for module, f in factors.items()}
        inner = trained.get_base_model()
    colora = colora_parts(inner)
    if not deltas and not colora:
        raise ConfigError(f"{type(trained).__name__} has neither LoRA nor CoLoRA layers; nothing to merge")
    if colora and not is_peft:  # CoLoRA alone trains the classifier directly, in place
        replaced = head_state(inner.state_dict(), classifier_name(plain))
    merged_sd = merge_state_dict(plain.state_dict(), {**deltas, **colora}, replaced)
    out = copy.deepcopy(plain)
    out.load_state_dict(merged_sd, strict=True)
    return out.eval()


def load_merged_model(run_dir: Path) -> nn.Module:
    """A finished run's deployed function as a torch model in eval mode: the base with the run's
    adapters merged in (lora, colora, lora+colora), or the trained model itself (full, linear)."""
    from gi_deploy.training.run import ADAPTER_METHODS, attach_trained, read_run_manifest, rebuild_base

    manifest = read_run_manifest(run_dir)
    plain = rebuild_base(manifest, run_dir).eval()
    trained = attach_trained(copy.deepcopy(plain), manifest, run_dir).eval()
    if manifest["config"]["method"] in ADAPTER_METHODS:
        return merge_into_plain(plain, trained)
    return trained.eval()
