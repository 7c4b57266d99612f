"""The adapter kinds and what a method does to a model, by the registry (core/methods.py).

Each adapter kind (peft LoRA, CoLoRA) gives the same five things, the way peft gives one
``LoraVariant`` per variant: its settings class, and how to apply, save, load and merge it; and
the training loop calls a few named hooks of it where a kind does something of its own (CoLoRA:
its parameter counts when training starts, its merge into the kernels at an epoch's end). A
method is a list of kinds (``MethodSpec.adapters``), so neither these functions nor the trainer
branch on a method's or a kind's name: a new kind is one module and one entry in ``ADAPTERS``.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from gi_deploy.core.methods import MethodSpec, method_spec
from gi_deploy.core.runs import ADAPTER_DIR, COLORA_WEIGHTS, RunRecord
from gi_deploy.errors import BundleError, ConfigError
from gi_deploy.model import colora, lora
from gi_deploy.model.base import classifier_name, head_state, inner_model, train_only_head
from gi_deploy.model.merge import merge_state_dict
from gi_deploy.model.settings import ADAPTER_SETTINGS


@dataclass(frozen=True)
class AdapterKind:
    """One kind of adapter. ``file``: its entry in the run folder. ``apply(model, settings, head)``
    returns the model with the adapter attached (possibly wrapped); ``save(model, run_dir,
    settings, head, with_head, merges)``; ``load(model, run_dir, settings, head, with_head)``
    returns the model with the saved adapter attached, un-merged; ``deltas(model)`` gives
    (``<module>.weight``/``.bias`` -> ΔW, tensors replaced whole) keyed by the plain model's names.

    The training hooks (None: the kind has nothing to do there):

    - ``summary(model, settings) -> dict``: what the kind adapted, once applied; recorded in
      run.json under the kind's name (and in the bundle's adapter entry).
    - ``summary_line(summary, deployed) -> str``: the line ``train`` shows about it when it
      starts (``deployed``: the parameters of the exported model).
    - ``epoch_end(model, optimizer, settings, epoch) -> bool``: after each epoch's steps, before
      validation; True when it changed the weights (a merge). Fresh random values it draws come from
      the global torch RNG, which the trainer seeds per (seed, epoch) under torchrun.
    - ``state(model, merges) -> {name: tensor}``: the kind's tensors as it saves them, hashed
      across ranks after ``epoch_end`` changed them (every rank must hold the same)."""

    name: str
    file: str
    settings: type
    apply: Callable[..., nn.Module]
    save: Callable[..., None]
    load: Callable[..., nn.Module]
    deltas: Callable[[nn.Module], tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]]
    summary: Callable[[nn.Module, Any], dict] | None = None
    summary_line: Callable[[dict, int], str] | None = None
    epoch_end: Callable[[nn.Module, torch.optim.Optimizer, Any, int], bool] | None = None
    state: Callable[[nn.Module, int], dict[str, torch.Tensor]] | None = None


ADAPTERS: dict[str, AdapterKind] = {
    "lora": AdapterKind(
        "lora", ADAPTER_DIR, ADAPTER_SETTINGS["lora"], lora.apply_lora, lora.save_lora, lora.load_lora, lora.lora_deltas
    ),
    "colora": AdapterKind(
        "colora",
        COLORA_WEIGHTS,
        ADAPTER_SETTINGS["colora"],
        colora.apply_colora_adapter,
        colora.save_colora_adapter,
        colora.load_colora_adapter,
        colora.colora_deltas,
        summary=colora.colora_run_summary,
        summary_line=colora.colora_summary_line,
        epoch_end=colora.colora_epoch_end,
        state=colora.colora_state,
    ),
}
assert ADAPTERS.keys() == ADAPTER_SETTINGS.keys(), "each adapter kind registers its settings and its torch side"


def _spec(method: str | MethodSpec) -> MethodSpec:
    return method if isinstance(method, MethodSpec) else method_spec(method)


def adapter_kinds(method: str | MethodSpec) -> tuple[AdapterKind, ...]:
    """The adapter kinds ``method`` carries, in the order it applies them."""
    return tuple(ADAPTERS[name] for name in _spec(method).adapters)


def adapter_settings(method: str | MethodSpec, config: dict | None = None, **given: Any) -> dict[str, Any]:
    """The settings object of each adapter kind the method carries: given as keywords (``lora=...``),
    else from a run's recorded config dict (``config["lora"]``), else the kind's defaults."""
    spec, config = _spec(method), config or {}
    out = {}
    for name in spec.adapters:
        kind = ADAPTERS[name]
        value = given.get(name)
        if value is None:
            value = kind.settings(**config[name]) if isinstance(config.get(name), dict) else kind.settings()
        out[name] = value
    return out


def apply_method(model: nn.Module, method: str | MethodSpec, **settings: Any) -> nn.Module:
    """Make exactly what ``method`` trains trainable: every weight (``trains_backbone``), else the
    classifier plus each adapter kind it carries, applied in order (peft first, so CoLoRA skips the
    layers LoRA holds). ``settings``: each kind's settings by its name (defaults when absent)."""
    spec = _spec(method)
    if spec.trains_backbone:
        return model
    model = train_only_head(model)
    head = classifier_name(model)
    for name, value in adapter_settings(spec, **settings).items():
        model = ADAPTERS[name].apply(model, value, head)
    return model


