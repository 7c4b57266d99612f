"""Capsule videos read as a stream with PyAV (the ``video`` extra, imported only here): never
extracted to disk, each frame's time from its ``pts * time_base`` (capsules vary their frame
rate), sampled to ``--fps`` by time.

Two passes, both streaming: :func:`probe_video` demuxes the packets (no decoding: a 100k-frame
study in seconds) to learn every frame's timestamp, so the job knows its items (one per sampled
frame) before any is classified and a resumed run asks for exactly the frames that are left;
:func:`decode_frames` then decodes and yields only the frames asked for. A damaged file keeps
the frames before the damage: the demuxer stops where the file is cut, the decoder where the
data is corrupt, and the damage is reported once, with the frame number.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path

import numpy as np
from PIL import Image

from gi_deploy.errors import DataError, DependencyError

log = logging.getLogger(__name__)

VIDEO_EXTENSIONS = frozenset({".mp4", ".avi", ".mkv", ".mov", ".m4v", ".webm", ".mpg", ".mpeg"})
# A frame rate is variable when the frame intervals spread more than this (max / min) beyond rounding
VFR_RATIO = 1.5
UHD_PIXELS = 3840 * 2160  # 4K and over: said, since each frame then costs ~10x a capsule frame to decode and resize


def _av():
    """PyAV, imported here only: the rest of gi-deploy runs without it."""
    try:
        import av  # the video extra
    except ImportError as e:
        raise DependencyError(
            "PyAV is not installed: pip install 'gi-deploy[video]' to triage video files (a "
            "folder of frames needs nothing more)"
        ) from e
    return av


@dataclass
class VideoInfo:
    """What the demux pass learned. ``pts`` (M,) int64: every frame's timestamp in presentation
    order (frame number = position); ``frames`` (N,) int64 the sampled frame numbers and
    ``times`` (N,) float64 their times in seconds from the stream's start."""

    path: Path
    width: int
    height: int
    codec: str
    time_base: Fraction
    pts: np.ndarray
    frames: np.ndarray
    times: np.ndarray
    fps_nominal: float | None
    vfr: bool
    damaged: str | None = None  # the demuxer's reason when the file stops early
    notes: list[str] = field(default_factory=list)

    @property
    def n_total(self) -> int:
        return len(self.pts)

    @property
    def duration_s(self) -> float:
        return float(self.times[-1] - self.times[0]) if len(self.times) else 0.0


def _open(path: Path):
    av = _av()
    if not path.is_file():
        raise DataError(f"cannot read video {path}: no such file")
    try:
        container = av.open(str(path))
    except (av.FFmpegError, OSError, ValueError) as e:
        hint = ""
        if path.suffix.lower() in (".mp4", ".mov", ".m4v"):
            hint = (
                "; an MP4 cut before its index (the 'moov' atom, written at the end unless the file was made "
                "with -movflags +faststart) cannot be read at all"
            )
        raise DataError(f"cannot read video {path}: not a video file FFmpeg can open ({e}){hint}") from e
    if not container.streams.video:
        kinds = ", ".join(s.type for s in container.streams) or "none"
        container.close()
        raise DataError(
            f"{path} has no video stream (its streams: {kinds}); give a capsule video or a folder of frames"
        )
    stream = container.streams.video[0]
    if stream.codec_context is None:  # PyAV#2344: decoding a stream without a codec context kills the process
        container.close()
        raise DataError(
            f"cannot read video {path}: FFmpeg found no codec parameters for its video stream (the file "
            "is cut inside its first frame, or its codec is unknown)"
        )
    return container, stream


def sample_by_time(times: np.ndarray, fps: float | None) -> np.ndarray:
    """Positions of ``times`` (sorted seconds) kept at ``fps``: the first frame of each 1/fps
    interval from the first frame's time (all of them when ``fps`` is None)."""
    if fps is None or len(times) == 0:
        return np.arange(len(times))
    bucket = np.floor((times - times[0]) * fps + 1e-9).astype(np.int64)
    return np.flatnonzero(np.r_[True, bucket[1:] != bucket[:-1]])


