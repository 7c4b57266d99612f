"""Classification metrics as the seed paper reports them (accuracy, precision, recall, F1, MCC).

numpy only, so the runtime install needs no scikit-learn; the tests check every number against
scikit-learn. Conventions follow scikit-learn: averages run over the labels present in
``y_true`` or ``y_pred``; a precision/recall with a zero denominator counts as 0.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def confusion_matrix(y_true: Sequence[int], y_pred: Sequence[int], num_classes: int) -> np.ndarray:
    """(num_classes, num_classes) int64 matrix: rows are true classes, columns predictions."""
    t = np.asarray(y_true, dtype=np.int64)
    p = np.asarray(y_pred, dtype=np.int64)
    cm = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(cm, (t, p), 1)
    return cm


def _safe_div(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    return np.divide(num, den, out=np.zeros_like(num, dtype=np.float64), where=den != 0)


def matthews_corrcoef(cm: np.ndarray) -> float:
    """Multiclass MCC (Gorodkin's R_K) from a confusion matrix; 0 when undefined."""
    t = cm.sum(axis=1).astype(np.float64)  # true occurrences per class
    p = cm.sum(axis=0).astype(np.float64)  # predictions per class
    c = float(np.trace(cm))
    s = float(cm.sum())
    cov_ytyp = c * s - float(t @ p)
    cov_ypyp = s * s - float(p @ p)
    cov_ytyt = s * s - float(t @ t)
    if cov_ypyp * cov_ytyt == 0:
        return 0.0
    return cov_ytyp / float(np.sqrt(cov_ytyt * cov_ypyp))


def classification_metrics(
    y_true: Sequence[int], y_pred: Sequence[int], class_names: Sequence[str]
) -> dict:
    """All metrics for integer labels in ``range(len(class_names))``.

    Returns accuracy, precision/recall/f1 averaged ``weighted`` (by support, as the paper
    reports) and ``macro``, MCC, per-class precision/recall/f1/support and the confusion matrix.
    """
    n_cls = len(class_names)
    if len(y_true) != len(y_pred):
        raise ValueError(f"y_true has {len(y_true)} labels but y_pred has {len(y_pred)}")
    if len(y_true) == 0:
        raise ValueError("no labelled predictions to score")
    cm = confusion_matrix(y_true, y_pred, n_cls)
    tp = np.diag(cm).astype(np.float64)
    support = cm.sum(axis=1).astype(np.float64)
    predicted = cm.sum(axis=0).astype(np.float64)
    precision = _safe_div(tp, predicted)
    recall = _safe_div(tp, support)
    f1 = _safe_div(2 * precision * recall, precision + recall)
    present = (support + predicted) > 0
    weights = support / support.sum()
    out = {
        "n": int(cm.sum()),
        "accuracy": float(tp.sum() / cm.sum()),
        "mcc": matthews_corrcoef(cm),
    }
    for name, values in (("precision", precision), ("recall", recall), ("f1", f1)):
        out[f"{name}_weighted"] = float((values * weights).sum())
        out[f"{name}_macro"] = float(values[present].mean())
    out["per_class"] = {
        cls: {"precision": float(precision[i]), "recall": float(recall[i]), "f1": float(f1[i]),
              "support": int(support[i])}
        for i, cls in enumerate(class_names)
    }
    out["confusion_matrix"] = cm.tolist()
    return out
