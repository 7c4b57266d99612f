import csv
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from sklearn import metrics as skm

from gi_deploy.core.metrics import classification_metrics
from gi_deploy.errors import ConfigError, DataError
from gi_deploy.runtime.evaluate import score_predictions
from gi_deploy.runtime.report import write_report

CAPSULE = ["erosion", "normal", "polyp"]
KVASIR = ["normal", "polyp", "ulcer"]
ALL = ["erosion", "normal", "polyp", "ulcer"]  # union, in first-appearance order
TOP_K = 2
HEADER = [
    "path",
    "source",
    "true_label",
    "predicted",
    "confidence",
    *[f"top{i}_{w}" for i in range(1, TOP_K + 1) for w in ("class", "prob")],
    "error",
    *[f"prob:{c}" for c in ALL],
]

# (true label, probabilities in the source's class order); 0.9-confident mistakes first to be listed
CAPSULE_ROWS = [
    ("erosion", [0.7, 0.2, 0.1]),
    ("erosion", [0.1, 0.9, 0.0]),
    ("erosion", [0.5, 0.3, 0.2]),
    ("normal", [0.2, 0.6, 0.2]),
    ("normal", [0.1, 0.8, 0.1]),
    ("normal", [0.6, 0.3, 0.1]),
    ("polyp", [0.1, 0.1, 0.8]),
    ("polyp", [0.3, 0.3, 0.4]),
    ("polyp", [0.05, 0.7, 0.25]),
]
KVASIR_ROWS = [
    ("normal", [0.8, 0.1, 0.1]),
    ("normal", [0.3, 0.6, 0.1]),
    ("polyp", [0.2, 0.7, 0.1]),
    ("polyp", [0.4, 0.4, 0.2]),
    ("ulcer", [0.1, 0.2, 0.7]),
    ("ulcer", [0.2, 0.2, 0.6]),
]


def prediction_row(path: str, source: str, true_label: str, classes: list[str], p: list[float]) -> dict:
    """A row as the runtime writes it: ties go to the first class, probabilities as 6-decimal strings."""
    order = np.argsort(-np.asarray(p), kind="stable")[:TOP_K]
    row = dict.fromkeys(HEADER, "")
    row.update(
        path=path, source=source, true_label=true_label, predicted=classes[order[0]], confidence=f"{p[order[0]]:.6f}"
    )
    for i, k in enumerate(order, 1):
        row[f"top{i}_class"], row[f"top{i}_prob"] = classes[k], f"{p[k]:.6f}"
    row.update({f"prob:{c}": f"{v:.6f}" for c, v in zip(classes, p)})
    return row


def write_csv(path: Path, rows: list[dict], header: list[str] = HEADER) -> Path:
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=header, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    return path


def source_rows(source: str, classes: list[str], data: list) -> list[dict]:
    return [prediction_row(f"{source}/{t}/{i}.jpg", source, t, classes, p) for i, (t, p) in enumerate(data)]


def error_row(path: str, source: str, true_label: str) -> dict:
    row = dict.fromkeys(HEADER, "")
    row.update(path=path, source=source, true_label=true_label, error=f"cannot read image {path}")
    return row


@pytest.fixture(scope="module")
def two_source_csv(tmp_path_factory) -> Path:
    rows = source_rows("capsule", CAPSULE, CAPSULE_ROWS)
    rows.append(error_row("capsule/broken.jpg", "capsule", "polyp"))
    rows.append(prediction_row("capsule/unknown.jpg", "capsule", "", CAPSULE, [0.2, 0.3, 0.5]))
    rows += source_rows("kvasir", KVASIR, KVASIR_ROWS)
    return write_csv(tmp_path_factory.mktemp("two") / "predictions.csv", rows)


@pytest.fixture(scope="module")
def scores(two_source_csv):
    """One scoring of the two-source CSV, shared: plotting is the slow part."""
    return score_predictions(two_source_csv, extra={"precision": "fp16"})


