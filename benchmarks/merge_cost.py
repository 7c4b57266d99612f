"""What does merging buy at inference? Throughput of the plain backbone, the merged model and
the un-merged LoRA model, in torch eager and in onnxruntime, measured side by side in one run
(interleaved repeats, median), reported as ratios against the plain backbone.

    python benchmarks/merge_cost.py --model convnextv2_atto --img-size 224 --batch 8

No trained run needed: random init with non-zero LoRA B (the cost does not depend on values).

Goal (``--check`` exits 1 when NOT met): a merged bundle costs what the plain backbone costs (the README's
export section), i.e. merged LoRA >= 0.9x the plain backbone's images/s in each runtime (0.9: the spread of
interleaved repeats on a shared 2-core machine; the parameter counts are equal by construction).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import tempfile
import time
from pathlib import Path

import torch
from _goals import Goals

from gi_deploy.export.onnx_export import INPUT_NAME, export_onnx, ort_session
from gi_deploy.model.adapters import merge_into_plain
from gi_deploy.model.base import create_base_model
from gi_deploy.model.lora import apply_lora
from gi_deploy.model.settings import LoraSettings


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="convnextv2_atto")
    ap.add_argument("--img-size", type=int, default=224)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--classes", type=int, default=11)
    ap.add_argument("--check", action="store_true", help="exit 1 when a goal is NOT met")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    plain, _ = create_base_model(args.model, args.classes, pretrained=False)
    plain.eval()
    adapted = apply_lora(copy.deepcopy(plain), LoraSettings()).eval()
    with torch.no_grad():
        for n, p in adapted.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.02)
    merged = merge_into_plain(plain, adapted)
    x = torch.randn(args.batch, 3, args.img_size, args.img_size)
    runners = {}
    tmp = Path(tempfile.mkdtemp())
    xn = x.numpy()
    for name, model in (("plain backbone", plain), ("merged LoRA", merged), ("un-merged LoRA", adapted)):
        runners[f"torch eager: {name}"] = (lambda m: lambda: m(x))(model)
        export_onnx(model, tmp / f"{name}.onnx", (args.img_size, args.img_size))
        session = ort_session(tmp / f"{name}.onnx")
        runners[f"onnxruntime: {name}"] = (lambda s: lambda: s.run(None, {INPUT_NAME: xn}))(session)
    times: dict[str, list[float]] = {k: [] for k in runners}
    with torch.inference_mode():
        for fn in runners.values():  # warm-up
            fn()
        for _ in range(args.repeats):  # interleaved, so machine noise hits every variant alike
            for k, fn in runners.items():
                t = time.perf_counter()
                fn()
                times[k].append(time.perf_counter() - t)
    print(
        f"{args.model} {args.img_size}px batch {args.batch}, {torch.get_num_threads()} threads, "
        f"median of {args.repeats}; params: plain {sum(p.numel() for p in plain.parameters()):,}, "
        f"merged {sum(p.numel() for p in merged.parameters()):,}, un-merged {sum(p.numel() for p in adapted.parameters()):,}"
    )
    print(f"{'variant':36s} {'images/s':>9s} {'vs plain (same runtime)':>24s}")
    for k, ts in times.items():
        runtime = k.split(":")[0]
        base = statistics.median(times[f"{runtime}: plain backbone"])
        med = statistics.median(ts)
        print(f"{k:36s} {args.batch / med:9.1f} {base / med:23.2f}x")
    goals = Goals()
    for runtime in ("torch eager", "onnxruntime"):
        goals.at_least(
            f"{runtime}: merged LoRA / plain backbone images/s",
            statistics.median(times[f"{runtime}: plain backbone"])
            / statistics.median(times[f"{runtime}: merged LoRA"]),
            0.9,
            "x",
        )
    return goals.finish(args.check)


if __name__ == "__main__":
    raise SystemExit(main())
