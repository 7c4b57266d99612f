"""One readable training loop for every method: AdamW, best-validation checkpoint, early stopping.

Run directory (``<out>/<source>/``)::

    run.json                    resolved config, classes, preprocessing, splits, base weights,
                                library versions, per-epoch history, best validation metrics
    adapter/                    LoRA: peft ``save_pretrained`` output (loads in plain peft)
    model.safetensors           full fine-tuning: the whole model
    base_weights.safetensors    only for a random-init base, which nothing else could rebuild
"""

from __future__ import annotations

import logging
import random
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from gi_deploy._io import library_versions, utc_now, write_json
from gi_deploy.errors import ConfigError
from gi_deploy.runtime.metrics import classification_metrics
from gi_deploy.runtime.preprocess import PreprocessSpec
from gi_deploy.training.config import TrainConfig
from gi_deploy.training.data import DatasetSplits, ImageDataset, discover_splits
from gi_deploy.training.model import apply_lora, classifier_name, count_parameters, create_base_model
from gi_deploy.training.run import (ADAPTER_DIR, FULL_WEIGHTS, RANDOM_BASE_WEIGHTS, RUN_FORMAT_VERSION, RUN_MANIFEST,
                                    load_run_model)

log = logging.getLogger(__name__)


@dataclass
class TrainResult:
    run_dir: Path
    best_epoch: int
    best_val: dict
    test: dict | None
    trainable_params: int
    total_params: int
    seconds: float


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda was requested but torch sees no CUDA device; use --device cpu")
    return torch.device(device)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader, device: torch.device, classes: list[str]) -> dict:
    """Metrics of ``model`` over ``loader`` (eval mode; restores the previous mode)."""
    was_training = model.training
    model.eval()
    y_true, y_pred = [], []
    for x, y in loader:
        logits = model(x.to(device, non_blocking=True))
        y_pred += logits.argmax(1).cpu().tolist()
        y_true += y.tolist()
    model.train(was_training)
    return classification_metrics(y_true, y_pred, classes)


def _save_trained(model: nn.Module, cfg: TrainConfig, run_dir: Path) -> None:
    """Save only what training changed: the adapter (LoRA) or the whole model (full)."""
    if cfg.method == "lora":
        tmp = run_dir / (ADAPTER_DIR + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        model.save_pretrained(str(tmp))
        shutil.rmtree(run_dir / ADAPTER_DIR, ignore_errors=True)
        tmp.rename(run_dir / ADAPTER_DIR)
    else:
        from safetensors.torch import save_file
        save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()},
                  str(run_dir / FULL_WEIGHTS))


def _loaders(ds: DatasetSplits, spec: PreprocessSpec, cfg: TrainConfig, device: torch.device):
    g = torch.Generator().manual_seed(cfg.seed)
    common = dict(batch_size=cfg.batch_size, num_workers=cfg.num_workers, pin_memory=device.type == "cuda",
                  persistent_workers=cfg.num_workers > 0)
    make = lambda split, train: ImageDataset(ds.root, ds.splits[split], spec, train=train, hflip=cfg.hflip,
                                             rotation_degrees=cfg.rotation_degrees)
    train = DataLoader(make("train", True), shuffle=True, generator=g, drop_last=False, **common)
    val = DataLoader(make("val", False), shuffle=False, **common)
    test = DataLoader(make("test", False), shuffle=False, **common) if ds.splits["test"] else None
    return train, val, test


def _check_run_dir(cfg: TrainConfig) -> None:
    if (cfg.run_dir / RUN_MANIFEST).exists() and not cfg.overwrite:
        raise ConfigError(f"{cfg.run_dir} already holds a run; pass --overwrite to replace it, or choose "
                          "another --out or source name")


def _prepare_run_dir(cfg: TrainConfig) -> Path:
    """Create the run folder. With ``cfg.overwrite``, a previous run there is removed whole, so no
    stale adapter or base of it can mix with the new one; called only once the new base is built."""
    run_dir = cfg.run_dir
    _check_run_dir(cfg)
    if (run_dir / RUN_MANIFEST).exists():
        for name in (RUN_MANIFEST, FULL_WEIGHTS, RANDOM_BASE_WEIGHTS):
            (run_dir / name).unlink(missing_ok=True)
        shutil.rmtree(run_dir / ADAPTER_DIR, ignore_errors=True)
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir


