"""gi-deploy triage from the command line on a real (tiny) bundle: a synthetic capsule video with
--evaluate, a folder of Kvasir-Capsule-named frames, and bad input answered in one line."""

import json

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from gi_deploy.cli import app

pytest.importorskip("av")
runner = CliRunner()


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    from gi_deploy.demo.triage_demo import write_study

    return write_study(tmp_path_factory.mktemp("study"), minutes=1.0, fps=2.0, size=32)


@pytest.mark.slow
def test_triage_a_video_and_evaluate(tiny_deploy, study, tmp_path):
    video, labels = study
    res = runner.invoke(
        app,
        [
            "triage",
            str(video),
            "--deploy",
            str(tiny_deploy),
            "--source",
            "capsule",
            "--normal",
            "normal",
            "--out",
            str(tmp_path / "rep"),
            "--evaluate",
            str(labels),
        ],
    )
    assert res.exit_code == 0, res.output
    assert "event sensitivity" in res.output and "unlabelled frames are unknown" in res.output
    summary = json.loads((tmp_path / "rep" / "summary.json").read_text())
    assert summary["videos"][0]["n_frames"] == 120 and summary["evaluation"]["events"] == 6
    assert summary["videos"][0]["sections"]["incomplete"]  # the tiny model has no landmark classes: said
    for name in ("report.html", "segments.csv", "frames.csv", "predictions.csv"):
        assert (tmp_path / "rep" / name).is_file()


@pytest.mark.slow
def test_triage_a_folder_of_kvasir_named_frames(tiny_deploy, tmp_path):
    frames = tmp_path / "frames"
    frames.mkdir()
    rng = np.random.default_rng(0)
    for video in ("aaa", "bbb"):
        for f in (3, 1, 2, 10):  # out of order on disk; ordered by frame number
            Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(frames / f"{video}_{f}.jpg")
    res = runner.invoke(
        app,
        [
            "triage",
            str(frames),
            "--deploy",
            str(tiny_deploy),
            "--normal",
            "normal",
            "--frame-rate",
            "2",
            "--out",
            str(tmp_path / "rep"),
        ],
    )
    assert res.exit_code == 0, res.output
    summary = json.loads((tmp_path / "rep" / "summary.json").read_text())
    assert [(v["video"], v["n_frames"], v["last_frame"], v["duration_s"]) for v in summary["videos"]] == [
        ("aaa", 4, 10, 4.5),
        ("bbb", 4, 10, 4.5),
    ]


def test_bad_input_is_one_line(tmp_path):
    (tmp_path / "frames").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "frames" / "nonumber.jpg")
    res = runner.invoke(app, ["triage", str(tmp_path / "frames"), "--out", str(tmp_path / "rep")])
    assert res.exit_code == 1 and "<video_id>_<frame>.jpg" in res.output and "Traceback" not in res.output
    res = runner.invoke(app, ["triage", str(tmp_path / "none.mp4"), "--out", str(tmp_path / "rep")])
    assert res.exit_code == 1 and "nothing to triage" in res.output
