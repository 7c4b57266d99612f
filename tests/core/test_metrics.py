import numpy as np
import pytest
from sklearn import metrics as skm

from gi_deploy.core.metrics import binary_roc_auc, classification_metrics, roc_curve

CLASSES = ["erosion", "normal", "polyp", "ulcer"]

# Hand-made predictions: imbalanced supports, one class never predicted, one never true.
Y_TRUE = [0, 0, 0, 1, 1, 1, 1, 1, 2, 2, 3, 1]
Y_PRED = [0, 0, 1, 1, 1, 1, 2, 1, 2, 0, 1, 1]


@pytest.mark.filterwarnings("ignore:A single label was found")  # sklearn notes the one-class case
@pytest.mark.parametrize(
    "y_true,y_pred",
    [
        (Y_TRUE, Y_PRED),
        ([0, 1, 2, 3] * 3, [0, 1, 2, 3] * 3),  # perfect
        ([1, 1, 1, 1], [1, 1, 1, 1]),  # one class only: MCC undefined -> 0
        (list(np.random.default_rng(0).integers(0, 4, 200)), list(np.random.default_rng(1).integers(0, 4, 200))),
    ],
)
def test_metrics_match_sklearn(y_true, y_pred):
    m = classification_metrics(y_true, y_pred, CLASSES)
    assert m["accuracy"] == pytest.approx(skm.accuracy_score(y_true, y_pred))
    assert m["mcc"] == pytest.approx(skm.matthews_corrcoef(y_true, y_pred))
    for avg in ("weighted", "macro"):
        p, r, f, _ = skm.precision_recall_fscore_support(y_true, y_pred, average=avg, zero_division=0)
        assert m[f"precision_{avg}"] == pytest.approx(p)
        assert m[f"recall_{avg}"] == pytest.approx(r)
        assert m[f"f1_{avg}"] == pytest.approx(f)
    assert m["confusion_matrix"] == skm.confusion_matrix(y_true, y_pred, labels=range(4)).tolist()


def test_per_class_numbers_by_hand():
    m = classification_metrics(Y_TRUE, Y_PRED, CLASSES)
    # polyp: 2 true, predicted 2 times, 1 hit -> precision 1/2, recall 1/2
    # and 1 false positive among the 10 non-polyp rows -> specificity 9/10
    assert m["per_class"]["polyp"] == {
        "precision": 0.5,
        "recall": 0.5,
        "sensitivity": 0.5,
        "specificity": 0.9,
        "f1": 0.5,
        "support": 2,
    }
    # ulcer: never predicted -> precision counts as 0
    assert m["per_class"]["ulcer"]["precision"] == 0.0
    assert m["n"] == 12 and m["accuracy"] == pytest.approx(8 / 12)


def test_empty_and_mismatched_inputs_raise():
    with pytest.raises(ValueError, match="no labelled"):
        classification_metrics([], [], CLASSES)
    with pytest.raises(ValueError, match="y_pred has 1"):
        classification_metrics([0, 1], [0], CLASSES)


def test_existing_keys_are_kept_and_auc_only_with_probs():
    m = classification_metrics(Y_TRUE, Y_PRED, CLASSES)
    assert "roc_auc_macro" not in m and "roc_auc" not in m["per_class"]["polyp"]
    for key in (
        "n",
        "accuracy",
        "mcc",
        "precision_weighted",
        "precision_macro",
        "recall_weighted",
        "recall_macro",
        "f1_weighted",
        "f1_macro",
        "per_class",
        "confusion_matrix",
    ):
        assert key in m


@pytest.mark.filterwarnings("ignore:A single label was found")
@pytest.mark.parametrize(
    "y_true,y_pred",
    [
        (Y_TRUE, Y_PRED),
        ([1, 1, 1, 1], [1, 1, 1, 1]),
        (list(np.random.default_rng(0).integers(0, 4, 200)), list(np.random.default_rng(1).integers(0, 4, 200))),
    ],
)
def test_specificity_and_normalized_matrix_match_sklearn(y_true, y_pred):
    m = classification_metrics(y_true, y_pred, CLASSES)
    mcm = skm.multilabel_confusion_matrix(y_true, y_pred, labels=range(4))  # (C, 2, 2): [[tn, fp], [fn, tp]]
    tn, fp = mcm[:, 0, 0].astype(float), mcm[:, 0, 1].astype(float)
    spec = np.divide(tn, tn + fp, out=np.zeros(4), where=(tn + fp) > 0)
    support = mcm[:, 1, :].sum(axis=1)
    present = (support + mcm[:, :, 1].sum(axis=1)) > 0  # true or predicted at least once
    for i, cls in enumerate(CLASSES):
        assert m["per_class"][cls]["specificity"] == pytest.approx(spec[i])
        assert m["per_class"][cls]["sensitivity"] == m["per_class"][cls]["recall"]
    assert m["specificity_macro"] == pytest.approx(spec[present].mean())
    assert m["specificity_weighted"] == pytest.approx((spec * support).sum() / support.sum())
    with np.errstate(invalid="ignore"):  # sklearn divides an empty row by zero -> nan; ours stays 0
        expected = np.nan_to_num(skm.confusion_matrix(y_true, y_pred, labels=range(4), normalize="true"))
    np.testing.assert_allclose(m["confusion_matrix_normalized"], expected)
    assert all(isinstance(v, float) for row in m["confusion_matrix_normalized"] for v in row)


