"""gi-deploy triage end to end through the job pipeline, with a stand-in model that reads a frame's
colour (so what it answers is known): a video with known segments, sections and stalls; a cut
video; a resume after a kill; the report files; and the CLI on a real tiny bundle."""

import csv
import json

import numpy as np
import pytest

from gi_deploy.core.preprocess import PreprocessSpec
from gi_deploy.runtime.job import Answer, Strategy
from gi_deploy.triage import run as triage_run
from gi_deploy.triage.config import TriageConfig
from gi_deploy.triage.run import triage

pytest.importorskip("av")
from gi_deploy.triage.video import write_video

CLASSES = ["normal", "polyp", "pylorus", "valve"]
COLOUR = {"normal": (120, 90, 80), "polyp": (230, 60, 60), "pylorus": (60, 60, 230), "valve": (60, 230, 60)}
FPS = 4.0
N = 200
POLYP_RUNS = [(60, 71), (120, 127)]
PYLORUS, VALVE = (38, 40), (150, 152)
STALL = (62, 66)  # frames 63..66 repeat frame 62: near-duplicates inside the first polyp run


def study_frames():
    """Frame i: its class's colour over its own random texture (so different frames hash apart)."""
    rng = np.random.default_rng(0)
    cls = ["normal"] * N
    for a, b in POLYP_RUNS:
        cls[a : b + 1] = ["polyp"] * (b - a + 1)
    cls[PYLORUS[0] : PYLORUS[1] + 1] = ["pylorus"] * 3
    cls[VALVE[0] : VALVE[1] + 1] = ["valve"] * 3
    last = None
    for i in range(N):
        if STALL[0] < i <= STALL[1]:
            yield last
            continue
        texture = rng.integers(-30, 31, (32, 32, 1))
        last = np.clip(np.asarray(COLOUR[cls[i]]) + texture, 0, 255).astype(np.uint8)
        yield last


class ColourModel(Strategy):
    """Answers by the frame's mean colour: the class whose colour is nearest gets 0.9."""

    def __init__(self, fail_after=None):
        self.slots, self.columns, self.classes = ("colour",), (), list(CLASSES)
        self.specs = (PreprocessSpec(size=(32, 32), mean=(0.5,) * 3, std=(0.25,) * 3),)
        self.bundles = {"colour": None}
        self.calls, self.fail_after = 0, fail_after

    def classify(self, inputs):
        self.calls += 1
        if self.fail_after is not None and self.calls > self.fail_after:
            raise KeyboardInterrupt  # the kill, between two batches
        mean = inputs[0].reshape(len(inputs[0]), -1, 3).mean(1)
        ref = np.array([COLOUR[c] for c in CLASSES], float)
        nearest = np.argmin(((mean[:, None, :] - ref[None]) ** 2).sum(-1), axis=1)
        probs = np.full((len(mean), len(CLASSES)), 0.1 / 3, np.float32)
        probs[np.arange(len(mean)), nearest] = 0.9
        return [[Answer("colour", p)] for p in probs]

    def identities(self, precision):
        return {"colour": {"bundle": "colour", "export_key": "stand-in", "precision": precision}}

    def backends(self):
        return {"colour": ("numpy stand-in", [])}

    def classes_of(self, source):
        return list(CLASSES)


@pytest.fixture(scope="module")
def video(tmp_path_factory):
    path = tmp_path_factory.mktemp("study") / "study.mp4"
    write_video(path, study_frames(), FPS)
    return path


@pytest.fixture
def colour_model(monkeypatch):
    model = ColourModel()
    monkeypatch.setattr(triage_run, "open_strategy", lambda cfg, load=True: model)
    return model


def _cfg(video, out, **kw):
    return TriageConfig(
        inputs=video, out_dir=out, normal=["normal"], landmark=["pylorus", "valve"], batch_size=16, min_frames=2, **kw
    )


def test_known_segments_sections_and_review_list(video, tmp_path, colour_model):
    r = triage(_cfg(video, tmp_path / "rep"))
    (s,) = r.studies
    found = [(g.finding, g.start_frame, g.end_frame) for g in s.segments]
    assert [f for f, *_ in found] == ["polyp", "polyp"]
    for (_, a, b), (ta, tb) in zip(found, POLYP_RUNS):
        assert abs(a - ta) <= 1 and abs(b - tb) <= 1  # the boundaries within a frame
    assert s.segments[0].start_time == pytest.approx(s.segments[0].start_frame / FPS)
    assert s.sections.bounds == (PYLORUS[0], VALVE[0]) and not s.sections.incomplete
    t = s.sections.transit(s.table.times)
    assert t["gastric_s"] == pytest.approx(PYLORUS[0] / FPS) and t["small_bowel_s"] == pytest.approx(
        (VALVE[0] - PYLORUS[0]) / FPS
    )
    # near-duplicates: the 4 stalled repeats of frame 62 leave the review list, nothing else does
    b = s.budget
    assert b["flagged_frames"] == sum(e - a + 1 for a, e in POLYP_RUNS)
    assert b["review_frames"] == b["flagged_frames"] - 4
    review_frames = set(s.table.frames[s.review].tolist())
    assert len(review_frames & set(range(STALL[0], STALL[1] + 1))) == 1
    assert b["flagged_per_hour"] == pytest.approx(b["flagged_frames"] / ((N - 1) / FPS / 3600))
    assert len(s.top["polyp"]) == 6 and len({x["position"] for x in s.top["polyp"]}) == 6
    for name in ("report", "segments", "frames", "summary"):
        assert r.files[name].is_file()
    html = r.files["report"].read_text()
    assert "data:image/png;base64," in html and "data:image/jpeg;base64," in html and "<script" not in html
    rows = list(csv.DictReader(r.files["frames"].read_text().splitlines()))
    assert len(rows) == N and rows[PYLORUS[0]]["section"] == "small bowel" and rows[VALVE[0]]["section"] == "colon"
    segs = list(csv.DictReader(r.files["segments"].read_text().splitlines()))
    assert [int(x["review_frames"]) for x in segs] == [12 - 4, 8]
    summary = json.loads(r.files["summary"].read_text())
    assert summary["videos"][0]["sections"]["first_colon_frame"] == VALVE[0]


