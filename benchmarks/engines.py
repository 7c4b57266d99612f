"""The issue's engine goals (issue 25) as one table: each row a ratio measured side by side in one run,
printed with met / NOT met / not measured; ``--check`` exits 1 when a measured row is NOT met.

    python benchmarks/engines.py [--deploy DIR --source NAME] [--work /tmp/gi-engines] [--check]

Without ``--deploy`` it builds a ``convnextv2_tiny`` 224 px bundle first (random-init LoRA run of one
epoch on synthetic images, exported with the INT8 file; the INT8 gate's thresholds are opened because
a random-init model's logits are near-ties everywhere; speed does not depend on the weights' values).
The CPU rows run ``gi-deploy benchmark``'s own measurement (runtime/benchmark.py) on the bundle's
onnxruntime and OpenVINO rows; the GPU rows need a CUDA GPU and say "not measured" without one.
Record the CPU (printed first) with any number you quote.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

MODEL, SIZE = "convnextv2_tiny", 224
SPLITS = {"train": 8, "val": 4, "test": 2}  # per class (4 classes): enough to calibrate and gate, quick to train
CPU_ROWS = ("onnxruntime fp32", "onnxruntime int8", "OpenVINO fp32", "OpenVINO bf16", "OpenVINO int8")


def cpu_name() -> str:
    out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
    name = next((line.split(":", 1)[1].strip() for line in out.splitlines() if "model name" in line.lower()), "")
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    feats = [f for f in ("avx512_vnni", "avx512_bf16", "amx_int8", "amx_bf16", "avx_vnni") if f in flags.split()]
    from gi_deploy.runtime.backends.base import cpu_threads

    return f"{name or platform.processor()} ({cpu_threads()} cores; {', '.join(feats) or 'no VNNI/AMX'})"


def build_bundle(work: Path, model: str = MODEL, size: int = SIZE) -> Path:
    """deploy folder with a ``capsule`` bundle of a random-init ``model`` at ``size`` px (fp32 + int8)."""
    from gi_deploy.demo.synthetic import write_source
    from gi_deploy.export.options import ExportOptions
    from gi_deploy.export.writer import export_source
    from gi_deploy.training.config import TrainConfig
    from gi_deploy.training.trainer import train

    deploy = work / f"deploy-{model}-{size}"
    if (deploy / "capsule" / "manifest.json").is_file():
        return deploy
    data = write_source(work / "data", "capsule", seed=0, size=size, split_sizes=SPLITS)
    run = train(
        TrainConfig(
            source="capsule",
            data_dir=data,
            model=model,
            pretrained=False,
            img_size=size,
            epochs=1,
            batch_size=8,
            out_dir=work / f"runs-{model}-{size}",
            device="cpu",
            overwrite=True,
        )
    ).run_dir
    export_source(
        run,
        deploy / "capsule",
        ExportOptions(
            fp16=False,
            int8=True,
            calib_images=32,
            int8_eval_images=16,
            int8_min_top1=0.0,
            int8_max_accuracy_drop=1.0,
            ood_images=32,
        ),
    )
    return deploy


def cpu_rows(deploy: Path, source: str | None, n_images: int, batch: int) -> dict:
    from gi_deploy.runtime.benchmark import BenchmarkConfig, run_benchmark

    r = run_benchmark(
        BenchmarkConfig(
            deploy_dir=deploy,
            source=source,
            n_images=n_images,
            batch_size=batch,
            latency_runs=5,
            rows=list(CPU_ROWS),
            device="cpu",
        ),
        say=lambda m: print(f"  {m}", flush=True),
    )
    return {row.name: row for row in r.rows}


def goal_table(rows: dict, gpu: str | None) -> list[tuple[str, float | None, float, str]]:
    """(goal, measured ratio or None, target, how) for each of the issue's rows."""
    ok = {n: r for n, r in rows.items() if r.status == "ok"}
    ort = ok.get("onnxruntime fp32")
    ov = max(
        (ok[n] for n in ("OpenVINO fp32", "OpenVINO bf16", "OpenVINO int8") if n in ok),
        key=lambda r: r.end_to_end,
        default=None,
    )
    int8 = max(
        (ok[n] for n in ("onnxruntime int8", "OpenVINO int8") if n in ok), key=lambda r: r.model_only, default=None
    )
    no_gpu = gpu or "no CUDA GPU on this machine"
    return [
        ("H200: compiled fp16 infer end to end vs compiled model-only", None, 0.8, no_gpu),
        ("H200: GPU decoder alone, 720x576 JPEG -> 224 tensors (img/s)", None, 5000.0, no_gpu),
        ("H200: compiled LoRA training step vs eager", None, 1.3, no_gpu),
        (
            "CPU: OpenVINO end to end vs onnxruntime fp32 end to end (issue: Intel AMX)",
            ov.end_to_end / ort.end_to_end if ov and ort else None,
            1.7,
            f"best OpenVINO row: {ov.name}" if ov else "OpenVINO rows did not run",
        ),
        (
            "CPU: best INT8 vs fp32, model-only (issue: VNNI/AMX)",
            int8.model_only / ort.model_only if int8 and ort else None,
            2.0,
            f"best INT8 row: {int8.name}" if int8 else "no INT8 row ran",
        ),
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--deploy", type=Path, help="an existing deploy folder (none: build the convnextv2_tiny bundle)")
    ap.add_argument("--source", default=None)
    ap.add_argument("--work", type=Path, default=Path("/tmp/gi-engines"))
    ap.add_argument("--n-images", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--check", action="store_true", help="exit 1 when a measured goal is NOT met")
    ap.add_argument("--build-only", action="store_true")
    args = ap.parse_args()
    print(f"CPU: {cpu_name()}", flush=True)
    deploy = args.deploy or build_bundle(args.work)
    if args.build_only:
        print(f"bundle: {deploy}")
        return
    rows = cpu_rows(deploy, args.source, args.n_images, args.batch_size)
    print(f"{'row':<18} {'e2e img/s':>10} {'model img/s':>12}  detail")
    for name, r in rows.items():
        if r.status == "ok":
            print(f"{name:<18} {r.end_to_end:>10.1f} {r.model_only:>12.1f}  {r.detail}")
        else:
            print(f"{name:<18} {r.status}")
    try:
        import torch

        gpu = None if not torch.cuda.is_available() else "GPU rows: run benchmarks/gpu_check.sh on the device"
    except ImportError:
        gpu = None
    table = goal_table(rows, gpu)
    failed = False
    print("\n| goal | measured | target | verdict | how |\n|---|---|---|---|---|")
    for what, value, target, how in table:
        verdict = "not measured" if value is None else ("met" if value >= target else "NOT met")
        failed |= verdict == "NOT met"
        shown = "n/a" if value is None else f"{value:.2f}x"
        print(f"| {what} | {shown} | >= {target:g}{'' if target >= 100 else 'x'} | {verdict} | {how} |")
    if args.json:
        args.json.write_text(
            json.dumps(
                {"cpu": cpu_name(), "goals": [dict(zip(("goal", "value", "target", "how"), g)) for g in table]},
                indent=1,
            )
        )
    if args.check and failed:
        sys.exit(1)


if __name__ == "__main__":
    main()
