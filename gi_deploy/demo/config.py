"""The demo's settings (torch-free: the CLI reads them without importing torch)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from gi_deploy.core.fields import helped
from gi_deploy.demo.synthetic import SOURCES, SPLIT_SIZES

BASE = "base"
MODEL = "convnextv2_atto"


@dataclass
class DemoConfig:
    out_dir: Path = helped(Path("gi-deploy-demo"), "Where data, runs, bundles and predictions go.")
    img_size: int = 48
    image_px: int = 64
    base_epochs: int = 15
    lora_epochs: int = 12
    # From random init, ConvNeXt collapses to a constant output at lr 1e-3 on this little data;
    # 3e-4 learns. The LoRA adapters start at B = 0 and take a larger step.
    base_lr: float = 3e-4
    lora_lr: float = 2e-3
    batch_size: int = 16
    seed: int = 0
    sources: tuple[str, ...] = SOURCES
    split_sizes: dict[str, int] = field(default_factory=lambda: dict(SPLIT_SIZES))  # images per class
    ood_per_kind: int = 8  # frames no source covers, per kind (blank, saturated, colour field, pattern)
    triage_minutes: float = 10.0  # the synthetic capsule video's length (2 frames/s): gi-deploy triage's demo
