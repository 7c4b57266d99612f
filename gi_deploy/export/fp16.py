"""fp16 ONNX with fp32 islands, and a true-fp16 evaluator to verify it on a CPU.

ConvNeXtV2 in fp16 is a known trap (PITFALLS "FP16"): GRN's L2 norm sums H*W squares, which
exceeds fp16's 65,504 once mean |x| passes ~4.6 at 224 px, and inf / inf = NaN; LayerNorm's
variance overflows the same way. So the conversion keeps every LayerNormalization and GRN's
reduction (ReduceL2 -> ReduceMean -> + eps -> Div) in fp32, the rest in fp16.

Verifying that on a CPU needs care: onnxruntime's CPU provider has fp16 kernels for few ops and
inserts Casts to run the rest in fp32, so an fp16 graph that overflows on a GPU runs clean on a
CPU. :func:`run_fp16_emulated` therefore runs the graph in ONNX's reference evaluator, whose ops
compute in the declared types (numpy float16), with Conv / MatMul / Gemm / Erf accumulating in
fp32 and rounding their outputs to fp16, as GPU tensor cores and TensorRT do.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from gi_deploy.errors import ExportError, VerificationError
from gi_deploy.export import verify
from gi_deploy.export.onnx_export import INPUT_NAME, run_onnx

# Op types kept in fp32 wherever they occur (besides onnxruntime's list of ops with no fp16 kernel).
FP32_OPS = ("LayerNormalization",)
# The fp16 gate also runs in true fp16 arithmetic (run_fp16_emulated) on the inputs that drive the
# largest activations: seconds per image for convnextv2_base, so a few.
FP16_EMULATED_IMAGES = 3


def grn_island_nodes(graph) -> list[str]:
    """Names of the nodes of every GRN reduction: each ReduceL2 node, the Div that divides by its
    output, and every node on a path between them (ReduceMean, + eps)."""
    consumers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    producers = {out: node for node in graph.node for out in node.output}
    island: list[str] = []
    for node in graph.node:
        if node.op_type != "ReduceL2":
            continue
        norm = node.output[0]
        divs = [c for c in consumers.get(norm, []) if c.op_type == "Div"]
        downstream, frontier = {node.name}, [node]
        while frontier:  # every node reachable from the ReduceL2...
            for c in (c for out in frontier.pop().output for c in consumers.get(out, [])):
                if c.name not in downstream:
                    downstream.add(c.name)
                    frontier.append(c)
        upstream, frontier = set(), list(divs)
        while frontier:  # ...that also reaches one of its Divs
            n = frontier.pop()
            if n.name in upstream or n.name not in downstream:
                continue
            upstream.add(n.name)
            frontier += [producers[i] for i in n.input if i in producers]
        island += sorted(upstream | ({node.name} if divs else set()))
    return island


def _name_nodes(graph) -> None:
    """node_block_list works by node name: give every unnamed node a unique one."""
    seen = {n.name for n in graph.node if n.name}
    for i, node in enumerate(graph.node):
        if not node.name:
            name = f"{node.op_type}_{i}"
            while name in seen:
                name += "_"
            node.name = name
            seen.add(name)


def convert_fp16(src: Path, dst: Path, islands: bool = True) -> dict:
    """fp16 copy of the fp32 ONNX ``src`` with fp32 input/output; with ``islands`` (the default),
    LayerNorm and the GRN reductions stay fp32. ``islands=False`` is the naive conversion (only
    the ops onnxruntime cannot run in fp16 stay fp32), kept to show why islands matter.

    Uses the converter that ships inside onnxruntime (no extra dependency). Returns what it kept
    in fp32, for the manifest."""
    import onnx
    from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16

    model = onnx.load(str(src))
    _name_nodes(model.graph)
    ops = list(FP32_OPS) if islands else []
    nodes = grn_island_nodes(model.graph) if islands else []
    fp32_nodes = sum(n.op_type in ops for n in model.graph.node) + len(nodes)
    model = convert_float_to_float16(
        model, keep_io_types=True, op_block_list=list(DEFAULT_OP_BLOCK_LIST) + ops, node_block_list=nodes
    )
    removed = _dedupe_casts(model.graph)
    _topological_sort(model.graph)  # the converter appends its input casts at the end
    onnx.save(model, str(dst))
    onnx.checker.check_model(str(dst))
    return {
        "islands": islands,
        "fp32_ops": ops,
        "grn_fp32_nodes": len(nodes),
        "fp32_nodes": fp32_nodes,
        "casts": sum(n.op_type == "Cast" for n in model.graph.node),
        "duplicate_casts_removed": removed,
    }


def _dedupe_casts(graph) -> int:
    """The converter adds one Cast per consumer edge; identical Casts of one tensor (same input,
    same target type) are merged into the first. Returns how many were removed."""
    first: dict[tuple[str, int], str] = {}
    rename: dict[str, str] = {}
    keep = []
    graph_outputs = {o.name for o in graph.output}
    for node in graph.node:
        if node.op_type == "Cast" and node.output[0] not in graph_outputs:
            key = (node.input[0], next(a.i for a in node.attribute if a.name == "to"))
            if key in first:
                rename[node.output[0]] = first[key]
                continue
            first[key] = node.output[0]
        keep.append(node)
    for node in keep:
        for i, name in enumerate(node.input):
            if name in rename:
                node.input[i] = rename[name]
    removed = len(graph.node) - len(keep)
    if removed:
        _replace_nodes(graph, keep)
    return removed


def _replace_nodes(graph, nodes: list) -> None:
    """Make ``nodes`` (protos, possibly of ``graph`` itself) the graph's node list, in order."""
    copies = [type(n)() for n in nodes]
    for dst, src in zip(copies, nodes):
        dst.CopyFrom(src)
    del graph.node[:]
    graph.node.extend(copies)


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
    _replace_nodes(graph, ordered)


