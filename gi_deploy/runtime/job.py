"""The one job every mode of inference runs: plan, open, classify, write, finish.

``infer`` (one source, every source, ``--source auto``), ``--ray``, serving and triage differ only in
how a batch becomes answers (a :class:`Strategy`: one model per source, or the router then the
routed model) and where the batches come from (decode workers, Ray actors, a video stream). The
steps, and so every guarantee, are these:

1. **plan** (:func:`plan_job`): inputs deduplicated; every path the job will write or delete listed
   by real path and refused when it is an input, the list or labels file, or inside the input
   folder; labels checked against the models' classes;
2. **open** (:func:`run_job`): the output lock taken on the CSV's real path; a ``--resume`` CSV read
   under it, its models checked against the sidecar (``<out>.bundles.json``) that names them;
3. **classify**: the caller's batches, answered by the strategy;
4. **write**: one row per (image, slot), each column filled by name, flushed every batch; a full
   disk keeps what was written and says to ``--resume``;
5. **finish**: the CSV scored (runtime/evaluate.py), refusals counted, the summary returned.

Torch-free.
"""

from __future__ import annotations

import csv
import errno
import io
import os
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from gi_deploy._io import create_exclusive, exclusive_lock, read_json, real_path, write_json
from gi_deploy.core.fields import helped
from gi_deploy.core.preprocess import PreprocessSpec
from gi_deploy.errors import ConfigError, DataError
from gi_deploy.runtime.evaluate import PROB_PREFIX, score_predictions
from gi_deploy.runtime.inputs import Inputs, check_label_names
from gi_deploy.runtime.report import SUFFIXES

BASE_COLUMNS = ("path", "source", "true_label", "predicted", "confidence")
DECODERS = ("auto", "cpu", "gpu")
PARQUET_NAME = "predictions.parquet"  # --parquet DIR: the one file a run writes there


@dataclass
class InferConfig:
    inputs: str | Path = helped(
        help="A folder (searched recursively), an image, a glob ('scans/**/*.jpg') or a .txt/.csv list of paths."
    )
    deploy_dir: Path = helped(Path("deploy"), "Bundles folder.")
    sources: list[str] | None = helped(
        None,
        "Bundle(s) to run, repeatable, or 'all'; each image gets one row per "
        "source (none: the only bundle). 'auto': the router picks each "
        "image's source, and refuses what no model was trained for.",
    )
    out_csv: Path = helped(Path("predictions.csv"), "Predictions CSV.")
    batch_size: int = helped(32, "Images per model call.")
    backend: str = helped(
        "auto",
        "auto: the fastest available (a TensorRT engine, onnxruntime on a GPU provider, torch "
        "on CUDA; on a CPU onnxruntime or OpenVINO, whichever measured faster here); "
        "onnxruntime | openvino | tensorrt; torch: the merged model rebuilt from its "
        "training run.",
    )
    precision: str = helped(
        "fp32",
        "fp32 | fp16 | int8 (the bundle's model files) | bf16 (OpenVINO on a CPU with native bf16, or torch on CUDA).",
    )
    device: str = helped("auto", "auto: TensorRT -> CUDA -> CPU, whichever is installed.")
    workers: int | None = helped(
        None,
        "Decoding processes (0: decode in the main process; none: one per core up to 4 "
        "for a CPU model, every core but one for a GPU model).",
    )
    compile: bool | None = helped(None, "torch.compile the torch backend (none: on CUDA).")
    decode: str = helped(
        "auto",
        "auto (gpu when every model runs on a GPU that can decode JPEGs and the GPU decoder "
        "measured faster than this machine's CPU workers, else cpu) | cpu (Pillow in the "
        "worker processes) | gpu (nvJPEG, batched; other files fall back to the CPU decoder "
        "one by one).",
    )
    threads: int | None = helped(None, "The model's CPU threads (none: every core this process may use).")
    labels: Path | None = helped(None, "CSV of (path, label): the true class of each image.")
    top_k: int = helped(3, "Classes and probabilities per row.")
    resume: bool = helped(False, "Keep the rows already in --out (a killed run's) and classify only the rest.")
    strict: bool = helped(False, "Stop at the first unreadable file instead of writing an error row for it.")
    n_wrong: int = helped(20, "Most confidently wrong images listed in the metrics.")
    explain_wrong: int = helped(
        0,
        "Write Grad-CAM heatmaps of the N most confidently wrong images (needs the "
        "training extra and the bundle's run).",
    )
    parquet_dir: Path | None = helped(
        None,
        "Also write the predictions as predictions.parquet in this folder, "
        "replaced at the end of the run (nothing else in the folder is "
        "touched).",
    )
    score: bool = True  # False: no labels read, checked or scored (evaluate --cross maps them itself)

    def __post_init__(self) -> None:
        self.deploy_dir, self.out_csv = Path(self.deploy_dir), Path(self.out_csv)
        self.parquet_dir = None if self.parquet_dir is None else Path(self.parquet_dir)
        if isinstance(self.sources, str):
            self.sources = [self.sources]
        if self.batch_size < 1 or self.top_k < 1:
            raise ConfigError(f"batch_size and top_k must be >= 1, got {self.batch_size} and {self.top_k}")
        if self.decode not in DECODERS:
            raise ConfigError(f"decode {self.decode!r} unknown; use one of {', '.join(DECODERS)}")
        if self.workers is not None and self.workers < 0:
            raise ConfigError(f"workers must be >= 0 (0 decodes in the main process), got {self.workers}")
        if self.threads is not None and self.threads < 1:
            raise ConfigError(
                f"threads must be >= 1 (or left out: every core this process may use), got {self.threads}"
            )
        if self.explain_wrong < 0:
            raise ConfigError(f"explain_wrong is a number of images (0: none), got {self.explain_wrong}")


