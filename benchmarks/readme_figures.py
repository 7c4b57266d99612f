"""Every speed figure of the README from one command: builds the bundle the figure needs, then prints it.

    PYTHONPATH=. python benchmarks/readme_figures.py cpu-table   [--check]   # the CPU benchmark table
    PYTHONPATH=. python benchmarks/readme_figures.py router-cost [--check]   # "router cost ... 0.37%"
    PYTHONPATH=. python benchmarks/readme_figures.py decode                  # "10.6 ms decode" per 720x576 JPEG

- ``cpu-table``: a ``convnextv2_tiny`` LoRA bundle at 224 px (random init, 1 epoch on the demo's synthetic
  capsule images, 4 classes, merged, exported with ``--int8``), then ``gi-deploy benchmark --n-images 128
  --batch-size 32 --workers 2``: the table, and its goals met / NOT met.
- ``router-cost``: ``convnextv2_base`` LoRA bundles at 224 px for the demo's two sources (random init, 1 epoch,
  fp32 ONNX only) and the router over them, then ``gi-deploy benchmark --source capsule --n-images 32
  --batch-size 8 --workers 2 --row "onnxruntime fp32"``: the router row and its cost against one model
  (goal <= 15%). Random init is fine: these are speed figures.
- ``decode``: decode + resize + normalise of synthetic 720x576 JPEG frames (``gi-deploy benchmark``'s) in this
  process, one core, to the bundle's 224 px input, with whole-image decoding and with draft (DCT-domain)
  scaling, ms per image. No bundle needed.

Bundles are built under ``--out`` (default /tmp/readme_figures) and reused when there. ``--model`` and
``--img-size`` shrink a figure for a dry run (``--model convnextv2_atto --img-size 64``). On a shared machine
only the ratios within one run mean anything; record the CPU (``lscpu | grep 'Model name'``) with a figure.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from _goals import Goals

ROOT = Path(__file__).resolve().parents[1]
SPLITS = {"train": 8, "val": 4, "test": 2}  # images per class: one short epoch, enough for the router's gate


def build(out: Path, model: str, px: int, sources: list[str], int8: bool, router: bool) -> Path:
    """Train one random-init LoRA epoch per source on the demo's synthetic images and export the bundles (and the
    router over them when ``router``); returns the deploy folder. A finished deploy folder is reused."""
    from gi_deploy.demo.synthetic import write_source
    from gi_deploy.export.options import ExportOptions
    from gi_deploy.export.writer import ExportConfig, export_router, export_runs
    from gi_deploy.training.config import TrainConfig
    from gi_deploy.training.trainer import train

    deploy = out / "deploy"
    if all((deploy / s / "manifest.json").is_file() for s in sources) and (not router or (deploy / "_router").is_dir()):
        print(f"reusing {deploy}", flush=True)
        return deploy
    t0 = time.perf_counter()
    for s in sources:
        data = write_source(out / "data", s, seed=0, size=64, split_sizes=SPLITS)
        train(
            TrainConfig(
                source=s,
                data_dir=data,
                method="lora",
                model=model,
                pretrained=False,
                img_size=px,
                epochs=1,
                batch_size=8,
                lr=1e-3,
                device="cpu",
                out_dir=out / "runs",
                overwrite=True,
            )
        )
    cfg = ExportConfig(
        runs_dir=out / "runs",
        deploy_dir=deploy,
        sources=sources,
        force=True,
        router=router,
        options=ExportOptions(fp16=False, int8=int8),
    )
    bundles = export_runs(cfg)
    if router:
        export_router(cfg, bundles)
    print(
        f"built {model} at {px} px for {', '.join(sources)} in {time.perf_counter() - t0:.0f}s -> {deploy}", flush=True
    )
    return deploy


def benchmark(deploy: Path, source: str, args: list[str], json_out: Path):
    """``gi-deploy benchmark`` as a user runs it (its table printed as it prints it), read back from --json."""
    from gi_deploy.runtime.benchmark import BenchmarkResult, BenchRow

    cmd = [
        sys.executable,
        "-m",
        "gi_deploy",
        "benchmark",
        "--deploy",
        str(deploy),
        "--source",
        source,
        *args,
        "--json",
        str(json_out),
    ]
    print("$ gi-deploy " + " ".join(cmd[3:]), flush=True)
    subprocess.run(cmd, check=True, cwd=ROOT, env={"PYTHONPATH": str(ROOT), **_env()})
    d = json.loads(json_out.read_text())
    return BenchmarkResult(**{**d, "rows": [BenchRow(**r) for r in d["rows"]]})


def _env() -> dict:
    import os

    return {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}


def cpu_table(a: argparse.Namespace, goals: Goals) -> None:
    from gi_deploy.runtime.benchmark import goals as benchmark_goals

    deploy = build(
        a.out / f"cpu_table_{a.model}_{a.img_size}", a.model, a.img_size, ["capsule"], int8=True, router=False
    )
    r = benchmark(
        deploy, "capsule", ["--n-images", "128", "--batch-size", "32", "--workers", "2"], a.out / "cpu_table.json"
    )
    for what, value, target in benchmark_goals(r):
        if not what.startswith("GPU"):
            goals.at_least(what, value, target, "x")


def router_cost(a: argparse.Namespace, goals: Goals) -> None:
    from gi_deploy.runtime.benchmark import ROUTER_MAX_COST, ROUTER_ROW
    from gi_deploy.runtime.benchmark import router_cost as cost_of

    model = a.model or "convnextv2_base"
    deploy = build(
        a.out / f"router_{model}_{a.img_size}", model, a.img_size, ["capsule", "endoscope"], int8=False, router=True
    )
    r = benchmark(
        deploy,
        "capsule",
        ["--n-images", "32", "--batch-size", "8", "--workers", "2", "--row", "onnxruntime fp32"],
        a.out / "router_cost.json",
    )
    ort, router = r.row("onnxruntime fp32"), r.row(ROUTER_ROW)
    if ort.status == "ok" and router.status == "ok":
        print(
            f"onnxruntime fp32 {model} {a.img_size} px: {ort.model_only:.2f} img/s ({1000 / ort.model_only:.0f} ms); "
            f"router: {router.model_only:,.0f} img/s ({1000 / router.model_only:.3f} ms) + thumbnail "
            f"{router.thumb_ms:.2f} ms per image"
        )
    cost = cost_of(r)
    goals.at_most(
        "router cost per image / one onnxruntime fp32 model",
        None if cost is None else 100 * cost,
        100 * ROUTER_MAX_COST,
        "%",
    )


def decode(a: argparse.Namespace, goals: Goals) -> None:
    import dataclasses
    import os

    import numpy as np

    from gi_deploy.core.preprocess import PreprocessSpec, load_rgb, normalize_pixels, to_pixels
    from gi_deploy.runtime.benchmark import synthetic_frames

    os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})  # one core, as the figure says
    frames = synthetic_frames(a.out / "frames", n=64)
    spec = PreprocessSpec(size=(a.img_size, a.img_size), mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
    for mode in ("full", "draft"):
        s = dataclasses.replace(spec, decode=mode)
        for p in frames[:4]:  # warm the page cache and Pillow
            to_pixels(load_rgb(p, s), s)
        wall, cpu = [], []
        for _ in range(3):
            t, c = time.perf_counter(), time.process_time()
            px = np.stack([to_pixels(load_rgb(p, s), s) for p in frames])
            normalize_pixels(px, s)
            wall.append((time.perf_counter() - t) * 1000 / len(frames))
            cpu.append((time.process_time() - c) * 1000 / len(frames))
        ms, cpu_ms = sorted(wall)[1], sorted(cpu)[1]
        print(
            f"decode={mode}: decode + resize + normalise of a 720x576 JPEG to {a.img_size} px: {ms:.1f} ms per image "
            f"on one core ({1000 / ms:.0f} img/s; CPU time {cpu_ms:.1f} ms, what a busy machine does not inflate), "
            f"median of 3 passes over {len(frames)} frames"
        )


FIGURES = {"cpu-table": cpu_table, "router-cost": router_cost, "decode": decode}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("figure", choices=list(FIGURES))
    ap.add_argument("--out", type=Path, default=Path("/tmp/readme_figures"))
    ap.add_argument("--model", default=None, help="cpu-table: convnextv2_tiny; router-cost: convnextv2_base")
    ap.add_argument("--img-size", type=int, default=224)
    ap.add_argument("--check", action="store_true", help="exit 1 when a goal is NOT met")
    a = ap.parse_args(argv)
    if a.figure == "cpu-table":
        a.model = a.model or "convnextv2_tiny"
    a.out.mkdir(parents=True, exist_ok=True)
    print(f"cpu: {_cpu()}", flush=True)
    goals = Goals()
    FIGURES[a.figure](a, goals)
    return goals.finish(a.check)


def _cpu() -> str:
    try:
        return next(
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        )
    except (OSError, StopIteration):
        return "unknown"


if __name__ == "__main__":
    raise SystemExit(main())
