"""What triage classifies: a capsule video (one item per sampled frame) or Kvasir-Capsule frames
(``<video_id>_<frame>.jpg``, grouped by video and ordered by frame number), as the runtime's
:class:`Inputs` with each item's video, frame number and time as extra CSV columns, so the job's
resume and the study read them back from the predictions CSV."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from itertools import pairwise
from pathlib import Path

import numpy as np

from gi_deploy.core.preprocess import IMAGE_EXTENSIONS, list_images
from gi_deploy.errors import ConfigError, DataError
from gi_deploy.runtime.inputs import Inputs

FRAME_NAME = re.compile(r"^(?P<video>.+)_(?P<frame>\d+)$")  # Kvasir-Capsule: <video_id>_<frame>.jpg
FRAME_COLUMNS = ("video", "frame", "time_s")
VIDEO_SUFFIXES = frozenset({".mp4", ".avi", ".mkv", ".mov", ".m4v", ".webm", ".mpg", ".mpeg"})


@dataclass
class StudyInputs(Inputs):
    """``paths``: the items in study order (a frame file, or ``<video>#<frame>`` for a video's
    frame); ``videos``/``frames``/``times`` the same order's video id, frame number and seconds.
    ``video`` holds the probed video (triage/video.py's VideoInfo) when the input is one."""

    videos: list[str] = field(default_factory=list)
    frames: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    times: np.ndarray = field(default_factory=lambda: np.zeros(0))
    video: object | None = None
    notes: list[str] = field(default_factory=list)
    extra_columns: tuple[str, ...] = FRAME_COLUMNS

    def __post_init__(self) -> None:
        self._pos = {p: i for i, p in enumerate(self.paths)}

    def extra_values(self, item: Path) -> dict[str, str]:
        i = self._pos[item]
        return {"video": self.videos[i], "frame": str(int(self.frames[i])), "time_s": f"{self.times[i]:.3f}"}


def frame_item(video: Path, frame: int) -> Path:
    """The item (and, relative to the video's folder, the CSV path) of a video's frame: ``study.mp4#000123``."""
    return video.with_name(f"{video.name}#{frame:06d}")


def parse_frame_name(path: Path) -> tuple[str, int]:
    """``(video id, frame number)`` of a Kvasir-Capsule frame file. Raises DataError otherwise."""
    m = FRAME_NAME.match(path.stem)
    if not m:
        raise DataError(
            f"{path}: frames are read as Kvasir-Capsule names them, <video_id>_<frame>.jpg (e.g. "
            "04a78ef00c5245e0_10023.jpg), to group them by video and order them in time; rename it"
        )
    return m["video"], int(m["frame"])


def collect_frames(paths: list[Path], root: Path, frame_rate: float | None) -> StudyInputs:
    """Frames grouped by video id and ordered by frame number; time = frame / ``frame_rate`` (frame
    numbers as seconds when no rate is given, said in the notes). Raises DataError on a name that
    is not ``<video_id>_<frame>`` or a frame number given twice in one video."""
    keyed = sorted(((*parse_frame_name(p), p) for p in paths), key=lambda t: (t[0], t[1]))
    for a, b in pairwise(keyed):
        if a[:2] == b[:2]:
            raise DataError(f"frame {a[1]} of video {a[0]} is given twice ({a[2]} and {b[2]}); keep one")
    frames = np.array([k[1] for k in keyed], np.int64)
    rate = frame_rate or 1.0
    notes = [] if frame_rate else ["no --frame-rate given: times are frame numbers read as seconds (1 frame/s)"]
    return StudyInputs(
        root, [k[2] for k in keyed], videos=[k[0] for k in keyed], frames=frames, times=frames / rate, notes=notes
    )


def collect_study(spec: str | Path, fps: float | None = None, frame_rate: float | None = None) -> StudyInputs:
    """A video file (probed: triage/video.py, PyAV), or a folder / list file of Kvasir-Capsule
    frames. ``fps`` samples a video by time; ``frame_rate`` gives frame files their times.
    Raises ConfigError for what is neither, DataError for a video that cannot be read or frames
    misnamed."""
    path = Path(spec)
    if path.is_file() and path.suffix.lower() in VIDEO_SUFFIXES:
        from gi_deploy.triage.video import probe_video  # PyAV: only for video input

        info = probe_video(path, fps)
        items = [frame_item(path, int(f)) for f in info.frames]
        notes = list(info.notes) + ([info.damaged] if info.damaged else [])
        return StudyInputs(
            path.parent,
            items,
            videos=[path.stem] * len(items),
            frames=info.frames.copy(),
            times=info.times.copy(),
            video=info,
            notes=notes,
        )
    if fps is not None:
        raise ConfigError("--fps samples a video file; frames in a folder are classified as they are")
    if path.is_dir():
        paths = list_images(path)
        if not paths:
            raise DataError(f"no frames ({', '.join(sorted(IMAGE_EXTENSIONS))}) found in {path}")
        return collect_frames(paths, path, frame_rate)
    if path.is_file() and path.suffix.lower() in (".txt", ".lst"):
        base = path.parent
        lines = [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines()]
        paths = [base / ln for ln in lines if ln and not ln.startswith("#")]
        if not paths:
            raise DataError(f"list {path} names no frame")
        return collect_frames(paths, base, frame_rate)
    if path.exists():
        raise ConfigError(
            f"cannot triage {path}: not a video ({', '.join(sorted(VIDEO_SUFFIXES))}), a folder of "
            "frames or a .txt list of frames"
        )
    raise ConfigError(f"nothing to triage at {spec}: no such file or folder")
