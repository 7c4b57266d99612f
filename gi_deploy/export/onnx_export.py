"""ONNX export and the numerical checks every conversion must pass before a file is kept."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from gi_deploy.errors import ExportError, VerificationError

# opset 17 keeps LayerNorm as one LayerNormalization node rather than a decomposed chain.
OPSET = 17
INPUT_NAME, OUTPUT_NAME = "input", "logits"
# fp32 ONNX vs the un-merged torch model: the same maths in another summation order; observed
# differences are ~1e-6 on logits, so 1e-4 catches any real error (the bound).
FP32_ATOL = 1e-4
# The merged torch model vs the un-merged peft model: W + BA folded in fp32, same bound.
MERGE_ATOL = 1e-4
# fp16 keeps ~3 significant digits, so logits move by ~1e-2; the gate is the decision itself:
# every output finite and top-1 equal to fp32 on (nearly) every verification input.
FP16_MIN_TOP1_AGREEMENT = 0.98
# Ops kept in fp32 inside the fp16 graph: LayerNorm and GRN's L2 norm and division overflow in
# fp16 (mean |x| above ~4.6 over H*W terms exceeds 65,504; ConvNeXt-V2#66, TensorRT#2564).
FP16_FP32_OPS = ("LayerNormalization", "ReduceL2", "Div")


def export_onnx(model: nn.Module, path: Path, input_size: tuple[int, int], opset: int = OPSET) -> None:
    """Export ``model`` (eval mode, CPU, fp32) with a dynamic batch axis.

    Uses the TorchScript exporter explicitly: the dynamo exporter (torch's default since 2.9)
    has reported silent accuracy losses and fixed batch dims (pytorch#169178, #148886); the
    parity check that follows export guards either way."""
    import onnx

    model = model.eval().cpu()
    example = torch.zeros(2, 3, *input_size)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        try:
            torch.onnx.export(
                model, (example,), str(path), dynamo=False, opset_version=opset,
                input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
            )
        except torch.onnx.errors.OnnxExporterError as e:
            first = str(e).strip().splitlines()[0]
            raise ExportError(
                f"ONNX export of {type(model).__name__} at {input_size[0]}x{input_size[1]} px failed: {first}. "
                "Some timm heads only export at their native size (VGG's pre_logits pools a feature map "
                "smaller than 7x7 up with adaptive pooling, which ONNX cannot express below 224 px): "
                "train at the model's default --img-size") from None
    onnx.checker.check_model(str(path))


def convert_fp16(src: Path, dst: Path) -> dict:
    """fp16 copy of an fp32 ONNX with fp32 input/output and fp32 islands (``FP16_FP32_OPS``).

    Uses the converter that ships inside onnxruntime (no extra dependency)."""
    import onnx
    from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16

    model = convert_float_to_float16(onnx.load(str(src)), keep_io_types=True,
                                     op_block_list=list(DEFAULT_OP_BLOCK_LIST) + list(FP16_FP32_OPS))
    _topological_sort(model.graph)  # the converter appends its input casts at the end
    onnx.save(model, str(dst))
    onnx.checker.check_model(str(dst))
    return {"fp32_ops": list(FP16_FP32_OPS), "casts": sum(n.op_type == "Cast" for n in model.graph.node)}


def _topological_sort(graph) -> None:
    """Reorder ``graph.node`` so every node comes after the producers of its inputs (in place)."""
    available = {i.name for i in graph.input} | {t.name for t in graph.initializer} | {""}
    pending, ordered = list(graph.node), []
    while pending:
        ready = [n for n in pending if all(i in available for i in n.input)]
        if not ready:
            raise VerificationError(f"ONNX graph has a cycle or a dangling input at {pending[0].name!r}")
        for n in ready:
            available.update(n.output)
        ordered += ready
        ready_ids = {id(n) for n in ready}
        pending = [n for n in pending if id(n) not in ready_ids]
    nodes = [type(ordered[0])() for _ in ordered]
    for dst, src in zip(nodes, ordered):
        dst.CopyFrom(src)
    del graph.node[:]
    graph.node.extend(nodes)


def ort_session(path: Path):
    import onnxruntime as ort
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def compare_logits(reference: np.ndarray, candidate: np.ndarray) -> dict:
    """max |Δlogit|, top-1 agreement and finiteness of ``candidate`` against ``reference``."""
    return {
        "max_abs_logit_diff": float(np.abs(reference - candidate).max()),
        "top1_agreement": float((reference.argmax(1) == candidate.argmax(1)).mean()),
        "finite": bool(np.isfinite(candidate).all()),
        "n": int(len(reference)),
    }


def verify_onnx(path: Path, reference: np.ndarray, inputs: np.ndarray, what: str,
                atol: float | None = None, min_top1: float | None = None) -> dict:
    """Run ``path`` in onnxruntime on ``inputs`` in two batch sizes (the dynamic axis must work)
    and compare with ``reference`` logits. Raises VerificationError outside the tolerance."""
    session = ort_session(path)
    # batch 1, then the rest: two sizes that both differ from the export's example batch of 2
    outputs = np.concatenate([session.run(None, {INPUT_NAME: inputs[:1]})[0],
                              session.run(None, {INPUT_NAME: inputs[1:]})[0]]).astype(np.float32)
    result = compare_logits(reference, outputs)
    result["batch_sizes"] = [1, len(inputs) - 1]
    if not result["finite"]:
        raise VerificationError(f"{what}: onnxruntime produced non-finite logits; file not written")
    if atol is not None:
        result["tolerance"] = atol
        if result["max_abs_logit_diff"] > atol:
            raise VerificationError(f"{what}: max |Δlogit| {result['max_abs_logit_diff']:.3g} vs torch exceeds "
                                    f"{atol:g}; file not written")
    if min_top1 is not None:
        result["min_top1_agreement"] = min_top1
        if result["top1_agreement"] < min_top1:
            raise VerificationError(f"{what}: top-1 agrees with fp32 on {result['top1_agreement']:.1%} of the "
                                    f"verification batch (< {min_top1:.0%}); file not written")
    return result
