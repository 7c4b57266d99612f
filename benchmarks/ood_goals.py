"""Refusal on hard, near out-of-distribution sets (issue 22): AUROC and FPR@95TPR per set, met / NOT met.

``gi-deploy evaluate --routing --ood`` (gi_deploy.runtime.routing_eval) on the demo's bundles and router, with
both sources' test sets as in-distribution and, as OOD, one folder per set:

- ``no_source``: the demo's own frames no source covers (blank, saturated, colour fields, patterns): the easy set;
- ``third_device``: the endoscope's anatomy and findings through a third device's optics and light;
- ``blur``, ``bubbles``, ``overexposed``: frames of the right devices, spoiled;
- ``pretext``: plain mucosa of the base's pretext task (no source's device).

(gi_deploy.demo.synthetic.write_near_ood draws the near sets.) The score is the one ``--source auto`` refuses on.

    PYTHONPATH=. python benchmarks/ood_goals.py [--demo gi-deploy-demo] [--out /tmp/ood_goals] [--n 60] [--check]

``--demo`` reuses a finished ``gi-deploy demo`` folder (data/ and deploy/); without it the demo runs first
(~70 s on 2 idle cores). ``--quick`` runs a reduced demo instead (32 px, 3 + 3 epochs, 16 training images per
class): a dry run of the script, not the demo's figures. Goals per set (``--check`` exits 1 when one is NOT
met): AUROC >= 0.90 (the Mahalanobis detector's 93.2 on CIFAR-10's six OOD sets, ANCHORS.md, rounded down) and
FPR@95TPR <= 0.50.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from _goals import Goals

from gi_deploy.demo.config import DemoConfig
from gi_deploy.demo.synthetic import write_near_ood
from gi_deploy.runtime.routing_eval import evaluate_routing

GOAL_AUROC = 0.90
GOAL_FPR95 = 0.50


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--demo", type=Path, help="a finished `gi-deploy demo` folder (default: run the demo)")
    ap.add_argument("--out", type=Path, default=Path("/tmp/ood_goals"))
    ap.add_argument("--n", type=int, default=None, help="images per near-OOD set (default 60; --quick: 16)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="a reduced demo (a dry run, not the demo's figures)")
    ap.add_argument("--check", action="store_true", help="exit 1 when a goal is NOT met")
    a = ap.parse_args(argv)
    demo = a.demo
    cfg = DemoConfig(out_dir=a.out / "demo", seed=a.seed)
    if a.quick:
        cfg = DemoConfig(
            out_dir=a.out / "demo",
            seed=a.seed,
            img_size=32,
            image_px=32,
            base_epochs=3,
            lora_epochs=3,
            split_sizes={"train": 16, "val": 6, "test": 10},
            ood_per_kind=4,
        )
    if demo is None:
        from gi_deploy.demo.pipeline import run_demo  # torch: only when the demo must run

        demo = cfg.out_dir
        run_demo(cfg, say=lambda s: print(f"demo: {s}", flush=True))
    data, deploy = demo / "data", demo / "deploy"
    sets = a.out / "ood_sets"
    shutil.rmtree(sets, ignore_errors=True)
    shutil.copytree(data / "ood", sets / "no_source")
    write_near_ood(sets, size=cfg.image_px, n=a.n or (16 if a.quick else 60), seed=a.seed + 1000)  # unseen seeds
    tests = {s: data / s / "test" for s in cfg.sources}
    rep = evaluate_routing(deploy, a.out / "routing", tests, sets).report
    print(
        f"in-distribution: {rep['n_images']} test images of {', '.join(cfg.sources)}, {rep['id_rejected']} refused "
        f"({rep['id_rejected_share']:.1%}); score: {rep['ood']['score']}"
    )
    print(f"{'set':<14}{'n':>5}{'AUROC':>8}{'FPR95':>8}{'refused':>9}  (by the router / by the model)")
    for name, k in [*rep["ood_by_set"].items(), ("all sets", rep["ood"])]:
        print(
            f"{name:<14}{k['n_ood']:>5}{k['auroc']:>8.4f}{k['fpr_at_95tpr']:>8.2%}{k['ood_rejected_share']:>9.1%}"
            f"  ({k['ood_rejected_by_router']} / {k['ood_rejected_by_model']})"
        )
    goals = Goals()
    for name, k in rep["ood_by_set"].items():
        goals.at_least(f"{name}: AUROC", k["auroc"], GOAL_AUROC, fmt=".4f")
        goals.at_most(f"{name}: FPR@95TPR", 100 * k["fpr_at_95tpr"], 100 * GOAL_FPR95, "%", fmt=".1f")
    return goals.finish(a.check)


if __name__ == "__main__":
    raise SystemExit(main())