@dataclass
class Answer:
    """One row's worth of a model's answer for one image."""

    source: str  # the model that answered (for --source auto: the routed source)
    probs: np.ndarray | None  # (C,) probabilities in that source's class order; None when refused
    extra: dict[str, str] = field(default_factory=dict)  # the strategy's own columns, by name
    rejected: bool = False
    reason: str = ""


class Strategy:
    """How a batch of decoded images becomes answers. ``slots``: the rows each image gets (each
    source's name, or ``("auto",)`` when the router picks one); ``specs``: the preprocessing every
    image is decoded under; ``classes``: every model's classes, first-appearance order (the
    ``prob:`` columns); ``columns``: the strategy's own CSV columns (after ``error``); ``bundles``:
    by source, loaded models (or, on a Ray driver, their manifests only)."""

    slots: tuple[str, ...]
    specs: tuple[PreprocessSpec, ...]
    classes: list[str]
    columns: tuple[str, ...] = ()
    bundles: dict

    def classify(self, inputs: list[np.ndarray]) -> list[list[Answer]]:
        """``inputs[j]``: the readable images' uint8 pixels (N, H, W, 3) under ``specs[j]``. Returns,
        per image, one Answer per slot, in slot order."""
        raise NotImplementedError

    def slot_of(self, source_column: str) -> str:
        """The slot a CSV row belongs to, from its ``source`` column (resume keys rows by it)."""
        return source_column

    def identities(self, precision: str) -> dict[str, dict]:
        """Per source (and per extra part, such as the router), what makes its rows one model's:
        written to the CSV's sidecar before the first row, compared on ``--resume``."""
        raise NotImplementedError

    def backends(self) -> dict[str, tuple[str, list[str]]]:
        """Per source: what its model runs on, and the notes the user must hear."""
        return {s: (b.provider, list(b.backend.notes)) for s, b in self.bundles.items()}

    def classes_of(self, source: str) -> list[str]:
        return list(self.bundles[source].classes)


@dataclass
class Answered:
    """One batch back from the classifier: ``items`` in input order, ``errors[i]`` why item i could
    not be read (None when it could), ``answers`` per readable item, one Answer per slot."""

    items: list
    errors: list[str | None]
    answers: list[list[Answer]]

    @property
    def n_good(self) -> int:
        return sum(e is None for e in self.errors)


def answered(strategy: Strategy, batches: Iterable) -> Iterator[Answered]:
    """Decoded batches (``paths``, ``errors``, ``inputs`` as runtime/decode/cpu.py's DecodedBatch)
    answered by ``strategy`` in this process."""
    for b in batches:
        yield Answered(list(b.paths), list(b.errors), strategy.classify(b.inputs) if b.n_good else [])


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
    n_rejected: int = 0  # rows refused as out of distribution (--source auto)

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
    n_duplicates: int = 0  # inputs listed more than once (classified once)
    parquet: Path | None = None

    @property
    def images_per_second(self) -> float:
        return self.n_classified / self.seconds if self.seconds > 0 else 0.0

    @property
    def n_rejected(self) -> int:
        return sum(r.n_rejected for r in self.sources.values())


