"""Where onnxruntime INT8 spends its time: per-op-type kernel time (onnxruntime's own profiler,
``SessionOptions.enable_profiling``) of the bundle's fp32 model and of INT8 files quantised several
ways, side by side in one run, with each one's model-only speed-up over fp32 and the goal
(best INT8 >= 2x fp32 model-only, issue 25) printed met / NOT met; ``--check`` exits 1 when it is not.

    python benchmarks/int8_ops.py [--deploy DIR --source NAME] [--batch 8 --runs 3] [--check]

Without ``--deploy`` it builds the convnextv2_tiny 224 bundle of benchmarks/engines.py. Variants
(each quantised from the bundle's model.onnx, calibrated on the run's training images, as export does):

* ``bundle``: the bundle's model.int8.onnx (export/int8.py's settings);
* ``qdq-all``: QDQ on every op the quantiser supports (Add, Mul, ... too), not only Conv/MatMul/Gemm;
* ``qoperator``: the QOperator format (QLinearConv / QLinearMatMul nodes) instead of QDQ;
* ``matmul-only``: the pointwise MatMuls (and the head) quantised, the 7x7 depthwise Conv left fp32.

Machines are noisy (2 shared cores here): read ratios from one run, not absolutes across runs.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

GOAL = 2.0


def session(path: Path, profile_dir: Path | None = None, threads: int | None = None):
    import onnxruntime as ort

    from gi_deploy.runtime.backends.base import cpu_threads

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.intra_op_num_threads, so.inter_op_num_threads = threads or cpu_threads(), 1
    if profile_dir is not None:
        so.enable_profiling = True
        so.profile_file_prefix = str(profile_dir / path.stem)
    return ort.InferenceSession(str(path), sess_options=so, providers=["CPUExecutionProvider"])


def images_per_s(path: Path, x: np.ndarray, runs: int) -> float:
    s = session(path)
    name = s.get_inputs()[0].name
    s.run(None, {name: x})
    best = float("inf")
    for _ in range(runs):
        t = time.perf_counter()
        s.run(None, {name: x})
        best = min(best, time.perf_counter() - t)
    return len(x) / best


def op_profile(path: Path, x: np.ndarray, tmp: Path) -> dict[str, float]:
    """ms per batch spent in each op type's kernels (after onnxruntime's graph fusions: what really ran)."""
    s = session(path, tmp)
    name = s.get_inputs()[0].name
    s.run(None, {name: x})  # warm-up (counted below and subtracted)
    s.run(None, {name: x})
    trace = json.loads(Path(s.end_profiling()).read_text())
    per_run: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0])
    runs = [e for e in trace if e.get("name") == "model_run"]
    second = runs[-1]["ts"] if runs else 0
    for e in trace:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            per_run[e["args"]["op_name"]][int(e["ts"] >= second)] += e["dur"] / 1000
    return {op: v[1] for op, v in per_run.items()}


def quantize_variant(fp32: Path, dst: Path, calib: np.ndarray, variant: str) -> None:
    from gi_deploy.export.int8 import quantize_int8

    quantize_int8(fp32, dst, calib, "input", variant=variant)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--deploy", type=Path)
    ap.add_argument("--source", default=None)
    ap.add_argument("--work", type=Path, default=Path("/tmp/gi-engines"))
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--variants", default="bundle,qdq-all,qoperator,matmul-only")
    ap.add_argument("--top", type=int, default=12, help="op types shown per model")
    ap.add_argument("--check", action="store_true")
    args = ap.parse_args()
    from engines import build_bundle, cpu_name

    from gi_deploy.core.bundles import read_bundle_manifest, resolve_bundle_dir
    from gi_deploy.core.runs import read_run_manifest
    from gi_deploy.export import verify
    from gi_deploy.export.int8 import load_images

    print(f"CPU: {cpu_name()}", flush=True)
    bundle = resolve_bundle_dir(args.deploy or build_bundle(args.work), args.source)
    manifest = read_bundle_manifest(bundle)
    spec = manifest.preprocess
    run = read_run_manifest(Path(manifest.training.run_dir))
    calib = load_images([p for p, _ in verify.split_images(run, "train", 32)], spec, "training")
    x = np.random.default_rng(0).standard_normal((args.batch, 3, *spec.size)).astype(np.float32)
    fp32 = bundle / "model.onnx"
    with tempfile.TemporaryDirectory(prefix="int8-ops-") as t:
        tmp = Path(t)
        models = {"fp32": fp32}
        for v in args.variants.split(","):
            if v == "bundle":
                if (bundle / "model.int8.onnx").is_file():
                    models["int8 bundle"] = bundle / "model.int8.onnx"
                continue
            models[f"int8 {v}"] = tmp / f"{v}.onnx"
            print(f"quantising {v}...", flush=True)
            quantize_variant(fp32, models[f"int8 {v}"], calib, v)
        speed = {k: images_per_s(p, x, args.runs) for k, p in models.items()}
        profiles = {k: op_profile(p, x, tmp) for k, p in models.items()}
    print(f"\nmodel-only, batch {args.batch}, best of {args.runs} (onnxruntime CPU):")
    for k in models:
        print(f"  {k:<18} {speed[k]:7.1f} img/s  {speed[k] / speed['fp32']:.2f}x fp32")
    for k, prof in profiles.items():
        total = sum(prof.values())
        print(f"\n{k}: {total:.0f} ms of kernels per batch of {args.batch}")
        for op, ms in sorted(prof.items(), key=lambda kv: -kv[1])[: args.top]:
            print(f"  {op:<28} {ms:8.1f} ms  {ms / total:6.1%}")
    best = max((k for k in speed if k != "fp32"), key=speed.get, default=None)
    ratio = speed[best] / speed["fp32"] if best else None
    verdict = "not measured" if ratio is None else ("met" if ratio >= GOAL else "NOT met")
    print(
        f"\ngoal best INT8 vs fp32 model-only >= {GOAL}x: "
        + ("n/a" if ratio is None else f"{ratio:.2f}x ({best})")
        + f" ({verdict})"
    )
    if args.check and verdict == "NOT met":
        sys.exit(1)


if __name__ == "__main__":
    main()
