"""Re-score an existing predictions CSV without a model: metrics JSON and report files per source.

The CSV contract (written by the runtime, one row per (image, source)):
``path, source, true_label, predicted, confidence, top1_class, top1_prob, ..., error,
prob:<class1>, prob:<class2>, ...``. The ``prob:`` columns span the union of all sources'
classes; a source's own classes are the ones whose column is filled in its rows. Error rows
have empty prediction fields; an empty ``true_label`` means unknown.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from gi_deploy._io import write_json
from gi_deploy.errors import ConfigError, DataError
from gi_deploy.runtime.metrics import classification_metrics
from gi_deploy.runtime.report import write_report

REQUIRED_COLUMNS = ("path", "source", "true_label", "predicted", "confidence", "error")
PROB_PREFIX = "prob:"


@dataclass
class SourceScore:
    source: str
    classes: list[str]  # the source's classes, in the CSV's prob: column order
    n_rows: int
    n_errors: int
    n_unlabelled: int  # error-free rows without a true_label
    metrics: dict | None  # None when no error-free row is labelled
    files: dict[str, Path] = field(default_factory=dict)  # "metrics" (the JSON) and the report kinds


def read_predictions(csv_path: Path) -> tuple[list[str], list[dict]]:
    """The class names of the ``prob:`` columns (in column order) and the rows as dicts.
    Raises DataError naming the file when it is missing, empty or lacks a required column."""
    csv_path = Path(csv_path)
    if not csv_path.is_file():
        raise DataError(f"predictions CSV not found: {csv_path}")
    with open(csv_path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        header = list(reader.fieldnames or [])
        rows = list(reader)
    if not header:
        raise DataError(f"predictions CSV {csv_path} is empty; re-run gi-deploy infer to write it")
    missing = [c for c in REQUIRED_COLUMNS if c not in header]
    classes = [c[len(PROB_PREFIX):] for c in header if c.startswith(PROB_PREFIX)]
    if missing or not classes:
        what = ", ".join(missing + ([] if classes else ["prob:<class> columns"]))
        raise DataError(f"predictions CSV {csv_path} lacks {what} (columns: {header}); it must be written by "
                        "gi-deploy infer, whose CSV carries every class probability")
    if not rows:
        raise DataError(f"predictions CSV {csv_path} has a header but no rows")
    return classes, rows


def _source_classes(rows: list[dict], all_classes: list[str]) -> list[str]:
    """The classes whose prob: column is filled in any of the source's error-free rows."""
    good = [r for r in rows if not r["error"]]
    return [c for c in all_classes if any(r[PROB_PREFIX + c] for r in good)]


def _float(row: dict, column: str, csv_path: Path) -> float:
    try:
        return float(row[column])
    except ValueError as e:
        raise DataError(f"{csv_path}: row {row['path']!r} (source {row['source']}) has {column}={row[column]!r}, "
                        "not a number; re-run gi-deploy infer for it") from e


def _check_labels(rows: list[dict], classes: list[str], source: str, csv_path: Path) -> None:
    """Every true_label and prediction must be one of the source's classes. A source with only
    error rows has no known classes (and nothing to score), so it is not checked."""
    if not classes:
        return
    for r in rows:
        if r["true_label"] and r["true_label"] not in classes:
            raise DataError(
                f"{csv_path}: row {r['path']!r} has true_label {r['true_label']!r}, not a class of source {source} "
                f"({', '.join(classes)}); labels from another class set need --class-map to rename them")
        if r["predicted"] and r["predicted"] not in classes:
            raise DataError(
                f"{csv_path}: row {r['path']!r} predicts {r['predicted']!r} but source {source}'s prob: columns "
                f"are {', '.join(classes)}; the CSV was edited or mixes runs, re-run gi-deploy infer")