def csv_columns(
    top_k: int, classes: list[str], extra: tuple[str, ...] = (), item: tuple[str, ...] = ()
) -> tuple[str, ...]:
    """The predictions CSV header: path, source, label, prediction, confidence, top-k, error, the
    input's own columns (``item``: a video frame's index and time), the strategy's (``extra``),
    then one probability column per class of every selected model."""
    top = tuple(f"top{i}_{what}" for i in range(1, top_k + 1) for what in ("class", "prob"))
    return (*BASE_COLUMNS, *top, "error", *item, *extra, *(PROB_PREFIX + c for c in classes))


def sidecar_of(csv_path: Path) -> Path:
    """``<csv>.bundles.json``: which models wrote a predictions CSV's rows."""
    return csv_path.with_name(csv_path.name + ".bundles.json")


def true_label(rel: Path, classes: list[str]) -> str | None:
    """The class named by the first folder of ``rel`` (relative to the scored folder), if any."""
    return rel.parts[0] if len(rel.parts) > 1 and rel.parts[0] in classes else None


@dataclass
class Job:
    """What one run does, decided before any image is decoded."""

    inputs: Inputs
    strategy: Strategy
    columns: tuple[str, ...]
    k_top: int
    items: list  # every input once, in order
    n_duplicates: int
    outputs: list[Path]  # every path the job writes or deletes, real paths
    todo: list = field(default_factory=list)  # filled under the lock: items with a slot still to write
    finished: set[tuple[str, str]] = field(default_factory=set)  # (path, slot) pairs already in the CSV
    n_resumed: int = 0


def job_outputs(cfg: InferConfig, sources: Iterable[str] = ()) -> tuple[list[Path], list[Path]]:
    """(files, folders) the job writes or deletes, by real path (a folder that is a symlink: where
    it points): the CSV and everything named after it (sidecar, temporary files, lock, metrics and
    report files ``<stem>.*``, the ``--explain-wrong`` folders ``<stem>_wrong`` and, per source,
    ``<stem>_<source>_wrong``) and the Parquet file."""
    out = real_path(cfg.out_csv)
    files = [out, sidecar_of(out), out.with_name(f".{out.name}.lock")]
    folders = (
        [real_path(out.parent / f"{out.stem}{part}_wrong") for part in ("", *(f"_{s}" for s in sources))]
        if cfg.explain_wrong
        else []
    )
    if cfg.parquet_dir is not None:
        files.append(real_path(cfg.parquet_dir) / PARQUET_NAME)
    return files, folders


# What the scoring writes beside the CSV: <stem>[.<source>]<ending> (runtime/evaluate.py, runtime/report.py)
REPORT_ENDINGS = (".metrics.json", *SUFFIXES.values())


def _in_family(p: Path, out: Path) -> bool:
    """Whether ``p`` has a name the job derives from ``out`` in its folder: ``<name>.<anything>``
    (sidecar, temporary files), its lock, ``<stem>[.<source>].metrics.json`` and the report files,
    ``<stem>_wrong`` and ``<stem>_<source>_wrong``. (``<stem>.jpg``, an image beside a CSV of the
    same stem, is not one: ``infer a.jpg --out a.csv`` writes nothing over it.)"""
    n = p.name
    return p.parent == out.parent and (
        n.startswith(out.name + ".")
        or n == f".{out.name}.lock"
        or (n.startswith(out.stem + ".") and n.endswith(REPORT_ENDINGS))
        or (n.startswith(out.stem + "_") and n.endswith("_wrong"))
    )


