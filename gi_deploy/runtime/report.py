"""Report files written next to a predictions CSV: confusion matrices (CSV and PNG), one-vs-rest
ROC curves (PNG) and the most confidently wrong rows (CSV).

numpy + matplotlib only; matplotlib is imported inside the plotting functions, with the Agg
backend, so importing this module costs nothing and works on headless machines.
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from gi_deploy.core.metrics import binary_roc_auc, roc_curve

SUFFIXES = {
    "confusion_csv": ".confusion.csv",
    "confusion_normalized_csv": ".confusion_normalized.csv",
    "confusion_png": ".confusion.png",
    "roc_png": ".roc.png",
    "wrong_csv": ".wrong.csv",
}
WRONG_COLUMNS = ("path", "true_label", "predicted", "confidence")
_DPI = 100
_CELL_IN = 0.45  # inches per confusion-matrix cell: room for a 4-character annotation at 7 pt


def report_path(prefix: Path, kind: str) -> Path:
    """``prefix`` + the kind's suffix, e.g. out/predictions.capsule + .roc.png (a plain
    ``with_suffix`` would replace ``.capsule``)."""
    return prefix.with_name(prefix.name + SUFFIXES[kind])


def write_report(
    prefix: Path,
    metrics: dict,
    class_names: Sequence[str],
    y_true: Sequence[int],
    probs: np.ndarray | None,
    wrong_rows: list[dict],
) -> dict[str, Path]:
    """Write the report files for one scored source and return ``{kind: path}``.

    ``metrics`` is ``classification_metrics``' dict (its confusion matrices are written as they
    are), ``y_true`` (N,) integer labels and ``probs`` (N, C) class probabilities in
    ``class_names`` order for the ROC curves (no ``roc_png`` when None), ``wrong_rows`` the rows
    to list, already sorted, each with the keys of ``WRONG_COLUMNS``.
    """
    prefix = Path(prefix)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    names = list(class_names)
    cm = np.asarray(metrics["confusion_matrix"], dtype=np.int64)
    cm_norm = np.asarray(metrics["confusion_matrix_normalized"], dtype=np.float64)
    files = {kind: report_path(prefix, kind) for kind in SUFFIXES if kind != "roc_png" or probs is not None}
    _write_matrix_csv(files["confusion_csv"], names, [[str(v) for v in row] for row in cm])
    _write_matrix_csv(files["confusion_normalized_csv"], names, [[f"{v:.4f}" for v in row] for row in cm_norm])
    plot_confusion(files["confusion_png"], cm, cm_norm, names)
    if probs is not None:
        plot_roc(
            files["roc_png"],
            np.asarray(y_true, dtype=np.int64),
            np.asarray(probs, dtype=np.float64),
            names,
            metrics.get("roc_auc_macro"),
        )
    with open(files["wrong_csv"], "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=WRONG_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(wrong_rows)
    return files


def _write_matrix_csv(path: Path, names: list[str], cells: list[list[str]]) -> None:
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["true\\pred", *names])
        writer.writerows([name, *row] for name, row in zip(names, cells))


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # no display on servers; must precede the pyplot import
    import matplotlib.pyplot as plt

    return plt


def plot_confusion(path: Path, cm: np.ndarray, cm_norm: np.ndarray, names: list[str]) -> None:
    """Raw counts (C, C) and row-normalised (C, C) matrices side by side, every cell annotated.
    The figure grows with the class count so 25 classes stay readable."""
    plt = _pyplot()
    n = len(names)
    side = max(4.0, _CELL_IN * n + 1.5)  # inches per panel, plus room for the tick labels
    font = 9 if n <= 10 else 7
    fig, axes = plt.subplots(1, 2, figsize=(2 * side + 1.5, side + 1.0), dpi=_DPI)
    panels = ((cm, "counts", "{:d}", None), (cm_norm, "row-normalised (recall)", "{:.2f}", 1.0))
    for ax, (mat, title, fmt, vmax) in zip(axes, panels):
        im = ax.imshow(mat, cmap="Blues", vmin=0, vmax=vmax)
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
        ax.set_title(title)
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        ax.set_xticks(
            range(n), names, rotation=45 if n <= 10 else 90, ha="right" if n <= 10 else "center", fontsize=font
        )
        ax.set_yticks(range(n), names, fontsize=font)
        # white text on dark cells, black elsewhere
        threshold = (mat.max() if vmax is None else vmax) / 2.0
        for i in range(n):
            for j in range(n):
                value = int(mat[i, j]) if vmax is None else float(mat[i, j])
                ax.text(
                    j,
                    i,
                    fmt.format(value),
                    ha="center",
                    va="center",
                    fontsize=font,
                    color="white" if mat[i, j] > threshold else "black",
                )
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_roc(path: Path, y_true: np.ndarray, probs: np.ndarray, names: list[str], auc_macro: float | None) -> None:
    """One-vs-rest ROC curve per class, labelled with its AUC, plus the chance diagonal.
    A class without positives or negatives in ``y_true`` (N,) has no curve; the legend says so."""
    plt = _pyplot()
    n = len(names)
    fig, ax = plt.subplots(figsize=(7.0 + (3.0 if n > 10 else 0.0), 6.0), dpi=_DPI)
    colors = plt.get_cmap("tab10" if n <= 10 else "tab20")
    for k, name in enumerate(names):
        positives = y_true == k
        auc = binary_roc_auc(positives, probs[:, k])
        if auc is None:
            ax.plot([], [], color=colors(k % colors.N), label=f"{name} (AUC undefined)")
            continue
        fpr, tpr, _ = roc_curve(positives, probs[:, k])
        ax.plot(fpr, tpr, color=colors(k % colors.N), lw=1.5, label=f"{name} (AUC {auc:.3f})")
    ax.plot([0, 1], [0, 1], color="grey", lw=1, ls="--", label="chance")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("false positive rate (1 - specificity)")
    ax.set_ylabel("true positive rate (sensitivity)")
    macro = "undefined" if auc_macro is None else f"{auc_macro:.3f}"
    ax.set_title(f"one-vs-rest ROC, macro AUC {macro}")
    if n > 10:  # too many entries to sit on the curves
        ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=7)
    else:
        ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
