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
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from gi_deploy.core.preprocess import PreprocessSpec, load_input
from gi_deploy.core.runs import RunRecord
from gi_deploy.errors import DataError, GateFailed
from gi_deploy.export import verify
from gi_deploy.export.onnx_export import INPUT_NAME, run_onnx

log = logging.getLogger(__name__)

QUANTIZED_OPS = ("Conv", "MatMul", "Gemm")
CALIB_BATCH = 8
# Ways to quantise that benchmarks/int8_ops.py compares per op (why INT8 pays little on VNNI CPUs);
# "default" is what export writes.
VARIANTS = ("default", "qdq-all", "qoperator", "matmul-only")


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
        raise DataError(
            f"{len(missing)} {what} image(s) of the run are gone, e.g. {missing[0]}; INT8 needs the "
            "source's training and validation images where training found them (or export without --int8)"
        )
    return np.stack([load_input(p, spec) for p in paths]).astype(np.float32)


class _Reader:
    """CalibrationDataReader over an in-memory float32 batch, CALIB_BATCH images at a time."""

    def __init__(self, images: np.ndarray, input_name: str):
        self.images, self.input_name, self.i = images, input_name, 0

    def get_next(self) -> dict | None:
        if self.i >= len(self.images):
            return None
        batch = self.images[self.i : self.i + CALIB_BATCH]
        self.i += CALIB_BATCH
        return {self.input_name: batch}

    def rewind(self) -> None:
        self.i = 0


class _QuantizerToDebug(logging.Filter):
    """onnxruntime's quantiser logs through the root logger (``logging.warning``), e.g. one
    ``Expected bias '...conv_dw.bias' to be an initializer`` per depthwise convolution: ~120 lines
    for convnextv2_base that bury the gate summary and ask nothing of the user. On the root logger
    this filter moves them to this module's debug log (``gi-deploy -v`` shows them)."""

    def filter(self, record: logging.LogRecord) -> bool:
        path = record.pathname.replace("\\", "/")
        if "onnxruntime/quantization/" not in path:
            return True
        log.debug("onnxruntime quantizer: %s", record.getMessage())
        return False


@contextmanager
def _quiet_quantizer():
    root, quiet = logging.getLogger(), _QuantizerToDebug()
    root.addFilter(quiet)
    try:
        yield
    finally:
        root.removeFilter(quiet)


def _depthwise_convs(path: Path) -> list[str]:
    import onnx

    model = onnx.load(str(path))
    return [
        n.name
        for n in model.graph.node
        if n.op_type == "Conv" and any(a.name == "group" and a.i > 1 for a in n.attribute)
    ]


def quantize_int8(fp32_path: Path, dst: Path, calib: np.ndarray, input_name: str, variant: str = "default") -> dict:
    """Write the QDQ INT8 model of ``fp32_path`` to ``dst``, calibrated on ``calib`` (N, 3, H, W).
    ``variant`` (VARIANTS) changes what is quantised or the format, for benchmarks/int8_ops.py.
    Returns the settings for the manifest."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    reader = type("CalibrationReader", (_Reader, CalibrationDataReader), {})(calib, input_name)
    reduce_range = not cpu_has_vnni()
    with tempfile.TemporaryDirectory(prefix="gi-deploy-int8-") as tmp, _quiet_quantizer():
        prepared = Path(tmp) / "prepared.onnx"
        # onnxruntime's recommended pre-processing: shape inference and graph optimisation (BN folding)
        quant_pre_process(str(fp32_path), str(prepared), skip_symbolic_shape=True)
        quantize_static(
            str(prepared),
            str(dst),
            reader,
            quant_format=QuantFormat.QOperator if variant == "qoperator" else QuantFormat.QDQ,
            op_types_to_quantize=None if variant == "qdq-all" else list(QUANTIZED_OPS),
            nodes_to_exclude=_depthwise_convs(prepared) if variant == "matmul-only" else None,
            per_channel=True,
            reduce_range=reduce_range,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            calibrate_method=CalibrationMethod.MinMax,
        )
    return {
        "format": "QOperator" if variant == "qoperator" else "QDQ",
        "variant": variant,
        "activations": "uint8 asymmetric",
        "weights": "int8 symmetric per-channel",
        "reduce_range": reduce_range,
        "calibration": "MinMax",
        "quantized_ops": list(QUANTIZED_OPS),
        "calibration_images": int(len(calib)),
    }


def export_int8(
    name: str,
    manifest: RunRecord,
    spec: PreprocessSpec,
    fp32_path: Path,
    dst: Path,
    inputs: np.ndarray,
    fp32_logits: np.ndarray,
    calib_images: int,
    eval_images: int,
    min_top1: float | None,
    max_accuracy_drop: float | None,
) -> tuple[dict, dict]:
    """model.int8.onnx, calibrated on the training split, gated on the validation split (agreement with
    fp32 and the accuracy drop) and on the verification batch (agreement). Thresholds given
    (not None) are used as they are; defaults are relaxed on small sets and ``relaxed`` says how.
    Returns (the gate's numbers, the
    quantiser's settings); raises GateFailed or DataError."""
    classes = list(manifest.classes)
    calib = load_images([p for p, _ in verify.split_images(manifest, "train", calib_images)], spec, "training")
    settings = quantize_int8(fp32_path, dst, calib, INPUT_NAME)
    logits, provider = run_onnx(dst, inputs)
    val = verify.split_images(manifest, "val", eval_images)
    x_val = load_images([p for p, _ in val], spec, "validation")
    y_val = np.array([classes.index(label) for _, label in val])
    val_fp32, _ = run_onnx(fp32_path, x_val)
    val_int8, _ = run_onnx(dst, x_val)
    acc32, acc8 = float((val_fp32.argmax(1) == y_val).mean()), float((val_int8.argmax(1) == y_val).mean())
    what = f"{name} INT8 ONNX vs fp32"
    # the verification batch is gated too, on the same agreement (a default relaxed by one input of it)
    batch_min, _, batch_notes = verify.int8_thresholds(
        min_top1, max_accuracy_drop, len(inputs), "verification-batch inputs"
    )
    batch = verify.check(
        "int8",
        f"{what} (verification batch)",
        verify.compare_logits(fp32_logits, logits),
        min_top1=batch_min,
        hint="calibrate on more images: --calib-images",
    )
    val_min, allowed, notes = verify.int8_thresholds(min_top1, max_accuracy_drop, len(val), "validation images")
    result = verify.check(
        "int8",
        f"{what} on {len(val)} validation images",
        verify.compare_logits(val_fp32, val_int8),
        min_top1=val_min,
        hint="calibrate on more images: --calib-images",
    )
    drop = acc32 - acc8
    for note in notes + batch_notes[:1]:
        log.warning("%s: %s", name, note)
    result.update(
        accuracy_fp32=acc32,
        accuracy_int8=acc8,
        accuracy_drop=drop,
        max_accuracy_drop=allowed,
        provider=provider,
        verification_batch=batch,
        thresholds="given" if min_top1 is not None and max_accuracy_drop is not None else "default",
        relaxed=notes + batch_notes[:1],
    )
    if drop > allowed + 1e-12:
        raise GateFailed(
            "int8",
            f"{what} on {len(val)} validation images",
            "accuracy drop",
            drop,
            allowed,
            "at most",
            f"fp32 {acc32:.2%} -> int8 {acc8:.2%}; calibrate on more images: --calib-images",
        )
    return result, settings
