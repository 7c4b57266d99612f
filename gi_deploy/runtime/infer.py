"""Batch-classify a folder of images with a bundle and score it when labels are known."""

from __future__ import annotations

import csv
import errno
import logging
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from gi_deploy._io import exclusive_lock, read_json, write_json
from gi_deploy.core.bundles import content_sha256, resolve_bundle_dirs
from gi_deploy.core.fields import helped
from gi_deploy.core.metrics import softmax
from gi_deploy.core.preprocess import PreprocessSpec
from gi_deploy.errors import ConfigError, DataError, DependencyError
from gi_deploy.runtime.evaluate import PROB_PREFIX, score_predictions
from gi_deploy.runtime.inputs import Inputs, check_label_names, collect_inputs
from gi_deploy.runtime.loader import Bundle, load_bundle
from gi_deploy.runtime.decode.cpu import decode_batch, decoded_batches, default_workers

log = logging.getLogger(__name__)


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
    workers: int | None = helped(None, "Decoding processes (0: decode in the main process; none: one per core up to 4 "
                                       "for a CPU model, every core but one for a GPU model).")
    compile: bool | None = helped(None, "torch.compile the torch backend (none: on CUDA).")
    decode: str = helped("auto", "auto (gpu when every model runs on a GPU that can decode JPEGs and the machine has "
                                 "under 13 cores, else cpu) | cpu "
                                 "(Pillow in the worker processes) | gpu (nvJPEG; other files fall back to the CPU "
                                 "decoder one by one).")
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
        if self.decode not in DECODERS:
            raise ConfigError(f"decode {self.decode!r} unknown; use one of {', '.join(DECODERS)}")
        if self.workers is not None and self.workers < 0:
            raise ConfigError(f"workers must be >= 0 (0 decodes in the main process), got {self.workers}")
        if self.threads is not None and self.threads < 1:
            raise ConfigError(f"threads must be >= 1 (or left out: every core this process may use), got {self.threads}")
        self.workers = capped_workers(self.workers)


# A decode worker holds a process image (~150 MB with numpy and Pillow), its batches in flight and
# the pool's queue: budget 512 MB each, so --workers never asks for more memory than the machine has.
WORKER_BYTES = 512 << 20


