"""A finished run's models, loaded once for every stage that needs torch: the exact base it was
trained from (checked by fingerprint), the trained ``reference`` model (adapters un-merged) and the
``deployed`` one (adapters merged into the plain backbone). Export gates the one against the
other; explain and the torch backend use the deployed one."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from gi_deploy.core.methods import method_spec
from gi_deploy.core.runs import RunRecord, read_run_manifest
from gi_deploy.errors import WeightsError
from gi_deploy.model.adapters import attach_trained, merge_into_plain
from gi_deploy.model.base import classifier_name, create_base_model, state_fingerprint


def rebuild_base(manifest: RunRecord, run_dir: Path) -> nn.Module:
    """The exact base model the run was trained from, checked by its tensor fingerprint."""
    base = manifest.base_weights
    model_cfg = manifest.model
    if base["kind"] == "hub":
        model, _ = create_base_model(model_cfg.name, model_cfg.num_classes, pretrained=True)
    else:
        path = Path(base["ref"]) if base["kind"] == "file" else Path(run_dir) / base["ref"]
        if not path.is_file():
            raise WeightsError(
                f"the base weights this run was trained from are gone: {path}; restore the "
                "file (its fingerprint is in run.json) or retrain"
            )
        model, _ = create_base_model(model_cfg.name, model_cfg.num_classes, pretrained=False, weights=path)
    fp = state_fingerprint(model, exclude_prefix=classifier_name(model))
    if fp != base["fingerprint"]:
        raise WeightsError(
            f"rebuilt base for run {run_dir} ({base['kind']}: {base['ref']}) differs from the one "
            f"it was trained on (fingerprint {fp[:12]} != {base['fingerprint'][:12]}); the adapter "
            "only fits the original base weights"
        )
    return model


@dataclass
class RunModels:
    """A run's models in eval mode on the CPU. ``merged``: ``deployed`` is the plain backbone with
    the adapters folded in; otherwise it is ``reference`` itself (full, linear, or merge off)."""

    manifest: RunRecord
    reference: nn.Module
    deployed: nn.Module
    merged: bool


def load_run_models(run_dir: Path, merge: bool = True, manifest: RunRecord | None = None) -> RunModels:
    """Rebuild the run's base, attach what it trained, and (for an adapter method, unless ``merge``
    is off) merge it into a copy of the plain base."""
    run_dir = Path(run_dir)
    manifest = manifest or read_run_manifest(run_dir)
    plain = rebuild_base(manifest, run_dir).eval()
    merged = merge and method_spec(manifest.method).merges
    reference = attach_trained(copy.deepcopy(plain) if merged else plain, manifest, run_dir).eval()
    deployed = merge_into_plain(plain, reference) if merged else reference
    return RunModels(manifest, reference, deployed, merged)


def load_run_model(run_dir: Path, device: torch.device | str = "cpu", manifest: RunRecord | None = None) -> nn.Module:
    """The trained model as validated, in eval mode: base + adapters (un-merged) for adapter runs,
    the plain timm model for full fine-tuning and linear probes."""
    run_dir = Path(run_dir)
    manifest = manifest or read_run_manifest(run_dir)
    return attach_trained(rebuild_base(manifest, run_dir), manifest, run_dir).to(device).eval()


def load_merged_model(run_dir: Path) -> nn.Module:
    """A finished run's deployed function as a torch model in eval mode: the base with the run's
    adapters merged in (adapter methods), or the trained model itself (full, linear)."""
    return load_run_models(run_dir).deployed