def check_outputs(cfg: InferConfig, inputs: Inputs, sources: Iterable[str] = ()) -> list[Path]:
    """Refuse, before anything starts, any output that is an input, the list or labels file, inside
    the input folder, or a folder that holds an input: ConfigError naming both. ``sources``: the
    models' (their ``--explain-wrong`` folders). Returns the outputs."""
    out = cfg.out_csv
    if out.is_dir() or str(out).endswith(("/", "\\")):
        raise ConfigError(
            f"--out {out} is a folder; give the predictions CSV's file name, e.g. {out / 'predictions.csv'}"
        )
    files, folders = job_outputs(cfg, sources)
    spec = Path(str(cfg.inputs))
    given = [p for p in (spec, cfg.labels) if p is not None and Path(p).is_file()]
    protected = {real_path(p): str(p) for p in [*inputs.paths, *given]}
    out_real = files[0]
    for p, shown in protected.items():
        if p == out_real:
            raise ConfigError(
                f"--out {out} is one of the inputs; writing the predictions there would destroy it. "
                "Choose another --out"
            )
        if p in files or any(_in_family(a, out_real) for a in (p, *p.parents)):
            raise ConfigError(
                f"--out {out} would write {p.name} beside it, and {shown} is one of the inputs of this "
                "run: it would be overwritten or deleted. Choose another --out (another name or folder)"
            )
        for d in folders:
            if p == d or p.is_relative_to(d):
                raise ConfigError(
                    f"{shown} is an input of this run, inside {d}, which this run writes and clears; "
                    "choose another --out or --parquet"
                )
    if spec.is_dir():
        root = real_path(spec)
        for o in [*files, *folders]:
            if o.is_relative_to(root) or o == root or root.is_relative_to(o):
                raise ConfigError(
                    f"--out {out} writes {o}, which lies inside the input folder {spec} (or holds it): the next run "
                    f"over that folder would classify (or lose) it. Write it outside, e.g. --out "
                    f"{spec.resolve().parent / out.name}"
                )
    if cfg.parquet_dir is not None and cfg.parquet_dir.exists():
        if not cfg.parquet_dir.is_dir():
            raise ConfigError(
                f"--parquet {cfg.parquet_dir} exists and is not a folder; give a folder (this run "
                f"writes {PARQUET_NAME} into it)"
            )
        # a reader of the folder (pyarrow, Spark, Ray) takes every Parquet file in it as one table
        others = sorted(
            p.name
            for p in cfg.parquet_dir.iterdir()
            if p.name.endswith(".parquet") and p.name != PARQUET_NAME and not p.name.startswith((".", "_"))
        )
        if others:
            raise ConfigError(
                f"--parquet {cfg.parquet_dir} already holds other Parquet files ({', '.join(others[:3])}"
                f"{', ...' if len(others) > 3 else ''}), which a reader of the folder would mix with "
                "this run's rows; move them away or give another folder"
            )
    return [*files, *folders]


def plan_job(cfg: InferConfig, inputs: Inputs, strategy: Strategy) -> Job:
    """Check the outputs against the inputs and the labels against the classes, drop repeated
    inputs, build the CSV header. Raises ConfigError before anything is written. An ``--out`` that
    is a symlink becomes the file it names, so the sidecar, lock and reports go beside that file
    (not beside the link, where the checks below would not see them) and ``cfg.out_csv`` is it."""
    if cfg.out_csv.is_symlink():
        cfg.out_csv = real_path(cfg.out_csv)
    outputs = check_outputs(cfg, inputs, strategy.bundles)
    if cfg.score:
        check_label_names(inputs.labels, strategy.classes, str(cfg.labels or cfg.inputs))
    seen: dict[str, object] = {}
    for p in inputs.paths:  # a list naming one file twice would write its rows twice
        seen.setdefault(inputs.rel(p), p)
    items = list(seen.values())
    k_top = min(cfg.top_k, max(len(strategy.classes_of(s)) for s in strategy.bundles))
    columns = csv_columns(k_top, strategy.classes, strategy.columns, getattr(inputs, "extra_columns", ()))
    return Job(inputs, strategy, columns, k_top, items, len(inputs.paths) - len(items), outputs)


_WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG}


