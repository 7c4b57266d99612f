"""``gi-deploy train``, ``compare`` and ``sources``. Every option defaults to None ("not given"), so a
``--config`` file and a resumed run's stored config can set it; the help shows the library's default.

The training library is imported inside the commands: the training extra (torch) may be absent,
and ``gi-deploy infer`` must start without it."""

from __future__ import annotations

import os
from contextlib import nullcontext
from pathlib import Path
from typing import Annotated, Optional

import typer

from gi_deploy._deps import require_training_extra
from gi_deploy.cli._display import arg, given, metrics_table, opt, out, reported, settings_options
from gi_deploy.cli._train_view import TrainProgress, compare_table
from gi_deploy.core.choices import Device
from gi_deploy.core.methods import Method
from gi_deploy.errors import ConfigError
from gi_deploy.model.settings import ADAPTER_SETTINGS
from gi_deploy.training.config import TrainConfig, layered_config

T = TrainConfig

# The options train and compare share: one definition each.
Source = Annotated[str, arg(T, "source")]
DataDir = Annotated[Optional[Path], opt(T, "data_dir")]
Model = Annotated[Optional[str], opt(T, "model", shown_default=True)]
Pretrained = Annotated[Optional[bool], opt(T, "pretrained", "--pretrained/--no-pretrained", shown_default=True)]
Weights = Annotated[Optional[Path], opt(T, "weights")]
Epochs = Annotated[Optional[int], opt(T, "epochs", shown_default=True)]
BatchSize = Annotated[Optional[int], opt(T, "batch_size", shown_default=True)]
Lr = Annotated[Optional[float], opt(T, "lr", shown_default=True)]
ImgSize = Annotated[Optional[int], opt(T, "img_size", shown_default=True)]
Seed = Annotated[Optional[int], opt(T, "seed", shown_default=True)]
DeviceOpt = Annotated[Optional[Device], opt(T, "device", shown_default=True)]


def _print_config(cfg: TrainConfig, processes: int = 1) -> None:
    import yaml

    out.print("resolved config:")
    out.print(yaml.safe_dump(cfg.to_dict(), sort_keys=False, default_flow_style=None).rstrip())
    if processes > 1:
        out.print(
            f"batch_size {cfg.batch_size} is the global batch: {cfg.batch_size // processes} per process x "
            f"{processes} processes"
        )


def _train_rank(cfg_dict: dict):
    """One rank of ``train --nproc-per-node N`` (launched by torch's elastic launcher): rank 0
    shows the progress; returns the TrainResult."""
    from gi_deploy.training import distributed  # lazy: torch is the training extra's
    from gi_deploy.training.trainer import train  # lazy: torch is the training extra's

    cfg = TrainConfig(**cfg_dict)
    if distributed.env_rank() != 0:
        return train(cfg)
    with TrainProgress(cfg.source, out) as progress:
        return train(cfg, report=progress)


