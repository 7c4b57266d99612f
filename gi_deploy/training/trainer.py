"""One readable training loop for every method of the registry (core/methods.py): AdamW,
best-validation checkpoint, early stopping, resumable to the same result. What an adapter kind does
of its own (its counts at the start, a merge at an epoch's end) is a named hook of the kind
(model/adapters.py ``AdapterKind``), called here without knowing which kind it is.

The run folder it writes is described in core/runs.py.
"""

from __future__ import annotations

import logging
import math
import os
import random
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, WeightedRandomSampler

from gi_deploy._io import library_versions, utc_now
from gi_deploy.core.methods import MethodSpec, method_spec
from gi_deploy.core.metrics import classification_metrics
from gi_deploy.core.preprocess import PreprocessSpec
from gi_deploy.core.runs import (
    CHECKPOINT,
    CURVES_PNG,
    RANDOM_BASE_WEIGHTS,
    SPLITS_DIR,
    RunModelInfo,
    RunRecord,
)
from gi_deploy.errors import BundleError, ConfigError, TrainingDiverged, TrainingInterrupted
from gi_deploy.model.adapters import AdapterKind, adapter_kinds, apply_method, save_trained
from gi_deploy.model.base import BaseWeights, classifier_name, count_parameters, create_base_model, train_mode
from gi_deploy.model.run import load_run_model, rebuild_base
from gi_deploy.training import distributed
from gi_deploy.training.checkpoint import (
    LoopState,
    check_run_dir,
    load_for_resume,
    plot_curves,
    prepare_run_dir,
    rng_state,
    save_checkpoint,
    set_rng_state,
    write_metrics_jsonl,
)
from gi_deploy.training.compiled import adamw_options, compile_model
from gi_deploy.training.config import TrainConfig
from gi_deploy.training.data import Augment, DatasetSplits, ImageDataset, subsample_per_class
from gi_deploy.training.device_input import DeviceFeed, augments_on_device
from gi_deploy.training.distributed import Dist
from gi_deploy.training.memory import PeakMemory, cpu_baseline
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


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: DataLoader,
    device: torch.device,
    classes: list[str],
    amp_dtype: torch.dtype | None = None,
    channels_last: bool = False,
    feed: DeviceFeed | None = None,
    d: Dist = Dist(),
) -> dict:
    """Metrics of ``model`` over ``loader`` (eval mode; restores the previous mode). ``feed`` turns
    a loader batch into the model's input (default: move it to ``device``). Under torchrun each
    rank holds a shard of the data and the predictions are gathered: every rank gets the metrics of
    the whole split."""
    was_training = model.training
    model.eval()
    y_true, y_pred = [], []
    for x, y in loader:
        if feed is not None:
            x = feed(x, train=False)
        else:
            x = x.to(device, non_blocking=True)
            x = x.contiguous(memory_format=torch.channels_last) if channels_last else x
        with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            logits = model(x)
        y_pred += logits.argmax(1).cpu().tolist()
        y_true += y.tolist()
    if was_training:
        train_mode(model)
    y_true, y_pred = distributed.gather_lists(d, y_true, y_pred)
    return classification_metrics(y_true, y_pred, classes)


def _train_counts(ds: DatasetSplits) -> list[int]:
    counts = Counter(y for _, y in ds.splits["train"])
    return [counts[i] for i in range(len(ds.classes))]


def _augment(cfg: TrainConfig) -> Augment:
    return Augment(
        hflip=cfg.hflip, vflip=cfg.vflip, rotation_degrees=cfg.rotation_degrees, color_jitter=cfg.color_jitter
    )


def loader_workers(cfg: TrainConfig, device: torch.device) -> int:
    """DataLoader workers: 0 on the CPU (the model needs the cores), every core but one on CUDA
    (the main process feeds the GPU), at most 32."""
    if cfg.num_workers is not None:
        return cfg.num_workers
    return (
        max(1, min(32, (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1) - 1))
        if device.type == "cuda"
        else 0
    )


