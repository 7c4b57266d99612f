"""Past one machine, measured on one: Ray Data batch inference against the local `infer`, and torchrun
training with 2 processes against 1, side by side in one run.

1. Makes synthetic data (the demo's drawn capsule images), trains a tiny LoRA run and exports it.
2. Inference: the same images through `infer_folder` (the local pipeline, decode workers + one
   onnxruntime session) and through `infer_on_ray` with 1 and 2 actors on a local Ray holding this
   machine's CPUs. Repeats are interleaved; the wall time of each job (Ray's includes building its
   actors and streaming, not `ray.init`) and images/s, as ratios to the local run.
3. Training: `gi-deploy train --nproc-per-node 1` and `2` (torch's elastic launcher, DDP over gloo),
   the same global batch; steady-state images/s (epochs after the first) and wall time incl. launch.

    PYTHONPATH=. python3 benchmarks/scale_out.py                      # ~5 min on 2 cores
    PYTHONPATH=. python3 benchmarks/scale_out.py --images 64 --repeats 1 --epochs 2 --skip-train

Absolute numbers from a shared 2-core machine mean little; the ratios within one run are the result.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="convnextv2_atto")
    ap.add_argument("--img-size", type=int, default=64)
    ap.add_argument("--images", type=int, default=400, help="images to classify (test split, 4 classes)")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--epochs", type=int, default=3, help="training epochs per torchrun job")
    ap.add_argument("--train-images", type=int, default=96, help="training images (4 classes)")
    ap.add_argument("--skip-train", action="store_true")
    ap.add_argument("--skip-infer", action="store_true")
    ap.add_argument("--work", type=Path, help="working folder (default: a temporary one)")
    args = ap.parse_args()

    from gi_deploy.demo.synthetic import write_source
    from gi_deploy.training.config import TrainConfig

    work = args.work or Path(tempfile.mkdtemp(prefix="scale_out-"))
    per_class = lambda n: max(1, n // 4)  # noqa: E731
    data = write_source(
        work / "data",
        "capsule",
        seed=0,
        size=args.img_size,
        split_sizes={"train": per_class(args.train_images), "val": 4, "test": per_class(args.images)},
    )
    base = dict(
        source="capsule",
        data_dir=data,
        model=args.model,
        pretrained=False,
        img_size=args.img_size,
        batch_size=16,
        lr=1e-3,
        device="cpu",
    )
    print(f"machine: {os.cpu_count()} CPUs; {args.model} {args.img_size}px; work folder {work}")

    if not args.skip_infer:
        _infer(args, work, data, TrainConfig(**base, epochs=1, out_dir=work / "runs"))
    if not args.skip_train:
        _train(args, work, base)


def _infer(args, work: Path, data: Path, cfg) -> None:
    import ray

    from gi_deploy.export.writer import export_source
    from gi_deploy.runtime.infer import InferConfig, infer_folder
    from gi_deploy.runtime.ray_infer import RayOptions, infer_on_ray
    from gi_deploy.training.trainer import train

    run = train(cfg).run_dir
    export_source(run, work / "deploy" / "capsule")
    t0 = time.perf_counter()
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False, configure_logging=False)
    ray_start = time.perf_counter() - t0
    n = len(list((data / "test").rglob("*.jpg")))

    def icfg(name: str) -> InferConfig:
        return InferConfig(
            inputs=data / "test", deploy_dir=work / "deploy", out_csv=work / f"{name}.csv", batch_size=args.batch_size
        )

    jobs = {
        "local infer": lambda: infer_folder(icfg("local")),
        "ray, 1 actor": lambda: infer_on_ray(icfg("ray1"), RayOptions(actors=1)),
        "ray, 2 actors": lambda: infer_on_ray(icfg("ray2"), RayOptions(actors=2)),
    }
    walls: dict[str, list[float]] = {k: [] for k in jobs}
    for r in range(args.repeats):
        order = list(jobs) if r % 2 == 0 else list(reversed(jobs))
        for name in order:
            t0 = time.perf_counter()
            jobs[name]()
            walls[name].append(time.perf_counter() - t0)
    ray.shutdown()
    print(
        f"\ninference: {n} images, batch {args.batch_size}, {args.repeats} interleaved repeats "
        f"(ray.init of a local Ray: {ray_start:.1f}s, not counted)"
    )
    local = statistics.median(walls["local infer"])
    for name, w in walls.items():
        m = statistics.median(w)
        print(
            f"  {name:14s} {m:6.1f}s  {n / m:7.1f} img/s  x{local / m:.2f} of local   "
            f"(repeats: {', '.join(f'{v:.1f}' for v in w)})"
        )


def _train(args, work: Path, base: dict) -> None:
    from gi_deploy.cli.train import _train_rank
    from gi_deploy.training.config import TrainConfig
    from gi_deploy.training.distributed import launch_local

    rows = {}
    for nproc in (1, 2):
        cfg = TrainConfig(**base, epochs=args.epochs, out_dir=work / f"ddp{nproc}", overwrite=True)
        t0 = time.perf_counter()
        result = launch_local(_train_rank, (cfg.to_dict(),), nproc)[0]
        wall = time.perf_counter() - t0
        steady = [h["img_per_s"] for h in result.history[1:]] or [result.history[0]["img_per_s"]]
        rows[nproc] = (statistics.median(steady), wall)
    print(f"\ntraining: {args.train_images} images, global batch {base['batch_size']}, {args.epochs} epochs, gloo")
    for nproc, (rate, wall) in rows.items():
        print(
            f"  torchrun x{nproc}   {rate:7.1f} img/s (epochs 2+)  x{rate / rows[1][0]:.2f}   wall {wall:.0f}s "
            "(incl. launch and test)"
        )


if __name__ == "__main__":
    main()