@settings_options(ADAPTER_SETTINGS, after="seed")  # --lora-r, --colora-merge-every, ...: each kind's settings fields
def train_cmd(
    source: Source,
    data_dir: DataDir = None,
    config: Annotated[Optional[Path], typer.Option(help="YAML or TOML file of settings; flags override it.")] = None,
    method: Annotated[Optional[Method], opt(T, "method", shown_default=True)] = None,
    model: Model = None,
    pretrained: Pretrained = None,
    weights: Weights = None,
    epochs: Epochs = None,
    batch_size: BatchSize = None,
    lr: Lr = None,
    weight_decay: Annotated[Optional[float], opt(T, "weight_decay", shown_default=True)] = None,
    scheduler: Annotated[Optional[str], opt(T, "scheduler", shown_default=True)] = None,
    img_size: ImgSize = None,
    resize: Annotated[Optional[str], opt(T, "resize", shown_default=True)] = None,
    crop_pct: Annotated[Optional[float], opt(T, "crop_pct", shown_default=True)] = None,
    hflip: Annotated[Optional[bool], opt(T, "hflip", "--hflip/--no-hflip", shown_default=True)] = None,
    vflip: Annotated[Optional[bool], opt(T, "vflip", "--vflip/--no-vflip", shown_default=True)] = None,
    rotation: Annotated[Optional[float], opt(T, "rotation_degrees", shown_default=True)] = None,
    color_jitter: Annotated[Optional[float], opt(T, "color_jitter", shown_default=True)] = None,
    balance: Annotated[Optional[str], opt(T, "balance", shown_default=True)] = None,
    label_fraction: Annotated[Optional[float], opt(T, "label_fraction", shown_default=True)] = None,
    split: Annotated[Optional[str], opt(T, "split", shown_default=True)] = None,
    patience: Annotated[Optional[int], opt(T, "patience", shown_default=True)] = None,
    seed: Seed = None,
    out_dir: Annotated[Optional[Path], opt(T, "out_dir", "--out", shown_default=True)] = None,
    device: DeviceOpt = None,
    amp: Annotated[Optional[str], opt(T, "amp", shown_default=True)] = None,
    channels_last: Annotated[Optional[bool], opt(T, "channels_last", "--channels-last/--no-channels-last")] = None,
    compile: Annotated[Optional[bool], opt(T, "compile", "--compile/--no-compile", shown_default=True)] = None,
    num_workers: Annotated[Optional[int], opt(T, "num_workers")] = None,
    resume: Annotated[bool, opt(T, "resume")] = False,
    overwrite: Annotated[bool, opt(T, "overwrite")] = False,
    nproc_per_node: Annotated[
        Optional[int],
        typer.Option(
            help="Train with N processes on this machine (DistributedDataParallel through torch's launcher; one per "
            "GPU). --batch-size stays the global batch. Several machines: torchrun --nnodes ... -m gi_deploy "
            "train ... (see docs/scaling.md)."
        ),
    ] = None,
    adapters: dict | None = None,  # {kind: {field: value}} of the generated adapter options (settings_options)
) -> None:
    """Fine-tune one classifier for SOURCE; save the adapter, checkpoints, metrics and curves."""
    with reported():
        require_training_extra("train")
    from gi_deploy.training import distributed  # lazy: torch is the training extra's
    from gi_deploy.training.checkpoint import lock_run_dir  # lazy: torch is the training extra's
    from gi_deploy.training.trainer import train  # lazy: torch is the training extra's

    flags = given(
        source=source,
        data_dir=data_dir,
        method=method,
        model=model,
        pretrained=pretrained,
        weights=weights,
        epochs=epochs,
        batch_size=batch_size,
        lr=lr,
        weight_decay=weight_decay,
        scheduler=scheduler,
        img_size=img_size,
        resize=resize,
        crop_pct=crop_pct,
        hflip=hflip,
        vflip=vflip,
        rotation_degrees=rotation,
        color_jitter=color_jitter,
        balance=balance,
        label_fraction=label_fraction,
        split=split,
        patience=patience,
        seed=seed,
        out_dir=out_dir,
        device=device,
        amp=amp,
        channels_last=channels_last,
        compile=compile,
        num_workers=num_workers,
        resume=resume,
        overwrite=overwrite,
        **(adapters or {}),
    )
    if distributed.env_rank() != 0:
        out.quiet = True  # under torchrun, rank 0 alone prints (and writes the run folder)
    with reported():
        cfg = layered_config(flags, config, resume)
        _print_config(cfg, nproc_per_node or int(os.environ.get("WORLD_SIZE", "1")))
        if nproc_per_node is not None and distributed.under_torchrun():
            raise ConfigError(
                "--nproc-per-node is for launching from a plain shell; under torchrun the process "
                "count is torchrun's --nproc-per-node"
            )
        # two trainings never write one run folder: the launcher of N local processes holds the lock for
        # all its ranks; under torchrun rank 0 speaks for the run
        with lock_run_dir(cfg.run_dir) if distributed.env_rank() == 0 else nullcontext():
            if nproc_per_node is not None:  # N local processes through torch's elastic launcher
                result = distributed.launch_local(_train_rank, (cfg.to_dict(),), nproc_per_node)[0]
            else:
                with TrainProgress(source, out) as progress:
                    result = train(cfg, report=progress)
    rows = {f"val (best epoch {result.best_epoch})": result.best_val, **({"test": result.test} if result.test else {})}
    out.print(metrics_table(f"{source} ({cfg.method})", rows))
    out.print(f"saved {result.run_dir} in {result.seconds:.0f}s (curves.png, metrics.jsonl, splits/)")


