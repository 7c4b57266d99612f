"""--evaluate against hand-computed numbers: events (gap G), found within a tolerance, per-video
detection, segmental F1, landmark time error, specificity on normal-labelled frames only."""

import numpy as np
import pytest

from gi_deploy.errors import DataError
from gi_deploy.triage.config import TriageConfig
from gi_deploy.triage.evaluate import evaluate_studies, events_of, read_labels
from gi_deploy.triage.roles import class_roles
from gi_deploy.triage.study import FrameTable, analyse, select_review

CLASSES = ["normal", "polyp", "pylorus", "valve"]


def _study(video, n, runs, landmarks=()):
    """Frames 0..n-1 at 1 s; ``runs``: (class, first, last) planted with probability 0.9."""
    probs = np.zeros((n, len(CLASSES)), np.float32)
    probs[:, 0] = 1.0
    for cls, a, b in [*runs, *landmarks]:
        probs[a : b + 1] = 0.0
        probs[a : b + 1, CLASSES.index(cls)] = 0.9
    table = FrameTable(
        video,
        [f"{video}#{i}" for i in range(n)],
        np.arange(n),
        np.arange(n, dtype=float),
        probs,
        np.zeros(n, bool),
        np.zeros(n, bool),
    )
    cfg = TriageConfig(inputs="x", smoothing="none", min_frames=1)
    roles = class_roles("mine", CLASSES, normal=["normal"], landmark=["pylorus", "valve"])
    s = analyse(table, roles, cfg)
    select_review(s, np.random.default_rng(0).integers(0, 256, (n, 32), dtype=np.uint8), cfg)
    return s


def test_events_group_labelled_frames_with_gaps_up_to_g():
    lab = {10: "Polyp", 12: "polyp", 20: "polyp", 50: "Normal"}
    assert [(e.start, e.end, e.n_labelled) for e in events_of("v", lab, ["polyp"], gap=5)] == [(10, 12, 2), (20, 20, 1)]
    assert [(e.start, e.end) for e in events_of("v", lab, ["polyp"], gap=8)] == [(10, 20)]


def test_event_sensitivity_by_hand(tmp_path):
    # video a: polyp events [10..12] (found: segment 11..13) and [40..41] (missed: segment at 60);
    # video b: one event [5..6], found only within tolerance (segment 9..10, tolerance 3)
    a = _study("a", 100, [("polyp", 11, 13), ("polyp", 60, 62)], landmarks=[("pylorus", 30, 30), ("valve", 80, 80)])
    b = _study("b", 50, [("polyp", 9, 10)])
    labels = tmp_path / "metadata.csv"
    labels.write_text(
        "filename;video_id;frame_number;finding_category;finding_class\n"
        "a_10.jpg;a;10;Luminal;Polyp\na_12.jpg;a;12;Luminal;Polyp\n"
        "a_40.jpg;a;40;Luminal;Polyp\na_41.jpg;a;41;Luminal;Polyp\n"
        "a_28.jpg;a;28;Anatomy;Pylorus\na_85.jpg;a;85;Anatomy;Valve\n"
        "a_70.jpg;a;70;Anatomy;Normal\na_61.jpg;a;61;Anatomy;Normal\n"
        "b_5.jpg;b;5;Luminal;Polyp\nb_6.jpg;b;6;Luminal;Polyp\nb_1.jpg;b;1;x;Ampulla of Vater\n"
    )
    r = evaluate_studies([a, b], read_labels(labels), gap=5, tolerance=3)
    assert (r["events"], r["events_found"]) == (3, 2) and r["event_sensitivity"] == pytest.approx(2 / 3)
    assert r["per_video"]["a"]["sensitivity"] == 0.5 and r["per_video"]["b"]["sensitivity"] == 1.0
    assert r["per_video_sensitivity"] == 1.0  # both videos have one event found
    r0 = evaluate_studies([a, b], read_labels(labels), gap=5, tolerance=0)
    assert r0["events_found"] == 1  # b's segment (9..10) misses [5..6] without the tolerance
    # specificity on the 2 normal-labelled frames: 61 is inside the polyp segment 60..62, 70 is not
    assert r["specificity_on_normal_frames"] == 0.5 and r["normal_frames"] == 2
    # landmarks: predicted at frames 30 and 80 (1 s per frame), labelled first at 28 and 85
    assert [x["error_s"] for x in r["landmarks"]] == [2.0, 5.0] and r["landmark_mean_error_s"] == 3.5
    # segmental F1 @0.1: a's 11..13 vs [10..12] IoU 2/4 (TP); 60..62 covers the normal label 61 (FP); b's 9..10
    # covers no labelled frame (left out); events [40..41] and [5..6] unmatched (FN): tp 1, fp 1, fn 2
    assert r["segmental_f1"]["0.1"] == {"tp": 1, "fp": 1, "fn": 2, "f1": pytest.approx(2 / 5)}
    assert r["segments_over_unlabelled_frames"] == 1
    assert r["segmental_f1"]["0.5"]["tp"] == 1 and r["segmental_f1"]["0.25"]["tp"] == 1
    assert r["labels_not_model_classes"] == {"Ampulla of Vater": 1}


def test_segments_over_unlabelled_frames_are_not_false_positives(tmp_path):
    a = _study("a", 100, [("polyp", 11, 13), ("polyp", 60, 62)])
    labels = tmp_path / "m.csv"
    labels.write_text("video_id,frame_number,finding_class\na,10,polyp\na,12,polyp\n")
    r = evaluate_studies([a], read_labels(labels), gap=5, tolerance=0)
    assert r["segments_over_unlabelled_frames"] == 1
    assert r["segmental_f1"]["0.1"] == {"tp": 1, "fp": 0, "fn": 0, "f1": 1.0}
    assert r["specificity_on_normal_frames"] is None  # no frame labelled normal: not claimed


def test_labels_of_another_study_are_refused(tmp_path):
    labels = tmp_path / "m.csv"
    labels.write_text("video_id,frame_number,finding_class\nzzz,10,polyp\n")
    with pytest.raises(DataError, match="none of the labelled videos"):
        evaluate_studies([_study("a", 20, [])], read_labels(labels))
