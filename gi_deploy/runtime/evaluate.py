"""Re-score an existing predictions CSV without a model: metrics JSON and report files per source.

The CSV contract (written by the runtime, one row per (image, source)):
``path, source, true_label, predicted, confidence, top1_class, top1_prob, ..., error,
prob:<class1>, prob:<class2>, ...``. The ``prob:`` columns span the union of all sources'
classes; a source's own classes are the ones whose column is filled in its rows. Error rows
have empty prediction fields; an empty ``true_label`` means unknown.
"""

from __future__ import annotations

import csv
import heapq
from array import array
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from gi_deploy._io import write_json
from gi_deploy.core.metrics import classification_metrics
from gi_deploy.errors import ConfigError, DataError
from gi_deploy.runtime.report import write_report

REQUIRED_COLUMNS = ("path", "source", "true_label", "predicted", "confidence", "error")
PROB_PREFIX = "prob:"  # one column per class: the full distribution, so ROC AUC needs no model


@dataclass
class SourceScore:
    source: str
    classes: list[str]  # the source's classes, in the CSV's prob: column order
    n_rows: int
    n_errors: int
    n_unlabelled: int  # error-free rows without a true_label
    metrics: dict | None  # None when no error-free row is labelled
    files: dict[str, Path] = field(default_factory=dict)  # "metrics" (the JSON) and the report kinds
    n_rejected: int = 0  # rows refused as out of distribution (infer --source auto): no diagnosis


@dataclass
class _Tally:
    """What one streaming pass learns of a source: counts, filled prob: columns, and the first
    row naming each label and prediction (for the error message)."""

    n_rows: int = 0
    n_errors: int = 0
    n_labelled: int = 0
    filled: set[int] = field(default_factory=set)  # indices of prob: columns filled in error-free rows
    labels: dict[str, str] = field(default_factory=dict)  # label -> first path
    predicted: dict[str, str] = field(default_factory=dict)
    n_rejected: int = 0
    rejected_labels: dict[str, int] = field(default_factory=dict)  # true label -> refused rows of it


def _open(csv_path: Path, need_probs: bool = True) -> tuple[list[str], dict[str, int], list[str]]:
    """Header checks: the prob: class names, the column index of each name, the header.
    Raises DataError naming the file when it is missing, empty or lacks a required column."""
    if not csv_path.is_file():
        raise DataError(f"predictions CSV not found: {csv_path}")
    with open(csv_path, newline="", encoding="utf-8") as f:
        header = next(csv.reader(f), [])
    if not header:
        raise DataError(f"predictions CSV {csv_path} is empty; re-run gi-deploy infer to write it")
    missing = [c for c in REQUIRED_COLUMNS if c not in header]
    classes = [c[len(PROB_PREFIX) :] for c in header if c.startswith(PROB_PREFIX)]
    if missing or (need_probs and not classes):
        what = ", ".join(missing + ([] if classes or not need_probs else ["prob:<class> columns"]))
        raise DataError(
            f"predictions CSV {csv_path} lacks {what} (columns: {header}); it must be written by "
            "gi-deploy infer, whose CSV carries every class probability"
        )
    return classes, {c: i for i, c in enumerate(header)}, header


class _TopWrong:
    """The ``n`` wrong rows with the highest confidence, kept in a heap of size n while the CSV
    streams by; ``result()`` is highest first, equal confidences in CSV order."""

    def __init__(self, n: int):
        self.n, self._heap = n, []

    def add(self, seq: int, path: str, true: str, pred: str, conf: float) -> None:
        if self.n:
            item = (conf, -seq, {"path": path, "true_label": true, "predicted": pred, "confidence": conf})
            (heapq.heappush if len(self._heap) < self.n else heapq.heappushpop)(self._heap, item)

    def result(self) -> list[dict]:
        return [w for _, _, w in sorted(self._heap, key=lambda h: (-h[0], -h[1]))]


def most_confidently_wrong(csv_path: Path, n: int, source: str | None = None) -> list[dict]:
    """The ``n`` labelled, readable rows of a predictions CSV (of ``source``'s rows when given)
    that are wrong with the highest confidence: dicts of path, true_label, predicted, confidence."""
    csv_path = Path(csv_path)
    _, col, _ = _open(csv_path, need_probs=False)
    top = _TopWrong(n)
    for seq, r in enumerate(_rows(csv_path)):
        true, pred, src = r[col["true_label"]], r[col["predicted"]], r[col["source"]]
        if true and pred and pred != true and not r[col["error"]] and source in (None, src):
            top.add(
                seq,
                r[col["path"]],
                true,
                pred,
                _float(r[col["confidence"]], "confidence", r[col["path"]], src, csv_path),
            )
    return top.result()


def _rows(csv_path: Path) -> Iterator[list[str]]:
    with open(csv_path, newline="", encoding="utf-8") as f:
        reader = csv.reader(f)
        next(reader)
        yield from reader


