"""``gi-deploy explain``'s config (torch-free: the CLI reads its help without importing torch)."""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from pathlib import Path

from gi_deploy.core.fields import helped
from gi_deploy.errors import ConfigError


class SaliencyMethod(str, Enum):
    gradcam = "gradcam"
    gradcam_pp = "gradcam++"
    smoothgrad = "smoothgrad"


METHODS = tuple(m.value for m in SaliencyMethod)


@dataclass
class ExplainConfig:
    path: Path = helped(help="An image or a folder of images (searched recursively).")
    runs_dir: Path = helped(Path("runs"), "Runs folder.")
    sources: list[str] = helped(
        default_factory=list, help="Source(s) to explain, side by side; repeat the option (none: every finished run)."
    )
    method: str = helped("gradcam", "gradcam | gradcam++ (grad-cam package) | smoothgrad.")
    target: str = helped("predicted", "Explain the predicted class, or this class name.")
    layer: str | None = helped(
        None,
        "Target layer for Grad-CAM (none: the backbone's last feature map with at "
        "least 4 cells per side, e.g. stages.3, layer4).",
    )
    out_dir: Path = helped(Path("explain"), "Where the PNGs go.")
    sheet_rows: int = helped(24, "Images on the contact sheet, at most 48.")
    limit: int | None = helped(None, "Only the first N images of the folder (sorted).")

    def __post_init__(self) -> None:
        self.path, self.runs_dir, self.out_dir = Path(self.path), Path(self.runs_dir), Path(self.out_dir)
        if self.method not in METHODS:
            raise ConfigError(f"--method {self.method!r} unknown; use one of {', '.join(METHODS)}")
        if not self.path.exists():
            raise ConfigError(f"nothing to explain at {self.path}: no such file or folder")
        if self.sheet_rows < 1 or (self.limit is not None and self.limit < 1):
            raise ConfigError(f"sheet_rows and limit must be >= 1, got {self.sheet_rows} and {self.limit}")
