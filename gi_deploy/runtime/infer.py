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
from gi_deploy.runtime.inputs import check_label_names, collect_inputs
from gi_deploy.runtime.preprocess import PreprocessSpec, load_input

def csv_columns(top_k: int) -> tuple[str, ...]:
    """The predictions CSV header: one row per (image, source)."""
    top = tuple(f"top{i}_{what}" for i in range(1, top_k + 1) for what in ("class", "prob"))
    return ("path", "source", "true_label", "predicted", "confidence", *top, "error")


@dataclass
class InferConfig:
    inputs: str | Path  # a folder, an image, a glob or a list file (runtime/inputs.py)
    deploy_dir: Path = Path("deploy")
    source: str | None = None
    out_csv: Path = Path("predictions.csv")
    batch_size: int = 32
    precision: str = "fp32"
    device: str = "cpu"
    workers: int = field(default_factory=lambda: min(8, os.cpu_count() or 1))
    labels: Path | None = None  # CSV of (path, class)
    top_k: int = 3  # classes and probabilities per row
    resume: bool = False  # keep the rows already in out_csv and classify only the rest

    def __post_init__(self) -> None:
        self.deploy_dir, self.out_csv = Path(self.deploy_dir), Path(self.out_csv)
        if self.batch_size < 1 or self.top_k < 1:
            raise ConfigError(f"batch_size and top_k must be >= 1, got {self.batch_size} and {self.top_k}")
        if self.workers < 1:
            raise ConfigError(f"workers must be >= 1, got {self.workers}")


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
    root: Path  # CSV paths are relative to this folder
    n_resumed: int = 0  # rows that were already in the CSV (--resume)


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


def _rows_done(csv_path: Path, columns: tuple[str, ...]) -> list[dict]:
    """The complete rows of a predictions CSV a killed run left behind. A last line cut short by
    the kill is dropped from the file; a CSV with another header is a ConfigError."""
    if not csv_path.is_file() or csv_path.stat().st_size == 0:
        return []
    raw = csv_path.read_bytes()
    if not raw.endswith(b"\n"):
        raw = raw[:raw.rfind(b"\n") + 1]
        csv_path.write_bytes(raw)
        if not raw:  # killed before the header was complete: nothing to keep
            return []
    with open(csv_path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        if tuple(reader.fieldnames or ()) != columns:
            raise ConfigError(f"--resume: {csv_path} has columns {reader.fieldnames}, this run writes {list(columns)} "
                              "(another --top-k or gi-deploy version); use another --out, or drop --resume")
        return list(reader)


def infer_folder(cfg: InferConfig) -> InferResult:
    """Classify every image of ``cfg.inputs`` (a folder, an image, a glob or a list file); write
    one CSV row per image as it goes (path, source, label, prediction, confidence, top-k, error),
    flushed every batch.

    With ``cfg.resume``, rows already in the CSV (a killed run's) are kept and only the other
    images are classified, so every image ends up there exactly once. Labels come from
    ``cfg.labels`` or the list file's label column (unknown class names are a ConfigError before
    anything runs), else from class-named first-level sub-folders. When any image is labelled,
    the CSV's rows are scored into ``<csv stem>.metrics.json`` beside it.
    """
    bundle = load_bundle(resolve_bundle_dir(cfg.deploy_dir, cfg.source), cfg.precision, cfg.device)
    inputs = collect_inputs(cfg.inputs, cfg.labels)
    check_label_names(inputs.labels, bundle.classes, str(cfg.labels or cfg.inputs))
    k_top = min(cfg.top_k, len(bundle.classes))
    columns = csv_columns(k_top)
    done = _rows_done(cfg.out_csv, columns) if cfg.resume else []
    finished = {(r["path"], r["source"]) for r in done}
    paths = [p for p in inputs.paths if (inputs.rel(p), bundle.source) not in finished]
    cfg.out_csv.parent.mkdir(parents=True, exist_ok=True)
    with open(cfg.out_csv, "a" if done else "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        if not done:
            writer.writerow(columns)
        for batch in _batches(paths, bundle.preprocess, cfg):
            good = [x for _, x in batch if isinstance(x, np.ndarray)]
            probs = iter(softmax(bundle.predict_logits(np.stack(good))) if good else ())
            for path, item in batch:  # rows keep the inputs' order
                rel = inputs.rel(path)
                label = (inputs.labels.get(path.resolve()) if inputs.labels
                         else true_label(Path(rel), bundle.classes))
                if not isinstance(item, np.ndarray):
                    writer.writerow((rel, bundle.source, label or "", "", "", *[""] * (2 * k_top), str(item)))
                    continue
                p = next(probs)
                order = np.argsort(-p, kind="stable")[:k_top]
                top = [v for i in order for v in (bundle.classes[i], f"{p[i]:.6f}")]
                writer.writerow((rel, bundle.source, label or "", bundle.classes[order[0]], f"{p[order[0]]:.6f}",
                                 *top, ""))
            f.flush()
    with open(cfg.out_csv, newline="", encoding="utf-8") as f:
        rows = [r for r in csv.DictReader(f) if r["source"] == bundle.source]
    n_errors = sum(1 for r in rows if r["error"])
    scored = [r for r in rows if not r["error"] and r["true_label"]]
    n_unlabelled = sum(1 for r in rows if not r["error"] and not r["true_label"])
    metrics = metrics_path = None
    if scored:
        metrics = classification_metrics([bundle.classes.index(r["true_label"]) for r in scored],
                                         [bundle.classes.index(r["predicted"]) for r in scored], bundle.classes)
        metrics.update(source=bundle.source, n_errors=n_errors, n_unlabelled=n_unlabelled,
                       inputs=str(cfg.inputs), precision=cfg.precision)
        metrics_path = cfg.out_csv.with_suffix(".metrics.json")
        write_json(metrics_path, metrics)
    return InferResult(
        source=bundle.source, n_images=len(rows), n_errors=n_errors, csv_path=cfg.out_csv,
        metrics_path=metrics_path, metrics=metrics, n_unlabelled=n_unlabelled, provider=bundle.provider,
        root=inputs.root, n_resumed=len(done),
    )