def _scan(csv_path: Path, col: dict[str, int], prob_cols: list[int]) -> dict[str, _Tally]:
    """Pass 1, streaming: per source (first-appearance order) its counts and class evidence."""
    tallies: dict[str, _Tally] = {}
    seen: dict[tuple[str, str], int] = {}
    for line, r in enumerate(_rows(csv_path), start=2):
        if len(r) != len(col):  # two writers interleaved, or a hand edit: nothing below could be trusted
            raise DataError(
                f"{csv_path} line {line} has {len(r)} cells, the header {len(col)}: the file is damaged "
                "(two processes writing it, or edited); re-run gi-deploy infer into a new --out"
            )
        source, path = r[col["source"]], r[col["path"]]
        if not source:
            raise DataError(f"{csv_path}: row {path!r} has no source; every row must name its bundle's source")
        if (path, source) in seen:
            raise DataError(
                f"{csv_path} line {line} repeats {path!r} for source {source!r} (first on line "
                f"{seen[(path, source)]}): it would be counted twice; re-run gi-deploy infer into a new "
                "--out"
            )
        seen[(path, source)] = line
        t = tallies.setdefault(source, _Tally())
        t.n_rows += 1
        if r[col["error"]]:
            t.n_errors += 1
            continue
        if _is_rejected(r, col):  # refused, no diagnosis: counted in its own column
            t.n_rejected += 1
            label = r[col["true_label"]] or ""
            t.rejected_labels[label] = t.rejected_labels.get(label, 0) + 1
            continue
        t.filled.update(j for j, c in enumerate(prob_cols) if r[c])
        if r[col["true_label"]]:
            t.n_labelled += 1
            t.labels.setdefault(r[col["true_label"]], path)
        if r[col["predicted"]]:
            t.predicted.setdefault(r[col["predicted"]], path)
    if not tallies:
        raise DataError(f"predictions CSV {csv_path} has a header but no rows")
    return tallies


def _is_rejected(r: list[str], col: dict[str, int]) -> bool:
    return "rejected" in col and r[col["rejected"]] == "1"


def _check_labels(t: _Tally, classes: list[str], source: str, csv_path: Path) -> None:
    """Every true_label and prediction must be one of the source's classes."""
    for label, path in t.labels.items():
        if label not in classes:
            raise DataError(
                f"{csv_path}: row {path!r} has true_label {label!r}, not a class of source {source} "
                f"({', '.join(classes)}); labels from another class set need --class-map to rename them"
            )
    for pred, path in t.predicted.items():
        if pred not in classes:
            raise DataError(
                f"{csv_path}: row {path!r} predicts {pred!r} but source {source}'s prob: columns "
                f"are {', '.join(classes)}; the CSV was edited or mixes runs, re-run gi-deploy infer"
            )


def _float(value: str, column: str, path: str, source: str, csv_path: Path) -> float:
    try:
        return float(value)
    except ValueError as e:
        raise DataError(
            f"{csv_path}: row {path!r} (source {source}) has {column}={value!r}, "
            "not a number; re-run gi-deploy infer for it"
        ) from e


def _prefix(csv_path: Path, out_prefix: Path | None, source: str, several: bool) -> Path:
    prefix = Path(out_prefix) if out_prefix is not None else Path(csv_path).with_suffix("")
    return prefix.with_name(f"{prefix.name}.{source}") if several else prefix


def score_predictions(
    csv_path: Path, n_wrong: int = 20, out_prefix: Path | None = None, extra: dict | None = None
) -> dict[str, SourceScore]:
    """Score every source of a predictions CSV and write its metrics JSON and report files.

    For each source with labelled, error-free rows: ``classification_metrics`` (with ROC AUC
    from the ``prob:`` columns) plus ``source``, ``n_errors``, ``n_unlabelled``, the keys of
    ``extra`` and ``most_confidently_wrong`` (the ``n_wrong`` wrong rows with the highest
    confidence), written to ``<prefix>.metrics.json`` with the report files beside it. The
    prefix is ``out_prefix`` or the CSV path without its suffix, plus ``.<source>`` when the
    file holds several sources. Sources with no labelled rows get metrics None and no files.

    The CSV is streamed twice (checks, then numbers) and only labels, predictions and
    probabilities are kept, as compact arrays: a 100k-row CSV costs a few MB, not its text.

    Raises ConfigError for a negative ``n_wrong``, DataError for a missing/empty/malformed CSV,
    a label or prediction that is not one of the source's classes, or an unreadable number.
    """
    if n_wrong < 0:
        raise ConfigError(f"n_wrong must be >= 0, got {n_wrong}")
    csv_path = Path(csv_path)
    all_classes, col, _ = _open(csv_path)
    prob_cols = [col[PROB_PREFIX + c] for c in all_classes]
    tallies = _scan(csv_path, col, prob_cols)
    classes_of = {}
    for source, t in tallies.items():  # every source checked before anything is written
        classes_of[source] = [c for j, c in enumerate(all_classes) if j in t.filled]
        _check_labels(t, classes_of[source], source, csv_path)
    scores = {
        s: SourceScore(
            source=s,
            classes=classes_of[s],
            n_rows=t.n_rows,
            n_errors=t.n_errors,
            n_unlabelled=t.n_rows - t.n_errors - t.n_labelled - sum(v for k, v in t.rejected_labels.items() if k),
            metrics=None,
            n_rejected=t.n_rejected,
        )
        for s, t in tallies.items()
    }
    gathered = _gather(
        csv_path, col, {s: classes_of[s] for s, t in tallies.items() if t.n_labelled}, all_classes, prob_cols, n_wrong
    )
    for source, (y_true, y_pred, probs, wrong) in gathered.items():
        score = scores[source]
        prefix = _prefix(csv_path, out_prefix, source, several=len(tallies) > 1)
        refused = _rejected_entry(tallies[source], y_true, y_pred) if "rejected" in col else {}
        score.metrics, score.files = _score_source(
            y_true, y_pred, probs, wrong, score, prefix, {**(extra or {}), **refused}
        )
    return scores


