import numpy as np
import pytest
from sklearn import metrics as skm

from gi_deploy.runtime.metrics import classification_metrics

CLASSES = ["erosion", "normal", "polyp", "ulcer"]

# Hand-made predictions: imbalanced supports, one class never predicted, one never true.
Y_TRUE = [0, 0, 0, 1, 1, 1, 1, 1, 2, 2, 3, 1]
Y_PRED = [0, 0, 1, 1, 1, 1, 2, 1, 2, 0, 1, 1]


@pytest.mark.filterwarnings("ignore:A single label was found")  # sklearn notes the one-class case
@pytest.mark.parametrize("y_true,y_pred", [
    (Y_TRUE, Y_PRED),
    ([0, 1, 2, 3] * 3, [0, 1, 2, 3] * 3),                       # perfect
    ([1, 1, 1, 1], [1, 1, 1, 1]),                               # one class only: MCC undefined -> 0
    (list(np.random.default_rng(0).integers(0, 4, 200)), list(np.random.default_rng(1).integers(0, 4, 200))),
])
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
    assert m["per_class"]["polyp"] == {"precision": 0.5, "recall": 0.5, "f1": 0.5, "support": 2}
    # ulcer: never predicted -> precision counts as 0
    assert m["per_class"]["ulcer"]["precision"] == 0.0
    assert m["n"] == 12 and m["accuracy"] == pytest.approx(8 / 12)


def test_empty_and_mismatched_inputs_raise():
    with pytest.raises(ValueError, match="no labelled"):
        classification_metrics([], [], CLASSES)
    with pytest.raises(ValueError, match="y_pred has 1"):
        classification_metrics([0, 1], [0], CLASSES)