def _loaders(
    ds: DatasetSplits,
    spec: PreprocessSpec,
    cfg: TrainConfig,
    device: torch.device,
    g: torch.Generator,
    d: Dist = Dist(),
) -> tuple[DataLoader, DataLoader, DataLoader | None]:
    workers = loader_workers(cfg, device)
    # Workers are started afresh each epoch (not persistent), seeded from a draw of the loader's generator (the
    # global RNG for val/test): every epoch's randomness then follows from the checkpointed RNG states, and a
    # resumed run goes on exactly as the uninterrupted one. Persistent workers would carry their random streams
    # on from epoch 1 and draw no new seed, which a resumed run cannot reproduce.
    common = dict(
        batch_size=distributed.per_rank_batch(cfg.batch_size, d),
        num_workers=workers,
        pin_memory=device.type == "cuda",
        persistent_workers=False,
        **({"prefetch_factor": 4} if workers > 0 else {}),
    )
    augment = _augment(cfg)
    pixels = augments_on_device(device, augment)  # uint8 to the GPU, augmented there
    train_set = ImageDataset(ds.root, ds.splits["train"], spec, augment=augment, pixels=pixels)
    ddp_sampler = distributed.train_sampler(train_set, d, g)  # this rank's share of what shuffle=True draws
    if ddp_sampler is not None:
        if cfg.balance == "sampler":
            raise ConfigError(
                "--balance sampler is not available under torchrun (it would draw each rank's batches "
                "independently); use --balance weighted-loss"
            )
        train = DataLoader(train_set, sampler=ddp_sampler, generator=g, **common)
    elif cfg.balance == "sampler":  # every class drawn equally often, with replacement
        counts = _train_counts(ds)
        weights = [1.0 / counts[y] for _, y in ds.splits["train"]]
        sampler = WeightedRandomSampler(weights, num_samples=len(weights), replacement=True, generator=g)
        train = DataLoader(train_set, sampler=sampler, generator=g, **common)
    else:
        train = DataLoader(train_set, shuffle=True, generator=g, **common)
    val = DataLoader(
        distributed.shard(ImageDataset(ds.root, ds.splits["val"], spec, pixels=pixels), d), shuffle=False, **common
    )
    test = (
        DataLoader(
            distributed.shard(ImageDataset(ds.root, ds.splits["test"], spec, pixels=pixels), d), shuffle=False, **common
        )
        if ds.splits["test"]
        else None
    )
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
        return torch.optim.lr_scheduler.ReduceLROnPlateau(
            optimizer, mode="max", factor=0.1, patience=max(1, cfg.patience // 2)
        )
    return None


def _run_epoch(
    model: nn.Module,
    loader: DataLoader,
    optimizer,
    scaler,
    loss_fn,
    device: torch.device,
    amp_dtype: torch.dtype | None,
    feed: DeviceFeed,
    epoch: int,
    report: Report,
    d: Dist = Dist(),
) -> dict:
    """One pass over the training data; returns the mean loss and the accuracy (over every rank's
    images under torchrun), the seconds to the end of the first step (loader start-up, cuDNN
    autotuning, a compile: the warm-up) and the images/s of the steps after it (the steady rate, of
    all ranks). Raises TrainingDiverged on a non-finite loss before the optimizer can apply it (under
    torchrun that rank exits and the launcher stops the others)."""
    train_mode(model)
    total_loss, seen = 0.0, 0
    correct = torch.zeros((), dtype=torch.long, device=device)  # summed on the device: no extra sync per step
    steps, t0 = len(loader), time.perf_counter()
    first_step_s, after_first = None, 0
    for step, (x, y) in enumerate(loader, start=1):
        x, y = feed(x, train=True), y.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            logits = model(x)
            loss = loss_fn(logits, y)
        loss_value = loss.item()
        if not math.isfinite(loss_value):
            raise TrainingDiverged(
                f"training loss became {loss_value} at epoch {epoch}, step {step}/{steps}; "
                "the last good checkpoint is kept. Lower --lr, or try --amp off"
            )
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        total_loss += loss_value * len(y)
        correct += (logits.argmax(1) == y).sum()
        seen += len(y)
        if first_step_s is None:  # loss.item() above synchronised: the first step is done
            first_step_s = time.perf_counter() - t0
        else:
            after_first += len(y)
        report(
            "batch",
            {
                "epoch": epoch,
                "step": step,
                "steps": steps,
                "loss": loss_value,
                "img_per_s": d.world * seen / max(time.perf_counter() - t0, 1e-9),
            },
        )
    steady = after_first / max(time.perf_counter() - t0 - (first_step_s or 0.0), 1e-9) if after_first else None
    total_loss, n_correct, seen = distributed.all_sum(d, total_loss, float(correct.item()), float(seen))
    return {
        "loss": total_loss / max(seen, 1),
        "accuracy": n_correct / max(seen, 1),
        "first_step_s": round(first_step_s or 0.0, 3),
        "steady_img_per_s": round(d.world * steady, 1) if steady else None,
    }


@dataclass
class _Run:
    """Everything one training run holds between its steps: the config and where it runs, the data,
    the model (``step_model`` is the compiled one when ``cfg.compile``), the optimisation state and
    the run manifest being written. ``kinds``: the adapter kinds the method carries, ``settings``
    each kind's settings, ``summaries`` what their ``summary`` hooks reported."""

    cfg: TrainConfig
    run_dir: Path
    device: torch.device
    amp_dtype: torch.dtype | None
    channels_last: bool
    ds: DatasetSplits
    model: nn.Module
    step_model: nn.Module
    method: MethodSpec
    settings: dict
    head: str
    loaders: tuple[DataLoader, DataLoader, DataLoader | None]
    generator: torch.Generator
    optimizer: torch.optim.Optimizer
    scheduler: Any
    scaler: torch.amp.GradScaler
    loss_fn: nn.Module
    feed: DeviceFeed
    manifest: RunRecord | None
    kinds: tuple[AdapterKind, ...]
    summaries: dict[str, dict]
    memory_baseline: int | None
    state: LoopState = field(default_factory=LoopState)
    dist: Dist = field(default_factory=Dist)  # this process's rank under torchrun
    eval_model: nn.Module | None = None  # step_model without DDP (evaluation runs on unequal shards)

    @property
    def merging(self) -> list[str]:
        """The adapter kinds with an ``epoch_end`` hook (a merge): the loop counts their merges."""
        return [k.name for k in self.kinds if k.epoch_end is not None]


def _load_data(cfg: TrainConfig, manifest: RunRecord | None) -> DatasetSplits:
    """The source's splits (label fraction applied); a resumed run must find the same ones."""
    ds = load_splits(cfg.source, cfg.data_dir, cfg.val_fraction, cfg.test_fraction, cfg.seed, cfg.split)
    if cfg.label_fraction < 1.0:
        ds.splits["train"] = subsample_per_class(ds.splits["train"], cfg.label_fraction, cfg.seed)
        ds.label_fraction = cfg.label_fraction
    if not ds.splits["val"]:
        raise ConfigError(f"{cfg.source}: the validation split is empty; early stopping needs one")
    if manifest is not None and manifest.splits["files"] != ds.to_dict()["files"]:
        raise ConfigError(
            f"the data under {cfg.data_dir} changed since run {cfg.run_dir} started (its splits "
            "differ); resuming would mix two datasets. Start again with --overwrite"
        )
    return ds


def _base_model(
    cfg: TrainConfig, ds: DatasetSplits, manifest: RunRecord | None, main: bool = True
) -> tuple[nn.Module, BaseWeights, Path]:
    """The base the run trains from (a resumed run's own, by fingerprint) and the run folder. A
    random-init base is saved in the run, since nothing else could rebuild it at export time."""
    if manifest is not None:
        return rebuild_base(manifest, cfg.run_dir), BaseWeights(**manifest.base_weights), cfg.run_dir
    model, base = create_base_model(cfg.model, len(ds.classes), cfg.pretrained, cfg.weights)
    if not main:  # only rank 0 writes the run folder; DDP gives every rank rank 0's weights anyway
        if base.kind == "random":
            base.ref = RANDOM_BASE_WEIGHTS
        return model, base, cfg.run_dir
    run_dir = prepare_run_dir(cfg)
    if base.kind == "random":
        from safetensors.torch import save_file

        head = classifier_name(model)
        save_file(
            {k: v.contiguous() for k, v in model.state_dict().items() if not k.startswith(head + ".")},
            str(run_dir / RANDOM_BASE_WEIGHTS),
        )
        base.ref = RANDOM_BASE_WEIGHTS
    return model, base, run_dir


def _prepare(cfg: TrainConfig, report: Report) -> _Run:
    """Check, load and build everything before the first step; write the run manifest (a crash
    before the first epoch leaves a run that export refuses) and the split CSVs."""
    d, device = distributed.setup(resolve_device(cfg.device))  # under torchrun: join the job, cuda:LOCAL_RANK
    manifest, checkpoint = load_for_resume(cfg) if cfg.resume else (None, None)
    if not cfg.resume and d.main:
        check_run_dir(cfg)  # before any heavy work
    distributed.barrier(d)  # every rank has read the run folder before rank 0 writes to it
    amp_dtype = resolve_amp(cfg.amp, device)
    channels_last = cfg.channels_last if cfg.channels_last is not None else device.type == "cuda"
    ds, split_hash = distributed.share_splits(lambda: _load_data(cfg, manifest), d)  # decided on rank 0
    memory_baseline = cpu_baseline() if device.type == "cpu" else None  # peaks count model + optimizer + activations
    seed_everything(cfg.seed)
    model, base, run_dir = _base_model(cfg, ds, manifest, d.main)
    head = classifier_name(model)
    spec = (
        manifest.preprocess
        if manifest is not None
        # a resumed run's own
        else PreprocessSpec(
            size=(cfg.img_size, cfg.img_size),
            mean=tuple(model.pretrained_cfg["mean"]),
            std=tuple(model.pretrained_cfg["std"]),
            resize=cfg.resize,
            crop_pct=cfg.crop_pct if cfg.resize == "crop" else 1.0,
            decode=cfg.decode,
        )
    )
    deployed = sum(p.numel() for p in model.parameters())  # what the exported (merged) model holds
    method, settings, kinds = method_spec(cfg.method), cfg.adapter_settings(), adapter_kinds(cfg.method)
    model = apply_method(model, method, **settings)
    summaries = {k.name: k.summary(model, settings[k.name]) for k in kinds if k.summary is not None}
    trainable, total = count_parameters(model)
    model.to(device)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    g = torch.Generator().manual_seed(cfg.seed)
    optimizer = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad],
        lr=cfg.lr,
        weight_decay=cfg.weight_decay,
        **adamw_options(device, cfg.compile),
    )
    eval_model, compile_cache = compile_model(model) if cfg.compile else (model, None)
    run = _Run(
        cfg,
        run_dir,
        device,
        amp_dtype,
        channels_last,
        ds,
        model,
        distributed.wrap(eval_model, d, device),
        method,
        settings,
        head,
        _loaders(ds, spec, cfg, device, g, d),
        g,
        optimizer,
        _scheduler(optimizer, cfg),
        torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16),
        _loss_fn(ds, cfg, device),
        DeviceFeed(spec, device, channels_last, _augment(cfg), augments_on_device(device, _augment(cfg))),
        manifest,
        kinds,
        summaries,
        memory_baseline,
        dist=d,
        eval_model=eval_model,
    )
    if checkpoint is not None:
        _restore(run, checkpoint)
    else:
        run.manifest = RunRecord(
            created=utc_now(),
            source=cfg.source,
            config=cfg.to_dict(),
            device=str(device),
            classes=tuple(ds.classes),
            preprocess=spec,
            base_weights=base.to_dict(),
            model=RunModelInfo(cfg.model, len(ds.classes), head),
            params={"trainable": trainable, "total": total, "deployed": deployed},
            artifact=tuple(method.artifact),
            splits=ds.to_dict(),
            versions=library_versions(),
        )
    run.manifest.runtime = {
        "amp": str(amp_dtype).replace("torch.", "") if amp_dtype else "off",
        "channels_last": channels_last,
        "compile": cfg.compile,
        "fused_adamw": bool(adamw_options(device, cfg.compile)),
        "compile_cache": str(compile_cache) if compile_cache else None,
        "num_workers": run.loaders[0].num_workers,
        "augment_on": "gpu" if run.feed.on_device else "cpu",
        # --batch-size is the global batch: batch_per_process x processes
        "processes": d.world,
        "global_batch": cfg.batch_size,
        "batch_per_process": run.loaders[0].batch_size,
        "split_hash": split_hash,
    }
    if d.main:
        run.manifest.save(run_dir)
        ds.write_csvs(run_dir / SPLITS_DIR)
    lines = [k.summary_line(summaries[k.name], deployed) for k in kinds if k.summary_line is not None]
    report(
        "start",
        {
            "trainable": trainable,
            "total": total,
            "deployed": deployed,
            "adapter_lines": lines,
            "classes": ds.classes,
            "counts": ds.counts(),
            "device": str(device),
            "base_weights": base.kind,
            "license": base.license,
            "layout": ds.layout,
            "notes": ds.notes,
            "excluded": ds.excluded,
            "resumed_from": run.state.epoch if cfg.resume else None,
            **run.manifest.runtime,
        },
    )
    return run


