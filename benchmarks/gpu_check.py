"""The device check the project owns: on one GPU, in a few minutes, from a plain checkout with no
network, measure what issue 16 asks for and print one table of ratios.

It makes its own data (synthetic 720x576 endoscope-like JPEGs, 3 findings), trains LoRA and full
fine-tuning for two epochs, exports the LoRA run, runs ``infer`` on the torch backend (compiled and
eager) and on ``auto``, runs ``benchmark`` and ``benchmarks/train_throughput.py`` (with and without
torch.compile), each step a subprocess with its own time limit, so one slow step costs its
row, not the table. Everything is written under --out; the table is also saved as summary.json.

    PYTHONPATH=. python3 benchmarks/gpu_check.py --out /tmp/gpu_check            # on the GPU (~6 min)
    PYTHONPATH=. python3 benchmarks/gpu_check.py --out /tmp/gpu_check --quick    # CPU dry run, tiny model

Ratios measured side by side in one run are the figures to read; absolute images/s are this GPU's. Goals, each
printed met / NOT met (``--check`` exits 1 when one is not met or was not measured): infer end to end >= 0.8x
model-only (compiled fp16), compiled >= 1.8x eager model-only (fp16), and ``train``'s steady rate >= 0.85x the
step-only rate for LoRA and full fine-tuning.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from _goals import Goals
from PIL import Image

FINDINGS = ("normal", "polyp", "bleeding")


def _frame(args: tuple[str, int, Path]) -> None:
    from gi_deploy.demo.synthetic import render

    finding, seed, path = args
    rng = np.random.default_rng(seed)
    small = render(finding, "endoscope", rng, size=96)
    big = np.asarray(Image.fromarray(small).resize((720, 576), Image.Resampling.BICUBIC), np.int16)
    noisy = np.clip(big + rng.normal(0, 6, big.shape), 0, 255).astype(np.uint8)  # real decode work per frame
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(noisy).save(path, quality=90)


def make_data(root: Path, per_class: dict[str, int], workers: int) -> Path:
    jobs = [
        (f, hash((split, f, i)) % 2**31, root / split / f / f"{split}_{f}_{i:04d}.jpg")
        for split, n in per_class.items()
        for f in FINDINGS
        for i in range(n)
    ]
    with ProcessPoolExecutor(workers) as pool:
        list(pool.map(_frame, jobs, chunksize=8))
    return root


DEADLINE = [float("inf")]  # perf_counter time after which no step starts (and running ones are cut)


def run(cmd: list[str], log: Path, timeout: int) -> tuple[int, str, float]:
    """Run one step; its output goes to ``log``. Returns (exit code, output, seconds); a step that
    runs out of time (its own limit, or the check's budget) returns 124, one never started 125."""
    t = time.perf_counter()
    timeout = int(min(timeout, DEADLINE[0] - t))
    if timeout < 10:
        log.write_text(" ".join(cmd) + "\n[not started: the check's time budget is spent]")
        print(f"[skipped] {' '.join(cmd[2:6])} ...: budget spent", flush=True)
        return 125, "", 0.0
    try:
        p = subprocess.run(
            cmd,
            capture_output=True,
            text=True,
            timeout=timeout,
            env={**os.environ, "COLUMNS": "200", "PYTHONUNBUFFERED": "1"},
        )
        code, text = p.returncode, p.stdout + p.stderr
    except subprocess.TimeoutExpired as e:
        parts = [p.decode(errors="replace") if isinstance(p, bytes) else p for p in (e.stdout, e.stderr) if p]
        code, text = 124, "".join(parts) + f"\n[timed out after {timeout}s]"
    log.write_text(" ".join(cmd) + "\n" + text)
    seconds = time.perf_counter() - t
    print(f"[{seconds:6.1f}s] exit {code}: {' '.join(cmd[2:6])} ... -> {log.name}", flush=True)
    return code, text, seconds


def img_per_s(text: str) -> float | None:
    m = re.search(r"classified in [\d.]+s \(([\d.]+) img/s", text)
    return float(m.group(1)) if m else None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("/tmp/gpu_check"))
    ap.add_argument("--quick", action="store_true", help="CPU dry run: convnextv2_atto at 64 px, few images")
    ap.add_argument("--budget", type=float, default=330, help="seconds after which no step starts")
    ap.add_argument("--steps", default="", help="comma-separated steps to run, in this order (default: all)")
    ap.add_argument("--check", action="store_true", help="exit 1 when a goal is NOT met (or not measured)")
    a = ap.parse_args(argv)
    quick = a.quick
    out = a.out
    out.mkdir(parents=True, exist_ok=True)
    py = [sys.executable, "-m", "gi_deploy"]
    model, px, batch, dev = ("convnextv2_atto", 64, 16, "cpu") if quick else ("convnextv2_base", 224, 64, "cuda")
    n_infer = 64 if quick else 2048
    cores = len(os.sched_getaffinity(0))
    summary: dict = {"model": model, "img_size": px, "batch": batch, "device": dev, "cores": cores}
    t0 = time.perf_counter()
    DEADLINE[0] = t0 + a.budget

    data = make_data(
        out / "data", {"train": 16, "val": 4, "test": 4} if quick else {"train": 256, "val": 32, "test": 32}, cores
    )
    frames = sorted(make_data(out / "frames", {"infer": n_infer // len(FINDINGS) + 1}, cores).rglob("*.jpg"))
    listing = out / "frames.csv"  # n_infer distinct frames (rows are keyed by path), labelled
    listing.write_text("path,label\n" + "".join(f"{p},{p.parent.name}\n" for p in frames[:n_infer]))
    print(f"data: {len(list(data.rglob('*.jpg')))} frames of 720x576 in {time.perf_counter() - t0:.0f}s", flush=True)

    common = [
        "--data-dir",
        str(data),
        "--model",
        model,
        "--no-pretrained",
        "--img-size",
        str(px),
        "--epochs",
        "2",
        "--batch-size",
        str(batch),
        "--device",
        dev,
        "--lr",
        "3e-4",
        "--patience",
        "5",
    ]
    tt = [
        sys.executable,
        "benchmarks/train_throughput.py",
        "--models",
        model,
        "--img-size",
        str(px),
        "--batch-size",
        str(batch),
        "--device",
        dev,
        "--repeats",
        "2",
        "--steps",
        "3" if quick else "8",
        *([] if quick else ["--amp", "--channels-last"]),
    ]
    summary["train"], summary["infer"] = {}, {}

    def train(method: str) -> None:
        code, _, secs = run(
            py + ["train", "capsule", "--method", method, "--out", str(out / f"runs_{method}"), *common],
            out / f"train_{method}.log",
            150,
        )
        if code == 0:
            h = json.loads((out / f"runs_{method}" / "capsule" / "run.json").read_text())["history"]
            summary["train"][method] = {
                "epoch1_first_step_s": h[0]["first_step_s"],
                "epoch1_img_per_s": h[0]["img_per_s"],
                "steady_img_per_s": h[-1]["steady_img_per_s"],
                "epoch2_img_per_s": h[-1]["img_per_s"],
                "seconds": round(secs, 1),
            }

    def export() -> None:
        code, _, secs = run(
            py + ["export", "--runs", str(out / "runs_lora"), "--out", str(out / "deploy"), "--no-fp16"],
            out / "export.log",
            150,
        )
        summary["export"] = {"exit": code, "seconds": round(secs, 1)}

    def infer(name: str, extra: list[str]) -> None:
        if quick:  # the CPU dry run: fp32, eager, the CPU decoder
            if "GPU decode" in name:
                return
            extra = [{"fp16": "fp32", "--compile": "--no-compile"}.get(e, e) for e in extra]
        i = len(summary["infer"])
        code, text, _ = run(
            py
            + [
                "infer",
                str(listing),
                "--deploy",
                str(out / "deploy"),
                "--batch-size",
                str(batch),
                "--device",
                dev,
                "--out",
                str(out / f"pred_{i}.csv"),
                *extra,
            ],
            out / f"infer_{i}.log",
            150,
        )
        summary["infer"][name] = {
            "exit": code,
            "img_per_s": img_per_s(text),
            "csv": str(out / f"pred_{i}.csv"),
            "chose": next(iter(re.findall(r"auto: ([^\n]*)", text)), None),
            "decoder": next(iter(re.findall(r"decoded by ([^\n]*)", text)), None),
        }

    def benchmark(decode: str = "cpu") -> None:
        rows = (
            ["PyTorch eager", "onnxruntime fp32"]
            if quick
            else ["PyTorch eager fp16", "PyTorch compiled fp16", "auto fp16"]
            if decode == "cpu"
            else ["PyTorch compiled fp16"]
        )
        key = "benchmark" if decode == "cpu" else f"benchmark_{decode}_decode"
        code, _, _ = run(
            py
            + [
                "benchmark",
                "--deploy",
                str(out / "deploy"),
                "--device",
                dev,
                "--n-images",
                str(n_infer),
                "--batch-size",
                str(batch),
                *[x for r in rows for x in ("--row", r)],
                "--decode",
                decode,
                "--json",
                str(out / f"{key}.json"),
            ],
            out / f"{key}.log",
            240,
        )
        if code == 0:
            bench = json.loads((out / f"{key}.json").read_text())
            summary[key] = {
                r["name"]: {k: r[k] for k in ("status", "end_to_end", "model_only", "p50_ms", "p95_ms", "detail")}
                for r in bench["rows"]
            }

    def steps(name: str, extra: list[str], limit: int) -> None:
        code, _, _ = run(tt + extra + ["--json", str(out / f"tt_{name}.json")], out / f"tt_{name}.log", limit)
        if code == 0:
            res = json.loads((out / f"tt_{name}.json").read_text())["results"][model]
            summary[f"step_{name}"] = {
                v: {"img_per_s": round(r["median_img_per_s"], 1), "peak_mib": r["median_peak_mib"]}
                for v, r in res.items()
            }

    compiled = ["--backend", "torch", "--precision", "fp16", "--compile"]
    plan = {  # most important first: a step that does not fit the budget costs its own row only
        "train_lora": lambda: train("lora"),
        "export": export,
        "infer_cpu": lambda: infer("torch fp16 compiled", compiled + ["--decode", "cpu"]),
        "infer_gpu": lambda: infer("torch fp16 compiled, GPU decode", compiled + ["--decode", "gpu"]),
        "infer_auto": lambda: infer("auto fp16", ["--backend", "auto", "--precision", "fp16"]),
        "benchmark": benchmark,
        "benchmark_gpu": lambda: None if quick else benchmark("gpu"),
        "train_full": lambda: train("full"),
        "steps_eager": lambda: steps("eager", ["--variants", "full,lora,lora-rank,linear"], 120),
        # where a LoRA step's time goes next to a full one's (top kernels by device time)
        "profile": lambda: (
            None
            if quick
            else [
                run(
                    tt + ["--variants", v, "--profile", "--profile-variant", v, "--profile-steps", "3"],
                    out / f"profile_{v}.log",
                    60,
                )
                for v in ("full", "lora")
            ]
        ),
        # what draft decoding changes for the model just trained (with it)
        "draft": lambda: run(
            [
                sys.executable,
                "benchmarks/draft_effect.py",
                "--run",
                str(out / "runs_lora" / "capsule"),
                "--images",
                str(data / "test"),
                "--device",
                dev,
            ],
            out / "draft_effect.log",
            60,
        ),
        # inductor on a 2-core CPU takes minutes: the CPU dry run checks the eager path only
        "steps_compiled": lambda: (
            None
            if quick
            else steps("compiled", ["--variants", "lora,full", "--compile", "--repeats", "1", "--warmup", "2"], 240)
        ),
    }
    for name in a.steps.split(",") if a.steps else plan:
        plan[name]()
    summary["decoder_agreement"] = agreement(summary["infer"])
    summary["seconds"] = round(time.perf_counter() - t0, 1)
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    goals = Goals()
    print_table(summary, goals)
    return goals.finish(a.check)


def agreement(infer: dict) -> float | None:
    """Share of images whose predicted class is the same with the GPU decoder as with the CPU one."""
    import csv

    a, b = infer.get("torch fp16 compiled"), infer.get("torch fp16 compiled, GPU decode")
    if not a or not b or a["exit"] or b["exit"]:
        return None
    rows = [{r["path"]: r["predicted"] for r in csv.DictReader(open(x["csv"], newline=""))} for x in (a, b)]
    return sum(rows[0][p] == rows[1].get(p) for p in rows[0]) / len(rows[0])


def _ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.2f}x" if a and b else "n/a"


def _div(a: float | None, b: float | None) -> float | None:
    return a / b if a and b else None


def print_table(s: dict, goals: Goals) -> None:
    print(
        f"\n== gpu_check: {s['model']} at {s['img_size']} px, batch {s['batch']}, {s['device']}, {s['cores']} "
        f"cores, {s['seconds']}s =="
    )
    bench = s.get("benchmark", {})
    for name, r in bench.items():
        if r["status"] == "ok":
            print(
                f"benchmark {name:24s} e2e {r['end_to_end']:8.1f}  model {r['model_only']:8.1f} img/s  "
                f"e2e/model {_ratio(r['end_to_end'], r['model_only'])}  p50 {r['p50_ms']:.1f} ms  | {r['detail']}"
            )
        else:
            print(f"benchmark {name:24s} {r['status']}")
    for name, r in s.get("benchmark_gpu_decode", {}).items():
        if r["status"] == "ok":
            print(
                f"benchmark {name + ', GPU decode':24s} e2e {r['end_to_end']:8.1f}  model {r['model_only']:8.1f} "
                f"img/s  e2e/model {_ratio(r['end_to_end'], r['model_only'])}"
            )
    comp, eager = bench.get("PyTorch compiled fp16", {}), bench.get("PyTorch eager fp16", {})
    goals.at_least(
        "infer e2e / model-only (compiled fp16)", _div(comp.get("end_to_end"), comp.get("model_only")), 0.8, "x"
    )
    goals.at_least(
        "compiled / eager model-only (fp16)", _div(comp.get("model_only"), eager.get("model_only")), 1.8, "x"
    )
    for name, r in s.get("infer", {}).items():
        print(
            f"infer {name:32s} exit {r['exit']}  {r['img_per_s']} img/s  decoder {r['decoder']}"
            + (f"  auto: {r['chose']}" if r["chose"] else "")
        )
    print(f"predictions equal with the GPU and the CPU decoder: {s.get('decoder_agreement')}")
    steps = s.get("step_eager", {})
    for method, r in s.get("train", {}).items():
        step = steps.get(method, {}).get("img_per_s")
        print(
            f"train {method:5s} epoch 1 first step {r['epoch1_first_step_s']}s; steady {r['steady_img_per_s']} "
            f"img/s vs step-only {step}"
        )
    for method in ("lora", "full"):
        r = s.get("train", {}).get(method, {})
        goals.at_least(
            f"train {method} steady / step-only",
            _div(r.get("steady_img_per_s"), steps.get(method, {}).get("img_per_s")),
            0.85,
            "x",
        )
    full = steps.get("full", {})
    for name in ("step_eager", "step_compiled"):
        for v, r in s.get(name, {}).items():
            base = s.get(name, {}).get("full", {})
            print(
                f"{name:13s} {v:10s} {r['img_per_s']:8.1f} img/s ({_ratio(r['img_per_s'], base.get('img_per_s'))} "
                f"of full)  peak {r['peak_mib']} MiB ({_ratio(r['peak_mib'], base.get('peak_mib'))})"
            )
    comp_steps = s.get("step_compiled", {})
    for v in ("full", "lora"):
        print(
            f"compile gain, training step {v}: {_ratio(comp_steps.get(v, {}).get('img_per_s'), steps.get(v, {}).get('img_per_s'))}"
        )
    print(f"(eager full step: {full.get('img_per_s')} img/s)")


if __name__ == "__main__":
    raise SystemExit(main())
