"""Batch-classify a folder of images with a bundle and score it when labels are known."""

from __future__ import annotations

import csv
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from gi_deploy.core.bundles import resolve_bundle_dirs
from gi_deploy.core.fields import helped
from gi_deploy.core.metrics import softmax
from gi_deploy.errors import ConfigError, DataError
from gi_deploy.runtime.evaluate import PROB_PREFIX, score_predictions
from gi_deploy.runtime.inputs import check_label_names, collect_inputs
from gi_deploy.runtime.loader import Bundle, load_bundle
from gi_deploy.runtime.pipeline import decoded_batches, default_workers


def csv_columns(top_k: int, classes: list[str] | None = None) -> tuple[str, ...]:
    """The predictions CSV header: one row per (image, source); ``classes`` is every class of
    the selected bundles (first-appearance order), one probability column each."""
    top = tuple(f"top{i}_{what}" for i in range(1, top_k + 1) for what in ("class", "prob"))
    return ("path", "source", "true_label", "predicted", "confidence", *top, "error",
            *(PROB_PREFIX + c for c in classes or ()))


@dataclass
class InferConfig:
    inputs: str | Path = helped(help="A folder (searched recursively), an image, a glob ('scans/**/*.jpg') or a "
                                     ".txt/.csv list of paths.")
    deploy_dir: Path = helped(Path("deploy"), "Bundles folder.")
    sources: list[str] | None = helped(None, "Bundle(s) to run, repeatable, or 'all'; each image gets one row per "
                                             "source (none: the only bundle). 'auto': the router picks each "
                                             "image's source, and refuses what no model was trained for.")
    out_csv: Path = helped(Path("predictions.csv"), "Predictions CSV.")
    batch_size: int = helped(32, "Images per model call.")
    backend: str = helped("auto", "auto: the fastest available (TensorRT engine, else onnxruntime on its best "
                                  "provider); torch: the merged model rebuilt from its training run, for debugging.")
    precision: str = helped("fp32", "fp32 | fp16 | int8 (the bundle's model files).")
    device: str = helped("auto", "auto: TensorRT -> CUDA -> CPU, whichever is installed.")
    workers: int = helped(default_factory=default_workers,
                          help="Decoding processes (0: decode in the main process; default: one per core, up to 4).")
    threads: int | None = helped(None, "The model's CPU threads (none: every core this process may use).")
    labels: Path | None = helped(None, "CSV of (path, label): the true class of each image.")
    top_k: int = helped(3, "Classes and probabilities per row.")
    resume: bool = helped(False, "Keep the rows already in --out (a killed run's) and classify only the rest.")
    strict: bool = helped(False, "Stop at the first unreadable file instead of writing an error row for it.")
    n_wrong: int = helped(20, "Most confidently wrong images listed in the metrics.")
    score: bool = True  # False: no labels read, checked or scored (evaluate --cross maps them itself)

    def __post_init__(self) -> None:
        self.deploy_dir, self.out_csv = Path(self.deploy_dir), Path(self.out_csv)
        if isinstance(self.sources, str):
            self.sources = [self.sources]
        if self.batch_size < 1 or self.top_k < 1:
            raise ConfigError(f"batch_size and top_k must be >= 1, got {self.batch_size} and {self.top_k}")
        if self.workers < 0:
            raise ConfigError(f"workers must be >= 0 (0 decodes in the main process), got {self.workers}")


@dataclass
class SourceRun:
    """One source's share of a run: what its model ran on and how its rows scored."""

    source: str
    backend: str  # what the model really ran on ("onnxruntime 1.22 CPUExecutionProvider (2 threads)")
    notes: list[str]
    n_rows: int
    n_errors: int
    n_unlabelled: int
    metrics: dict | None
    files: dict[str, Path]  # metrics.json and the report files, when labelled

    @property
    def metrics_path(self) -> Path | None:
        return self.files.get("metrics")


@dataclass
class InferResult:
    csv_path: Path
    root: Path  # CSV paths are relative to this folder
    n_images: int  # images in the input
    n_errors: int  # of them unreadable (error rows)
    n_resumed: int  # rows that were already in the CSV (--resume)
    n_classified: int  # images this run decoded and classified (unreadable ones not counted)
    seconds: float  # this run's classification wall time, decode workers' start-up included
    sources: dict[str, SourceRun]

    @property
    def images_per_second(self) -> float:
        return self.n_classified / self.seconds if self.seconds > 0 else 0.0


def true_label(rel: Path, classes: list[str]) -> str | None:
    """The class named by the first folder of ``rel`` (relative to the scored folder), if any."""
    return rel.parts[0] if len(rel.parts) > 1 and rel.parts[0] in classes else None


def _rows_done(csv_path: Path, columns: tuple[str, ...]) -> tuple[set[tuple[str, str]], int]:
    """The (path, source) pairs of the complete rows a killed run left in a predictions CSV, and
    their count. A last line cut short by the kill is dropped from the file; a CSV with another
    header is a ConfigError. Only the pairs are kept, so resuming a 100k-image run stays small."""
    if not csv_path.is_file() or csv_path.stat().st_size == 0:
        return set(), 0
    raw = csv_path.read_bytes()
    if not raw.endswith(b"\n"):
        raw = raw[:raw.rfind(b"\n") + 1]
        csv_path.write_bytes(raw)
        if not raw:  # killed before the header was complete: nothing to keep
            return set(), 0
    with open(csv_path, newline="", encoding="utf-8") as f:
        reader = csv.reader(f)
        header = tuple(next(reader, ()))
        if header != columns:
            raise ConfigError(f"--resume: {csv_path} has columns {list(header)}, this run writes {list(columns)} "
                              "(other sources, --top-k or gi-deploy version); use another --out, or drop --resume")
        pairs, n = set(), 0
        for row in reader:
            pairs.add((row[0], row[1]))  # path, source
            n += 1
        return pairs, n


