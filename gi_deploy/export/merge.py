"""LoRA merge maths, once, as pure functions on tensors and state dicts.

For a target layer with frozen weight W, LoRA factors A (r x in) and B (out x r) and scaling
s = alpha / r (alpha / sqrt(r) with rsLoRA), the merged weight is W' = W + s * B @ A. For a
convolution, A is a (r, in, kh, kw) kernel and B a 1x1 (out, r) kernel, and the update is the
kernel of the composed convolution: einsum("or,rihw->oihw", B, A). The merged state dict then
loads strictly into the plain timm model, which costs exactly what the backbone costs.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

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


def merge_lora_state_dict(base: dict[str, torch.Tensor], factors: dict[str, LoraFactors],
                          replaced: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """A new state dict: ``base`` with every ``<module>.weight`` in ``factors`` merged and the
    tensors in ``replaced`` (fully trained modules such as the new head) swapped in.

    Works on copies in fp32 and casts back to each weight's dtype; raises VerificationError
    naming the module when a merged weight is not finite, and ConfigError for shape mismatches.
    ``base`` is not modified."""
    merged = dict(base)
    for module, f in factors.items():
        key = f"{module}.weight"
        if key not in base:
            raise ConfigError(f"LoRA factors for {module!r} but the base has no {key!r}")
        w = base[key]
        delta = lora_delta(f)
        if delta.shape != w.shape:
            raise ConfigError(f"LoRA update for {module!r} has shape {tuple(delta.shape)}, weight has {tuple(w.shape)}")
        new = w.float() + delta
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


def merge_into_plain(plain: nn.Module, peft_model: nn.Module, adapter: str = "default") -> nn.Module:
    """A copy of the plain timm model with the adapter merged in (strict load: the result has
    exactly the plain architecture). ``plain`` must hold the same base weights as ``peft_model``."""
    factors, replaced = peft_lora_parts(peft_model, adapter)
    merged_sd = merge_lora_state_dict(plain.state_dict(), factors, replaced)
    out = copy.deepcopy(plain)
    out.load_state_dict(merged_sd, strict=True)
    return out.eval()
