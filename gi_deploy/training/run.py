"""Read a training run directory back: its manifest, its exact base, its trained model."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from gi_deploy._io import read_json
from gi_deploy.errors import BundleError, WeightsError
from gi_deploy.training.config import COLORA_METHODS, LORA_METHODS
from gi_deploy.training.model import head_state

RUN_MANIFEST = "run.json"
RUN_FORMAT_VERSION = 1
ADAPTER_DIR = "adapter"  # lora: peft save_pretrained output
FULL_WEIGHTS = "model.safetensors"  # full: the whole model
HEAD_WEIGHTS = "head.safetensors"  # linear: the classifier only
COLORA_WEIGHTS = "colora.safetensors"  # colora / lora+colora: CoLoRA factors and merges (+ head for colora)
RANDOM_BASE_WEIGHTS = "base_weights.safetensors"
CHECKPOINT = "checkpoint.pt"  # last complete epoch: trained tensors, optimizer, scheduler, RNG, loop state
METRICS_JSONL = "metrics.jsonl"
CURVES_PNG = "curves.png"
SPLITS_DIR = "splits"
RUN_FILES = (RUN_MANIFEST, FULL_WEIGHTS, HEAD_WEIGHTS, COLORA_WEIGHTS, RANDOM_BASE_WEIGHTS, CHECKPOINT, METRICS_JSONL,
             CURVES_PNG)
ADAPTER_METHODS = ("lora", "colora", "lora+colora")  # trained into adapters that export merges into the base
RUN_DIRS = (ADAPTER_DIR, SPLITS_DIR)


def artifact_names(method: str) -> tuple[str, ...]:
    """What a run of ``method`` keeps of training: adapters, the head, or the whole model."""
    return {"lora": (ADAPTER_DIR,), "linear": (HEAD_WEIGHTS,), "colora": (COLORA_WEIGHTS,),
            "lora+colora": (ADAPTER_DIR, COLORA_WEIGHTS)}.get(method, (FULL_WEIGHTS,))


def artifact_files(run_dir: Path, method: str) -> list[Path]:
    """The weights files of the run's artifact (hashed into bundle manifests)."""
    return [Path(run_dir) / name / "adapter_model.safetensors" if name == ADAPTER_DIR else Path(run_dir) / name
            for name in artifact_names(method)]


def artifact_bytes(run_dir: Path, method: str) -> int:
    """Size on disk of what this run adds to the base model."""
    total = 0
    for name in artifact_names(method):
        path = Path(run_dir) / name
        total += sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else path.stat().st_size
    return total


def save_trained(model: nn.Module, method: str, run_dir: Path, head: str, colora=None, merges: int = 0) -> None:
    """Save only what training changed, atomically: the peft adapter (LoRA), the CoLoRA factors
    and merges (with the head for ``colora``; ``colora`` are its ColoraSettings), the classifier
    ``head`` (linear) or the whole model (full). :func:`attach_trained` reads it back."""
    import shutil

    from safetensors.torch import save_file

    run_dir = Path(run_dir)
    if method in LORA_METHODS:
        tmp = run_dir / (ADAPTER_DIR + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        model.save_pretrained(str(tmp))
        shutil.rmtree(run_dir / ADAPTER_DIR, ignore_errors=True)
        tmp.rename(run_dir / ADAPTER_DIR)
    if method in COLORA_METHODS:
        from gi_deploy.training.colora import save_colora

        inner = model.get_base_model() if method in LORA_METHODS else model
        extra = head_state(inner.state_dict(), head) if method == "colora" else {}
        save_colora(inner, run_dir / COLORA_WEIGHTS, colora, merges, extra)
    if method in ADAPTER_METHODS:
        return
    state = model.state_dict()
    if method == "linear":
        state = head_state(state, head)
    path = run_dir / artifact_names(method)[0]
    tmp = path.with_suffix(".tmp")
    save_file({k: v.detach().cpu().contiguous() for k, v in state.items()}, str(tmp))
    tmp.replace(path)


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
    """``base`` with the run's trained weights: wrapped by its peft adapter (LoRA) and/or its
    CoLoRA layers, all un-merged, or with the trained head (linear) or full fine-tuned state
    (full) loaded in place."""
    run_dir = Path(run_dir)
    method = manifest["config"]["method"]
    head = manifest["model"]["classifier"]
    if method in ADAPTER_METHODS:
        model = base
        if method in LORA_METHODS:
            from peft import PeftModel
            adapter = run_dir / ADAPTER_DIR
            if not (adapter / "adapter_config.json").is_file():
                raise BundleError(f"adapter missing in {adapter}; the run did not finish an epoch")
            model = PeftModel.from_pretrained(base, str(adapter))
        if method in COLORA_METHODS:
            from gi_deploy.training.colora import load_colora
            from gi_deploy.training.config import ColoraSettings

            settings = ColoraSettings(**manifest["config"]["colora"])
            inner = model.get_base_model() if method in LORA_METHODS else model
            load_colora(inner, run_dir / COLORA_WEIGHTS, settings, head, head_in_file=method == "colora")
        return model
    from safetensors.torch import load_file

    path = run_dir / artifact_names(method)[0]
    if not path.is_file():
        raise BundleError(f"trained weights missing: {path}; the run did not finish an epoch")
    state = load_file(str(path))
    if method == "linear":
        expected = set(head_state(base.state_dict(), head))
        if set(state) != expected:
            raise BundleError(f"{path} holds {sorted(state)}, expected the classifier tensors {sorted(expected)}")
        base.load_state_dict(state, strict=False)
    else:
        base.load_state_dict(state, strict=True)
    return base


def stored_config(run_dir: Path) -> dict:
    """The resolved training config a run recorded (for ``--resume``)."""
    manifest = read_json(Path(run_dir) / RUN_MANIFEST, "run manifest")
    return dict(manifest["config"])


def load_run_model(run_dir: Path, device: torch.device | str = "cpu", manifest: dict | None = None) -> nn.Module:
    """The trained model in eval mode: base + adapters (peft LoRA and/or CoLoRA, un-merged) for
    adapter runs, the plain timm model for full fine-tuning and linear probes."""
    run_dir = Path(run_dir)
    manifest = manifest or read_run_manifest(run_dir)
    return attach_trained(rebuild_base(manifest, run_dir), manifest, run_dir).to(device).eval()