def capped_workers(workers: int | None) -> int | None:
    """``workers``, or as many as the available memory allows (at least 1), with a warning saying so
    (None, the default decided once the models are loaded, is left to that choice)."""
    if workers is None:
        return None
    try:
        available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):  # not a POSIX system: no cap
        return workers
    cap = max(1, available // WORKER_BYTES, min(workers, os.cpu_count() or 1))
    if workers > cap:
        log.warning("--workers %d: the %.1f GB of free memory allows %d decode workers (%d MB each); using %d",
                    workers, available / 1e9, cap, WORKER_BYTES >> 20, cap)
        return cap
    return workers


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
    decoder: str = ""  # which decoder ran, and how many images each decoded
    workers: int = 0

    @property
    def images_per_second(self) -> float:
        return self.n_classified / self.seconds if self.seconds > 0 else 0.0


DECODERS = ("auto", "cpu", "gpu")


def specs_of(bundles: list[Bundle]) -> tuple:
    """The distinct preprocessing specs of the bundles, in order (each image is decoded once per spec)."""
    return tuple(dict.fromkeys(b.preprocess for b in bundles))


def choose_decoder(decode: str, bundles: list, specs: tuple) -> tuple[str, Callable, Callable | None]:
    """(what ran, the workers' function, the main process's finishing step) for ``decode``. The GPU
    decoder feeds GPU models only (its batches stay on the device). ``auto`` takes it when every
    selected model runs on a GPU that nvJPEG can use and it measured faster than this machine's CPU
    decode workers (runtime/decode/measure.py, cached per machine). Raises ConfigError
    / DependencyError when ``gpu`` is asked for where it cannot run."""
    backends = [getattr(b, "backend", b) for b in bundles]  # bundles, or (in the benchmark) bare backends
    on_gpu = all(b.device == "cuda" and b.run_pixels is not None for b in backends)
    if decode == "cpu" or (decode == "auto" and not on_gpu):
        return "cpu (Pillow" + (", draft" if any(s.decode == "draft" for s in specs) else "") + ")", decode_batch, None
    if not on_gpu:
        raise ConfigError("--decode gpu feeds models that run on the GPU (torch or TensorRT on CUDA); "
                          f"{', '.join(b.name + ' on ' + b.detail for b in backends)}: use --decode cpu")
    from gi_deploy.runtime.decode import gpu as gpu_decode  # lazy: the GPU decoder needs torch and torchvision

    ok, why = gpu_decode.nvjpeg_status()
    if not ok:
        if decode == "auto":
            return f"cpu (Pillow; no GPU decoding: {why})", decode_batch, None
        raise DependencyError(f"--decode gpu: {why}; use --decode cpu")
    if decode == "auto":
        from gi_deploy.runtime.decode.measure import gpu_decoding_faster  # lazy: measures with torch

        faster, rates = gpu_decoding_faster(specs)
        if not faster:
            return f"cpu (Pillow; {rates})", decode_batch, None
        why = f"{why}; {rates}"
    return f"gpu ({why})", gpu_decode.read_batch, gpu_decode.GpuDecoder(specs)


def true_label(rel: Path, classes: list[str]) -> str | None:
    """The class named by the first folder of ``rel`` (relative to the scored folder), if any."""
    return rel.parts[0] if len(rel.parts) > 1 and rel.parts[0] in classes else None


@contextmanager
def _removed_on_error(path: Path):
    try:
        yield
    except BaseException:
        path.unlink(missing_ok=True)
        raise


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
        pairs, n, cut = set(), 0, False
        tmp = csv_path.with_name(csv_path.name + ".resume.tmp")
        with _removed_on_error(tmp), open(tmp, "w", newline="", encoding="utf-8") as out:  # the complete rows, re-written identically
            writer = csv.writer(out)
            writer.writerow(header)
            try:
                for row in reader:
                    if cut:  # a broken row with rows after it: not a kill, a damaged file
                        raise ConfigError(f"--resume: {csv_path} has a malformed row before line {reader.line_num} "
                                          "(two processes wrote it, or it was edited); use another --out")
                    if len(row) != len(columns):  # the kill cut a quoted path that holds a newline
                        cut = True
                        continue
                    writer.writerow(row)
                    pairs.add((row[0], row[1]))  # path, source
                    n += 1
            except csv.Error:  # the file ends inside a quoted field
                cut = True
    if cut:
        tmp.replace(csv_path)
    else:
        tmp.unlink()
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


def bundles_sidecar(csv_path: Path) -> Path:
    """``<csv>.bundles.json``: which model wrote each source's rows of a predictions CSV."""
    return csv_path.with_name(csv_path.name + ".bundles.json")


def bundle_identity(b: Bundle, precision: str) -> dict:
    """What makes one source's rows one model's: the bundle's export key and content hash, and the
    model file (precision and sha256) that ran."""
    m = b.manifest
    return {"bundle": str(b.path), "export_key": m.get("export_key"), "content_sha256": content_sha256(m),
            "precision": precision, "model_sha256": m["models"].get(precision, {}).get("sha256")}


def _check_same_models(csv_path: Path, identities: dict[str, dict]) -> None:
    """--resume keeps rows only when the same models wrote them: ConfigError naming both otherwise."""
    side = bundles_sidecar(csv_path)
    if not side.is_file():
        raise ConfigError(f"--resume: {csv_path} has rows but no {side.name} saying which models wrote them (written by "
                          "an older gi-deploy, or the file was removed), so they could mix with another model's; use "
                          "another --out, or drop --resume")
    recorded = read_json(side, "predictions sidecar")
    for source, now in identities.items():
        before = recorded.get(source) if isinstance(recorded, dict) else None
        if before is not None and {k: before.get(k) for k in now if k != "bundle"} != \
                {k: v for k, v in now.items() if k != "bundle"}:
            raise ConfigError(
                f"--resume: the {source} rows in {csv_path} were written by {before.get('bundle')} (export "
                f"{str(before.get('export_key'))[:12]}, {before.get('precision')}), this run loads {now['bundle']} "
                f"(export {str(now['export_key'])[:12]}, {now['precision']}): one CSV would mix two models. Use "
                "another --out, or drop --resume to start it again")


def check_out_path(cfg: InferConfig, inputs) -> None:
    """Refuse an ``--out`` that would destroy or pollute an input: a folder, an input image, the list
    or labels file, or a path inside the input folder (a later run would classify its report PNGs)."""
    out = cfg.out_csv
    if out.is_dir() or str(out).endswith(("/", "\\")):
        raise ConfigError(f"--out {out} is a folder; give the predictions CSV's file name, e.g. {out / 'predictions.csv'}")
    real = lambda p: Path(os.path.realpath(p))  # no error on a symlink loop among the inputs
    resolved = real(out)
    spec = Path(str(cfg.inputs))
    protected = {real(p) for p in inputs.paths}
    protected |= {real(p) for p in (spec, cfg.labels) if p is not None and p.is_file()}
    if resolved in protected:
        raise ConfigError(f"--out {out} is one of the inputs; writing the predictions there would destroy it. Choose "
                          "another --out")
    if spec.is_dir() and resolved.is_relative_to(real(spec)):
        raise ConfigError(f"--out {out} lies inside the input folder {spec}: the CSV and its report images would be "
                          "classified by the next run over that folder. Write it outside, e.g. --out "
                          f"{spec.resolve().parent / out.name}")


_WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG}