def probe_video(path: Path, fps: float | None = None) -> VideoInfo:
    """Demux ``path``'s first video stream (no decoding) into a :class:`VideoInfo`. Raises
    DataError for a file FFmpeg cannot open, one with no video stream or no frame, or frames
    without timestamps. A file that stops early keeps the frames before and says so in
    ``damaged`` (logged once by the caller)."""
    av = _av()
    path = Path(path)
    if fps is not None and fps <= 0:
        raise DataError(f"--fps must be > 0 frames per second, got {fps}")
    container, stream = _open(path)
    stamps: list[int] = []
    damaged = None
    with container:
        try:
            for packet in container.demux(stream):
                if packet.size == 0:  # the demuxer's end-of-stream flush packet
                    continue
                ts = packet.pts if packet.pts is not None else packet.dts
                if ts is None:
                    raise DataError(
                        f"{path}: frame {len(stamps)} has no timestamp (pts or dts); remux the file "
                        "(ffmpeg -i IN -c copy OUT.mkv) to give its frames times"
                    )
                stamps.append(int(ts))
        except av.FFmpegError as e:
            damaged = f"the file is damaged after frame {len(stamps) - 1} ({e})"
        codec = stream.codec_context.name
        width, height = stream.codec_context.width, stream.codec_context.height
        time_base = stream.time_base or Fraction(1, 1)
        rate = stream.average_rate or stream.guessed_rate
        start = stream.start_time
        listed = stream.frames  # what the container's index declares (0: unknown)
    if not stamps:
        raise DataError(
            f"{path} has a video stream ({codec}, {width}x{height}) but no frame" + (f": {damaged}" if damaged else "")
        )
    if damaged is None and listed and len(stamps) < listed:
        damaged = f"the file is cut: its index lists {listed} frames, {len(stamps)} are there"
    pts = np.unique(np.asarray(stamps, dtype=np.int64))  # presentation order; a repeated stamp is one frame
    origin = int(start) if start is not None else int(pts[0])
    all_times = (pts - origin).astype(np.float64) * float(time_base)
    keep = sample_by_time(all_times, fps)
    notes = []
    steps = np.diff(all_times)
    steps = steps[steps > 0]
    vfr = bool(len(steps) > 1 and steps.max() / steps.min() > VFR_RATIO)
    if vfr:
        notes.append(
            f"variable frame rate (frame intervals {steps.min() * 1000:.1f} to {steps.max() * 1000:.1f} ms): "
            "each frame's time is its own timestamp, and --fps samples by time"
        )
    if width * height >= UHD_PIXELS:
        notes.append(
            f"a {width}x{height} stream (4K or over): every frame is decoded whole and resized to the "
            "model's input, ~10x the decoding of a capsule frame; --fps 2 or less keeps triage fast"
        )
    return VideoInfo(
        path,
        width,
        height,
        codec,
        time_base,
        pts,
        pts.searchsorted(pts[keep]),
        all_times[keep],
        float(rate) if rate else None,
        vfr,
        damaged,
        notes,
    )


# Wanted frames further apart than this are reached by a seek (to the keyframe before) rather than by
# decoding every frame between: x264's default keyframe interval is 250.
SEEK_GAP = 300


def decode_frames(info: VideoInfo, wanted: np.ndarray) -> Iterator[tuple[int, Image.Image | None, str | None]]:
    """Decode ``info.path`` as a stream and yield ``(frame number, RGB image, None)`` for each of
    ``wanted`` (sorted frame numbers), in order; a frame that cannot be decoded gives ``(frame
    number, None, reason)``, and so does every wanted frame after it up to the next seek, with the
    damage logged once naming the frame. Runs of wanted frames more than ``SEEK_GAP`` apart start
    with a seek to the keyframe before them: a resumed run or the report's few frames do not
    decode the whole study again."""
    wanted = np.asarray(wanted, dtype=np.int64)
    if len(wanted) == 0:
        return
    breaks = np.flatnonzero(np.diff(wanted) > SEEK_GAP) + 1
    container, stream = _open(info.path)
    with container:
        for run in np.split(wanted, breaks):
            yield from _decode_run(info, container, stream, run)


def _decode_run(info: VideoInfo, container, stream, wanted: np.ndarray):
    av = _av()
    nxt = 0  # index into wanted of the next frame to yield
    if wanted[0] > 0:
        container.seek(int(info.pts[wanted[0]]), stream=stream, backward=True, any_frame=False)
    reason = None
    try:
        for frame in container.decode(stream):
            if frame.pts is None:
                continue
            number = int(info.pts.searchsorted(frame.pts))
            if number >= info.n_total or info.pts[number] != frame.pts:
                continue  # a timestamp the demux pass did not see: not one of our frames
            while nxt < len(wanted) and wanted[nxt] < number:  # skipped by the decoder: never produced
                yield int(wanted[nxt]), None, f"frame {wanted[nxt]} of {info.path} was not decoded"
                nxt += 1
            if nxt < len(wanted) and wanted[nxt] == number:
                yield number, frame.to_image(), None
                nxt += 1
            if nxt == len(wanted):
                return
    except av.FFmpegError as e:
        reason = f"{info.path} is damaged at frame {int(wanted[nxt]) if nxt < len(wanted) else info.n_total} ({e})"
    if reason is None:
        reason = f"{info.path} ends before frame {int(wanted[nxt])} (the file is cut)"
    log.warning("%s; the frames before it are kept, the %d after it are not classified", reason, len(wanted) - nxt)
    for number in wanted[nxt:]:
        yield int(number), None, reason


def write_video(path: Path, frames: Iterator[np.ndarray], fps: float, codec: str = "libx264", crf: int = 18) -> int:
    """Encode ``frames`` (each uint8 (H, W, 3) RGB, all one size, H and W even) into ``path`` at a
    constant ``fps``, streaming (the demo's synthetic studies). Returns the frames written."""
    av = _av()
    n = 0
    # faststart: the index goes first, so a copy cut short still opens and keeps its frames
    options = {"movflags": "+faststart"} if Path(path).suffix.lower() in (".mp4", ".mov", ".m4v") else {}
    with av.open(str(path), "w", options=options) as container:
        stream = container.add_stream(codec, rate=Fraction(fps).limit_denominator(1000))
        stream.pix_fmt = "yuv420p"
        if codec == "libx264":
            stream.options = {"crf": str(crf), "preset": "veryfast"}
        for rgb in frames:
            if n == 0:
                stream.height, stream.width = rgb.shape[:2]
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb), format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
            n += 1
        for packet in stream.encode():
            container.mux(packet)
    return n
