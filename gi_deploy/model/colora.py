"""CoLoRA (seeds/002): low-rank adaptation of dense convolution kernels, merged every N epochs.

A frozen ``nn.Conv2d`` K0 (bias b0) gets a residual update constrained to a separable kernel in
the paper's "inception order" (section 3.2): a pointwise 1x1 kernel K_p (out, in, 1, 1; Glorot
init) then a depthwise k x k kernel K_d (out, 1, kh, kw; zeros), with K0's stride, padding and
dilation, plus a bias update db (zeros; only where K0 has a bias)::

    y = K0 * x + K_d * (K_p * x) + b0 + db   ==   (K0 + dK) * x + b0 + db,   dK = colora_delta(K_p, K_d)

After every ``merge_every`` epochs the update is merged (K0 <- K0 + dK, b0 <- b0 + db, eq. 10-11),
K_d and db are reset to zero and K_p is re-initialised, so the total update spans one separable
kernel per merge (eq. 12-14). Merges accumulate in ``merged_weight``/``merged_bias`` buffers;
the frozen K0 itself is never written, so a run's adapter is (accumulated delta, live factors)
and fits the untouched base.

Depthwise and grouped convolutions (ConvNeXt's 7x7 ``conv_dw``) are skipped: CoLoRA's update
mixes channels through K_p, which a groups=C kernel cannot hold, so the merge would not be
exact. The only exact update there is per-channel spatial (k*k weights per channel), which is
already the size of the kernel itself; those layers stay frozen (LoRA on fc1/fc2 adapts the
ConvNeXt blocks). Naming one explicitly is an error.

The layer is a small module of ours, not a peft custom module: peft's conv LoRA factorises in
the other order (k x k down to rank r, then 1x1 up) and has no merge-and-reinit schedule.
Parameter names avoid peft's ``lora_`` prefix so a ``lora+colora`` model's peft adapter file
holds only the LoRA tensors; CoLoRA's go to ``colora.safetensors``.
"""

from __future__ import annotations

import fnmatch
import json
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from gi_deploy.core.runs import COLORA_WEIGHTS
from gi_deploy.errors import BundleError, ConfigError
from gi_deploy.model.base import head_state, inner_model
from gi_deploy.model.merge import colora_delta
from gi_deploy.model.settings import ColoraSettings

# names that belong to the classifier stage of timm CNNs rather than the backbone
# (VGG's fc6/fc7 run as ``pre_logits`` convolutions; the paper replaces that top with its own head)
HEAD_PREFIXES = ("pre_logits",)


