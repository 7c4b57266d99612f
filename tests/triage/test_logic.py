"""The study logic against hand-computed numbers: roles, smoothing, hysteresis segments, ordered
sections, near-duplicate removal, top-k, the review budget and the quality track."""

import numpy as np
import pytest

from gi_deploy.errors import ConfigError
from gi_deploy.triage.review import (
    DUPLICATE_BITS,
    dhash,
    hamming,
    quality_track,
    remove_near_duplicates,
    review_budget,
    top_frames,
)
from gi_deploy.triage.roles import class_roles
from gi_deploy.triage.sections import find_sections
from gi_deploy.triage.temporal import find_segments, hysteresis_runs, smooth

KVASIR = [
    "angiectasia",
    "blood-fresh",
    "erosion",
    "erythema",
    "foreign body",
    "ileocecal valve",
    "lymphangiectasia",
    "normal clean mucosa",
    "pylorus",
    "reduced mucosal view",
    "ulcer",
]


def test_kvasir_roles_are_built_in():
    r = class_roles("kvasir", KVASIR)
    assert r.names("normal") == ["normal clean mucosa"]
    assert r.names("landmarks") == ["pylorus", "ileocecal valve"]  # ordered: stomach->SB, SB->colon
    assert r.names("quality") == ["reduced mucosal view"]
    assert r.names("findings") == [
        "angiectasia",
        "blood-fresh",
        "erosion",
        "erythema",
        "foreign body",
        "lymphangiectasia",
        "ulcer",
    ]


def test_roles_given_for_any_source_and_checked():
    r = class_roles("mine", ["normal", "polyp", "Ileo-cecal valve"], normal=["normal"], landmark=["ileocecal valve"])
    assert r.normal == (0,) and r.landmarks == (2,) and r.findings == (1,) and r.quality == ()
    assert class_roles("mine", ["normal", "polyp"]).findings == (0, 1)  # nothing given: all findings
    with pytest.raises(ConfigError, match="'tumour' is not a class"):
        class_roles("mine", ["normal", "polyp"], normal=["tumour"])
    with pytest.raises(ConfigError, match="two roles"):
        class_roles("mine", ["normal", "polyp", "x"], normal=["x"], quality=["x"])
    with pytest.raises(ConfigError, match="no finding class"):
        class_roles("mine", ["normal", "polyp"], normal=["normal"], quality=["polyp"])


def test_median_smoothing_by_hand():
    x = np.array([[0, 1], [1, 0], [0, 0], [1, 1], [1, 1], [0, 1]], np.float32)
    # window 3, edges repeat: column 0 padded [0,0,1,0,1,1,0,0] -> medians 0,0,1,1,1,0
    np.testing.assert_array_equal(smooth(x, "median", 3)[:, 0], [0, 0, 1, 1, 1, 0])
    np.testing.assert_array_equal(smooth(x, "median", 3)[:, 1], [1, 0, 0, 1, 1, 1])
    np.testing.assert_array_equal(smooth(x, "none", 3), x)
    with pytest.raises(ConfigError, match="odd"):
        smooth(x, "median", 4)


def test_ema_smoothing_by_hand_is_zero_phase():
    x = np.array([[0.0], [1.0], [0.0]], np.float32)
    # window 3 -> alpha 0.5. forward: 0, 0.5, 0.25; backward over that: 0.25, 0.375, 0.1875
    np.testing.assert_allclose(smooth(x, "ema", 3)[:, 0], [0.1875, 0.375, 0.25], atol=1e-6)
    y = smooth(np.r_[np.zeros(10), np.ones(10), np.zeros(10)][:, None], "ema", 5)[:, 0]
    assert abs(int(np.argmax(y)) - 14.5) <= 0.5  # centred on the run, not lagging behind it


def test_hysteresis_runs_by_hand():
    s = np.array([0.1, 0.35, 0.6, 0.4, 0.2, 0.45, 0.35, 0.1, 0.9, 0.9])
    # >= low 0.3: [1..3], [5..6], [8..9]; reaching high 0.5: [1..3] (0.6) and [8..9]; [5..6] peaks at 0.45
    assert hysteresis_runs(s, 0.5, 0.3) == [(1, 3), (8, 9)]
    assert hysteresis_runs(s, 0.5, 0.3, min_frames=3) == [(1, 3)]
    assert hysteresis_runs(s, 0.5, 0.5) == [(2, 2), (8, 9)]  # one threshold: no hysteresis
    with pytest.raises(ConfigError, match="low <= high"):
        hysteresis_runs(s, 0.3, 0.5)


