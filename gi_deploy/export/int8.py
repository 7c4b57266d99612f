"""INT8: onnxruntime static quantisation (QDQ) calibrated on the source's own training images.

Settings, following onnxruntime's guidance for CPU inference (``quantize_static`` docstring):
QDQ format; weights int8, symmetric, per output channel (ResNet-style and ConvNeXt kernels vary
a lot between channels); activations uint8 (asymmetric: GELU/ReLU outputs are mostly positive);
``reduce_range`` (7-bit weights) on CPUs without VNNI, where 8-bit products can saturate. Only
Conv, MatMul and Gemm are quantised: LayerNorm and GRN stay in float, the same islands as fp16.
Calibration uses MinMax over the images in batches of 8. The calibration graph reduces every tensor
to its min and max per batch, so memory stays small for any N. ``CalibMaxIntermediateOutputs`` is
deliberately not used: onnxruntime discards the held batches without folding them into the ranges
(onnxruntime#18893, #20949), so only the last few batches would count.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

import numpy as np

from gi_deploy.errors import DataError
from gi_deploy.runtime.preprocess import PreprocessSpec, load_input

log = logging.getLogger(__name__)

QUANTIZED_OPS = ("Conv", "MatMul", "Gemm")
CALIB_BATCH = 8


def cpu_has_vnni() -> bool:
    """Whether this x86 CPU has a VNNI dot-product instruction (Linux /proc/cpuinfo)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return any(f in flags.split() for f in ("avx512_vnni", "avx_vnni", "amx_int8"))


def load_images(paths: list[Path], spec: PreprocessSpec, what: str) -> np.ndarray:
    """Decode ``paths`` with the bundle's preprocessing; raises DataError naming the first
    unreadable file (calibration and validation must use the images the manifest lists)."""
    if not paths:
        raise DataError(f"no {what} images listed in the run")
    missing = [p for p in paths if not p.is_file()]
    if missing:
        raise DataError(f"{len(missing)} {what} image(s) of the run are gone, e.g. {missing[0]}; INT8 needs the "
                        "source's training and validation images where training found them (or export without --int8)")
    return np.stack([load_input(p, spec) for p in paths]).astype(np.float32)


class _Reader:
    """CalibrationDataReader over an in-memory float32 batch, CALIB_BATCH images at a time."""

    def __init__(self, images: np.ndarray, input_name: str):
        self.images, self.input_name, self.i = images, input_name, 0

    def get_next(self) -> dict | None:
        if self.i >= len(self.images):
            return None
        batch = self.images[self.i:self.i + CALIB_BATCH]
        self.i += CALIB_BATCH
        return {self.input_name: batch}

    def rewind(self) -> None:
        self.i = 0


def quantize_int8(fp32_path: Path, dst: Path, calib: np.ndarray, input_name: str) -> dict:
    """Write the QDQ INT8 model of ``fp32_path`` to ``dst``, calibrated on ``calib`` (N, 3, H, W).
    Returns the settings for the manifest."""
    from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType
    from onnxruntime.quantization import quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    reader = type("CalibrationReader", (_Reader, CalibrationDataReader), {})(calib, input_name)
    reduce_range = not cpu_has_vnni()
    with tempfile.TemporaryDirectory(prefix="gi-deploy-int8-") as tmp:
        prepared = Path(tmp) / "prepared.onnx"
        # onnxruntime's recommended pre-processing: shape inference and graph optimisation (BN folding)
        quant_pre_process(str(fp32_path), str(prepared), skip_symbolic_shape=True)
        quantize_static(
            str(prepared), str(dst), reader, quant_format=QuantFormat.QDQ, op_types_to_quantize=list(QUANTIZED_OPS),
            per_channel=True, reduce_range=reduce_range, activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8, calibrate_method=CalibrationMethod.MinMax,
        )
    return {"format": "QDQ", "activations": "uint8 asymmetric", "weights": "int8 symmetric per-channel",
            "reduce_range": reduce_range, "calibration": "MinMax", "quantized_ops": list(QUANTIZED_OPS),
            "calibration_images": int(len(calib))}