def _rows_done(
    csv_path: Path, columns: tuple[str, ...], slot_of: Callable[[str], str]
) -> tuple[set[tuple[str, str]], int]:
    """The (path, slot) pairs of the complete rows a killed run left in a predictions CSV, and their
    count. A last line cut short by the kill is dropped from the file; a CSV with another header, or
    a malformed row with rows after it, is a ConfigError. Only the pairs are kept."""
    if not csv_path.is_file() or csv_path.stat().st_size == 0:
        return set(), 0
    raw = csv_path.read_bytes()
    trimmed = not raw.endswith(b"\n")  # the kill cut the last line: dropped, once the header is known to be ours
    ours = io.StringIO(newline="")
    csv.writer(ours).writerow(columns)
    if trimmed and b"\n" not in raw and ours.getvalue().encode("utf-8").startswith(raw):
        csv_path.write_bytes(b"")  # killed before the header was complete: nothing to keep
        return set(), 0
    try:
        text = raw[: raw.rfind(b"\n") + 1].decode("utf-8") if trimmed else raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(
            f"--resume: {csv_path} is not a predictions CSV (not UTF-8 text: {e.reason} at byte "
            f"{e.start}); use another --out, or drop --resume"
        ) from e
    reader = csv.reader(io.StringIO(text, newline=""))
    header = tuple(next(reader, ()))
    if header != columns:  # checked before anything is written: a CSV that is not this run's is left as it is
        raise ConfigError(
            f"--resume: {csv_path} has columns {list(header)}, this run writes {list(columns)} "
            "(other sources, --top-k or gi-deploy version); use another --out, or drop --resume"
        )
    pairs, n, cut = set(), 0, False
    tmp = csv_path.with_name(csv_path.name + ".resume.tmp")
    with create_exclusive(tmp) as out:  # the complete rows, re-written identically
        writer = csv.writer(out)
        writer.writerow(header)
        try:
            for row in reader:
                if cut:  # a broken row with rows after it: not a kill, a damaged file
                    raise ConfigError(
                        f"--resume: {csv_path} has a malformed row before line {reader.line_num} "
                        "(two processes wrote it, or it was edited); use another --out"
                    )
                if len(row) != len(columns):  # the kill cut a quoted path that holds a newline
                    cut = True
                    continue
                writer.writerow(row)
                pairs.add((row[0], slot_of(row[1])))
                n += 1
        except csv.Error:  # the file ends inside a quoted field
            cut = True
    cut = cut or trimmed
    if cut:
        os.replace(tmp, csv_path)
    else:
        tmp.unlink()
    return pairs, n


def _check_same_models(csv_path: Path, identities: dict[str, dict]) -> dict[str, dict]:
    """--resume keeps rows only when the same models wrote them: ConfigError naming both otherwise
    (a sidecar that is missing, not an object, or silent about a part of this run included).
    Returns the sidecar's parts this run does not load (their rows stay in the CSV: so must they)."""
    side = sidecar_of(csv_path)
    if not side.is_file():
        raise ConfigError(
            f"--resume: {csv_path} has rows but no {side.name} saying which models wrote them (written by "
            "an older gi-deploy, or the file was removed), so they could mix with another model's; use "
            "another --out, or drop --resume"
        )
    recorded = read_json(side, "predictions sidecar")
    recorded = recorded if isinstance(recorded, dict) else {}
    for part, now in identities.items():
        before = recorded.get(part)
        same = isinstance(before, dict) and {k: before.get(k) for k in now if k != "bundle"} == {
            k: v for k, v in now.items() if k != "bundle"
        }
        if not same:
            was = (
                f"{before.get('bundle')} (export {str(before.get('export_key'))[:12]}, {before.get('precision')})"
                if isinstance(before, dict)
                else f"models {side.name} does not name for {part}"
            )
            raise ConfigError(
                f"--resume: the {part} rows in {csv_path} were written by {was}; this run loads "
                f"{now.get('bundle')} (export {str(now.get('export_key'))[:12]}, {now.get('precision')})"
                ": one CSV would mix two models. Use another --out, or drop --resume to start again"
            )
    return {part: v for part, v in recorded.items() if part not in identities}


INPUTS_PART = "_inputs"  # the sidecar's entry for the folder the CSV's paths are relative to


def _check_same_root(csv_path: Path, before: object, now: dict) -> None:
    """--resume keeps rows only for the same images: the CSV's paths are relative to the folder
    classified, so another folder's ``a/1.jpg`` would be taken for done. ConfigError naming both."""
    if before != now:
        was = before.get("root") if isinstance(before, dict) else f"a folder {sidecar_of(csv_path).name} does not name"
        raise ConfigError(
            f"--resume: the rows in {csv_path} are paths relative to {was}; this run's are relative to "
            f"{now['root']}: the same names may be other images. Resume with the same INPUT, or use "
            "another --out"
        )