def sources_cmd() -> None:
    """List the built-in data sources: classes, split and the expected folder layout."""
    from gi_deploy.training.data import EXPECTED_LAYOUT  # lazy: training.data imports torch
    from gi_deploy.training.sources import SOURCES  # lazy: it imports training.data

    for spec in SOURCES.values():
        out.print(f"{spec.name}: {spec.title}", style="bold", soft_wrap=True)
        out.print(f"  {len(spec.classes)} classes: {', '.join(spec.classes)}", soft_wrap=True)
        out.print(f"  left out: {', '.join(spec.excluded)}", soft_wrap=True)
        out.print(f"  split: {spec.split}", soft_wrap=True)
        out.print(f"  layout:\n{spec.layout}\n", soft_wrap=True)
    out.print("any other name: an ImageFolder tree", style="bold", soft_wrap=True)
    out.print("  " + EXPECTED_LAYOUT.replace("\n", "\n  "), soft_wrap=True)


def compare_cmd(
    source: Source,
    data_dir: DataDir = None,
    methods: Annotated[
        str, opt(T, "method", help="Comma-separated methods, from " + ",".join(m.value for m in Method) + ".")
    ] = "lora,full,linear",
    label_fractions: Annotated[
        str, opt(T, "label_fraction", help="Comma-separated shares of the labels, e.g. 0.01,0.1,1.0.")
    ] = "1.0",
    config: Annotated[
        Optional[Path], typer.Option(help="YAML or TOML file of training settings (as for `train`).")
    ] = None,
    model: Model = None,  # the base every cell starts from
    pretrained: Pretrained = None,
    weights: Weights = None,
    img_size: ImgSize = None,
    epochs: Epochs = None,  # the recipe every cell shares
    lr: Lr = None,
    batch_size: BatchSize = None,
    seed: Seed = None,
    out_dir: Annotated[
        Optional[Path], opt(T, "out_dir", "--out", help="Runs folder; the grid goes to OUT/SOURCE-compare.")
    ] = None,
    device: DeviceOpt = None,
    overwrite: Annotated[bool, opt(T, "overwrite", help="Retrain cells that already finished.")] = False,
) -> None:
    """Train every method x label fraction on SOURCE and write one table (CSV + Markdown)."""
    with reported():
        require_training_extra("compare")
    from gi_deploy.training.compare import compare  # lazy: torch is the training extra's

    flags = given(
        source=source,
        data_dir=data_dir,
        model=model,
        pretrained=pretrained,
        weights=weights,
        epochs=epochs,
        batch_size=batch_size,
        lr=lr,
        img_size=img_size,
        seed=seed,
        out_dir=out_dir,
        device=device,
        overwrite=overwrite,
    )
    with reported():
        try:
            fractions = [float(f) for f in label_fractions.split(",") if f.strip()]
        except ValueError as e:
            raise ConfigError(f"--label-fractions {label_fractions!r}: {e}") from None
        base = layered_config(flags, config)
        _print_config(base)
        with TrainProgress(source, out) as progress:
            result = compare(base, [m.strip() for m in methods.split(",") if m.strip()], fractions, report=progress)
    out.print(compare_table(source, result.rows))
    out.print(f"table -> {result.csv_path}, {result.markdown_path}")