def test_fps_samples_the_video_by_time(video, tmp_path, colour_model):
    r = triage(_cfg(video, tmp_path / "rep", fps=2.0))
    s = r.studies[0]
    assert s.table.frames.tolist() == list(range(0, N, 2))
    assert [(g.start_frame, g.end_frame) for g in s.segments] == [(60, 70), (120, 126)]


def test_resume_after_a_kill_gives_the_same_study(video, tmp_path, monkeypatch):
    whole = ColourModel()
    monkeypatch.setattr(triage_run, "open_strategy", lambda cfg, load=True: whole)
    full = triage(_cfg(video, tmp_path / "full"))
    killed = ColourModel(fail_after=5)
    monkeypatch.setattr(triage_run, "open_strategy", lambda cfg, load=True: killed)
    with pytest.raises(KeyboardInterrupt):
        triage(_cfg(video, tmp_path / "rep"))
    pred = tmp_path / "rep" / "predictions.csv"
    done = pred.read_text().splitlines()
    assert len(done) == 1 + 5 * 16  # the header and the five batches written before the kill
    pred.write_text("\n".join(done) + "\n" + done[-1][:10])  # and a row cut short by it
    again = ColourModel()
    monkeypatch.setattr(triage_run, "open_strategy", lambda cfg, load=True: again)
    r = triage(_cfg(video, tmp_path / "rep", resume=True))
    assert r.n_resumed == 80 and r.n_classified == N - 80
    rows = list(csv.DictReader(pred.read_text().splitlines()))
    assert sorted(int(x["frame"]) for x in rows) == list(range(N))  # every frame once
    assert [(g.start_frame, g.end_frame) for g in r.studies[0].segments] == [
        (g.start_frame, g.end_frame) for g in full.studies[0].segments
    ]
    assert r.studies[0].budget == full.studies[0].budget  # the stalled repeats found again after the resume


def test_a_cut_video_keeps_the_frames_before_the_damage(video, tmp_path, colour_model, caplog):
    data = video.read_bytes()
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(data[: int(len(data) * 0.7)])
    with caplog.at_level("WARNING"):
        r = triage(_cfg(cut, tmp_path / "rep"))
    s = r.studies[0]
    good = s.table.frames[~s.table.unreadable]
    assert len(good) > 0.5 * N and good.tolist() == list(range(len(good)))
    assert any("cut" in n for n in r.summary["notes"])
    assert s.segments[0].start_frame in (59, 60, 61)  # what came before the damage is still triaged


def test_no_finding_class_left_is_refused_before_any_frame(video, tmp_path, colour_model):
    from gi_deploy.errors import ConfigError

    with pytest.raises(ConfigError, match="no finding class"):
        triage(
            TriageConfig(
                inputs=video, out_dir=tmp_path / "rep", normal=["normal", "polyp"], landmark=["pylorus", "valve"]
            )
        )
    assert not (tmp_path / "rep" / "predictions.csv").exists()


def test_kvasir_frames_are_grouped_by_video_and_ordered_by_frame_number(tmp_path):
    from PIL import Image

    from gi_deploy.triage.inputs import collect_study

    for name in ("b_2", "a_10", "a_9", "b_1", "a_100"):  # by name a_10 < a_100 < a_9: not time order
        Image.new("RGB", (8, 8)).save(tmp_path / f"{name}.jpg")
    s = collect_study(tmp_path, frame_rate=2.0)
    assert [(v, int(f)) for v, f in zip(s.videos, s.frames)] == [("a", 9), ("a", 10), ("a", 100), ("b", 1), ("b", 2)]
    assert s.times.tolist() == [4.5, 5.0, 50.0, 0.5, 1.0]


def test_predictions_are_read_back_per_video_in_frame_order(tmp_path):
    from gi_deploy.triage.study import read_predictions

    pred = tmp_path / "p.csv"
    pred.write_text(
        "path,source,error,video,frame,time_s,prob:normal,prob:polyp\n"
        "v#3,m,,v,3,1.5,0.2,0.8\nw#0,m,,w,0,0.0,1,0\nv#1,m,,v,1,0.5,0.9,0.1\n"
        "v#2,m,cannot read,v,2,1.0,,\nv#4,other,,v,4,2.0,0.5,0.5\n"
    )
    v, w = read_predictions(pred, "m", ["normal", "polyp"])
    assert (v.video, v.frames.tolist(), v.times.tolist()) == ("v", [1, 2, 3, 4], [0.5, 1.0, 1.5, 2.0])
    np.testing.assert_allclose(v.probs, [[0.9, 0.1], [0, 0], [0.2, 0.8], [0, 0]])
    assert v.unreadable.tolist() == [False, True, False, False]
    assert v.refused.tolist() == [False, False, False, True]  # another model answered frame 4 (--source auto)
    assert w.frames.tolist() == [0]
