"""One readable training loop for every method (lora, full, linear, colora, lora+colora): AdamW,
best-validation checkpoint, early stopping, CoLoRA merges every N epochs, resumable to the same result.

Run directory (``<out>/<source>/``)::

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
"""

from __future__ import annotations

import logging
import math
import os
import random
import shutil
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, WeightedRandomSampler

from gi_deploy._io import library_versions, read_json, utc_now, write_json
from gi_deploy.errors import BundleError, ConfigError, TrainingDiverged, TrainingInterrupted
from gi_deploy.runtime.metrics import classification_metrics
from gi_deploy.runtime.preprocess import PreprocessSpec
from gi_deploy.training.config import COLORA_METHODS, RESUME_MAY_CHANGE, TrainConfig, field_default
from gi_deploy.training.data import Augment, DatasetSplits, ImageDataset, subsample_per_class
from gi_deploy.training.memory import PeakMemory, cpu_baseline
from gi_deploy.training.colora import colora_summary, is_merge_epoch, merge_all
from gi_deploy.training.model import (BaseWeights, apply_method, classifier_name, count_parameters, create_base_model,
                                      train_mode)
from gi_deploy.training.run import (CHECKPOINT, CURVES_PNG, METRICS_JSONL, RANDOM_BASE_WEIGHTS, RUN_DIRS, RUN_FILES,
                                    RUN_FORMAT_VERSION, RUN_MANIFEST, SPLITS_DIR, artifact_names, load_run_model,
                                    rebuild_base, save_trained)
from gi_deploy.training.sources import load_splits

log = logging.getLogger(__name__)

Report = Callable[[str, dict], None]


@dataclass
class TrainResult:
    run_dir: Path
    best_epoch: int
    best_val: dict
    test: dict | None
    trainable_params: int
    total_params: int
    seconds: float
    history: list[dict] = field(default_factory=list)


@dataclass
class LoopState:
    """Where the epoch loop stands; checkpointed with the weights so a resumed run continues it."""

    epoch: int = 0  # last complete epoch
    best_acc: float = -1.0
    best_epoch: int = 0
    stale: int = 0
    merges: int = 0  # CoLoRA merges done


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda was requested but torch sees no CUDA device; use --device cpu")
    return torch.device(device)