def _emulation_ops():
    """Reference-evaluator overrides: fp32 accumulation, output rounded to the input's dtype."""
    import torch
    from onnx.reference.op_run import OpRun

    def _f32(a):
        a = np.ascontiguousarray(a, dtype=np.float32)
        return torch.from_numpy(a if a.flags.writeable else a.copy())  # initializers are read-only

    class Conv(OpRun):
        op_domain = ""

        def _run(
            self, X, W, B=None, auto_pad=None, dilations=None, group=None, kernel_shape=None, pads=None, strides=None
        ):
            n = X.ndim - 2
            if auto_pad not in (None, "NOTSET", b"NOTSET", "VALID", b"VALID") or n not in (1, 2, 3):
                raise ExportError(
                    f"fp16 check: Conv with auto_pad={auto_pad!r} on {n}-d input is not supported; "
                    "export with --no-fp16"
                )
            pads = list(pads or [0] * (2 * n))
            x = _f32(X)
            if pads[:n] != pads[n:]:  # asymmetric: pad explicitly (torch's F.pad takes the last axis first)
                x = torch.nn.functional.pad(x, [p for i in reversed(range(n)) for p in (pads[i], pads[n + i])])
                pads = [0] * (2 * n)
            conv = (torch.nn.functional.conv1d, torch.nn.functional.conv2d, torch.nn.functional.conv3d)[n - 1]
            y = conv(
                x,
                _f32(W),
                None if B is None else _f32(B),
                stride=tuple(strides or [1] * n),
                padding=tuple(pads[:n]),
                dilation=tuple(dilations or [1] * n),
                groups=group or 1,
            )
            return (y.numpy().astype(X.dtype),)

    class MatMul(OpRun):
        op_domain = ""

        def _run(self, a, b):
            return ((_f32(a) @ _f32(b)).numpy().astype(a.dtype),)

    class Gemm(OpRun):
        op_domain = ""

        def _run(self, a, b, c=None, alpha=None, beta=None, transA=None, transB=None):
            a32, b32 = _f32(a), _f32(b)
            y = (1.0 if alpha is None else alpha) * ((a32.T if transA else a32) @ (b32.T if transB else b32))
            if c is not None:
                y = y + (1.0 if beta is None else beta) * _f32(c)
            return (y.numpy().astype(a.dtype),)

    class Erf(OpRun):
        op_domain = ""

        def _run(self, x):
            return (torch.erf(_f32(x)).numpy().astype(x.dtype),)

    return [Conv, MatMul, Gemm, Erf]


def run_fp16_emulated(path: Path, inputs: np.ndarray, input_name: str) -> np.ndarray:
    """Logits of the ONNX model at ``path`` computed in its declared precisions (see the module
    docstring): fp16 nodes overflow here exactly where they would on a GPU. Slow (seconds per
    224 px image for convnextv2_base): meant for the few inputs with the largest activations."""
    import warnings

    from onnx.reference import ReferenceEvaluator

    evaluator = ReferenceEvaluator(str(path), new_ops=_emulation_ops())
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        out = [evaluator.run(None, {input_name: inputs[i : i + 1]})[0] for i in range(len(inputs))]
    return np.concatenate(out).astype(np.float32)


def _gate_providers_fp16() -> list[str]:
    """onnxruntime's CUDA provider runs fp16 kernels in fp16; its CPU provider casts most fp16 ops
    back to fp32 (so the CPU run alone cannot show an fp16 overflow; fp16_emulated does)."""
    import onnxruntime as ort

    return (
        ["CUDAExecutionProvider", "CPUExecutionProvider"]
        if "CUDAExecutionProvider" in ort.get_available_providers()
        else ["CPUExecutionProvider"]
    )


def export_fp16(
    name: str, fp32_path: Path, dst: Path, inputs: np.ndarray, fp32_logits: np.ndarray, peaks: np.ndarray
) -> tuple[dict, dict]:
    """model.fp16.onnx and its two gates: onnxruntime on the whole batch, true-fp16 arithmetic on
    the inputs with the largest activations. Returns (the gates' numbers, the conversion's settings);
    raises GateFailed."""
    conversion = convert_fp16(fp32_path, dst)
    logits, provider = run_onnx(dst, inputs, _gate_providers_fp16())
    ort_result = verify.check(
        "onnx_fp16",
        f"{name} fp16 ONNX vs fp32",
        {**verify.compare_logits(fp32_logits, logits, verify.FP16_TIE_MARGIN), "provider": provider},
        min_top1=verify.FP16_MIN_TOP1,
    )
    idx = np.argsort(-peaks, kind="stable")[:FP16_EMULATED_IMAGES]
    emulated = run_fp16_emulated(dst, inputs[idx], INPUT_NAME)
    emu_result = verify.check(
        "fp16_emulated",
        f"{name} fp16 ONNX in true fp16 arithmetic vs fp32",
        {
            **verify.compare_logits(fp32_logits[idx], emulated, verify.FP16_TIE_MARGIN),
            "inputs": idx.tolist(),
            "peak_activations": [round(float(p), 3) for p in peaks[idx]],
        },
        min_top1=verify.FP16_MIN_TOP1,
        hint="fp16 arithmetic overflows here as it would on a GPU; onnxruntime's CPU provider hides it by computing "
        "in fp32",
    )
    return {"onnx_fp16": ort_result, "fp16_emulated": emu_result}, conversion