@contextmanager
def _opened(cfg: InferConfig, job: Job) -> Iterator[tuple]:
    """The CSV under an exclusive lock on its real path; with ``--resume`` its rows read under the
    lock and its models checked; the sidecar written before the first row. Yields (file, writer).
    A full disk or read-only folder is a DataError that keeps the rows and says to --resume."""
    out = cfg.out_csv
    try:
        with exclusive_lock(out, "choose another --out"):
            slot_of = job.strategy.slot_of
            job.finished, job.n_resumed = _rows_done(out, job.columns, slot_of) if cfg.resume else (set(), 0)
            identities = job.strategy.identities(cfg.precision)
            root = {"root": str(real_path(job.inputs.root))}  # the CSV's paths are relative to it
            if job.n_resumed:  # a source this run does not select keeps its rows, and so its entry
                kept = _check_same_models(out, identities)
                _check_same_root(out, kept.pop(INPUTS_PART, None), root)
                identities = {**kept, **identities}
            identities[INPUTS_PART] = root
            rel, slots = job.inputs.rel, job.strategy.slots
            job.todo = [p for p in job.items if any((rel(p), s) not in job.finished for s in slots)]
            out.parent.mkdir(parents=True, exist_ok=True)
            write_json(sidecar_of(out), identities)
            with open(out, "a" if job.n_resumed else "w", newline="", encoding="utf-8") as f:
                writer = csv.writer(f)
                if not job.n_resumed:
                    writer.writerow(job.columns)
                yield f, writer
    except OSError as e:
        if e.errno not in _WRITE_ERRNOS:
            raise
        raise DataError(
            f"cannot write {out}: {e.strerror} ({e.filename or out}); the rows already written are "
            "kept: free space or fix the folder's permissions, then run the same command with --resume "
            "to continue"
        ) from e


def _label_of(cfg: InferConfig, job: Job, item, rel: str, classes: list[str]) -> str:
    inputs = job.inputs
    label = inputs.labels.get(Path(item).resolve()) if inputs.labels else true_label(Path(rel), classes)
    return label if cfg.score and label in classes else ""  # another source's class: unlabelled


def _row(job: Job, values: dict[str, str]) -> list[str]:
    return [values.get(c, "") for c in job.columns]


def _answer_values(job: Job, a: Answer) -> dict[str, str]:
    classes = job.strategy.classes_of(a.source)
    v = {"source": a.source, **a.extra}
    if a.probs is None:
        return v
    order = np.argsort(-a.probs, kind="stable")[: job.k_top]
    v.update(predicted=classes[order[0]], confidence=f"{a.probs[order[0]]:.6f}")
    for i, k in enumerate(order, start=1):
        v[f"top{i}_class"], v[f"top{i}_prob"] = classes[k], f"{a.probs[k]:.6f}"
    v.update({PROB_PREFIX + c: f"{p:.6f}" for c, p in zip(classes, a.probs)})
    return v


def write_rows(cfg: InferConfig, job: Job, writer, f, batch: Answered) -> None:
    """One batch's rows (per item and slot not already in the CSV), in input order, then flush. With
    ``cfg.strict`` the first unreadable file raises DataError (the rows before it are flushed)."""
    good = 0
    extra_values = getattr(job.inputs, "extra_values", None)
    for item, error in zip(batch.items, batch.errors):
        if error and cfg.strict:
            f.flush()
            raise DataError(
                f"{error} (--strict: stopped at the first unreadable file; the rows before it are "
                f"in {cfg.out_csv}: fix or remove the file and run again with --resume)"
            )
        rel = job.inputs.rel(item)
        own = extra_values(item) if extra_values else {}
        answers = None if error else batch.answers[good]
        for i, slot in enumerate(job.strategy.slots):
            if (rel, slot) in job.finished:
                continue
            if answers is None:
                values = {"source": slot, "error": error}
            else:
                a = answers[i]
                values = _answer_values(job, a)
                values["true_label"] = _label_of(cfg, job, item, rel, job.strategy.classes_of(a.source))
            writer.writerow(_row(job, {"path": rel, **own, **values}))
        good += error is None
    f.flush()


