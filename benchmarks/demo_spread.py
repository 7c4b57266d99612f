"""How far the demo's table moves with the seed and the CPU's oneDNN ISA level (issue 22).

Runs the whole demo (``gi_deploy.demo.pipeline.run_demo``, what ``gi-deploy demo`` runs) once per seed and ISA
level, each in a fresh process (oneDNN reads ``ONEDNN_MAX_CPU_ISA`` once, when it loads; MKL reads
``MKL_ENABLE_INSTRUCTIONS``), then prints the README's table as median [min-max] over the runs, and the paper's
effect verdict (``pipeline.paper_effect``) for every run.

    PYTHONPATH=. python benchmarks/demo_spread.py --seeds 0,1,2,3,4 --isa default,AVX2 --out /tmp/demo_spread

A finished run is kept as ``OUT/<isa>_seed<N>.json`` and reused, so a stopped sweep resumes. Goal (``--check``
exits 1 when NOT met): the effect holds in every run. ~70 s per run on 2 idle cores.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from _goals import Goals

ROOT = Path(__file__).resolve().parents[1]
# ISA level -> environment. "default" leaves the libraries to pick the best the CPU has.
ISA_ENV = {
    "default": {},
    "AVX2": {"ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"},
    "AVX512_CORE": {"ONEDNN_MAX_CPU_ISA": "AVX512_CORE", "MKL_ENABLE_INSTRUCTIONS": "AVX512"},
}

_ONE = """
import json, sys
from pathlib import Path
from gi_deploy.demo.config import DemoConfig
from gi_deploy.demo.pipeline import run_demo
out, seed, dest = Path(sys.argv[1]), int(sys.argv[2]), Path(sys.argv[3])
r = run_demo(DemoConfig(out_dir=out, seed=seed), say=lambda s: None)
rep = r.routing
json.dump({"seed": seed, "seconds": r.seconds, "effect": r.effect,
           "acc": {m: {s: 100 * v["accuracy"] for s, v in by.items()} for m, by in r.scores.items()},
           "mixed": {m: 100 * a for m, a in rep["single_model_accuracy"].items()},
           "own_mixed": 100 * rep["own_model_accuracy"], "auto_mixed": 100 * rep["routed_accuracy"],
           "auto": {s: 100 * a for s, a in rep["routed_accuracy_by_source"].items()},
           "ood_auroc": (rep.get("ood") or {}).get("auroc")}, open(dest, "w"))
"""


def _run(isa: str, seed: int, out: Path) -> dict:
    dest = out / f"{isa}_seed{seed}.json"
    if not dest.is_file():
        env = {**os.environ, **ISA_ENV[isa], "PYTHONPATH": str(ROOT)}
        t0 = time.time()
        subprocess.run(
            [sys.executable, "-c", _ONE, str(out / f"work_{isa}_{seed}"), str(seed), str(dest)], env=env, check=True
        )
        print(f"  {isa} seed {seed}: {time.time() - t0:.0f}s", flush=True)
    return json.loads(dest.read_text())


def _spread(values: list[float]) -> str:
    return f"{statistics.median(values):.2f} [{min(values):.2f}-{max(values):.2f}]"


def table(runs: list[dict]) -> list[str]:
    """The demo's first table, one cell per (model, column) as median [min-max] over ``runs``."""
    sources = list(runs[0]["acc"])
    lines = [f"| model | {' | '.join(f'{s} test' for s in sources)} | mixed |", "|---" * (len(sources) + 2) + "|"]
    for m in sources:
        cells = [_spread([r["acc"][m][s] for r in runs]) for s in sources] + [_spread([r["mixed"][m] for r in runs])]
        lines.append(f"| {m} LoRA | {' | '.join(cells)} |")
    own = [_spread([r["acc"][s][s] for r in runs]) for s in sources] + [_spread([r["own_mixed"] for r in runs])]
    lines.append(f"| each image's own model | {' | '.join(own)} |")
    auto = [_spread([r["auto"][s] for r in runs]) for s in sources] + [_spread([r["auto_mixed"] for r in runs])]
    lines.append(f"| --source auto | {' | '.join(auto)} |")
    return lines


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", default="0,1,2,3,4")
    ap.add_argument("--isa", default="default,AVX2", help=f"comma-separated, of {', '.join(ISA_ENV)}")
    ap.add_argument("--out", type=Path, default=Path("/tmp/demo_spread"))
    ap.add_argument("--check", action="store_true", help="exit 1 when a goal is NOT met")
    a = ap.parse_args(argv)
    a.out.mkdir(parents=True, exist_ok=True)
    seeds = [int(s) for s in a.seeds.split(",")]
    isas = a.isa.split(",")
    runs: dict[str, list[dict]] = {isa: [] for isa in isas}
    for seed in seeds:  # seed outer: a sweep stopped early still has every ISA level for its first seeds
        for isa in isas:
            runs[isa].append(_run(isa, seed, a.out))
    every = [r for rs in runs.values() for r in rs]
    for isa, rs in runs.items():
        print(f"\n{isa}, seeds {a.seeds} ({len(rs)} runs), accuracy %, median [min-max]:")
        print("\n".join(table(rs)))
        for r in rs:
            print(f"  seed {r['seed']}: {r['effect']['line']}; {r['seconds']:.0f}s")
    if len(isas) > 1:
        for seed in seeds:
            cells = {isa: next(r for r in runs[isa] if r["seed"] == seed)["acc"] for isa in isas}
            diff = max(abs(cells[i][m][s] - cells[isas[0]][m][s]) for i in isas for m in cells[i] for s in cells[i][m])
            print(f"seed {seed}: largest change of a table cell across ISA levels {', '.join(isas)}: {diff:.2f} points")
    print(f"\nall {len(every)} runs, accuracy %, median [min-max]:")
    print("\n".join(table(every)))
    held = sum(r["effect"]["met"] for r in every)
    goals = Goals()
    goals.at_least(f"runs with the paper's effect ({held}/{len(every)})", 100 * held / len(every), 100.0, "%", ".0f")
    return goals.finish(a.check)


if __name__ == "__main__":
    raise SystemExit(main())