def _rejected_entry(t: _Tally, y_true: np.ndarray, y_pred: np.ndarray) -> dict:
    """Refused rows as their own column: their count per true class, and the accuracy over every
    labelled row with a refusal counted as not a correct diagnosis (``accuracy`` is over the
    accepted rows only)."""
    labelled_rejected = sum(v for k, v in t.rejected_labels.items() if k)
    n = len(y_true) + labelled_rejected
    return {
        "n_rejected": t.n_rejected,
        "rejected_by_true_label": {k or "(unlabelled)": v for k, v in sorted(t.rejected_labels.items())},
        "accuracy_counting_rejected": float((y_true == y_pred).sum() / n) if n else None,
        "rejected_share": t.n_rejected / max(1, t.n_rows - t.n_errors),
    }


def _gather(
    csv_path: Path,
    col: dict[str, int],
    classes_of: dict[str, list[str]],
    all_classes: list[str],
    prob_cols: list[int],
    n_wrong: int,
) -> dict[str, tuple]:
    """Pass 2, streaming: per labelled source, y_true and y_pred (int32 (N,)), probabilities in
    the source's class order (float64 (N, C)) and its ``n_wrong`` most confidently wrong rows
    (highest confidence first; equal confidences in CSV order)."""
    index = {s: {c: i for i, c in enumerate(cls)} for s, cls in classes_of.items()}
    cols = {s: [prob_cols[all_classes.index(c)] for c in cls] for s, cls in classes_of.items()}
    acc = {s: (array("i"), array("i"), array("d"), _TopWrong(n_wrong)) for s in classes_of}
    for seq, r in enumerate(_rows(csv_path)):
        source = r[col["source"]]
        if source not in acc or r[col["error"]] or not r[col["true_label"]] or _is_rejected(r, col):
            continue
        path, true, pred = r[col["path"]], r[col["true_label"]], r[col["predicted"]]
        y_true, y_pred, probs, wrong = acc[source]
        y_true.append(index[source][true])
        y_pred.append(index[source][pred])
        probs.extend(_float(r[c], "prob", path, source, csv_path) for c in cols[source])
        if pred != true and n_wrong:
            wrong.add(seq, path, true, pred, _float(r[col["confidence"]], "confidence", path, source, csv_path))
    out = {}
    for s, (y_true, y_pred, probs, wrong) in acc.items():
        out[s] = (
            np.frombuffer(y_true, np.int32),
            np.frombuffer(y_pred, np.int32),
            np.frombuffer(probs, np.float64).reshape(len(y_true), len(classes_of[s])),
            wrong.result(),
        )
    return out


def _score_source(
    y_true: np.ndarray,
    y_pred: np.ndarray,
    probs: np.ndarray,
    wrong: list[dict],
    score: SourceScore,
    prefix: Path,
    extra: dict | None,
) -> tuple[dict, dict[str, Path]]:
    """Metrics and files for one source's labelled, error-free rows."""
    metrics = classification_metrics(y_true, y_pred, score.classes, probs=probs)
    metrics.update(source=score.source, n_errors=score.n_errors, n_unlabelled=score.n_unlabelled)
    metrics.update(extra or {})
    metrics["most_confidently_wrong"] = wrong
    files = {"metrics": prefix.with_name(prefix.name + ".metrics.json")}
    write_json(files["metrics"], metrics)
    files.update(write_report(prefix, metrics, score.classes, y_true, probs, wrong))
    return metrics, files


def evaluate_csv(csv_path: Path, out_dir: Path | None = None, n_wrong: int = 20) -> dict[str, SourceScore]:
    """``gi-deploy evaluate``: :func:`score_predictions` with the report files in ``out_dir``
    (created; default: beside the CSV). Raises DataError when no row is labelled: nothing to score."""
    prefix = None
    if out_dir is not None:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        prefix = Path(out_dir) / Path(csv_path).stem
    scores = score_predictions(csv_path, n_wrong=n_wrong, out_prefix=prefix)
    if not any(sc.metrics for sc in scores.values()):
        raise DataError(f"no labelled rows in {csv_path}: nothing to score")
    return scores