def resolve_amp(amp: str, device: torch.device) -> torch.dtype | None:
    """Autocast dtype: ``auto`` = bf16 on a CUDA GPU that supports it, fp16 (with a grad scaler)
    on one that does not, off on CPU."""
    if amp == "off" or (amp == "auto" and device.type != "cuda"):
        return None
    if amp == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if amp == "fp16" and device.type != "cuda":
        raise ConfigError("--amp fp16 needs a CUDA device; use --amp bf16 or --amp off on CPU")
    return torch.bfloat16 if amp == "bf16" else torch.float16


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _rng_state(loader_gen: torch.Generator) -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
             "loader": loader_gen.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict, loader_gen: torch.Generator) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    loader_gen.set_state(state["loader"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _trained_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """What training changes: trainable parameters plus every buffer (norm statistics update in
    train mode even in frozen layers)."""
    state = {n: p.detach().cpu().clone() for n, p in model.named_parameters() if p.requires_grad}
    state.update({n: b.detach().cpu().clone() for n, b in model.named_buffers()})
    return state


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader, device: torch.device, classes: list[str],
             amp_dtype: torch.dtype | None = None, channels_last: bool = False) -> dict:
    """Metrics of ``model`` over ``loader`` (eval mode; restores the previous mode)."""
    was_training = model.training
    model.eval()
    y_true, y_pred = [], []
    for x, y in loader:
        x = x.to(device, non_blocking=True)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            logits = model(x)
        y_pred += logits.argmax(1).cpu().tolist()
        y_true += y.tolist()
    if was_training:
        train_mode(model)
    return classification_metrics(y_true, y_pred, classes)


def _train_counts(ds: DatasetSplits) -> list[int]:
    counts = Counter(y for _, y in ds.splits["train"])
    return [counts[i] for i in range(len(ds.classes))]


def _loaders(ds: DatasetSplits, spec: PreprocessSpec, cfg: TrainConfig, device: torch.device,
             g: torch.Generator) -> tuple[DataLoader, DataLoader, DataLoader | None]:
    workers = cfg.num_workers if cfg.num_workers is not None else (
        min(8, os.cpu_count() or 1) if device.type == "cuda" else 0)
    common = dict(batch_size=cfg.batch_size, num_workers=workers, pin_memory=device.type == "cuda",
                  persistent_workers=workers > 0)
    augment = Augment(hflip=cfg.hflip, vflip=cfg.vflip, rotation_degrees=cfg.rotation_degrees,
                      color_jitter=cfg.color_jitter)
    train_set = ImageDataset(ds.root, ds.splits["train"], spec, augment=augment)
    if cfg.balance == "sampler":  # every class drawn equally often, with replacement
        counts = _train_counts(ds)
        weights = [1.0 / counts[y] for _, y in ds.splits["train"]]
        sampler = WeightedRandomSampler(weights, num_samples=len(weights), replacement=True, generator=g)
        train = DataLoader(train_set, sampler=sampler, generator=g, **common)
    else:
        train = DataLoader(train_set, shuffle=True, generator=g, **common)
    val = DataLoader(ImageDataset(ds.root, ds.splits["val"], spec), shuffle=False, **common)
    test = DataLoader(ImageDataset(ds.root, ds.splits["test"], spec), shuffle=False, **common) \
        if ds.splits["test"] else None
    return train, val, test


def _loss_fn(ds: DatasetSplits, cfg: TrainConfig, device: torch.device) -> nn.Module:
    if cfg.balance != "weighted-loss":
        return nn.CrossEntropyLoss()
    counts = _train_counts(ds)  # inverse class frequency, mean weight 1 over the training images
    n = sum(counts)
    weights = torch.tensor([n / (len(counts) * c) if c else 0.0 for c in counts], dtype=torch.float32)
    return nn.CrossEntropyLoss(weight=weights.to(device))


def _scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig):
    if cfg.scheduler == "cosine":  # per epoch over the maximum number of epochs
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=cfg.epochs)
    if cfg.scheduler == "plateau":  # on validation accuracy
        return torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode="max", factor=0.1,
                                                          patience=max(1, cfg.patience // 2))
    return None


def _check_run_dir(cfg: TrainConfig) -> None:
    if (cfg.run_dir / RUN_MANIFEST).exists() and not (cfg.overwrite or cfg.resume):
        raise ConfigError(f"{cfg.run_dir} already holds a run; pass --resume to continue it, --overwrite to "
                          "replace it, or choose another --out or source name")


def _prepare_run_dir(cfg: TrainConfig) -> Path:
    """Create the run folder. With ``cfg.overwrite``, a previous run there is removed whole, so no
    stale adapter or base of it can mix with the new one; called only once the new base is built."""
    run_dir = cfg.run_dir
    _check_run_dir(cfg)
    for name in RUN_FILES:
        (run_dir / name).unlink(missing_ok=True)
    for name in RUN_DIRS:
        shutil.rmtree(run_dir / name, ignore_errors=True)
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir


def _load_for_resume(cfg: TrainConfig) -> tuple[dict, dict]:
    """The run's manifest and last checkpoint; refuses when there is nothing to resume or the
    config differs in anything but ``RESUME_MAY_CHANGE``."""
    run_dir = cfg.run_dir
    if not (run_dir / RUN_MANIFEST).is_file():
        raise ConfigError(f"nothing to resume in {run_dir}: no {RUN_MANIFEST}; drop --resume to start a run")
    manifest = read_json(run_dir / RUN_MANIFEST, "run manifest")
    if manifest.get("status") == "done":
        raise ConfigError(f"run {run_dir} already finished; pass --overwrite to train it again")
    if not (run_dir / CHECKPOINT).is_file():
        raise ConfigError(f"run {run_dir} stopped before its first epoch finished ({CHECKPOINT} missing); "
                          "start it again with --overwrite")
    old, new = manifest["config"], cfg.to_dict()
    # a key the run did not record was added to gi-deploy after it started: it ran with the default
    changed = sorted(k for k in new if k not in RESUME_MAY_CHANGE and old.get(k, field_default(k)) != new[k])
    if changed:
        raise ConfigError(f"--resume with a different config: {', '.join(f'{k} {old.get(k)!r} -> {new[k]!r}' for k in changed)}; "
                          "resume with the original settings, or start again with --overwrite")
    checkpoint = torch.load(run_dir / CHECKPOINT, map_location="cpu", weights_only=False)
    return manifest, checkpoint


def _write_metrics_jsonl(run_dir: Path, history: list[dict]) -> None:
    import json

    tmp = run_dir / (METRICS_JSONL + ".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in history), encoding="utf-8")
    tmp.replace(run_dir / METRICS_JSONL)


def _save_checkpoint(run_dir: Path, model: nn.Module, optimizer, scheduler, scaler, state: LoopState,
                     loader_gen: torch.Generator) -> None:
    tmp = run_dir / (CHECKPOINT + ".tmp")
    torch.save({"trained": _trained_state(model), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict() if scheduler is not None else None,
                "scaler": scaler.state_dict(), "loop": vars(state).copy(), "rng": _rng_state(loader_gen)}, tmp)
    tmp.replace(run_dir / CHECKPOINT)  # atomic: an interrupt never leaves half a checkpoint


def plot_curves(history: list[dict], path: Path, title: str) -> None:
    """Training loss and train/val accuracy per epoch, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [r["epoch"] for r in history]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    ax_loss.plot(epochs, [r["train_loss"] for r in history], marker="o")
    ax_loss.set(xlabel="epoch", ylabel="training loss", title="loss")
    ax_acc.plot(epochs, [100 * r["train_accuracy"] for r in history], marker="o", label="train")
    ax_acc.plot(epochs, [100 * r["val_accuracy"] for r in history], marker="o", label="val")
    best = [r for r in history if r["best"]]
    if best:
        ax_acc.axvline(best[-1]["epoch"], color="grey", linestyle="--", label=f"best (epoch {best[-1]['epoch']})")
    ax_acc.set(xlabel="epoch", ylabel="accuracy (%)", title="accuracy")
    ax_acc.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _run_epoch(model: nn.Module, loader: DataLoader, optimizer, scaler, loss_fn, device: torch.device,
               amp_dtype: torch.dtype | None, channels_last: bool, epoch: int, report: Report) -> tuple[float, float]:
    """One pass over the training data; returns (mean loss, accuracy). Raises TrainingDiverged on a
    non-finite loss before the optimizer can apply it."""
    train_mode(model)
    total_loss, seen = 0.0, 0
    correct = torch.zeros((), dtype=torch.long, device=device)  # summed on the device: no extra sync per step
    steps, t0 = len(loader), time.perf_counter()
    for step, (x, y) in enumerate(loader, start=1):
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            logits = model(x)
            loss = loss_fn(logits, y)
        loss_value = loss.item()
        if not math.isfinite(loss_value):
            raise TrainingDiverged(f"training loss became {loss_value} at epoch {epoch}, step {step}/{steps}; "
                                   "the last good checkpoint is kept. Lower --lr, or try --amp off")
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        total_loss += loss_value * len(y)
        correct += (logits.argmax(1) == y).sum()
        seen += len(y)
        report("batch", {"epoch": epoch, "step": step, "steps": steps, "loss": loss_value,
                         "img_per_s": seen / max(time.perf_counter() - t0, 1e-9)})
    return total_loss / max(seen, 1), correct.item() / max(seen, 1)


def train(cfg: TrainConfig, report: Report | None = None) -> TrainResult:
    """Train ``cfg.method`` on ``cfg.source``; returns the best-validation result.

    The best epoch's weights are saved as soon as they are found and every epoch ends with an
    atomic checkpoint, so Ctrl-C (raised as TrainingInterrupted) or a crash loses at most the
    epoch in progress, and ``cfg.resume`` continues to the same result as an uninterrupted run.
    ``report(event, data)`` receives ``"start"``, ``"batch"`` and ``"epoch"`` events for progress output."""
    report = report or (lambda event, data: None)
    t0 = time.time()
    manifest, checkpoint = _load_for_resume(cfg) if cfg.resume else (None, None)
    if not cfg.resume:
        _check_run_dir(cfg)  # before any heavy work
    device = resolve_device(cfg.device)
    amp_dtype = resolve_amp(cfg.amp, device)
    channels_last = cfg.channels_last if cfg.channels_last is not None else device.type == "cuda"
    ds = load_splits(cfg.source, cfg.data_dir, cfg.val_fraction, cfg.test_fraction, cfg.seed, cfg.split)
    if cfg.label_fraction < 1.0:
        ds.splits["train"] = subsample_per_class(ds.splits["train"], cfg.label_fraction, cfg.seed)
        ds.label_fraction = cfg.label_fraction
    if not ds.splits["val"]:
        raise ConfigError(f"{cfg.source}: the validation split is empty; early stopping needs one")
    splits_dict = ds.to_dict()
    if manifest is not None and manifest["splits"]["files"] != splits_dict["files"]:
        raise ConfigError(f"the data under {cfg.data_dir} changed since run {cfg.run_dir} started (its splits "
                          "differ); resuming would mix two datasets. Start again with --overwrite")
    memory_baseline = cpu_baseline() if device.type == "cpu" else None  # peaks count model + optimizer + activations
    seed_everything(cfg.seed)
    if manifest is not None:
        model = rebuild_base(manifest, cfg.run_dir)
        base = BaseWeights(**manifest["base_weights"])
        run_dir = cfg.run_dir
    else:
        model, base = create_base_model(cfg.model, len(ds.classes), cfg.pretrained, cfg.weights)
        run_dir = _prepare_run_dir(cfg)
    head = classifier_name(model)
    spec = PreprocessSpec(size=(cfg.img_size, cfg.img_size), mean=tuple(model.pretrained_cfg["mean"]),
                          std=tuple(model.pretrained_cfg["std"]), resize=cfg.resize,
                          crop_pct=cfg.crop_pct if cfg.resize == "crop" else 1.0)
    if base.kind == "random" and manifest is None:  # nothing else could rebuild this base at export time
        from safetensors.torch import save_file
        save_file({k: v.contiguous() for k, v in model.state_dict().items() if not k.startswith(head + ".")},
                  str(run_dir / RANDOM_BASE_WEIGHTS))
        base.ref = RANDOM_BASE_WEIGHTS
    deployed = sum(p.numel() for p in model.parameters())  # what the exported (merged) model holds
    model = apply_method(model, cfg.method, cfg.lora, cfg.colora)
    trainable, total = count_parameters(model)
    colora = colora_summary(model) if cfg.method in COLORA_METHODS else None
    model.to(device)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    g = torch.Generator().manual_seed(cfg.seed)
    train_loader, val_loader, test_loader = _loaders(ds, spec, cfg, device, g)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.lr,
                                  weight_decay=cfg.weight_decay)
    scheduler = _scheduler(optimizer, cfg)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    loss_fn = _loss_fn(ds, cfg, device)
    step_model = torch.compile(model) if cfg.compile else model
    state = LoopState()
    if checkpoint is not None:
        needed = {n for n, p in model.named_parameters() if p.requires_grad}
        unexpected = model.load_state_dict(checkpoint["trained"], strict=False).unexpected_keys
        if unexpected or needed - set(checkpoint["trained"]):
            raise BundleError(f"{run_dir / CHECKPOINT} does not fit this model (unexpected: {unexpected[:3]}, "
                              f"missing: {sorted(needed - set(checkpoint['trained']))[:3]}); start again with --overwrite")
        optimizer.load_state_dict(checkpoint["optimizer"])
        if scheduler is not None:
            scheduler.load_state_dict(checkpoint["scheduler"])
        scaler.load_state_dict(checkpoint["scaler"])
        state = LoopState(**checkpoint["loop"])
        _set_rng_state(checkpoint["rng"], g)
        manifest["history"] = manifest["history"][:state.epoch]  # drop epochs past the checkpoint
        manifest.update(config=cfg.to_dict(), device=str(device), status="training",
                        resumed=manifest.get("resumed", []) + [{"at_epoch": state.epoch, "time": utc_now()}])
    else:
        manifest = {
            "format": "gi-deploy-run", "format_version": RUN_FORMAT_VERSION, "created": utc_now(),
            "source": cfg.source, "config": cfg.to_dict(), "device": str(device), "classes": ds.classes,
            "preprocess": spec.to_dict(), "base_weights": base.to_dict(),
            "model": {"name": cfg.model, "num_classes": len(ds.classes), "classifier": head},
            "params": {"trainable": trainable, "total": total, "deployed": deployed},
            "artifact": list(artifact_names(cfg.method)), "splits": splits_dict, "versions": library_versions(),
            "history": [], "best": None, "test": None, "status": "training",
        }
    manifest["runtime"] = {"amp": str(amp_dtype).replace("torch.", "") if amp_dtype else "off",
                           "channels_last": channels_last, "compile": cfg.compile,
                           "num_workers": train_loader.num_workers}
    write_json(run_dir / RUN_MANIFEST, manifest)  # a crash before the first epoch leaves a run export refuses
    ds.write_csvs(run_dir / SPLITS_DIR)
    report("start", {"trainable": trainable, "total": total, "deployed": deployed, "colora": colora,
                     "classes": ds.classes, "counts": ds.counts(),
                     "device": str(device), "base_weights": base.kind, "license": base.license,
                     "layout": ds.layout, "notes": ds.notes, "excluded": ds.excluded,
                     "resumed_from": state.epoch if cfg.resume else None, **manifest["runtime"]})
    try:
        for epoch in range(state.epoch + 1, cfg.epochs + 1):
            if state.stale >= cfg.patience:
                break  # a resumed run that had already stopped early
            t_epoch = time.time()
            with PeakMemory(device, baseline=memory_baseline) as mem:
                train_loss, train_acc = _run_epoch(step_model, train_loader, optimizer, scaler, loss_fn, device,
                                                   amp_dtype, channels_last, epoch, report)
                merged = colora is not None and is_merge_epoch(epoch, cfg.colora.merge_every)
                if merged:  # K0 += K_p * K_d, b0 += db; reset the factors (and their optimizer moments)
                    merge_all(model, optimizer)
                    state.merges += 1
                val = evaluate(step_model, val_loader, device, ds.classes, amp_dtype, channels_last)
            seconds = time.time() - t_epoch
            record = {"epoch": epoch, "train_loss": train_loss, "train_accuracy": train_acc,
                      "val_accuracy": val["accuracy"], "val_f1_weighted": val["f1_weighted"], "val_mcc": val["mcc"],
                      "lr": optimizer.param_groups[0]["lr"], "seconds": round(seconds, 2),
                      "img_per_s": round(len(ds.splits["train"]) / max(seconds, 1e-9), 1),
                      "peak_mem_mib": round(mem.peak_mib, 1) if mem.peak_mib is not None else None}
            if colora is not None:
                record["colora_merged"] = merged
            if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
                scheduler.step(val["accuracy"])
            elif scheduler is not None:
                scheduler.step()
            improved = val["accuracy"] > state.best_acc
            if improved:
                state.best_acc, state.best_epoch, state.stale = val["accuracy"], epoch, 0
                save_trained(model, cfg.method, run_dir, head, cfg.colora, state.merges)
                manifest["best"] = {"epoch": epoch, **{k: v for k, v in val.items() if k != "confusion_matrix"}}
                if colora is not None:
                    manifest["best"]["colora_merges"] = state.merges
            else:
                state.stale += 1
            state.epoch = epoch
            record["best"] = improved
            if colora is not None:  # Table 4's counts, and how many merges the run and its saved best hold
                manifest["colora"] = {**colora, "merge_every": cfg.colora.merge_every, "merges": state.merges,
                                      "merges_in_best": manifest["best"]["colora_merges"]}
            manifest["history"].append(record)
            _save_checkpoint(run_dir, model, optimizer, scheduler, scaler, state, g)
            _write_metrics_jsonl(run_dir, manifest["history"])
            write_json(run_dir / RUN_MANIFEST, manifest)
            report("epoch", record)
            if state.stale >= cfg.patience:
                log.info("early stop after epoch %d: no val accuracy gain for %d epochs", epoch, cfg.patience)
                break
    except KeyboardInterrupt:
        manifest["status"] = "interrupted"
        write_json(run_dir / RUN_MANIFEST, manifest)
        raise TrainingInterrupted(
            f"interrupted; epochs 1-{state.epoch} are checkpointed in {run_dir}. Continue with the same command "
            "plus --resume" if state.epoch else f"interrupted before the first epoch finished; nothing to resume "
            f"in {run_dir}") from None
    except TrainingDiverged:
        manifest["status"] = "diverged"
        write_json(run_dir / RUN_MANIFEST, manifest)
        raise
    plot_curves(manifest["history"], run_dir / CURVES_PNG, f"{cfg.source} ({cfg.method}, {cfg.model})")
    test_metrics = None
    if test_loader is not None:
        best_model = load_run_model(run_dir, device=device, manifest=manifest)  # what was saved, reloaded
        test_metrics = evaluate(best_model, test_loader, device, ds.classes)
    manifest.update(test=test_metrics, status="done", seconds=round(time.time() - t0, 1))
    write_json(run_dir / RUN_MANIFEST, manifest)
    return TrainResult(run_dir=run_dir, best_epoch=state.best_epoch, best_val=manifest["best"], test=test_metrics,
                       trainable_params=trainable, total_params=total, seconds=time.time() - t0,
                       history=manifest["history"])
