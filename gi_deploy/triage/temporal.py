"""From per-frame probabilities to suspected-finding segments: temporal smoothing, then
hysteresis thresholds. Pure numpy; every function is tested against hand-computed numbers."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from gi_deploy.errors import ConfigError

SMOOTHING = ("median", "ema", "none")


def smooth(probs: np.ndarray, method: str = "median", window: int = 5) -> np.ndarray:
    """Smooth ``probs`` (N, C) float along time (axis 0), each column alone; returns (N, C) float32.

    ``median``: the median of the ``window`` frames centred on each frame (``window`` odd; the
    edges repeat the first/last frame). ``ema``: an exponential moving average with
    alpha = 2 / (window + 1), run forwards and then backwards over the result, so a run's
    boundaries are not shifted later (a forward-only EMA lags by about window / 2 frames).
    ``none``: the probabilities as they are. Raises ConfigError on an unknown method or a window
    under 1 (or even, for median)."""
    x = np.asarray(probs, dtype=np.float32)
    if x.ndim != 2:
        raise ConfigError(f"smooth expects (frames, classes) probabilities, got shape {x.shape}")
    if method not in SMOOTHING:
        raise ConfigError(f"smoothing {method!r} unknown; use one of {', '.join(SMOOTHING)}")
    if window < 1:
        raise ConfigError(f"smoothing window must be >= 1 frame, got {window}")
    if method == "none" or window == 1 or len(x) == 0:
        return x.copy()
    if method == "median":
        if window % 2 == 0:
            raise ConfigError(f"the median window must be odd (centred on the frame), got {window}")
        h = window // 2
        padded = np.concatenate([np.repeat(x[:1], h, 0), x, np.repeat(x[-1:], h, 0)])
        views = np.lib.stride_tricks.sliding_window_view(padded, window, axis=0)  # (N, C, window)
        return np.median(views, axis=-1).astype(np.float32)
    alpha = 2.0 / (window + 1)
    return _ema(_ema(x, alpha)[::-1], alpha)[::-1].copy()


def _ema(x: np.ndarray, alpha: float) -> np.ndarray:
    out = np.empty_like(x)
    acc = x[0].copy()
    for t in range(len(x)):  # a Python loop over frames: ~1 s for 100k frames, once per study
        acc = alpha * x[t] + (1 - alpha) * acc
        out[t] = acc
    return out


@dataclass
class Segment:
    """A run of frames where one finding's smoothed score stays >= the low threshold and reaches
    the high one. ``start``/``end``/``peak`` are positions in the video's frame sequence
    (inclusive); ``*_frame`` the frame numbers in the video; times in seconds."""

    video: str
    finding: str
    start: int
    end: int
    peak: int
    start_frame: int
    end_frame: int
    peak_frame: int
    start_time: float
    end_time: float
    peak_time: float
    max_score: float
    mean_score: float

    @property
    def n_frames(self) -> int:
        return self.end - self.start + 1

    def to_row(self) -> dict:
        return {**asdict(self), "n_frames": self.n_frames}


def hysteresis_runs(score: np.ndarray, high: float, low: float, min_frames: int = 1) -> list[tuple[int, int]]:
    """Runs ``(start, end)`` (inclusive) of ``score`` (N,) where it is >= ``low`` throughout and >=
    ``high`` somewhere, at least ``min_frames`` long. Raises ConfigError unless 0 <= low <= high <= 1."""
    if not 0.0 <= low <= high <= 1.0:
        raise ConfigError(f"hysteresis thresholds must satisfy 0 <= low <= high <= 1, got low {low}, high {high}")
    above = np.asarray(score) >= low
    edges = np.diff(np.concatenate([[0], above.astype(np.int8), [0]]))
    starts, ends = np.flatnonzero(edges == 1), np.flatnonzero(edges == -1) - 1
    return [
        (int(s), int(e))
        for s, e in zip(starts, ends)
        if e - s + 1 >= min_frames and float(np.max(score[s : e + 1])) >= high
    ]


def find_segments(
    video: str,
    scores: np.ndarray,
    findings: list[str],
    frames: np.ndarray,
    times: np.ndarray,
    high: float = 0.5,
    low: float = 0.3,
    min_frames: int = 1,
) -> list[Segment]:
    """Every finding's segments in one video, in time order. ``scores`` (N, F): the smoothed score of
    each of ``findings`` per frame; ``frames`` (N,) int frame numbers; ``times`` (N,) seconds."""
    segments = []
    for j, name in enumerate(findings):
        s = scores[:, j]
        for a, b in hysteresis_runs(s, high, low, min_frames):
            peak = a + int(np.argmax(s[a : b + 1]))
            segments.append(
                Segment(
                    video,
                    name,
                    a,
                    b,
                    peak,
                    int(frames[a]),
                    int(frames[b]),
                    int(frames[peak]),
                    float(times[a]),
                    float(times[b]),
                    float(times[peak]),
                    float(s[peak]),
                    float(np.mean(s[a : b + 1])),
                )
            )
    return sorted(segments, key=lambda g: (g.start, g.finding))