class CoLoRAConv2d(nn.Module):
    """A frozen ``nn.Conv2d`` (groups=1) plus the CoLoRA update.

    Parameters: ``pointwise`` (out, in, 1, 1), ``spatial`` (out, 1, kh, kw), ``bias_delta`` (out)
    or None. Buffers: ``merged_weight`` (out, in, kh, kw) and ``merged_bias`` (out) or None, the
    sum of every merge so far. ``forward_mode`` "fused" folds dK into the one convolution;
    "branch" runs the paper's two extra convolutions (same maths, different cost; see the benchmark)."""

    def __init__(self, base: nn.Conv2d, forward_mode: str = "fused"):
        super().__init__()
        if type(base) is not nn.Conv2d or base.groups != 1:
            raise ConfigError(
                f"CoLoRA needs a dense nn.Conv2d (groups=1), got {type(base).__name__} "
                f"with groups={getattr(base, 'groups', '?')}"
            )
        if base.padding_mode != "zeros":
            raise ConfigError(f"CoLoRA supports zero padding only, got padding_mode={base.padding_mode!r}")
        self.base = base
        self.forward_mode = forward_mode
        for p in base.parameters():
            p.requires_grad_(False)
        out_ch, in_ch, kh, kw = base.weight.shape
        kwargs = dict(device=base.weight.device, dtype=base.weight.dtype)
        self.pointwise = nn.Parameter(torch.empty(out_ch, in_ch, 1, 1, **kwargs))
        self.spatial = nn.Parameter(torch.zeros(out_ch, 1, kh, kw, **kwargs))
        self.bias_delta = nn.Parameter(torch.zeros(out_ch, **kwargs)) if base.bias is not None else None
        self.register_buffer("merged_weight", torch.zeros_like(base.weight))
        self.register_buffer("merged_bias", torch.zeros_like(base.bias) if base.bias is not None else None)
        nn.init.xavier_uniform_(self.pointwise)

    def _frozen(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """K0 + every merge so far, and b0 + merges + the live db."""
        weight = self.base.weight + self.merged_weight
        bias = None if self.base.bias is None else self.base.bias + self.merged_bias + self.bias_delta
        return weight, bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = self.base
        weight, bias = self._frozen()
        if self.forward_mode == "fused":
            weight = weight + colora_delta(self.pointwise, self.spatial).to(weight.dtype)
            return F.conv2d(x, weight, bias, b.stride, b.padding, b.dilation)
        y = F.conv2d(x, weight, bias, b.stride, b.padding, b.dilation)
        z = F.conv2d(x, self.pointwise)  # 1x1, stride 1: per-pixel, so it commutes with K0's zero padding
        return y + F.conv2d(z, self.spatial, None, b.stride, b.padding, b.dilation, groups=z.shape[1])

    @torch.no_grad()
    def merge_and_reset(self) -> None:
        """K0 <- K0 + dK and b0 <- b0 + db (into the merge buffers), then K_d = 0, db = 0 and a
        fresh Glorot K_p: the output is unchanged up to fp32 rounding."""
        self.merged_weight += colora_delta(self.pointwise, self.spatial).to(self.merged_weight.dtype)
        self.spatial.zero_()
        if self.bias_delta is not None:
            self.merged_bias += self.bias_delta
            self.bias_delta.zero_()
        nn.init.xavier_uniform_(self.pointwise)

    def delta(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The total update (merges + live factors) as dense (dW, db) in fp32."""
        with torch.no_grad():
            dw = self.merged_weight.float() + colora_delta(self.pointwise, self.spatial)
            db = None if self.bias_delta is None else self.merged_bias.float() + self.bias_delta.float()
        return dw, db

    def extra_repr(self) -> str:
        return f"forward_mode={self.forward_mode!r}"


@dataclass
class ColoraReport:
    """What :func:`apply_colora` wrapped, and the grouped convolutions it left frozen."""

    layers: list[str] = field(default_factory=list)
    skipped_grouped: list[str] = field(default_factory=list)
    skipped_unsupported: list[str] = field(default_factory=list)  # Conv2d subclasses (timm's Conv2dSame, StdConv2d)


def _is_peft_layer(module: nn.Module) -> bool:
    try:
        from peft.tuners.tuners_utils import BaseTunerLayer
        from peft.utils.other import ModulesToSaveWrapper
    except ImportError:  # pragma: no cover - peft is a training dependency
        return False
    return isinstance(module, (BaseTunerLayer, ModulesToSaveWrapper))


def colora_candidates(model: nn.Module, settings: ColoraSettings, head: str) -> ColoraReport:
    """The dense convolutions CoLoRA will wrap in ``model`` (and those it skips), by
    ``settings.targets`` (fnmatch patterns on module names; empty = every convolution of the
    backbone) and ``settings.min_kernel``. The classifier ``head``, ``pre_logits`` and layers peft
    already adapts are never touched. Conv2d subclasses are skipped: timm's Conv2dSame pads in its
    forward and StdConv2d standardises its weight, so a merged plain kernel would not be exact.
    Raises ConfigError when a pattern matches nothing usable."""
    excluded_roots = [n for n, m in model.named_modules() if n and _is_peft_layer(m)]
    excluded_roots += [head, *HEAD_PREFIXES]

    def outside(name: str) -> bool:
        return not any(name == r or name.startswith(r + ".") for r in excluded_roots)

    convs = {n: m for n, m in model.named_modules() if isinstance(m, nn.Conv2d) and outside(n)}
    if settings.targets:
        chosen = {n: m for n, m in convs.items() if any(fnmatch.fnmatchcase(n, p) for p in settings.targets)}
        for pattern in settings.targets:
            hits = [n for n in convs if fnmatch.fnmatchcase(n, pattern)]
            if not hits:
                raise ConfigError(
                    f"CoLoRA target {pattern!r} matched no convolution; convolutions are: "
                    + ", ".join(list(convs)[:12])
                    + (" ..." if len(convs) > 12 else "")
                )
            if all(convs[n].groups > 1 for n in hits):
                raise ConfigError(
                    f"CoLoRA target {pattern!r} matches only grouped/depthwise convolutions "
                    f"({hits[0]}, ...); their kernels cannot hold CoLoRA's channel-mixing update "
                    "(see gi_deploy/model/colora.py). Target dense convolutions"
                )
    else:
        chosen = convs
    report = ColoraReport(
        layers=[
            n
            for n, m in chosen.items()
            if type(m) is nn.Conv2d and m.groups == 1 and min(m.kernel_size) >= settings.min_kernel
        ],
        skipped_grouped=[n for n, m in chosen.items() if m.groups > 1],
        skipped_unsupported=[n for n, m in chosen.items() if type(m) is not nn.Conv2d and m.groups == 1],
    )
    if not report.layers:
        raise ConfigError(
            f"CoLoRA found no dense convolution to adapt in {type(model).__name__} "
            f"(targets {list(settings.targets) or 'all'}, min_kernel {settings.min_kernel}"
            + (
                f"; skipped Conv2d subclasses: {', '.join(report.skipped_unsupported[:3])}"
                if report.skipped_unsupported
                else ""
            )
            + ")"
        )
    return report


def apply_colora(model: nn.Module, settings: ColoraSettings, head: str) -> ColoraReport:
    """Wrap the chosen convolutions of ``model`` in place with :class:`CoLoRAConv2d` (their base
    kernels frozen, the factors trainable). Other parameters keep their ``requires_grad``."""
    report = colora_candidates(model, settings, head)
    for name in report.layers:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        layer = CoLoRAConv2d(getattr(parent, child), settings.forward_mode)
        setattr(parent, child, layer)
    return report


def colora_layers(model: nn.Module) -> dict[str, CoLoRAConv2d]:
    """Every CoLoRA layer of ``model`` by its module name (as in the plain model)."""
    return {n: m for n, m in model.named_modules() if isinstance(m, CoLoRAConv2d)}


def colora_summary(model: nn.Module) -> dict:
    """Parameter counts the way the paper's Table 4 footnotes give them: ``backprop_params`` train
    by backpropagation (K_p, K_d, db), ``merged_into_params`` are the base kernels and biases the
    merges update, and ``skipped_grouped`` counts depthwise/grouped convolutions left frozen."""
    layers = colora_layers(model)
    skipped = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d) and m.groups > 1]
    return {
        "layers": len(layers),
        "skipped_grouped": len(skipped),
        "backprop_params": sum(p.numel() for p in colora_parameters(model)),
        "merged_into_params": sum(
            m.base.weight.numel() + (m.base.bias.numel() if m.base.bias is not None else 0) for m in layers.values()
        ),
    }


def colora_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [
        p
        for layer in colora_layers(model).values()
        for p in (layer.pointwise, layer.spatial, layer.bias_delta)
        if p is not None
    ]


def merge_all(model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> int:
    """Merge-and-reset every CoLoRA layer; returns how many. With ``optimizer``, the AdamW moments
    of the reset factors are dropped too: they describe factors that no longer exist, and would
    otherwise push the fresh K_d along the previous epoch's direction."""
    layers = colora_layers(model)
    for layer in layers.values():
        layer.merge_and_reset()
    if optimizer is not None:
        for p in colora_parameters(model):
            optimizer.state.pop(p, None)
    return len(layers)


@contextmanager
def branch_form(model: nn.Module):
    """Run every CoLoRA layer of ``model`` in the paper's branch form, K0 ⊛ x + K_d ⊛ (K_p ⊛ x),
    inside the block: a computation independent of :func:`colora_delta` (which the fused forward
    and the merge both use), so the export's merge gate compares two different computations and a
    wrong delta cannot pass it."""
    layers = colora_layers(model)
    modes = {name: layer.forward_mode for name, layer in layers.items()}
    for layer in layers.values():
        layer.forward_mode = "branch"
    try:
        yield model
    finally:
        for name, layer in layers.items():
            layer.forward_mode = modes[name]


def colora_parts(model: nn.Module) -> dict[str, torch.Tensor]:
    """The total CoLoRA update of every layer as plain state-dict deltas
    (``<module>.weight`` -> dW, ``<module>.bias`` -> db), for :func:`merge_state_dict`."""
    deltas: dict[str, torch.Tensor] = {}
    for name, layer in colora_layers(model).items():
        dw, db = layer.delta()
        deltas[f"{name}.weight"] = dw
        if db is not None:
            deltas[f"{name}.bias"] = db
    return deltas


def colora_state(model: nn.Module, merges: int) -> dict[str, torch.Tensor]:
    """The adapter tensors to save: live factors always, merge buffers once something was merged
    (before that they are zeros, and leaving them out keeps a merge-at-export adapter small)."""
    keys = ("pointwise", "spatial", "bias_delta") + (("merged_weight", "merged_bias") if merges else ())
    state = {}
    for name, layer in colora_layers(model).items():
        for key in keys:
            t = getattr(layer, key)
            if t is not None:
                state[f"{name}.{key}"] = t.detach().cpu().contiguous()
    return state


def save_colora(
    model: nn.Module, path: Path, settings: ColoraSettings, merges: int, extra: dict[str, torch.Tensor] | None = None
) -> None:
    """Write the CoLoRA adapter (plus ``extra`` tensors, e.g. the classifier) atomically as
    safetensors, with the settings and merge count in its metadata."""
    from safetensors.torch import save_file

    path = Path(path)
    tensors = {**colora_state(model, merges), **{k: v.detach().cpu().contiguous() for k, v in (extra or {}).items()}}
    meta = {"format": "gi-deploy-colora", "settings": json.dumps(settings.to_dict()), "merges": str(merges)}
    tmp = path.with_suffix(".tmp")
    save_file(tensors, str(tmp), metadata=meta)
    tmp.replace(path)


def load_colora(model: nn.Module, path: Path, settings: ColoraSettings, head: str, head_in_file: bool) -> ColoraReport:
    """Wrap ``model`` as the run did (``head`` names its classifier) and load the adapter from
    ``path``, with the classifier's tensors when ``head_in_file`` (``colora`` alone; with
    ``lora+colora`` peft's adapter holds the head). Raises BundleError when the file does not fit."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise BundleError(f"CoLoRA adapter missing: {path}; the run did not finish an epoch")
    report = apply_colora(model, settings, head)
    with safe_open(str(path), framework="pt") as f:
        state = {k: f.get_tensor(k) for k in f.keys()}
    layers = colora_layers(model)
    expected = {
        f"{n}.{k}"
        for n, layer in layers.items()
        for k in ("pointwise", "spatial", "bias_delta")
        if getattr(layer, k) is not None
    }
    optional = {
        f"{n}.{k}"
        for n, layer in layers.items()
        for k in ("merged_weight", "merged_bias")
        if getattr(layer, k) is not None
    }
    head_keys = set(head_state(model.state_dict(), head)) if head_in_file else set()
    missing = sorted((expected | head_keys) - set(state))
    unexpected = sorted(set(state) - expected - optional - head_keys)
    if missing or unexpected:
        raise BundleError(
            f"{path} does not fit the model (missing: {missing[:3]}, unexpected: {unexpected[:3]}); "
            "it was saved for another model or CoLoRA targets"
        )
    for key, t in state.items():
        target = model.get_parameter(key) if key in expected or key in head_keys else model.get_buffer(key)
        if target.shape != t.shape:
            raise BundleError(f"{path}: {key} has shape {tuple(t.shape)}, the model expects {tuple(target.shape)}")
        with torch.no_grad():
            target.copy_(t)
    return report


def is_merge_epoch(epoch: int, merge_every: int) -> bool:
    return merge_every > 0 and epoch % merge_every == 0


# The adapter kind's uniform interface (model/adapters.py): CoLoRA wraps convolutions of the timm
# model in place, inside a peft wrapper when LoRA is applied too.


def apply_colora_adapter(model: nn.Module, settings: ColoraSettings, head: str) -> nn.Module:
    apply_colora(inner_model(model), settings, head)
    return model


def save_colora_adapter(
    model: nn.Module, run_dir: Path, settings: ColoraSettings, head: str, with_head: bool, merges: int
) -> None:
    """``colora.safetensors``: the factors and merges, with the classifier when no peft adapter holds it."""
    inner = inner_model(model)
    extra = head_state(inner.state_dict(), head) if with_head else {}
    save_colora(inner, Path(run_dir) / COLORA_WEIGHTS, settings, merges, extra)


def load_colora_adapter(
    model: nn.Module, run_dir: Path, settings: ColoraSettings, head: str, with_head: bool
) -> nn.Module:
    load_colora(inner_model(model), Path(run_dir) / COLORA_WEIGHTS, settings, head, head_in_file=with_head)
    return model


def colora_deltas(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Every CoLoRA layer's total update as state-dict deltas; CoLoRA replaces no tensor whole."""
    return colora_parts(inner_model(model)), {}


# Its training hooks (AdapterKind): Table 4's counts, and the merge every ``merge_every`` epochs.


def colora_run_summary(model: nn.Module, settings: ColoraSettings) -> dict:
    """:func:`colora_summary`'s counts and the merge schedule, as run.json records them."""
    return {**colora_summary(model), "merge_every": settings.merge_every}


def colora_summary_line(summary: dict, deployed: int) -> str:
    return (
        f"CoLoRA: {summary['layers']} convolutions, {summary['backprop_params']:,} parameters trained by "
        f"backpropagation, merged into {summary['merged_into_params']:,} of the {deployed:,} deployed"
        + (
            f"; {summary['skipped_grouped']} depthwise/grouped convolutions stay frozen"
            if summary["skipped_grouped"]
            else ""
        )
    )


def colora_epoch_end(model: nn.Module, optimizer: torch.optim.Optimizer, settings: ColoraSettings, epoch: int) -> bool:
    """After every ``merge_every``-th epoch: K0 += K_p * K_d, b0 += db, the factors reset (and their
    optimizer moments dropped, :func:`merge_all`). True when it merged."""
    if not is_merge_epoch(epoch, settings.merge_every):
        return False
    merge_all(model, optimizer)
    return True