def _probs(n: int, seed: int, decimals: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Labels (n,) covering all 4 classes and (n, 4) probabilities that lean towards them."""
    rng = np.random.default_rng(seed)
    y = np.r_[np.arange(4), rng.integers(0, 4, n - 4)]
    logits = rng.normal(size=(n, 4)) + 1.5 * np.eye(4)[y]
    p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    if decimals is not None:  # coarse rounding makes many tied scores (1 decimal keeps each row max >= 0.2)
        p = np.round(p, decimals)
        p /= p.sum(1, keepdims=True)
    return y, p


@pytest.mark.parametrize("n,seed,decimals", [(12, 0, None), (200, 1, None), (200, 2, 1), (50, 3, 1)])
def test_roc_auc_matches_sklearn(n, seed, decimals):
    y, p = _probs(n, seed, decimals)
    m = classification_metrics(y, p.argmax(1), CLASSES, probs=p)
    for avg in ("macro", "weighted"):
        assert m[f"roc_auc_{avg}"] == pytest.approx(
            skm.roc_auc_score(y, p, multi_class="ovr", average=avg, labels=range(4))
        )
    per_class = skm.roc_auc_score(y, p, multi_class="ovr", average=None, labels=range(4))
    for i, cls in enumerate(CLASSES):
        assert m["per_class"][cls]["roc_auc"] == pytest.approx(per_class[i])


def test_auc_of_all_ties_is_one_half_and_ties_count_half():
    assert binary_roc_auc([0, 1, 0, 1], [0.5, 0.5, 0.5, 0.5]) == 0.5
    # pairs (pos, neg): (0.9, 0.1) win, (0.9, 0.5) win, (0.5, 0.1) win, (0.5, 0.5) tie -> 3.5 / 4
    assert binary_roc_auc([1, 1, 0, 0], [0.9, 0.5, 0.5, 0.1]) == pytest.approx(3.5 / 4)
    assert binary_roc_auc([1, 1, 0, 0], [0.9, 0.5, 0.5, 0.1]) == pytest.approx(
        skm.roc_auc_score([1, 1, 0, 0], [0.9, 0.5, 0.5, 0.1])
    )


def test_auc_undefined_for_a_class_absent_from_y_true():
    y, p = _probs(100, 4)
    keep = y != 3  # ulcer never true: its one-vs-rest AUC has no positives
    y, p = y[keep], p[keep]
    m = classification_metrics(y, p.argmax(1), CLASSES, probs=p)
    assert m["per_class"]["ulcer"]["roc_auc"] is None
    defined = [skm.roc_auc_score(y == k, p[:, k]) for k in range(3)]
    support = np.bincount(y, minlength=3)
    for k in range(3):
        assert m["per_class"][CLASSES[k]]["roc_auc"] == pytest.approx(defined[k])
    assert m["roc_auc_macro"] == pytest.approx(np.mean(defined))
    assert m["roc_auc_weighted"] == pytest.approx(np.average(defined, weights=support))
    # only one class in y_true: every class lacks positives or negatives -> no AUC anywhere
    m1 = classification_metrics([1, 1, 1], [1, 1, 0], CLASSES, probs=np.full((3, 4), 0.25))
    assert m1["roc_auc_macro"] is None and m1["roc_auc_weighted"] is None
    assert all(c["roc_auc"] is None for c in m1["per_class"].values())


def test_probs_shape_is_checked():
    with pytest.raises(ValueError, match="shape"):
        classification_metrics([0, 1], [0, 1], CLASSES, probs=np.full((2, 3), 1 / 3))


@pytest.mark.parametrize("decimals", [None, 1])
def test_roc_curve_matches_sklearn(decimals):
    y, p = _probs(120, 5, decimals)
    for k in range(4):
        fpr, tpr, thr = roc_curve(y == k, p[:, k])
        s_fpr, s_tpr, s_thr = skm.roc_curve(y == k, p[:, k], drop_intermediate=False)
        np.testing.assert_allclose(fpr, s_fpr)
        np.testing.assert_allclose(tpr, s_tpr)
        np.testing.assert_array_equal(thr, s_thr)
        # the trapezoid under our curve is the rank-based AUC
        assert np.trapezoid(tpr, fpr) == pytest.approx(binary_roc_auc(y == k, p[:, k]))


def test_roc_curve_needs_both_classes():
    with pytest.raises(ValueError, match="one positive and one negative"):
        roc_curve([1, 1], [0.2, 0.3])