def _row(rel: str, bundle: Bundle, label: str, p: np.ndarray | None, k_top: int, error: str,
         all_classes: list[str]) -> list[str]:
    if p is None:
        return [rel, bundle.source, label, "", "", *[""] * (2 * k_top), error, *[""] * len(all_classes)]
    order = np.argsort(-p, kind="stable")[:k_top]
    top = [v for i in order for v in (bundle.classes[i], f"{p[i]:.6f}")]
    top += [""] * (2 * k_top - len(top))  # a source with fewer classes than k
    prob = dict(zip(bundle.classes, p))
    return [rel, bundle.source, label, bundle.classes[order[0]], f"{p[order[0]]:.6f}", *top, "",
            *(f"{prob[c]:.6f}" if c in prob else "" for c in all_classes)]


def infer_folder(cfg: InferConfig, progress: Callable[[int, int], None] | None = None) -> InferResult:
    """Classify every image of ``cfg.inputs`` (a folder, an image, a glob or a list file) with
    every selected source's bundle; write one CSV row per (image, source) as it goes (path,
    source, label, prediction, confidence, top-k, error, every class's probability), flushed
    every batch. Images are decoded once, in ``cfg.workers`` processes, while the model runs.

    With ``cfg.resume``, rows already in the CSV (a killed run's) are kept and only the missing
    (image, source) pairs are classified, so each lands there exactly once. Labels come from
    ``cfg.labels`` or the list file's label column (names no selected bundle knows are a
    ConfigError before anything runs), else from class-named first-level sub-folders. When any
    row is labelled, the CSV is scored (runtime/evaluate.py): ``<csv stem>.metrics.json`` and the
    report files beside it. ``progress(done, total)`` is called after every batch.

    Raises DataError with ``cfg.strict`` at the first unreadable file (rows before it are kept).
    """
    dirs = resolve_bundle_dirs(cfg.deploy_dir, cfg.sources)
    inputs = collect_inputs(cfg.inputs, cfg.labels)  # cheap checks first, then load the models
    bundles = [load_bundle(d, cfg.precision, cfg.device, backend=cfg.backend, threads=cfg.threads) for d in dirs]
    seen: dict[str, Path] = {}
    for b in bundles:  # rows are keyed by the manifest's source: two folders of one source would mix
        if b.source in seen:
            raise ConfigError(f"{seen[b.source]} and {b.path} are both bundles of source {b.source!r} (a copied or "
                              "renamed folder?); select one of them with --source")
        seen[b.source] = b.path
    all_classes = list(dict.fromkeys(c for b in bundles for c in b.classes))
    if cfg.score:
        check_label_names(inputs.labels, all_classes, str(cfg.labels or cfg.inputs))
    k_top = min(cfg.top_k, max(len(b.classes) for b in bundles))
    columns = csv_columns(k_top, all_classes)
    finished, n_resumed = _rows_done(cfg.out_csv, columns) if cfg.resume else (set(), 0)
    todo = [p for p in inputs.paths if any((inputs.rel(p), b.source) not in finished for b in bundles)]
    specs = tuple(dict.fromkeys(b.preprocess for b in bundles))
    spec_of = [specs.index(b.preprocess) for b in bundles]
    cfg.out_csv.parent.mkdir(parents=True, exist_ok=True)
    start, n_done, n_classified = time.perf_counter(), 0, 0
    with open(cfg.out_csv, "a" if n_resumed else "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        if not n_resumed:
            writer.writerow(columns)
        for batch in decoded_batches(todo, specs, cfg.batch_size, cfg.workers):
            probs = [softmax(b.predict_logits(batch.inputs[j])) if batch.n_good else None
                     for b, j in zip(bundles, spec_of)]
            good = 0
            for path, error in zip(batch.paths, batch.errors):  # rows keep the inputs' order
                if error and cfg.strict:
                    f.flush()
                    raise DataError(f"{error} (--strict: stopped at the first unreadable file; the rows before it are "
                                    f"in {cfg.out_csv}: fix or remove the file and run again with --resume)")
                rel = inputs.rel(path)
                for b, p in zip(bundles, probs):
                    if (rel, b.source) in finished:
                        continue
                    label = (inputs.labels.get(path.resolve()) if inputs.labels else true_label(Path(rel), b.classes))
                    label = label if cfg.score and label in b.classes else ""  # another source's class: unlabelled
                    writer.writerow(_row(rel, b, label, None if error else p[good], k_top, error or "", all_classes))
                good += error is None
            f.flush()
            n_done += len(batch.paths)
            n_classified += batch.n_good
            if progress:
                progress(n_done, len(todo))
    seconds = time.perf_counter() - start
    extra = {"inputs": str(cfg.inputs), "precision": cfg.precision,
             "backends": {b.source: b.provider for b in bundles}}
    scores = score_predictions(cfg.out_csv, n_wrong=cfg.n_wrong, extra=extra)
    runs = {}
    for b in bundles:
        sc = scores[b.source]
        runs[b.source] = SourceRun(b.source, b.provider, b.backend.notes, sc.n_rows, sc.n_errors, sc.n_unlabelled,
                                   sc.metrics, sc.files)
    n_errors = max(r.n_errors for r in runs.values())  # an unreadable image has an error row per source
    return InferResult(csv_path=cfg.out_csv, root=inputs.root, n_images=len(inputs.paths), n_errors=n_errors,
                       n_resumed=n_resumed, n_classified=n_classified, seconds=seconds, sources=runs)
