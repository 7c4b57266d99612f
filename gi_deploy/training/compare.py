"""The papers' comparisons from one call: every method x label fraction, trained with the same
loop and recipe, summarised in one table (CSV + Markdown).

Each grid cell is an ordinary run under ``<out>/<source>-compare/<method>-<fraction>/<source>/``,
so it can be exported or inspected like any other. A finished cell is reused (the grid can be
re-run after an interruption) unless ``overwrite``; an interrupted cell is resumed.
"""

from __future__ import annotations

import csv
import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from gi_deploy.core.methods import METHODS, method_spec
from gi_deploy.core.runs import CHECKPOINT, RUN_MANIFEST, RunRecord, read_run_manifest
from gi_deploy.errors import ConfigError
from gi_deploy.training.config import RESUME_MAY_CHANGE, TrainConfig
from gi_deploy.training.trainer import train

COLUMNS = (
    "method",
    "label_fraction",
    "train_images",
    "eval_split",
    "accuracy",
    "f1_weighted",
    "mcc",
    "trainable_params",
    "total_params",
    "artifact_bytes",
    "epochs",
    "best_epoch",
    "epoch_seconds",
    "peak_mem_mib",
)


@dataclass
class CompareResult:
    rows: list[dict]
    csv_path: Path
    markdown_path: Path


def _cell_config(base: TrainConfig, method: str, fraction: float, out_dir: Path) -> TrainConfig:
    cell_out = out_dir / f"{method}-{fraction:g}"
    return dataclasses.replace(
        base, method=method, label_fraction=fraction, out_dir=cell_out, resume=False, overwrite=base.overwrite
    )


def _previous(cfg: TrainConfig) -> RunRecord | None:
    """The manifest an earlier call left in this cell, if any."""
    path = cfg.run_dir / RUN_MANIFEST
    return read_run_manifest(cfg.run_dir, finished=False) if path.is_file() else None


def _same_settings(manifest: RunRecord, cfg: TrainConfig) -> bool:
    return all(manifest.config.get(k) == v for k, v in cfg.to_dict().items() if k not in RESUME_MAY_CHANGE)


def row_of(manifest: RunRecord, run_dir: Path) -> dict:
    """One table row from a finished run's manifest."""
    history = manifest.history
    scores, split = (manifest.test, "test") if manifest.test else (manifest.best, "val")
    peaks = [r["peak_mem_mib"] for r in history if r.get("peak_mem_mib") is not None]
    method = manifest.method
    return {
        "method": method,
        "label_fraction": manifest.config["label_fraction"],
        "train_images": manifest.splits["counts"]["train"],
        "eval_split": split,
        "accuracy": scores["accuracy"],
        "f1_weighted": scores["f1_weighted"],
        "mcc": scores["mcc"],
        "trainable_params": manifest.params["trainable"],
        "total_params": manifest.params["total"],
        "artifact_bytes": method_spec(method).artifact_bytes(run_dir),
        "epochs": len(history),
        "best_epoch": manifest.best["epoch"],
        "epoch_seconds": sum(r["seconds"] for r in history) / len(history),
        "peak_mem_mib": max(peaks) if peaks else None,
    }


def write_tables(rows: list[dict], out_dir: Path, title: str) -> tuple[Path, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    csv_path, md_path = out_dir / "compare.csv", out_dir / "compare.md"
    with open(csv_path, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS)
        w.writeheader()
        w.writerows(rows)
    header = (
        "| method | labels | train imgs | eval | Acc | F1 (w) | MCC | trainable | artifact | epochs "
        "| s/epoch | peak MiB |"
    )
    lines = [f"# {title}", "", header, "|" + "---|" * (header.count("|") - 1)]
    for r in rows:
        peak = f"{r['peak_mem_mib']:.0f}" if r["peak_mem_mib"] is not None else "n/a"
        lines.append(
            f"| {r['method']} | {100 * r['label_fraction']:g}% | {r['train_images']} | {r['eval_split']} "
            f"| {100 * r['accuracy']:.2f} | {100 * r['f1_weighted']:.2f} | {100 * r['mcc']:.2f} "
            f"| {r['trainable_params']:,} / {r['total_params']:,} | {r['artifact_bytes'] / 1e6:.2f} MB "
            f"| {r['epochs']} (best {r['best_epoch']}) | {r['epoch_seconds']:.1f} | {peak} |"
        )
    lines += [
        "",
        "Scores on the test split when there is one, else on validation at the best epoch; "
        "peak memory is CUDA's allocator peak on GPU, the resident-set growth on CPU.",
    ]
    md_path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return csv_path, md_path


def compare(
    base: TrainConfig,
    methods: list[str],
    fractions: list[float],
    report: Callable[[str, dict], None] | None = None,
    train_fn: Callable | None = None,
) -> CompareResult:
    """Train every (method, label fraction) cell of the grid with ``base``'s recipe; write the
    table to ``<base.out_dir>/<source>-compare/compare.{csv,md}``. Errors (including Ctrl-C as
    TrainingInterrupted) propagate; calling again reuses finished cells and resumes the stopped one."""
    train_fn = train_fn or train
    report = report or (lambda event, data: None)
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise ConfigError(f"methods {unknown or methods} unknown; use some of {', '.join(METHODS)}")
    bad = [f for f in fractions if not 0 < f <= 1]
    if bad or not fractions:
        raise ConfigError(f"label fractions must be in (0, 1], got {fractions}")
    out_dir = base.out_dir / f"{base.source}-compare"
    rows = []
    for method in methods:
        for fraction in fractions:
            cfg = _cell_config(base, method, fraction, out_dir)
            manifest = _previous(cfg)
            reused = (
                manifest is not None
                and not base.overwrite
                and manifest.status == "done"
                and _same_settings(manifest, cfg)
            )
            report("cell", {"method": method, "label_fraction": fraction, "reused": reused})
            if not reused:
                resume = (
                    manifest is not None
                    and not base.overwrite
                    and (cfg.run_dir / CHECKPOINT).is_file()
                    and manifest.status in ("interrupted", "training")
                )
                cfg = dataclasses.replace(cfg, resume=resume, overwrite=not resume and manifest is not None)
                train_fn(cfg, report=report)
                manifest = read_run_manifest(cfg.run_dir)
            rows.append(row_of(manifest, cfg.run_dir))
    csv_path, md_path = write_tables(rows, out_dir, f"{base.source}: methods x label fractions ({base.model})")
    return CompareResult(rows=rows, csv_path=csv_path, markdown_path=md_path)