def _restore(run: _Run, checkpoint: dict) -> None:
    """Continue from the last complete epoch: trained tensors, optimizer, scheduler, scaler, loop
    state and every RNG, so the run goes on exactly as if it had never stopped."""
    model, path = run.model, run.run_dir / CHECKPOINT
    needed = {n for n, p in model.named_parameters() if p.requires_grad}
    unexpected = model.load_state_dict(checkpoint["trained"], strict=False).unexpected_keys
    if unexpected or needed - set(checkpoint["trained"]):
        raise BundleError(
            f"{path} does not fit this model (unexpected: {unexpected[:3]}, "
            f"missing: {sorted(needed - set(checkpoint['trained']))[:3]}); start again with --overwrite"
        )
    run.optimizer.load_state_dict(checkpoint["optimizer"])
    if run.scheduler is not None:
        run.scheduler.load_state_dict(checkpoint["scheduler"])
    run.scaler.load_state_dict(checkpoint["scaler"])
    run.state = LoopState(**checkpoint["loop"])
    set_rng_state(distributed.own_rng_state(checkpoint, run.dist), run.generator)
    m = run.manifest
    m.history = m.history[: run.state.epoch]  # drop epochs past the checkpoint
    m.config, m.device, m.status = run.cfg.to_dict(), str(run.device), "training"
    m.resumed = (m.resumed or []) + [{"at_epoch": run.state.epoch, "time": utc_now()}]