def save_trained(
    model: nn.Module,
    method: str | MethodSpec,
    run_dir: Path,
    head: str,
    settings: dict[str, Any] | None = None,
    merges: int = 0,
) -> None:
    """Save only what training changed, atomically: each adapter kind's file (the classifier goes
    where ``spec.head_in`` says), the classifier alone (linear) or the whole model (full).
    :func:`attach_trained` reads it back."""
    from safetensors.torch import save_file

    spec, run_dir = _spec(method), Path(run_dir)
    if spec.adapters:
        for name, value in adapter_settings(spec, **(settings or {})).items():
            kind = ADAPTERS[name]
            kind.save(model, run_dir, value, head, spec.head_in == kind.file, merges)
        return
    state = model.state_dict()
    if not spec.trains_backbone:
        state = head_state(state, head)
    path = run_dir / spec.artifact[0]
    tmp = path.with_suffix(".tmp")
    save_file({k: v.detach().cpu().contiguous() for k, v in state.items()}, str(tmp))
    tmp.replace(path)


def attach_trained(base: nn.Module, manifest: RunRecord, run_dir: Path) -> nn.Module:
    """``base`` with the run's trained weights: wrapped by / fitted with each adapter kind the
    method carries, all un-merged, or with the trained head (linear) or full fine-tuned state
    (full) loaded in place."""
    from safetensors.torch import load_file

    run_dir = Path(run_dir)
    spec = method_spec(manifest.method)
    head = manifest.model.classifier
    if spec.adapters:
        model = base
        for name, value in adapter_settings(spec, manifest.config).items():
            kind = ADAPTERS[name]
            model = kind.load(model, run_dir, value, head, spec.head_in == kind.file)
        return model
    path = run_dir / spec.artifact[0]
    if not path.is_file():
        raise BundleError(f"trained weights missing: {path}; the run did not finish an epoch")
    state = load_file(str(path))
    if spec.trains_backbone:
        base.load_state_dict(state, strict=True)
        return base
    expected = set(head_state(base.state_dict(), head))
    if set(state) != expected:
        raise BundleError(f"{path} holds {sorted(state)}, expected the classifier tensors {sorted(expected)}")
    base.load_state_dict(state, strict=False)
    return base


def merge_into_plain(plain: nn.Module, trained: nn.Module) -> nn.Module:
    """A copy of the plain timm model with every adapter of ``trained`` merged in (each kind's
    deltas through the one merge function, model/merge.py), and the classifier it trained: the
    tensors an adapter replaced whole (peft's ``modules_to_save``), else the head trained in place.
    The strict load guarantees the result has exactly the plain architecture. ``plain`` must hold
    the base ``trained`` started from."""
    deltas: dict[str, torch.Tensor] = {}
    replaced: dict[str, torch.Tensor] = {}
    for kind in ADAPTERS.values():
        d, r = kind.deltas(trained)
        deltas.update(d)
        replaced.update(r)
    if not deltas:
        raise ConfigError(f"{type(trained).__name__} has no adapter layers ({', '.join(ADAPTERS)}); nothing to merge")
    if not replaced:  # no wrapper kept a trained copy of the classifier: it trained in place
        replaced = head_state(inner_model(trained).state_dict(), classifier_name(plain))
    merged_sd = merge_state_dict(plain.state_dict(), deltas, replaced)
    out = copy.deepcopy(plain)
    out.load_state_dict(merged_sd, strict=True)
    return out.eval()