def test_segments_carry_frames_times_peak_and_scores():
    s = np.array([[0.1, 0.0], [0.4, 0.0], [0.8, 0.6], [0.5, 0.7], [0.2, 0.1]])
    frames, times = np.array([10, 12, 14, 16, 18]), np.array([5.0, 6.0, 7.0, 8.0, 9.0])
    segs = find_segments("v", s, ["polyp", "ulcer"], frames, times, high=0.5, low=0.3)
    assert [(g.finding, g.start, g.end) for g in segs] == [("polyp", 1, 3), ("ulcer", 2, 3)]
    p = segs[0]
    assert (p.start_frame, p.end_frame, p.peak_frame, p.start_time, p.end_time, p.peak_time) == (12, 16, 14, 6, 8, 7)
    assert p.max_score == pytest.approx(0.8) and p.mean_score == pytest.approx((0.4 + 0.8 + 0.5) / 3)
    assert p.n_frames == 3


def test_sections_order_is_enforced():
    n = 100
    e = np.zeros((n, 2))
    e[10, 0], e[80, 0] = 0.6, 0.9  # pylorus seen at 10, and (looking back) at 80
    e[50, 1] = 0.95  # the valve at 50
    # per-frame argmax would give small bowel from 80 and colon from 50: out of order
    s = find_sections(e, min_evidence=0.5)
    assert s.bounds == (10, 50) and not s.incomplete
    labels = s.labels()
    assert (labels[:10] == 0).all() and (labels[10:50] == 1).all() and (labels[50:] == 2).all()
    times = np.arange(n) * 2.0
    t = s.transit(times)
    assert (t["gastric_s"], t["small_bowel_s"], t["colon_s"]) == (20.0, 80.0, 98.0)


def test_sections_incomplete_when_the_valve_is_never_seen():
    e = np.zeros((50, 2))
    e[20, 0] = 0.8
    e[30, 1] = 0.3  # under the evidence needed
    s = find_sections(e, min_evidence=0.5)
    assert s.bounds == (20, None) and s.incomplete and "incomplete" in s.reason
    assert s.transit(np.arange(50.0))["small_bowel_s"] is None
    assert (s.labels()[:20] == 0).all() and (s.labels()[20:] == 1).all()  # no colon claimed
    none = find_sections(np.zeros((50, 0)))
    assert none.incomplete and (none.labels() == -1).all()  # no landmark classes: said, not guessed as stomach


def test_dhash_and_near_duplicate_removal():
    rng = np.random.default_rng(0)
    a = (rng.random((64, 64, 3)) * 255).astype(np.uint8)
    b = (rng.random((64, 64, 3)) * 255).astype(np.uint8)
    a2 = np.clip(a.astype(int) + rng.integers(-2, 3, a.shape), 0, 255).astype(np.uint8)  # a with sensor noise
    border = a.copy()
    border[:8] = 0  # outside the centre square the hash reads: the same view
    h = np.stack([dhash(a), dhash(b), dhash(a2), dhash(a), dhash(border)])
    assert h.shape == (5, 32) and h.dtype == np.uint8
    assert int(hamming(h[0], h[2])) <= DUPLICATE_BITS < int(hamming(h[0], h[1])) and int(hamming(h[0], h[4])) == 0
    # best first: 3 (a), 1 (b), 0 (a), 2 (a with noise), 4 (a, border): the copies after the first are dropped
    assert remove_near_duplicates(np.array([3, 1, 0, 2, 4]), h).tolist() == [3, 1]
    assert remove_near_duplicates(np.array([3, 1, 0, 2, 4]), h, max_bits=-1).tolist() == [3, 1, 0, 2, 4]


def test_top_frames_per_finding_after_removal():
    s = np.array([[0.1], [0.6], [0.9], [0.7], [0.1], [0.8]])
    segs = find_segments("v", s, ["polyp"], np.arange(6), np.arange(6.0), high=0.5, low=0.5)
    assert [(g.start, g.end) for g in segs] == [(1, 3), (5, 5)]
    top = top_frames(segs, "polyp", s[:, 0], kept={1, 3, 5}, k=2)  # 2 was a duplicate
    assert [(r["position"], r["segment"]) for r in top] == [(5, 1), (3, 0)]
    # each segment's best before any segment's second best: 1 (0.95) and 5 (0.8) before 3 (0.9)
    s[1, 0], s[3, 0] = 0.95, 0.9
    top = top_frames(segs, "polyp", s[:, 0], kept={1, 3, 5}, k=3)
    assert [r["position"] for r in top] == [1, 5, 3]


def test_review_budget_by_hand():
    b = review_budget(n_frames=7200, duration_s=7200.0, n_flagged=360, n_review=90, frames_per_minute=30)
    assert b["flagged_per_hour"] == 180 and b["review_per_hour"] == 45
    assert b["flagged_percent"] == 5.0 and b["review_percent"] == 1.25 and b["reading_minutes"] == 3.0


def test_quality_track_counts_reduced_view_and_refused():
    probs = np.array([[0.9, 0.1], [0.3, 0.7], [0.6, 0.4], [0.5, 0.5]])
    q = quality_track(probs, (1,), rejected=np.array([False, False, True, False]))
    assert q["reduced_view"] == 2 and q["refused"] == 1 and q["poor"] == 3 and q["poor_share"] == 0.75
