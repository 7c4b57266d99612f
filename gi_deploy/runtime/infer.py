"""Batch-classify a folder of images with a bundle and score it when labels are known."""

from __future__ import annotations

import csv
import os
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from gi_deploy._io import write_json
from gi_deploy.errors import ConfigError, DataError
from gi_deploy.runtime.bundle import load_bundle, resolve_bundle_dir
from gi_deploy.runtime.metrics import classification_metrics
from gi_deploy.runtime.preprocess import IMAGE_EXTENSIONS, PreprocessSpec, list_images, load_input

CSV_COLUMNS = ("path", "true_label", "predicted", "confidence", "error")


@dataclass
class InferConfig:
    folder: Path
    deploy_dir: Path = Path("deploy")
    source: str | None = None
    out_csv: Path = Path("predictions.csv")
    batch_size: int = 32
    precision: str = "fp32"
    device: str = "cpu"
    workers: int = field(default_factory=lambda: min(8, os.cpu_count() or 1))

    def __post_init__(self) -> None:
        self.folder, self.deploy_dir, self.out_csv = Path(self.folder), Path(self.deploy_dir), Path(self.out_csv)
        if self.batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.workers < 1:
            raise ConfigError(f"workers must be >= 1, got {self.workers}")
        if not self.folder.is_dir():
            raise ConfigError(f"folder to classify does not exist: {self.folder}")


@dataclass
class InferResult:
    source: str
    n_images: int
    n_errors: int
    csv_path: Path
    metrics_path: Path | None
    metrics: dict | None
    n_unlabelled: int
    provider: str


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def true_label(rel: Path, classes: list[str]) -> str | None:
    """The class named by the first folder of ``rel`` (relative to the scored folder), if any."""
    return rel.parts[0] if len(rel.parts) > 1 and rel.parts[0] in classes else None


def _decode(path: Path, spec: PreprocessSpec) -> np.ndarray | DataError:
    try:
        return load_input(path, spec)
    except DataError as e:  # an unreadable file becomes an error row; the run goes on
        return e


def _batches(paths: list[Path], spec: PreprocessSpec, cfg: InferConfig,
             ) -> Iterator[list[tuple[Path, np.ndarray | DataError]]]:
    """Decoded batches in order; the next batch decodes on a thread pool while the current one
    runs, so at most two batches of pixels are in memory whatever the folder's size."""
    chunks = [paths[i:i + cfg.batch_size] for i in range(0, len(paths), cfg.batch_size)]
    with ThreadPoolExecutor(max_workers=cfg.workers) as pool:
        def submit(chunk: list[Path]) -> list:
            return [pool.submit(_decode, p, spec) for p in chunk]
        pending = submit(chunks[0]) if chunks else []
        for i, chunk in enumerate(chunks):
            current, pending = pending, (submit(chunks[i + 1]) if i + 1 < len(chunks) else [])
            yield [(p, f.result()) for p, f in zip(chunk, current)]


def infer_folder(cfg: InferConfig) -> InferResult:
    """Classify every image under ``cfg.folder``; write one CSV row per image as it goes.

    When the folder's first-level sub-folders are class names, score the labelled images and
    write ``<csv stem>.metrics.json`` beside the CSV.
    """
    bundle = load_bundle(resolve_bundle_dir(cfg.deploy_dir, cfg.source), cfg.precision, cfg.device)
    paths = list_images(cfg.folder)
    if not paths:
        raise DataError(f"no images ({', '.join(sorted(IMAGE_EXTENSIONS))}) found under {cfg.folder}")
    cfg.out_csv.parent.mkdir(parents=True, exist_ok=True)
    y_true: list[int] = []
    y_pred: list[int] = []
    n_errors = n_unlabelled = 0
    with open(cfg.out_csv, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(CSV_COLUMNS)
        for batch in _batches(paths, bundle.preprocess, cfg):
            good = [x for _, x in batch if isinstance(x, np.ndarray)]
            probs = iter(softmax(bundle.predict_logits(np.stack(good))) if good else ())
            for path, item in batch:  # rows keep the folder's sorted order
                rel = path.relative_to(cfg.folder)
                label = true_label(rel, bundle.classes)
                if not isinstance(item, np.ndarray):
                    n_errors += 1
                    writer.writerow((rel.as_posix(), label or "", "", "", str(item)))
                    continue
                p = next(probs)
                k = int(p.argmax())
                writer.writerow((rel.as_posix(), label or "", bundle.classes[k], f"{p[k]:.6f}", ""))
                if label is None:
                    n_unlabelled += 1
                else:
                    y_true.append(bundle.classes.index(label))
                    y_pred.append(k)
            f.flush()
    metrics = metrics_path = None
    if y_true:
        metrics = classification_metrics(y_true, y_pred, bundle.classes)
        metrics.update(source=bundle.source, n_errors=n_errors, n_unlabelled=n_unlabelled,
                       folder=str(cfg.folder), precision=cfg.precision)
        metrics_path = cfg.out_csv.with_suffix(".metrics.json")
        write_json(metrics_path, metrics)
    return InferResult(
        source=bundle.source, n_images=len(paths), n_errors=n_errors, csv_path=cfg.out_csv,
        metrics_path=metrics_path, metrics=metrics, n_unlabelled=n_unlabelled, provider=bundle.provider,
    )
