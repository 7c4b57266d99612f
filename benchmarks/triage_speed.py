"""gi-deploy triage's two goals, measured side by side on one machine:

1. speed: triage of a capsule video (decoding with PyAV included) runs at >= 0.9x the throughput of
   `gi-deploy infer` on the same frames as JPEG files (decoded from that video, so the pixels match);
   runs are interleaved (infer, triage, infer, triage) and the best of each is compared;
2. memory: peak RSS of a 2-hour synthetic study is within 1.2x that of a 10-minute one (each in its
   own process, so each peak is its own).

Scaled down to run in minutes on 2 shared cores: the studies are sampled at --study-fps (default 1
frame/s: 600 frames for 10 minutes, 7,200 for 2 hours) at --px pixels (default 64), where a real
capsule records 2-6 frames/s at 336 px; the model is whatever --deploy holds (the demo's
convnextv2_atto at 48 px). The time of a 50,000-frame study is extrapolated from the measured triage
throughput. Prints met / NOT met per goal; --check exits 1 when one is not met.

    PYTHONPATH=. python benchmarks/triage_speed.py --deploy gi-deploy-demo/deploy --source capsule --check
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

SPEED_GOAL = 0.9
MEMORY_GOAL = 1.2
STUDY_FRAMES = 50_000

CHILD = """
import json, resource, sys, time
a = json.loads(sys.argv[1])
if a["kind"] == "infer":
    from gi_deploy.runtime.infer import InferConfig, infer_folder
    t = time.perf_counter()
    r = infer_folder(InferConfig(inputs=a["input"], deploy_dir=a["deploy"], sources=[a["source"]], out_csv=a["out"],
                                 precision=a["precision"], batch_size=32))
    job = r.seconds
else:
    from gi_deploy.triage.config import TriageConfig
    from gi_deploy.triage.run import triage
    t = time.perf_counter()
    r = triage(TriageConfig(inputs=a["input"], deploy_dir=a["deploy"], source=a["source"], out_dir=a["out"],
                            precision=a["precision"], normal=a["normal"], batch_size=32))
    job = r.seconds
