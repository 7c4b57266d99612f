"""LoRA and CoLoRA merge maths, once, as pure functions on tensors and state dicts (the one copy:
training's CoLoRA merges, export and the torch backend all use these).

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

from dataclasses import dataclass

import torch

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
        raise ConfigError(
            f"CoLoRA spatial kernel must be (out, 1, kh, kw) with out={pointwise.shape[0]}, got {tuple(spatial.shape)}"
        )
    return pointwise.float() * spatial.float()  # (out, in, 1, 1) * (out, 1, kh, kw) broadcasts to (out, in, kh, kw)


def merge_state_dict(
    base: dict[str, torch.Tensor], deltas: dict[str, torch.Tensor], replaced: dict[str, torch.Tensor] | None = None
) -> dict[str, torch.Tensor]:
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
            raise VerificationError(
                f"merging the adapter into {module!r} produced non-finite weights; "
                "the adapter is corrupt or diverged in training"
            )
        merged[key] = new.to(w.dtype)
    for key, t in (replaced or {}).items():
        if key not in base:
            raise ConfigError(f"replacement tensor {key!r} has no counterpart in the base state dict")
        if t.shape != base[key].shape:
            raise ConfigError(f"replacement {key!r} has shape {tuple(t.shape)}, base has {tuple(base[key].shape)}")
        merged[key] = t.detach().clone()
    return merged


def merge_lora_state_dict(
    base: dict[str, torch.Tensor], factors: dict[str, LoraFactors], replaced: dict[str, torch.Tensor] | None = None
) -> dict[str, torch.Tensor]:
    """:func:`merge_state_dict` with every ``<module>.weight`` in ``factors`` updated by s * B A."""
    return merge_state_dict(base, {f"{module}.weight": lora_delta(f) for module, f in factors.items()}, replaced)
