"""Classification metrics as the seed paper reports them (accuracy, precision, recall, F1, MCC),
plus what clinicians ask for (sensitivity, specificity) and one-vs-rest ROC AUC from probabilities.

numpy only, so the runtime install needs no scikit-learn; the tests check every number against
scikit-learn. Conventions follow scikit-learn: averages run over the labels present in
``y_true`` or ``y_pred``; a precision/recall/specificity with a zero denominator counts as 0.
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


def rank_average(x: np.ndarray) -> np.ndarray:
    """1-based ranks of a 1-D array, tied values sharing the mean of their ranks (float64, shape (N,))."""
    order = np.argsort(x, kind="mergesort")
    sorted_x = x[order]
    # group boundaries of equal values in the sorted array
    starts = np.r_[0, np.flatnonzero(np.diff(sorted_x)) + 1]
    ends = np.r_[starts[1:], len(x)]
    mean_rank = (starts + ends + 1) / 2.0  # mean of the 1-based ranks starts+1 .. ends
    ranks = np.empty(len(x), dtype=np.float64)
    ranks[order] = np.repeat(mean_rank, ends - starts)
    return ranks


def binary_roc_auc(y_true_binary: Sequence[bool], scores: Sequence[float]) -> float | None:
    """ROC AUC of ``scores`` (N,) for the positives in ``y_true_binary`` (N,); None when there
    are no positives or no negatives.

    Mann-Whitney U / (n_pos * n_neg) with average ranks for ties, which is exactly the area under
    the trapezoidal ROC curve (a tied positive/negative pair counts one half).
    """
    pos = np.asarray(y_true_binary, dtype=bool)
    s = np.asarray(scores, dtype=np.float64)
    n_pos = int(pos.sum())
    n_neg = len(pos) - n_pos
    if n_pos == 0 or n_neg == 0:
        return None
    rank_sum = float(rank_average(s)[pos].sum())
    return (rank_sum - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg)


def roc_curve(y_true_binary: Sequence[bool], scores: Sequence[float]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ROC curve as ``sklearn.metrics.roc_curve(..., drop_intermediate=False)`` returns it.

    One point per distinct score (highest first) plus the origin, whose threshold is ``inf``;
    no collinear points are dropped. Returns float64 arrays fpr, tpr, thresholds, each (D + 1,)
    for D distinct scores. Raises ValueError when there are no positives or no negatives (the
    curve is undefined; scikit-learn would return NaNs with a warning).
    """
    pos = np.asarray(y_true_binary, dtype=bool)
    s = np.asarray(scores, dtype=np.float64)
    if len(pos) != len(s):
        raise ValueError(f"y_true_binary has {len(pos)} values but scores has {len(s)}")
    if pos.all() or not pos.any():
        raise ValueError(
            f"the ROC curve needs at least one positive and one negative; got {int(pos.sum())} of {len(pos)} positive"
        )
    order = np.argsort(s, kind="mergesort")[::-1]  # descending, as scikit-learn sorts
    s, pos = s[order], pos[order]
    last_of_value = np.r_[np.flatnonzero(np.diff(s)), len(s) - 1]  # one point after each tied run
    tps = np.cumsum(pos)[last_of_value].astype(np.float64)
    fps = (last_of_value + 1) - tps
    fpr = np.r_[0.0, fps / fps[-1]]
    tpr = np.r_[0.0, tps / tps[-1]]
    return fpr, tpr, np.r_[np.inf, s[last_of_value]]