print(json.dumps({"seconds": time.perf_counter() - t, "job_seconds": job, "frames": r.n_classified,
                  "peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def _child(args: dict) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, json.dumps(args)], capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"{args['kind']} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _study(folder: Path, minutes: float, fps: float, px: int, frames_too: bool) -> tuple[Path, Path | None]:
    import numpy as np
    from PIL import Image

    from gi_deploy.demo.synthetic import plan_capsule_study, render_capsule_study
    from gi_deploy.triage.video import decode_frames, probe_video, write_video

    folder.mkdir(parents=True, exist_ok=True)
    video = folder / "study.mp4"
    write_video(video, render_capsule_study(plan_capsule_study(int(minutes * 60 * fps), fps), px), fps)
    if not frames_too:
        return video, None
    files = folder / "frames"
    files.mkdir()
    info = probe_video(video)
    for n, image, _ in decode_frames(info, info.frames):  # the video's own pixels, as Kvasir-named JPEGs
        Image.fromarray(np.asarray(image)).save(files / f"study_{n}.jpg", quality=95)
    return video, files


def _cpu() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        return next(
            (ln.split(":", 1)[1].strip() for ln in out.splitlines() if "model name" in ln.lower()), platform.processor()
        )
    except OSError:
        return platform.processor()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--deploy", type=Path, required=True)
    ap.add_argument("--source", required=True)
    ap.add_argument("--normal", default="normal", help="the bundle's normal class (for the roles)")
    ap.add_argument("--precision", default="fp32")
    ap.add_argument("--study-fps", type=float, default=1.0)
    ap.add_argument("--px", type=int, default=64)
    ap.add_argument("--speed-minutes", type=float, default=20.0, help="length of the speed study")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--check", action="store_true")
    ap.add_argument("--json", type=Path)
    a = ap.parse_args()
    base = dict(deploy=str(a.deploy), source=a.source, precision=a.precision, normal=[a.normal])
    print(
        f"CPU: {_cpu()}; studies at {a.study_fps:g} frame/s, {a.px} px; model: {a.deploy}/{a.source} ({a.precision})",
        flush=True,
    )
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        video, files = _study(tmp / "speed", a.speed_minutes, a.study_fps, a.px, frames_too=True)
        runs = {"infer": [], "triage": []}
        for i in range(a.repeats):
            runs["infer"].append(_child({**base, "kind": "infer", "input": str(files), "out": str(tmp / f"i{i}.csv")}))
            runs["triage"].append(_child({**base, "kind": "triage", "input": str(video), "out": str(tmp / f"t{i}")}))
            last_i, last_t = runs["infer"][-1], runs["triage"][-1]
            print(
                f"repeat {i + 1}: infer {last_i['seconds']:.1f}s, triage {last_t['seconds']:.1f}s (its job "
                f"{last_t['job_seconds']:.1f}s)",
                flush=True,
            )
        inf = min(runs["infer"], key=lambda r: r["seconds"])
        tri = min(runs["triage"], key=lambda r: r["seconds"])
        n = tri["frames"]
        ratio = inf["seconds"] / tri["seconds"]  # throughput ratio on the same frames
        job_ratio = inf["job_seconds"] / tri["job_seconds"]
        mem = {}
        for label, minutes in (("10 min", 10.0), ("2 h", 120.0)):
            v, _ = _study(tmp / label.replace(" ", ""), minutes, a.study_fps, a.px, frames_too=False)
            mem[label] = _child({**base, "kind": "triage", "input": str(v), "out": str(tmp / f"m{minutes:g}")})
            print(
                f"memory, {label} study ({mem[label]['frames']} frames): peak RSS {mem[label]['peak_mib']:.0f} MiB "
                f"in {mem[label]['seconds']:.1f}s",
                flush=True,
            )
    mem_ratio = mem["2 h"]["peak_mib"] / mem["10 min"]["peak_mib"]
    fps = n / tri["seconds"]
    results = {
        "cpu": _cpu(),
        "frames": n,
        "infer_s": inf["seconds"],
        "triage_s": tri["seconds"],
        "infer_job_s": inf["job_seconds"],
        "triage_job_s": tri["job_seconds"],
        "speed_ratio": ratio,
        "job_ratio": job_ratio,
        "memory_ratio": mem_ratio,
        "peak_mib": {k: v["peak_mib"] for k, v in mem.items()},
        "triage_frames_per_s": fps,
        "study_50k_minutes": STUDY_FRAMES / fps / 60,
    }
    speed_ok, mem_ok = ratio >= SPEED_GOAL, mem_ratio <= MEMORY_GOAL
    print(
        f"speed: triage of the video {n / tri['seconds']:.0f} frames/s vs infer on the same {n} frames as files "
        f"{n / inf['seconds']:.0f} frames/s: {ratio:.2f}x (goal >= {SPEED_GOAL}x; the job alone {job_ratio:.2f}x) "
        f"{'met' if speed_ok else 'NOT met'}"
    )
    print(
        f"memory: 2-hour study {mem['2 h']['peak_mib']:.0f} MiB vs 10-minute {mem['10 min']['peak_mib']:.0f} MiB: "
        f"{mem_ratio:.2f}x (goal <= {MEMORY_GOAL}x) {'met' if mem_ok else 'NOT met'}"
    )
    print(
        f"a {STUDY_FRAMES:,}-frame study at this throughput: {results['study_50k_minutes']:.1f} min "
        f"(this model and frame size; see the docstring)"
    )
    if a.json:
        a.json.write_text(json.dumps(results, indent=2))
    return 1 if a.check and not (speed_ok and mem_ok) else 0


if __name__ == "__main__":
    sys.exit(main())
