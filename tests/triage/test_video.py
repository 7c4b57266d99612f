"""Video input read as a stream (PyAV): times from timestamps, --fps by time, the wanted frames
decoded, and every kind of bad video answered clearly; the hash that drops a stalled capsule's
repeats after H.264."""

from fractions import Fraction

import numpy as np
import pytest

from gi_deploy.errors import DataError
from gi_deploy.triage import video
from gi_deploy.triage.inputs import collect_study
from gi_deploy.triage.review import DUPLICATE_BITS, dhash, hamming
from gi_deploy.triage.video import decode_frames, probe_video, write_video

av = pytest.importorskip("av")


def _ramp(n, size=32):
    """Frame i is grey level 4 * i: its number can be read back from its pixels."""
    for i in range(n):
        yield np.full((size, size, 3), 4 * i, np.uint8)


def _level(img) -> int:
    return round(float(np.asarray(img).mean()) / 4)


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    path = tmp_path_factory.mktemp("video") / "study.mp4"
    write_video(path, _ramp(60), fps=10.0)
    return path


def test_times_come_from_timestamps_and_fps_samples_by_time(clip):
    info = probe_video(clip)
    assert info.n_total == 60 and not info.vfr and info.damaged is None
    np.testing.assert_allclose(info.times[:3], [0.0, 0.1, 0.2])
    s = collect_study(clip, fps=2.5)  # one frame per 0.4 s
    assert s.frames.tolist() == list(range(0, 60, 4)) and s.rel(s.paths[1]) == "study.mp4#000004"
    assert s.extra_values(s.paths[1]) == {"video": "study", "frame": "4", "time_s": "0.400"}


def test_decodes_exactly_the_wanted_frames_after_a_seek(clip, monkeypatch):
    info = probe_video(clip)
    got = [(n, _level(im), e) for n, im, e in decode_frames(info, np.array([0, 1, 45, 59]))]
    assert got == [(0, 0, None), (1, 1, None), (45, 45, None), (59, 59, None)]
    monkeypatch.setattr(video, "SEEK_GAP", 5)  # a seek before 45 and before 59
    assert [(n, _level(im)) for n, im, e in decode_frames(info, np.array([0, 1, 45, 59]))] == [
        (0, 0),
        (1, 1),
        (45, 45),
        (59, 59),
    ]


def test_a_cut_video_keeps_the_frames_before_the_damage(clip, tmp_path, caplog):
    data = clip.read_bytes()
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(data[: int(len(data) * 0.6)])
    info = probe_video(cut)
    assert 0 < info.n_total < 60 and "cut" in info.damaged
    with caplog.at_level("WARNING"):
        got = list(decode_frames(info, np.arange(info.n_total)))
    assert [n for n, _, _ in got] == list(range(info.n_total))  # every frame asked for is answered, read or not
    good = [n for n, im, e in got if e is None]
    bad = [n for n, im, e in got if e is not None]
    assert good == list(range(len(good))) and len(good) >= info.n_total - 4  # all before the damage kept
    assert all(_level(im) == n for n, im, e in got if e is None)
    if bad:  # the damage named once, with its frame number
        lines = [r.message for r in caplog.records if "damaged" in r.message or "ends before" in r.message]
        assert len(lines) == 1 and f"frame {bad[0]}" in lines[0]


def test_no_video_stream_zero_frames_and_not_a_video(tmp_path, clip):
    audio = tmp_path / "audio.mkv"
    with av.open(str(audio), "w") as c:
        s = c.add_stream("pcm_s16le", rate=8000)
        fr = av.AudioFrame.from_ndarray(np.zeros((1, 800), np.int16), format="s16", layout="mono")
        fr.sample_rate = 8000
        for p in [*s.encode(fr), *s.encode()]:
            c.mux(p)
    with pytest.raises(DataError, match="has no video stream .*audio"):
        probe_video(audio)
    data = clip.read_bytes()
    header = tmp_path / "header.mp4"  # the index (faststart: first) and not one frame's data
    header.write_bytes(data[: data.index(b"mdat") + 4])
    with pytest.raises(DataError, match="no frame"):
        probe_video(header)
    junk = tmp_path / "junk.mp4"
    junk.write_bytes(b"not a video at all" * 10)
    with pytest.raises(DataError, match="cannot read video .*junk.mp4"):
        probe_video(junk)


def test_variable_frame_rate_is_said_and_times_follow_timestamps(tmp_path):
    path = tmp_path / "vfr.mkv"
    with av.open(str(path), "w") as c:
        s = c.add_stream("libx264", rate=10)
        s.width = s.height = 32
        s.pix_fmt = "yuv420p"
        s.codec_context.time_base = Fraction(1, 1000)
        t = 0
        for i, rgb in enumerate(_ramp(30)):
            f = av.VideoFrame.from_ndarray(rgb, format="rgb24")
            f.pts, f.time_base = t, Fraction(1, 1000)
            t += 100 if i < 15 else 500  # 10 frames/s, then 2
            for p in s.encode(f):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    info = probe_video(path)
    assert info.vfr and "variable frame rate" in info.notes[0]
    assert info.times[15] == pytest.approx(1.5) and info.times[16] == pytest.approx(2.0)
    # 1 frame/s by time: frame 0 (0 s), 10 (1.0 s), then every 0.5-s frame from 16 (2.0 s): 16, 18, ... 28
    assert probe_video(path, fps=1.0).frames.tolist() == [0, 10, 16, 18, 20, 22, 24, 26, 28]


def test_a_4k_stream_is_said(tmp_path):
    path = tmp_path / "uhd.mkv"
    write_video(path, (np.zeros((2160, 3840, 3), np.uint8) for _ in range(2)), fps=2.0)
    info = probe_video(path)
    assert (info.width, info.height) == (3840, 2160) and any("4K" in n for n in info.notes)


def test_the_hash_drops_a_stalled_capsules_repeats_after_h264(tmp_path):
    from gi_deploy.demo.synthetic import plan_capsule_study, render_capsule_study

    plan = plan_capsule_study(240, 2.0, seed=3)
    path = tmp_path / "s.mp4"
    write_video(path, render_capsule_study(plan, 64), 2.0)
    info = probe_video(path)
    h = np.stack([dhash(np.asarray(im)) for _, im, _ in decode_frames(info, info.frames)])
    dup = np.flatnonzero(plan.copy_of >= 0)
    assert len(dup) > 10
    assert int(hamming(h[dup], h[plan.copy_of[dup]]).max()) <= DUPLICATE_BITS
    rng = np.random.default_rng(0)
    a, b = rng.integers(0, 240, 300), rng.integers(0, 240, 300)
    same = (
        (a == b)
        | (plan.copy_of[a] == b)
        | (plan.copy_of[b] == a)
        | ((plan.copy_of[a] >= 0) & (plan.copy_of[a] == plan.copy_of[b]))
    )
    assert int(hamming(h[a[~same]], h[b[~same]]).min()) > DUPLICATE_BITS
