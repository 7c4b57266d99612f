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
from gi_deploy.errors import ConfigError, DataError
from gi_deploy.runtime.evaluate import PROB_PREFIX, score_predictions
from gi_deploy.runtime.inputs import Inputs, check_label_names
from gi_deploy.runtime.job_types import (  # noqa: F401 (the job's vocabulary, imported from here by every mode)
    BASE_COLUMNS,
    DECODERS,
    Answer,
    Answered,
    InferConfig,
    InferResult,
    SourceRun,
    Strategy,
    answered,
    csv_columns,
    true_label,
)
from gi_deploy.runtime.outputs import PARQUET_NAME, check_outputs, sidecar_of, write_parquet  # noqa: F401


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
            out.parent.mkdir(parents=True, exist_ok=True)
            fd = _claim(out)  # the file itself, whatever its name: a hard link to it is refused, not truncated
            try:
                _prepare(cfg, job, out)
                if os.fstat(fd).st_ino != os.stat(out).st_ino:  # the resume step replaced a cut-short CSV
                    os.close(fd)
                    fd = -1
                    fd = _claim(out)
                if not job.n_resumed:
                    os.ftruncate(fd, 0)
                f = open(fd, "a", newline="", encoding="utf-8")  # owns the descriptor: closing it releases the claim
            except BaseException:
                if fd >= 0:
                    os.close(fd)  # a refused resume must not keep the claim for the rest of this process
                raise
            with f:
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


def _prepare(cfg: InferConfig, job: Job, out: Path) -> None:
    """Under the lock, with the CSV claimed: read a --resume CSV's rows, check its models and input
    folder against the sidecar, list what is left to do, write the sidecar."""
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
    write_json(sidecar_of(out), identities)


def _claim(out: Path) -> int:
    """An open descriptor of the CSV (created if new, never truncated here) holding an exclusive
    ``flock`` on the file itself: a second run that reaches it by another name (a hard link, which
    has its own name lock) is refused before it could truncate the rows being written."""
    fd = os.open(out, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        import fcntl  # POSIX; where it is missing (Windows) the name lock is all there is
    except ImportError:
        return fd
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        os.close(fd)
        if e.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
            raise
        raise ConfigError(
            f"{out} is being written by another gi-deploy process (under another name: a hard link to the "
            "same file); wait for it to finish or stop it, or choose another --out"
        ) from None
    return fd


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