def _auc_metrics(y_true: np.ndarray, probs: np.ndarray, class_names: Sequence[str]) -> dict:
    """One-vs-rest ROC AUC per class plus macro and support-weighted means over the classes
    where it is defined (None when no class has one)."""
    n_cls = len(class_names)
    if probs.ndim != 2 or probs.shape != (len(y_true), n_cls):
        raise ValueError(
            f"probs must have shape (N, C) = ({len(y_true)}, {n_cls}) in class_names order, got {probs.shape}"
        )
    per_class = [binary_roc_auc(y_true == k, probs[:, k]) for k in range(n_cls)]
    defined = np.array([a is not None for a in per_class])
    out: dict = {"per_class": per_class, "roc_auc_macro": None, "roc_auc_weighted": None}
    if defined.any():
        aucs = np.array([a for a in per_class if a is not None])
        support = np.bincount(y_true, minlength=n_cls)[defined].astype(np.float64)
        out["roc_auc_macro"] = float(aucs.mean())
        out["roc_auc_weighted"] = float((aucs * support).sum() / support.sum())
    return out


def classification_metrics(
    y_true: Sequence[int], y_pred: Sequence[int], class_names: Sequence[str], probs: np.ndarray | None = None
) -> dict:
    """All metrics for integer labels in ``range(len(class_names))``.

    Returns accuracy, precision/recall/f1/specificity averaged ``weighted`` (by support, as the
    paper reports) and ``macro``, MCC, per-class precision/recall (= sensitivity)/specificity/f1/
    support, and the confusion matrix raw and row-normalised (rows are true classes).

    ``probs`` (N, C) float class probabilities in ``class_names`` order adds one-vs-rest ROC AUC:
    per class (None when the class has no positives or no negatives in ``y_true``) and
    ``roc_auc_macro`` / ``roc_auc_weighted`` over the classes where it is defined, equal to
    ``sklearn.metrics.roc_auc_score(..., multi_class="ovr", labels=range(C))`` when every class is
    present. Raises ValueError on empty or mismatched inputs.
    """
    n_cls = len(class_names)
    if len(y_true) != len(y_pred):
        raise ValueError(f"y_true has {len(y_true)} labels but y_pred has {len(y_pred)}")
    if len(y_true) == 0:
        raise ValueError("no labelled predictions to score")
    cm = confusion_matrix(y_true, y_pred, n_cls)
    total = float(cm.sum())
    tp = np.diag(cm).astype(np.float64)
    support = cm.sum(axis=1).astype(np.float64)
    predicted = cm.sum(axis=0).astype(np.float64)
    precision = _safe_div(tp, predicted)
    recall = _safe_div(tp, support)
    f1 = _safe_div(2 * precision * recall, precision + recall)
    fp = predicted - tp
    tn = total - support - fp  # neither true nor predicted as the class
    specificity = _safe_div(tn, tn + fp)
    present = (support + predicted) > 0
    weights = support / support.sum()
    out = {
        "n": int(cm.sum()),
        "accuracy": float(tp.sum() / cm.sum()),
        "mcc": matthews_corrcoef(cm),
    }
    for name, values in (("precision", precision), ("recall", recall), ("f1", f1), ("specificity", specificity)):
        out[f"{name}_weighted"] = float((values * weights).sum())
        out[f"{name}_macro"] = float(values[present].mean())
    auc = (
        _auc_metrics(np.asarray(y_true, dtype=np.int64), np.asarray(probs, dtype=np.float64), class_names)
        if probs is not None
        else None
    )
    if auc is not None:
        out["roc_auc_macro"], out["roc_auc_weighted"] = auc["roc_auc_macro"], auc["roc_auc_weighted"]
    out["per_class"] = {}
    for i, cls in enumerate(class_names):
        row = {
            "precision": float(precision[i]),
            "recall": float(recall[i]),
            "sensitivity": float(recall[i]),
            "specificity": float(specificity[i]),
            "f1": float(f1[i]),
            "support": int(support[i]),
        }
        if auc is not None:
            row["roc_auc"] = auc["per_class"][i]
        out["per_class"][cls] = row
    out["confusion_matrix"] = cm.tolist()
    out["confusion_matrix_normalized"] = _safe_div(cm.astype(np.float64), support[:, None]).tolist()
    return out


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax of (N, C) logits, stable for large values."""
    z = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)