def train(cfg: TrainConfig, report: Callable[[str, dict], None] | None = None) -> TrainResult:
    """Train ``cfg.method`` on ``cfg.source``; returns the best-validation result.

    The best epoch's weights are saved as soon as they are found, so an interrupted run keeps
    its best checkpoint. ``report(event, data)`` is called with ``"start"`` (parameter counts,
    split sizes, device) and after each ``"epoch"`` (that epoch's record), for progress output."""
    report = report or (lambda event, data: None)
    t0 = time.time()
    _check_run_dir(cfg)  # before any heavy work
    device = resolve_device(cfg.device)
    ds = discover_splits(cfg.data_dir, cfg.val_fraction, cfg.test_fraction, cfg.seed)
    seed_everything(cfg.seed)
    model, base = create_base_model(cfg.model, len(ds.classes), cfg.pretrained, cfg.weights)
    head = classifier_name(model)
    spec = PreprocessSpec(size=(cfg.img_size, cfg.img_size), mean=tuple(model.pretrained_cfg["mean"]),
                          std=tuple(model.pretrained_cfg["std"]))
    run_dir = _prepare_run_dir(cfg)
    if base.kind == "random":  # nothing else could rebuild this base at export time
        from safetensors.torch import save_file
        save_file({k: v.contiguous() for k, v in model.state_dict().items() if not k.startswith(head + ".")},
                  str(run_dir / RANDOM_BASE_WEIGHTS))
        base.ref = RANDOM_BASE_WEIGHTS
    if cfg.method == "lora":
        model = apply_lora(model, cfg.lora)
    trainable, total = count_parameters(model)
    model.to(device)
    train_loader, val_loader, test_loader = _loaders(ds, spec, cfg, device)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.lr,
                                  weight_decay=cfg.weight_decay)
    loss_fn = nn.CrossEntropyLoss()
    manifest = {
        "format": "gi-deploy-run", "format_version": RUN_FORMAT_VERSION, "created": utc_now(),
        "source": cfg.source, "config": cfg.to_dict(), "device": str(device), "classes": ds.classes,
        "preprocess": spec.to_dict(), "base_weights": base.to_dict(),
        "model": {"name": cfg.model, "num_classes": len(ds.classes), "classifier": head},
        "params": {"trainable": trainable, "total": total},
        "artifact": ADAPTER_DIR if cfg.method == "lora" else FULL_WEIGHTS,
        "splits": ds.to_dict(), "versions": library_versions(),
        "history": [], "best": None, "test": None, "status": "training",
    }
    write_json(run_dir / RUN_MANIFEST, manifest)  # a crash before the first epoch leaves a run export refuses
    report("start", {"trainable": trainable, "total": total, "classes": ds.classes, "counts": ds.counts(),
                     "device": str(device), "base_weights": base.kind, "layout": ds.layout})
    best_acc, best_epoch, stale = -1.0, 0, 0
    for epoch in range(1, cfg.epochs + 1):
        model.train()
        t_epoch, total_loss, n_seen = time.time(), 0.0, 0
        for x, y in train_loader:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                loss = loss_fn(model(x), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total_loss += loss.item() * len(y)
            n_seen += len(y)
        val = evaluate(model, val_loader, device, ds.classes)
        record = {"epoch": epoch, "train_loss": total_loss / max(n_seen, 1), "val_accuracy": val["accuracy"],
                  "val_f1_weighted": val["f1_weighted"], "seconds": round(time.time() - t_epoch, 2)}
        improved = val["accuracy"] > best_acc
        if improved:
            best_acc, best_epoch, stale = val["accuracy"], epoch, 0
            _save_trained(model, cfg, run_dir)
            manifest["best"] = {"epoch": epoch, **{k: v for k, v in val.items() if k != "confusion_matrix"}}
        else:
            stale += 1
        record["best"] = improved
        manifest["history"].append(record)
        write_json(run_dir / RUN_MANIFEST, manifest)
        report("epoch", record)
        if stale >= cfg.patience:
            log.info("early stop after epoch %d: no val accuracy gain for %d epochs", epoch, cfg.patience)
            break
    test_metrics = None
    if test_loader is not None:
        best_model = load_run_model(run_dir, device=device, manifest=manifest)  # what was saved, reloaded
        test_metrics = evaluate(best_model, test_loader, device, ds.classes)
    manifest.update(test=test_metrics, status="done", seconds=round(time.time() - t0, 1))
    write_json(run_dir / RUN_MANIFEST, manifest)
    return TrainResult(run_dir=run_dir, best_epoch=best_epoch, best_val=manifest["best"], test=test_metrics,
                       trainable_params=trainable, total_params=total, seconds=time.time() - t0)
