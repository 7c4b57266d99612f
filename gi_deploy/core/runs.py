"""The training run folder's format (``<runs>/<source>/``), readable without torch: file names,
the manifest's format version, reading it, and listing the runs under a folder.

Run folder::

    run.json                    resolved config, classes, preprocessing, splits, base weights,
                                library versions, per-epoch history, best validation and test metrics
    splits/{train,val,test}.csv every split, one row per image (path, class[, video])
    adapter/                    lora: peft ``save_pretrained`` output of the best epoch (plain peft loads it)
    colora.safetensors          colora: the best epoch's CoLoRA factors, accumulated merges (and head)
    head.safetensors            linear: the best epoch's classifier
    model.safetensors           full: the best epoch's whole model
    base_weights.safetensors    only for a random-init base, which nothing else could rebuild
    checkpoint.pt               the last complete epoch: trained tensors, optimizer, scheduler, grad
                                scaler, every RNG state, early-stopping state (for --resume)
    metrics.jsonl               one line per epoch
    curves.png                  loss and accuracy per epoch

Which of the weights files a run holds is its method's ``artifact`` (core/methods.py).
"""

from __future__ import annotations

import logging
from pathlib import Path

from gi_deploy._io import read_json
from gi_deploy.errors import BundleError

log = logging.getLogger(__name__)

RUN_MANIFEST = "run.json"
RUN_FORMAT = "gi-deploy-run"
RUN_FORMAT_VERSION = 1
ADAPTER_DIR = "adapter"  # lora: peft save_pretrained output
ADAPTER_WEIGHTS = "adapter_model.safetensors"  # the weights file peft writes inside ADAPTER_DIR
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
RUN_DIRS = (ADAPTER_DIR, SPLITS_DIR)


def read_run_manifest(run_dir: Path, finished: bool = True) -> dict:
    """The run's ``run.json``; raises BundleError when missing or of another format, and (with
    ``finished``) when no epoch has been saved yet."""
    manifest = read_json(Path(run_dir) / RUN_MANIFEST, "run manifest")
    if manifest.get("format") != RUN_FORMAT or manifest.get("format_version") != RUN_FORMAT_VERSION:
        raise BundleError(f"{run_dir / RUN_MANIFEST} is not a gi-deploy run manifest v{RUN_FORMAT_VERSION}")
    if finished and manifest.get("best") is None:
        raise BundleError(f"run {run_dir} has no saved checkpoint yet (status: {manifest.get('status')}); "
                          "train it first")
    return manifest


def stored_config(run_dir: Path) -> dict:
    """The resolved training config a run recorded (for ``--resume``)."""
    return dict(read_json(Path(run_dir) / RUN_MANIFEST, "run manifest")["config"])


def list_runs(runs_dir: Path) -> list[str]:
    """Names of the sources with a run manifest under ``runs_dir`` (finished or not), sorted."""
    return sorted(p.parent.name for p in Path(runs_dir).glob(f"*/{RUN_MANIFEST}"))


def select_runs(runs_dir: Path, sources: list[str] | None = None, finished_only: bool = False) -> list[Path]:
    """The run folders a command works on: ``sources`` by name (each must have a run), or with
    none every run under ``runs_dir`` (with ``finished_only``, those with a saved epoch; the
    others are logged as skipped). Raises BundleError naming what is missing and what is there."""
    runs_dir = Path(runs_dir)
    trained = list_runs(runs_dir)
    if sources:
        missing = [s for s in sources if s not in trained]
        if missing:
            raise BundleError(f"no trained run for {', '.join(missing)} under {runs_dir}; "
                              f"trained: {', '.join(trained) or 'none'}")
        return [runs_dir / s for s in sources]
    if not trained:
        raise BundleError(f"no trained runs under {runs_dir}; run `gi-deploy train` first")
    if not finished_only:
        return [runs_dir / s for s in trained]
    finished = [s for s in trained if read_json(runs_dir / s / RUN_MANIFEST, "run manifest").get("best")]
    for s in sorted(set(trained) - set(finished)):
        log.warning("skipping %s: its run has no finished epoch yet", s)
    if not finished:
        raise BundleError(f"no finished training run under {runs_dir}; train a source first")
    return [runs_dir / s for s in finished]