def _epoch(run: _Run, epoch: int, report: Report) -> tuple[dict, dict]:
    """Train one epoch, run the adapter kinds' epoch-end hooks (a merge, when due), validate; the
    epoch's record and the validation metrics."""
    state = run.state
    t_epoch = time.time()
    with PeakMemory(run.device, baseline=run.memory_baseline) as mem:
        stats = _run_epoch(
            run.step_model,
            run.loaders[0],
            run.optimizer,
            run.scaler,
            run.loss_fn,
            run.device,
            run.amp_dtype,
            run.feed,
            epoch,
            report,
            run.dist,
        )
        merged = _epoch_end_hooks(run, epoch)
        if merged:
            state.merges += 1
        eval_model = run.eval_model if run.eval_model is not None else run.step_model  # no bool(): compiled
        val = evaluate(
            eval_model, run.loaders[1], run.device, run.ds.classes, run.amp_dtype, run.channels_last, run.feed, run.dist
        )
    seconds = time.time() - t_epoch
    record = {
        "epoch": epoch,
        "train_loss": stats["loss"],
        "train_accuracy": stats["accuracy"],
        "val_accuracy": val["accuracy"],
        "val_f1_weighted": val["f1_weighted"],
        "val_mcc": val["mcc"],
        "lr": run.optimizer.param_groups[0]["lr"],
        "seconds": round(seconds, 2),
        "img_per_s": round(len(run.ds.splits["train"]) / max(seconds, 1e-9), 1),
        "first_step_s": stats["first_step_s"],
        "steady_img_per_s": stats["steady_img_per_s"],
        "peak_mem_mib": round(mem.peak_mib, 1) if mem.peak_mib is not None else None,
    }
    for name in run.merging:  # whether it merged, and under torchrun the hash every rank merged to
        record[f"{name}_merged"] = name in merged
        if merged.get(name):
            record[f"{name}_merge_hash"] = merged[name][:16]
    return record, val