def _prefix(csv_path: Path, out_prefix: Path | None, source: str, several: bool) -> Path:
    prefix = Path(out_prefix) if out_prefix is not None else Path(csv_path).with_suffix("")
    return prefix.with_name(f"{prefix.name}.{source}") if several else prefix


def score_predictions(csv_path: Path, n_wrong: int = 20, out_prefix: Path | None = None,
                      extra: dict | None = None) -> dict[str, SourceScore]:
    """Score every source of a predictions CSV and write its metrics JSON and report files.

    For each source with labelled, error-free rows: ``classification_metrics`` (with ROC AUC
    from the ``prob:`` columns) plus ``source``, ``n_errors``, ``n_unlabelled``, the keys of
    ``extra`` and ``most_confidently_wrong`` (the ``n_wrong`` wrong rows with the highest
    confidence), written to ``<prefix>.metrics.json`` with the report files beside it. The
    prefix is ``out_prefix`` or the CSV path without its suffix, plus ``.<source>`` when the
    file holds several sources. Sources with no labelled rows get metrics None and no files.

    Raises ConfigError for a negative ``n_wrong``, DataError for a missing/empty/malformed CSV, a label or prediction that is not one of
    the source's classes, or an unreadable number.
    """
    if n_wrong < 0:
        raise ConfigError(f"n_wrong must be >= 0, got {n_wrong}")
    csv_path = Path(csv_path)
    all_classes, rows = read_predictions(csv_path)
    by_source: dict[str, list[dict]] = {}  # dicts keep first-appearance order
    for r in rows:
        if not r["source"]:
            raise DataError(f"{csv_path}: row {r['path']!r} has no source; every row must name its bundle's source")
        by_source.setdefault(r["source"], []).append(r)
    # check every source before writing anything, so a bad label leaves no half-written report
    plans = []
    for source, src_rows in by_source.items():
        classes = _source_classes(src_rows, all_classes)
        _check_labels(src_rows, classes, source, csv_path)
        plans.append((source, src_rows, classes))
    scores = {}
    for source, src_rows, classes in plans:
        good = [r for r in src_rows if not r["error"]]
        scored = [r for r in good if r["true_label"]]
        score = SourceScore(source=source, classes=classes, n_rows=len(src_rows),
                            n_errors=len(src_rows) - len(good), n_unlabelled=len(good) - len(scored), metrics=None)
        if scored:
            prefix = _prefix(csv_path, out_prefix, source, several=len(by_source) > 1)
            score.metrics, score.files = _score_source(scored, classes, score, prefix, n_wrong, extra, csv_path)
        scores[source] = score
    return scores


def _score_source(scored: list[dict], classes: list[str], score: SourceScore, prefix: Path, n_wrong: int,
                  extra: dict | None, csv_path: Path) -> tuple[dict, dict[str, Path]]:
    """Metrics and files for one source's labelled, error-free rows."""
    y_true = [classes.index(r["true_label"]) for r in scored]
    y_pred = [classes.index(r["predicted"]) for r in scored]
    probs = np.array([[_float(r, PROB_PREFIX + c, csv_path) for c in classes] for r in scored])  # (N, C)
    wrong = [{"path": r["path"], "true_label": r["true_label"], "predicted": r["predicted"],
              "confidence": _float(r, "confidence", csv_path)}
             for r in scored if r["predicted"] != r["true_label"]]
    # stable sort: equal confidences keep the CSV's order
    wrong = sorted(wrong, key=lambda w: -w["confidence"])[:n_wrong]
    metrics = classification_metrics(y_true, y_pred, classes, probs=probs)
    metrics.update(source=score.source, n_errors=score.n_errors, n_unlabelled=score.n_unlabelled)
    metrics.update(extra or {})
    metrics["most_confidently_wrong"] = wrong
    files = {"metrics": prefix.with_name(prefix.name + ".metrics.json")}
    write_json(files["metrics"], metrics)
    files.update(write_report(prefix, metrics, classes, y_true, probs, wrong))
    return metrics, files
