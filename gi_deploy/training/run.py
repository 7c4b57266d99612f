"""Read a training run directory back: its manifest, its exact base, its trained model."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from gi_deploy._io import read_json
from gi_deploy.errors import BundleError, WeightsError

RUN_MANIFEST = "run.json"
RUN_FORMAT_VERSION = 1
ADAPTER_DIR = "adapter"
FULL_WEIGHTS = "model.safetensors"
RANDOM_BASE_WEIGHTS = "base_weights.safetensors"


def read_run_manifest(run_dir: Path) -> dict:
    """The run's ``run.json``; raises BundleError when missing, unfinished or of another format."""
    manifest = read_json(Path(run_dir) / RUN_MANIFEST, "run manifest")
    if manifest.get("format") != "gi-deploy-run" or manifest.get("format_version") != RUN_FORMAT_VERSION:
        raise BundleError(f"{run_dir / RUN_MANIFEST} is not a gi-deploy run manifest v{RUN_FORMAT_VERSION}")
    if manifest.get("best") is None:
        raise BundleError(f"run {run_dir} has no saved checkpoint yet (status: {manifest.get('status')}); "
                          "train it first")
    return manifest


def rebuild_base(manifest: dict, run_dir: Path) -> nn.Module:
    """The exact base model the run was trained from, checked by its tensor fingerprint."""
    from gi_deploy.training.model import classifier_name, create_base_model, state_fingerprint

    base = manifest["base_weights"]
    model_cfg = manifest["model"]
    if base["kind"] == "hub":
        model, _ = create_base_model(model_cfg["name"], model_cfg["num_classes"], pretrained=True)
    else:
        path = Path(base["ref"]) if base["kind"] == "file" else Path(run_dir) / base["ref"]
        if not path.is_file():
            raise WeightsError(f"the base weights this run was trained from are gone: {path}; restore the "
                               "file (its fingerprint is in run.json) or retrain")
        model, _ = create_base_model(model_cfg["name"], model_cfg["num_classes"], pretrained=False, weights=path)
    fp = state_fingerprint(model, exclude_prefix=classifier_name(model))
    if fp != base["fingerprint"]:
        raise WeightsError(f"rebuilt base for run {run_dir} ({base['kind']}: {base['ref']}) differs from the one "
                           f"it was trained on (fingerprint {fp[:12]} != {base['fingerprint'][:12]}); the adapter "
                           "only fits the original base weights")
    return model


def attach_trained(base: nn.Module, manifest: dict, run_dir: Path) -> nn.Module:
    """``base`` with the run's trained weights: wrapped by its peft adapter (LoRA, un-merged) or
    with the full fine-tuned state loaded in place (full)."""
    run_dir = Path(run_dir)
    if manifest["config"]["method"] == "lora":
        from peft import PeftModel
        adapter = run_dir / ADAPTER_DIR
        if not (adapter / "adapter_config.json").is_file():
            raise BundleError(f"adapter missing in {adapter}; the run did not finish an epoch")
        return PeftModel.from_pretrained(base, str(adapter))
    from safetensors.torch import load_file
    base.load_state_dict(load_file(str(run_dir / FULL_WEIGHTS)), strict=True)
    return base


def load_run_model(run_dir: Path, device: torch.device | str = "cpu", manifest: dict | None = None) -> nn.Module:
    """The trained model in eval mode: a peft model (base + adapter, un-merged) for LoRA runs,
    the plain timm model for full fine-tuning."""
    run_dir = Path(run_dir)
    manifest = manifest or read_run_manifest(run_dir)
    return attach_trained(rebuild_base(manifest, run_dir), manifest, run_dir).to(device).eval()
