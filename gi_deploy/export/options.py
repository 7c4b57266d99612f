"""The export stage's config objects (torch-free, so the CLI can read their help and defaults
without importing torch): what to produce and check, and which runs to export where."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path

from gi_deploy.core.fields import helped
from gi_deploy.errors import ConfigError
from gi_deploy.export import verify

# opset 17 keeps LayerNorm as one LayerNormalization node rather than a decomposed chain.
OPSET = 17


class Exporter(str, Enum):
    """torch's ONNX exporters: ``torchscript`` (legacy, the verified default) and ``dynamo`` (the
    torch.export-based default since torch 2.9)."""

    torchscript = "torchscript"
    dynamo = "dynamo"


EXPORTERS = tuple(e.value for e in Exporter)
DEFAULT_EXPORTER = Exporter.torchscript.value


@dataclass
class ExportOptions:
    """What to produce and check; every field is part of the bundle's export key."""

    merge: bool = helped(True, "Merge the adapters into the backbone (plain-backbone cost).")
    fp16: bool = helped(
        True,
        "Also write model.fp16.onnx (fp32 LayerNorm/GRN islands), gated in onnxruntime and in true fp16 arithmetic.",
    )
    int8: bool = helped(
        False,
        "Also write model.int8.onnx (onnxruntime static QDQ), calibrated on the training "
        "split, gated on the validation split.",
    )
    calib_images: int = helped(200, "INT8: training images to calibrate on.")
    int8_eval_images: int = helped(500, "INT8: validation images scored by fp32 and int8 (the accuracy gate).")
    int8_min_top1: float | None = helped(
        None,
        f"INT8 gate: least top-1 agreement with fp32, on the validation "
        f"images and on the verification batch (default {verify.INT8_MIN_TOP1}, "
        "relaxed to all but one image on sets too small to resolve it, and "
        "said so; a value you give is never relaxed).",
    )
    int8_max_accuracy_drop: float | None = helped(
        None,
        f"INT8 gate: largest validation accuracy drop, as a fraction "
        f"(default {verify.INT8_MAX_ACCURACY_DROP}, relaxed to one "
        "image on small sets, and said so; a value you give is never "
        "relaxed).",
    )
    allow_no_val: bool = helped(
        False,
        "Export even when none of the run's validation images can be read (the gates then "
        "run on the synthetic stress images alone; said loudly and recorded in the "
        "manifest).",
    )
    ood_images: int = helped(
        2000,
        "In-distribution statistics: most training (and half as many validation) "
        "images whose pooled features fit them.",
    )
    engine: bool = helped(
        False,
        "Build a TensorRT engine from the fp16 ONNX (needs TensorRT 10/11 and a GPU; "
        "otherwise writes build_engine.sh).",
    )
    max_batch: int = helped(32, "TensorRT profile: batch 1 to this.")
    opset: int = helped(OPSET, "ONNX opset (>= 17: LayerNormalization as one node).")
    exporter: str = helped(DEFAULT_EXPORTER, "torch ONNX exporter: torchscript (legacy, verified default) | dynamo.")

    def __post_init__(self) -> None:
        if self.opset < 17:
            raise ConfigError(f"opset must be >= 17 (LayerNormalization as one node), got {self.opset}")
        if self.exporter not in EXPORTERS:
            raise ConfigError(f"exporter {self.exporter!r} unknown; use one of {', '.join(EXPORTERS)}")
        for name in ("calib_images", "int8_eval_images", "max_batch", "ood_images"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if any(v is not None and not 0.0 <= v <= 1.0 for v in (self.int8_min_top1, self.int8_max_accuracy_drop)):
            raise ConfigError(
                "int8_min_top1 and int8_max_accuracy_drop are fractions in [0, 1], got "
                f"{self.int8_min_top1} and {self.int8_max_accuracy_drop}"
            )
        if self.engine and not self.fp16:
            raise ConfigError("--engine builds from the fp16 ONNX: drop --no-fp16")


@dataclass
class ExportConfig:
    runs_dir: Path = helped(Path("runs"), "Runs folder.")
    deploy_dir: Path = helped(Path("deploy"), "Bundles folder.")
    sources: list[str] = helped(default_factory=list, help="Sources to export (none: every trained run).")
    options: ExportOptions = field(default_factory=ExportOptions)
    force: bool = helped(False, "Re-export even when the bundle is up to date.")
    router: bool | None = helped(
        None,
        "Fit the source router (deploy/_router/) that `infer --source auto` uses "
        "(default: when two or more sources are exported).",
    )
    router_sources: list[str] | None = helped(
        None, "Sources the router chooses between (none: the exported sources, or every bundle there)."
    )
    router_min_accuracy: float = helped(0.99, "Router gate: least held-out validation routing accuracy.")
    allow_small_val: bool = helped(
        False,
        "Router gate: with fewer validation images than resolve "
        "--router-min-accuracy (100 for 0.99), gate on all but one image instead "
        "of refusing (said loudly and recorded in the router's manifest).",
    )

    def __post_init__(self) -> None:
        self.runs_dir, self.deploy_dir = Path(self.runs_dir), Path(self.deploy_dir)
        if not 0.0 <= self.router_min_accuracy <= 1.0:
            raise ConfigError(f"router_min_accuracy is a fraction in [0, 1], got {self.router_min_accuracy}")
        if not self.runs_dir.is_dir():
            raise ConfigError(f"runs folder {self.runs_dir} does not exist; train a source first")