def expected(classes: list[str], data: list) -> tuple[list[int], list[int], np.ndarray]:
    y_true = [classes.index(t) for t, _ in data]
    probs = np.array([p for _, p in data], dtype=float)
    return y_true, list(probs.argmax(1)), probs


def test_two_sources_scored_like_classification_metrics_and_sklearn(scores):
    assert list(scores) == ["capsule", "kvasir"]
    cap, kva = scores["capsule"], scores["kvasir"]
    assert cap.classes == CAPSULE and kva.classes == KVASIR
    assert (cap.n_rows, cap.n_errors, cap.n_unlabelled) == (11, 1, 1)
    assert (kva.n_rows, kva.n_errors, kva.n_unlabelled) == (6, 0, 0)
    for score, classes, data in ((cap, CAPSULE, CAPSULE_ROWS), (kva, KVASIR, KVASIR_ROWS)):
        y_true, y_pred, probs = expected(classes, data)
        m = score.metrics
        ref = classification_metrics(y_true, y_pred, classes, probs=probs)
        # the CSV's 6-decimal strings parse back to these exact floats, so the numbers are identical
        assert {k: m[k] for k in ref} == ref
        assert m["accuracy"] == pytest.approx(skm.accuracy_score(y_true, y_pred))
        assert m["f1_weighted"] == pytest.approx(skm.f1_score(y_true, y_pred, average="weighted", zero_division=0))
        assert m["roc_auc_macro"] == pytest.approx(skm.roc_auc_score(y_true, probs, multi_class="ovr", labels=range(3)))
        assert m["source"] == score.source and m["precision"] == "fp16"
        assert m["n_errors"] == score.n_errors and m["n_unlabelled"] == score.n_unlabelled
        saved = json.loads(score.files["metrics"].read_text())
        assert saved == json.loads(json.dumps(m))


def test_file_names_for_several_sources_and_one(two_source_csv, scores, tmp_path):
    for source in ("capsule", "kvasir"):
        files = scores[source].files
        assert files == {
            kind: two_source_csv.parent / f"predictions.{source}{suffix}"
            for kind, suffix in (
                ("metrics", ".metrics.json"),
                ("confusion_csv", ".confusion.csv"),
                ("confusion_normalized_csv", ".confusion_normalized.csv"),
                ("confusion_png", ".confusion.png"),
                ("roc_png", ".roc.png"),
                ("wrong_csv", ".wrong.csv"),
            )
        }
        assert all(p.is_file() for p in files.values())
    single = write_csv(tmp_path / "single.csv", source_rows("kvasir", KVASIR, KVASIR_ROWS))
    files = score_predictions(single)["kvasir"].files
    assert files["metrics"] == tmp_path / "single.metrics.json"
    assert files["roc_png"] == tmp_path / "single.roc.png"
    out = score_predictions(single, out_prefix=tmp_path / "out" / "run1")["kvasir"].files
    assert out["metrics"] == tmp_path / "out" / "run1.metrics.json" and out["metrics"].is_file()


def test_source_without_labels_has_no_metrics_and_no_files(tmp_path):
    rows = [prediction_row(f"x/{i}.jpg", "capsule", "", CAPSULE, p) for i, (_, p) in enumerate(CAPSULE_ROWS)]
    score = score_predictions(write_csv(tmp_path / "p.csv", rows))["capsule"]
    assert score.metrics is None and score.files == {} and score.n_unlabelled == len(rows)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.csv"]


def test_most_confidently_wrong_sorted_by_confidence(two_source_csv, scores, tmp_path):
    assert [w["confidence"] for w in scores["capsule"].metrics["most_confidently_wrong"]] == [0.9, 0.7, 0.6]
    two = score_predictions(two_source_csv, n_wrong=2, out_prefix=tmp_path / "top2")
    wrong = two["capsule"].metrics["most_confidently_wrong"]
    # capsule mistakes: erosion->normal 0.9, polyp->normal 0.7, normal->erosion 0.6
    assert wrong == [
        {"path": "capsule/erosion/1.jpg", "true_label": "erosion", "predicted": "normal", "confidence": 0.9},
        {"path": "capsule/polyp/8.jpg", "true_label": "polyp", "predicted": "normal", "confidence": 0.7},
    ]
    with open(two["capsule"].files["wrong_csv"], newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(r["path"], float(r["confidence"])) for r in rows] == [(w["path"], w["confidence"]) for w in wrong]
    assert list(rows[0]) == ["path", "true_label", "predicted", "confidence"]