def _epoch_end_hooks(run: _Run, epoch: int) -> dict[str, str]:
    """Each adapter kind's ``epoch_end`` hook; returns {kind: hash} of the kinds that changed their
    weights (the hash only under torchrun, else ""). Under torchrun the random values a hook draws
    (fresh factors after a merge) come from a generator seeded by (seed, epoch), and the kind's
    tensors must then hash equal on every rank (DistributedError otherwise)."""
    changed = {}
    for kind in run.kinds:
        if kind.epoch_end is None:
            continue
        with distributed.same_draws(run.dist, run.device, seed=run.cfg.seed * 100_003 + epoch):
            if not kind.epoch_end(run.model, run.optimizer, run.settings[kind.name], epoch):
                continue
        changed[kind.name] = ""
        if run.dist.active:
            changed[kind.name] = distributed.fingerprint(kind.state(run.model, run.state.merges + 1))
            distributed.check_same(changed[kind.name], f"{kind.name}'s weights after epoch {epoch}", run.dist)
    return changed


def _end_epoch(run: _Run, record: dict, val: dict) -> None:
    """Step the scheduler, keep the best epoch's weights, checkpoint, and write the manifest."""
    state, manifest, epoch = run.state, run.manifest, record["epoch"]
    if isinstance(run.scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
        run.scheduler.step(val["accuracy"])
    elif run.scheduler is not None:
        run.scheduler.step()
    improved = val["accuracy"] > state.best_acc
    if improved:
        state.best_acc, state.best_epoch, state.stale = val["accuracy"], epoch, 0
        if run.dist.main:
            save_trained(run.model, run.method, run.run_dir, run.head, run.settings, state.merges)
        manifest.best = {
            "epoch": epoch,
            **{k: v for k, v in val.items() if k != "confusion_matrix"},
            "artifact_sha256": run.method.artifact_sha256(run.run_dir),
        }  # checked at export
        manifest.best.update({f"{name}_merges": state.merges for name in run.merging})
    else:
        state.stale += 1
    state.epoch = epoch
    record["best"] = improved
    for name, summary in run.summaries.items():  # each kind's counts, and the merges the run and its best hold
        merges = (
            {"merges": state.merges, "merges_in_best": manifest.best[f"{name}_merges"]} if name in run.merging else {}
        )
        manifest.set_adapter_summary(name, {**summary, **merges})
    manifest.history.append(record)
    rng_ranks = distributed.rank_rng_states(rng_state(run.generator), run.dist)  # a collective: every rank
    if run.dist.main:  # only rank 0 writes; every rank resumes from this checkpoint
        save_checkpoint(
            run.run_dir,
            run.model,
            run.optimizer,
            run.scheduler,
            run.scaler,
            state,
            run.generator,
            extra={"rng_ranks": rng_ranks} if rng_ranks else None,
        )
        write_metrics_jsonl(run.run_dir, manifest.history)
        manifest.save(run.run_dir)


def train(cfg: TrainConfig, report: Report | None = None) -> TrainResult:
    """Train ``cfg.method`` on ``cfg.source``; returns the best-validation result.

    The best epoch's weights are saved as soon as they are found and every epoch ends with an
    atomic checkpoint, so Ctrl-C (raised as TrainingInterrupted) or a crash loses at most the
    epoch in progress, and ``cfg.resume`` continues to the same result as an uninterrupted run.
    ``report(event, data)`` receives ``"start"``, ``"batch"`` and ``"epoch"`` events for progress output."""
    report = report or (lambda event, data: None)
    t0 = time.time()
    run = _prepare(cfg, report)
    try:
        return _train(run, report, t0)
    finally:
        distributed.teardown(run.dist)


def _train(run: _Run, report: Report, t0: float) -> TrainResult:
    cfg, state, manifest, main = run.cfg, run.state, run.manifest, run.dist.main
    try:
        for epoch in range(state.epoch + 1, cfg.epochs + 1):
            if state.stale >= cfg.patience:
                break  # a resumed run that had already stopped early
            record, val = _epoch(run, epoch, report)
            _end_epoch(run, record, val)
            report("epoch", record)
            if state.stale >= cfg.patience:
                log.info("early stop after epoch %d: no val accuracy gain for %d epochs", epoch, cfg.patience)
                break
    except KeyboardInterrupt:
        manifest.status = "interrupted"
        if main:
            manifest.save(run.run_dir)
        raise TrainingInterrupted(
            f"interrupted; epochs 1-{state.epoch} are checkpointed in {run.run_dir}. Continue with the same command "
            "plus --resume"
            if state.epoch
            else f"interrupted before the first epoch finished; nothing to resume in {run.run_dir}"
        ) from None
    except TrainingDiverged:
        manifest.status = "diverged"
        if main:
            manifest.save(run.run_dir)
        raise
    if main:
        plot_curves(manifest.history, run.run_dir / CURVES_PNG, f"{cfg.source} ({cfg.method}, {cfg.model})")
    test_metrics = None
    if run.loaders[2] is not None:
        distributed.barrier(run.dist)  # rank 0 has saved the best epoch
        best_model = load_run_model(run.run_dir, device=run.device, manifest=manifest)  # what was saved, reloaded
        test_metrics = evaluate(best_model, run.loaders[2], run.device, run.ds.classes, feed=run.feed, d=run.dist)
    manifest.test, manifest.status, manifest.seconds = test_metrics, "done", round(time.time() - t0, 1)
    if main:
        manifest.save(run.run_dir)
    params = manifest.params
    return TrainResult(
        run_dir=run.run_dir,
        best_epoch=state.best_epoch,
        best_val=manifest.best,
        test=test_metrics,
        trainable_params=params["trainable"],
        total_params=params["total"],
        seconds=time.time() - t0,
        history=manifest.history,
    )
