"""The triage stage's one config, validated when built (the CLI, the Python API and the tests
build the same object)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from gi_deploy.core.fields import helped
from gi_deploy.errors import ConfigError
from gi_deploy.triage.temporal import SMOOTHING

# Reading speed of the review list: RAPID-style quick view runs at 8-25 frames/s, but a reader who
# looks at each flagged frame reads ~20-40 per minute; 30 is what the report's reading time assumes
# unless --read-fpm says otherwise.
READ_FRAMES_PER_MINUTE = 30.0


@dataclass
class TriageConfig:
    inputs: str | Path = helped(
        help="A capsule video (mp4, avi, mkv; read as a stream) or a folder / .txt list of "
        "Kvasir-Capsule frames named <video_id>_<frame>.jpg."
    )
    out_dir: Path = helped(
        Path("triage"),
        "Report folder: report.html, segments.csv, frames.csv, summary.json and "
        "the job's predictions.csv (what --resume continues).",
    )
    deploy_dir: Path = helped(Path("deploy"), "Bundles folder.")
    source: str | None = helped(
        None, "The bundle to run (kvasir, any source's name, or auto: the router; none: the only bundle)."
    )
    fps: float | None = helped(None, "Sample a video to this many frames per second, by time (none: every frame).")
    frame_rate: float | None = helped(
        None, "Frames per second of a folder of frames, for their times (none: frame numbers read as seconds)."
    )
    normal: list[str] | None = helped(None, "Classes that are normal mucosa (none: the source's built-in roles).")
    landmark: list[str] | None = helped(
        None,
        "Landmark classes in order: stomach -> small bowel, small bowel -> colon (kvasir: pylorus, ileocecal valve).",
    )
    quality: list[str] | None = helped(
        None, "Classes that mean the view cannot be read (kvasir: reduced mucosal view)."
    )
    smoothing: str = helped("median", "median | ema | none: temporal smoothing of the probabilities.")
    window: int = helped(5, "Smoothing window in sampled frames (odd for median; the EMA's span).")
    high: float = helped(0.6, "A segment needs one frame with a smoothed finding score >= this ...")
    low: float = helped(0.35, "... and lasts while the score stays >= this (hysteresis).")
    min_frames: int = helped(2, "Shortest segment, in sampled frames.")
    landmark_evidence: float = helped(0.5, "Smoothed landmark score a section change needs.")
    top_k: int = helped(6, "Frames per finding in the review list's contact sheet.")
    duplicate_bits: int = helped(24, "Near-duplicates: 256-bit dHashes differing in at most this many bits.")
    read_fpm: float = helped(READ_FRAMES_PER_MINUTE, "Reading speed (frames per minute) for the reading time.")
    batch_size: int = helped(32, "Frames per model call.")
    precision: str = helped("fp32", "fp32 | fp16 | int8 (the bundle's model files).")
    device: str = helped("auto", "auto: TensorRT -> CUDA -> CPU, whichever is installed.")
    backend: str = helped("auto", "auto | onnxruntime | tensorrt | torch.")
    threads: int | None = helped(None, "The model's CPU threads (none: every core this process may use).")
    workers: int | None = helped(None, "Decoding processes for frame files (a video decodes in one thread).")
    resume: bool = helped(False, "Keep the frames a killed run classified and classify only the rest.")
    labels: Path | None = helped(
        None,
        "Score the study against Kvasir-Capsule's metadata.csv (video id, frame number, "
        "finding): event sensitivity, segmental F1, landmark time error.",
    )
    gap: int = helped(10, "Evaluation: labelled frames of one class at most this many frames apart are one event.")
    tolerance: int = helped(5, "Evaluation: an event is found when a segment overlaps it within this many frames.")

    def __post_init__(self) -> None:
        self.out_dir, self.deploy_dir = Path(self.out_dir), Path(self.deploy_dir)
        if self.smoothing not in SMOOTHING:
            raise ConfigError(f"smoothing {self.smoothing!r} unknown; use one of {', '.join(SMOOTHING)}")
        if self.window < 1 or (self.smoothing == "median" and self.window % 2 == 0):
            raise ConfigError(f"window must be >= 1 (and odd for median), got {self.window}")
        if not 0.0 <= self.low <= self.high <= 1.0:
            raise ConfigError(f"thresholds must satisfy 0 <= low <= high <= 1, got low {self.low}, high {self.high}")
        for name in ("fps", "frame_rate", "read_fpm"):
            v = getattr(self, name)
            if v is not None and v <= 0:
                raise ConfigError(f"{name} must be > 0, got {v}")
        if self.min_frames < 1 or self.top_k < 1 or self.batch_size < 1:
            raise ConfigError(
                f"min_frames, top_k and batch_size must be >= 1, got {self.min_frames}, {self.top_k}, {self.batch_size}"
            )
        self.labels = None if self.labels is None else Path(self.labels)
        if self.gap < 0 or self.tolerance < 0:
            raise ConfigError(f"gap and tolerance are frame counts >= 0, got {self.gap} and {self.tolerance}")
        if not 0 <= self.duplicate_bits < 256:
            raise ConfigError(f"duplicate_bits must be 0..255, got {self.duplicate_bits}")