def infer_folder(cfg: InferConfig, progress: Callable[[int, int], None] | None = None) -> InferResult:
    """Classify every image of ``cfg.inputs`` (a folder, an image, a glob or a list file) with
    every selected source's bundle; write one CSV row per (image, source) as it goes (path,
    source, label, prediction, confidence, top-k, error, every class's probability), flushed
    every batch. Images are decoded once, in decode worker processes, while the model runs.

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
    check_out_path(cfg, inputs)
    bundles = [load_bundle(d, cfg.precision, cfg.device, backend=cfg.backend, threads=cfg.threads, compile=cfg.compile,
                           batch_size=cfg.batch_size) for d in dirs]
    workers = cfg.workers if cfg.workers is not None else default_workers(gpu=any(b.device == "cuda" for b in bundles))
    decoder, reader, finish = choose_decoder(cfg.decode, bundles, specs_of(bundles))
    job = plan_job(cfg, inputs, bundles)
    start, n_done, n_classified = time.perf_counter(), 0, 0
    with open_csv(cfg, job) as (f, writer):
        for batch in decoded_batches(job.todo, job.specs, cfg.batch_size, workers, reader=reader, finish=finish):
            probs = [softmax(b.predict_logits(batch.inputs[j])) if batch.n_good else None
                     for b, j in zip(bundles, job.spec_of)]
            write_rows(cfg, job, writer, f, batch.paths, batch.errors, probs)
            n_done += len(batch.paths)
            n_classified += batch.n_good
            if progress:
                progress(n_done, len(job.todo))
    seconds = time.perf_counter() - start
    decoder += f" ({finish.n_gpu} on the GPU, {finish.n_cpu} on the CPU)" if hasattr(finish, "n_gpu") else ""
    result = finish_job(cfg, job, {b.source: (b.provider, b.backend.notes) for b in bundles}, n_classified, seconds,
                        {"decoder": decoder, "decode_workers": workers})
    result.decoder, result.workers = decoder, workers
    return result


@dataclass
class Job:
    """What one infer run does, decided before any image is decoded (shared by the local run and
    the Ray one, runtime/ray_infer.py). ``bundles`` need only ``source``, ``classes``,
    ``preprocess``, ``path`` and ``manifest``: the Ray driver plans with manifests, its actors load
    the models."""

    inputs: Inputs
    bundles: list
    all_classes: list[str]
    k_top: int
    columns: tuple[str, ...]
    finished: set[tuple[str, str]]  # (path, source) pairs already in the CSV (--resume)
    n_resumed: int
    todo: list[Path]  # images with at least one source still to classify
    specs: tuple[PreprocessSpec, ...]  # the distinct preprocessing of the bundles
    spec_of: list[int]  # bundle i's inputs are decoded under specs[spec_of[i]]
    identities: dict[str, dict]  # per source, the model that writes its rows (the CSV's sidecar)


def plan_job(cfg: InferConfig, inputs: Inputs, bundles: list) -> Job:
    """Check the selected bundles and labels, read what a resumed CSV already holds and list
    the images still to classify. Raises ConfigError for two bundles of one source or a label no
    bundle knows."""
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
    specs = specs_of(bundles)
    return Job(inputs, bundles, all_classes, k_top, columns, finished, n_resumed, todo, specs,
               [specs.index(b.preprocess) for b in bundles],
               {b.source: bundle_identity(b, cfg.precision) for b in bundles})


@contextmanager
def open_csv(cfg: InferConfig, job: Job) -> Iterator[tuple]:
    """The predictions CSV under an exclusive lock (a second writer is refused naming the holder),
    appended to when resuming the same models' rows (else written with its header), with the
    sidecar naming the models that write it: (file, writer). A full disk or a read-only folder while
    writing is a DataError that keeps the rows written and says to --resume."""
    try:
        with exclusive_lock(cfg.out_csv, "choose another --out"):
            if job.n_resumed:
                _check_same_models(cfg.out_csv, job.identities)
            cfg.out_csv.parent.mkdir(parents=True, exist_ok=True)
            side = bundles_sidecar(cfg.out_csv)  # written before the first row: which models write them
            kept = read_json(side, "predictions sidecar") if job.n_resumed else {}
            write_json(side, {**(kept if isinstance(kept, dict) else {}), **job.identities})
            with open(cfg.out_csv, "a" if job.n_resumed else "w", newline="", encoding="utf-8") as f:
                writer = csv.writer(f)
                if not job.n_resumed:
                    writer.writerow(job.columns)
                yield f, writer
    except OSError as e:
        if e.errno not in _WRITE_ERRNOS:
            raise
        raise DataError(f"cannot write {cfg.out_csv}: {e.strerror} ({e.filename or cfg.out_csv}); the rows already "
                        "written are kept: free space or fix the folder's permissions, then run the same command "
                        "with --resume to continue") from e


def write_rows(cfg: InferConfig, job: Job, writer, f, paths: list[Path], errors: list[str | None],
               probs: list[np.ndarray | None]) -> None:
    """Write one batch's rows (one per image and source not already in the CSV) in ``paths``'
    order and flush. ``probs[i]`` is bundle i's (n_good, classes) probabilities of the readable
    images, in order. With ``cfg.strict``, the first unreadable file raises DataError (rows before
    it are flushed)."""
    inputs, good = job.inputs, 0
    for path, error in zip(paths, errors):
        if error and cfg.strict:
            f.flush()
            raise DataError(f"{error} (--strict: stopped at the first unreadable file; the rows before it are "
                            f"in {cfg.out_csv}: fix or remove the file and run again with --resume)")
        rel = inputs.rel(path)
        for b, p in zip(job.bundles, probs):
            if (rel, b.source) in job.finished:
                continue
            label = (inputs.labels.get(path.resolve()) if inputs.labels else true_label(Path(rel), b.classes))
            label = label if cfg.score and label in b.classes else ""  # another source's class: unlabelled
            writer.writerow(_row(rel, b, label, None if error else p[good], job.k_top, error or "", job.all_classes))
        good += error is None
    f.flush()


def finish_job(cfg: InferConfig, job: Job, backends: dict[str, tuple[str, list[str]]], n_classified: int,
               seconds: float, extra: dict | None = None) -> InferResult:
    """Score the whole CSV (runtime/evaluate.py) and sum the run up. ``backends``: per source,
    what its model ran on and the backend's notes; ``extra`` goes into the metrics JSON."""
    extra = {"inputs": str(cfg.inputs), "precision": cfg.precision,
             "backends": {s: provider for s, (provider, _) in backends.items()}, **(extra or {})}
    scores = score_predictions(cfg.out_csv, n_wrong=cfg.n_wrong, extra=extra)
    runs = {}
    for b in job.bundles:
        sc, (provider, notes) = scores[b.source], backends[b.source]
        runs[b.source] = SourceRun(b.source, provider, notes, sc.n_rows, sc.n_errors, sc.n_unlabelled,
                                   sc.metrics, sc.files)
    n_errors = max(r.n_errors for r in runs.values())  # an unreadable image has an error row per source
    return InferResult(csv_path=cfg.out_csv, root=job.inputs.root, n_images=len(job.inputs.paths),
                       n_errors=n_errors, n_resumed=job.n_resumed, n_classified=n_classified, seconds=seconds,
                       sources=runs)