def test_report_csvs_equal_the_metrics_and_pngs_open(scores):
    score = scores["capsule"]
    m, files = score.metrics, score.files
    with open(files["confusion_csv"], newline="") as f:
        raw = list(csv.reader(f))
    assert raw[0] == ["true\\pred", *CAPSULE] and [r[0] for r in raw[1:]] == CAPSULE
    assert [[int(v) for v in r[1:]] for r in raw[1:]] == m["confusion_matrix"]
    with open(files["confusion_normalized_csv"], newline="") as f:
        norm = list(csv.reader(f))
    assert norm[0] == raw[0] and all(len(v.split(".")[1]) == 4 for r in norm[1:] for v in r[1:])
    np.testing.assert_allclose(
        [[float(v) for v in r[1:]] for r in norm[1:]], m["confusion_matrix_normalized"], atol=5e-5
    )
    for kind in ("confusion_png", "roc_png"):
        with Image.open(files[kind]) as im:
            im.verify()
        with Image.open(files[kind]) as im:
            assert im.format == "PNG" and 400 <= im.width <= 4000 and 300 <= im.height <= 3000


def test_report_scales_to_many_classes_and_skips_roc_without_probs(tmp_path):
    names = [f"class_{i:02d}" for i in range(25)]
    rng = np.random.default_rng(0)
    y = np.r_[np.arange(25), rng.integers(0, 25, 175)]
    probs = rng.dirichlet(np.ones(25), len(y))
    m = classification_metrics(y, probs.argmax(1), names, probs=probs)
    files = write_report(tmp_path / "many", m, names, y, probs, [])
    with Image.open(files["confusion_png"]) as big, Image.open(files["roc_png"]):
        assert big.width > 1500  # grows with the class count
    small = classification_metrics([0, 1], [0, 1], ["a", "b"])
    files = write_report(tmp_path / "small", small, ["a", "b"], [0, 1], None, [])
    assert "roc_png" not in files and not (tmp_path / "small.roc.png").exists()
    with Image.open(files["confusion_png"]) as im:
        assert im.width < big.width
    assert (tmp_path / "small.wrong.csv").read_text().strip() == "path,true_label,predicted,confidence"


def test_unknown_true_label_names_row_label_and_classes(tmp_path):
    rows = source_rows("kvasir", KVASIR, KVASIR_ROWS)
    rows[2]["true_label"] = "esophagitis"
    bad = write_csv(tmp_path / "bad.csv", rows)
    with pytest.raises(DataError, match=r"kvasir/polyp/2\.jpg.*'esophagitis'.*normal, polyp, ulcer.*--class-map"):
        score_predictions(bad)
    assert not (tmp_path / "bad.metrics.json").exists()


def test_malformed_csvs_are_data_errors(tmp_path):
    rows = source_rows("kvasir", KVASIR, KVASIR_ROWS)
    no_probs = write_csv(tmp_path / "old.csv", rows, [c for c in HEADER if not c.startswith("prob:")])
    with pytest.raises(DataError, match=r"old\.csv lacks prob:<class> columns"):
        score_predictions(no_probs)
    no_conf = write_csv(tmp_path / "noconf.csv", rows, [c for c in HEADER if c != "confidence"])
    with pytest.raises(DataError, match=r"noconf\.csv lacks confidence"):
        score_predictions(no_conf)
    with pytest.raises(DataError, match="not found.*missing.csv"):
        score_predictions(tmp_path / "missing.csv")
    (tmp_path / "empty.csv").write_text("")
    with pytest.raises(DataError, match=r"empty\.csv is empty"):
        score_predictions(tmp_path / "empty.csv")
    with pytest.raises(ConfigError, match="n_wrong"):
        score_predictions(no_conf, n_wrong=-1)