def run_job(
    cfg: InferConfig,
    job: Job,
    batches: Callable[[list], Iterable[Answered]],
    progress: Callable[[int, int], None] | None = None,
    backends: Callable[[], dict] | None = None,
    extra: dict | None = None,
) -> InferResult:
    """Open the outputs (lock, resume, sidecar), write the rows of ``batches(job.todo)`` as they
    come, then score and sum up. ``batches`` gets the items still to classify, in order, and yields
    them answered (:func:`answered` over decoded batches, Ray's actors, a video's frames);
    ``backends()`` says per source what ran (default: the strategy's). ``progress(done, total)``
    after every batch."""
    import time

    start, n_done, n_classified = time.perf_counter(), 0, 0
    with _opened(cfg, job) as (f, writer):
        for batch in batches(job.todo):
            write_rows(cfg, job, writer, f, batch)
            n_done += len(batch.items)
            n_classified += batch.n_good
            if progress:
                progress(n_done, len(job.todo))
        f.flush()
        seconds = time.perf_counter() - start
        # still under the lock: another run on this --out would rewrite the CSV while it is scored
        return finish_job(cfg, job, (backends or job.strategy.backends)(), n_classified, seconds, extra)


def finish_job(
    cfg: InferConfig,
    job: Job,
    backends: dict[str, tuple[str, list[str]]],
    n_classified: int,
    seconds: float,
    extra: dict | None = None,
) -> InferResult:
    """Score the whole CSV (runtime/evaluate.py), write the Parquet copy, sum the run up. Sources
    are the models' (an unreadable image's row under ``auto`` counts as an error, not a source)."""
    extra = {
        "inputs": str(cfg.inputs),
        "precision": cfg.precision,
        "backends": {s: provider for s, (provider, _) in backends.items()},
        **(extra or {}),
    }
    scores = score_predictions(cfg.out_csv, n_wrong=cfg.n_wrong, extra=extra)
    runs = {}
    for s in job.strategy.bundles:
        provider, notes = backends.get(s, ("not run", []))
        sc = scores.get(s)
        runs[s] = (
            SourceRun(s, provider, notes, 0, 0, 0, None, {})
            if sc is None
            else SourceRun(
                s, provider, notes, sc.n_rows, sc.n_errors, sc.n_unlabelled, sc.metrics, sc.files, sc.n_rejected
            )
        )
    per_slot = [scores[s].n_errors for s in job.strategy.slots if s in scores]
    n_errors = max(per_slot, default=0)  # an unreadable image has an error row per slot
    result = InferResult(
        csv_path=cfg.out_csv,
        root=job.inputs.root,
        n_images=len(job.items),
        n_errors=n_errors,
        n_resumed=job.n_resumed,
        n_classified=n_classified,
        seconds=seconds,
        sources=runs,
        n_duplicates=job.n_duplicates,
    )
    if cfg.parquet_dir is not None:
        result.parquet = write_parquet(cfg.out_csv, job.columns, cfg.parquet_dir)
    return result


def write_parquet(csv_path: Path, columns: tuple[str, ...], folder: Path) -> Path:
    """The finished CSV as ``<folder>/predictions.parquet`` with an explicit schema (probabilities
    and confidences float64, everything else text; an error row's empty numbers are nulls), written
    to a new temporary file in ``folder`` that then replaces that one file: never appended to, never
    mixed with an earlier run's, and nothing else in the folder touched (it may hold the CSV, or the
    user's files). Needs pyarrow (the scale extra)."""
    try:
        import pyarrow as pa
        import pyarrow.csv as pacsv
        import pyarrow.parquet as pq
    except ImportError as e:
        from gi_deploy.errors import DependencyError

        raise DependencyError(f"--parquet needs pyarrow ({e}); install it with: pip install 'gi-deploy[scale]'") from e
    numeric = lambda c: (
        c.startswith(PROB_PREFIX)
        or c == "confidence"
        or c.endswith("_prob")
        or c
        in (  # noqa: E731
            "router_confidence",
            "id_score",
            "id_threshold",
        )
    )
    types = {c: pa.float64() if numeric(c) else pa.string() for c in columns}
    table = pacsv.read_csv(
        csv_path,
        convert_options=pacsv.ConvertOptions(
            column_types=types, strings_can_be_null=False, null_values=[""], quoted_strings_can_be_null=False
        ),
    )
    table = table.cast(pa.schema([(c, types[c]) for c in columns]))
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".{PARQUET_NAME}.tmp"  # hidden: Parquet readers skip it
    with create_exclusive(tmp, "wb") as f:  # new, never through a planted link
        pq.write_table(table, f)
    os.replace(tmp, folder / PARQUET_NAME)
    return folder / PARQUET_NAME
