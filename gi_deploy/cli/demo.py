"""``gi-deploy demo``. The demo pipeline is imported inside the command: it trains (torch)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

from rich.table import Table

from gi_deploy._deps import require_training_extra
from gi_deploy.cli._display import metrics_table, opt, out, reported
from gi_deploy.cli.triage import triage_lines
from gi_deploy.core.fields import default_of
from gi_deploy.core.router import router_gate_text
from gi_deploy.demo.config import DemoConfig


def _tables(r) -> list[Table]:
    sources = list(r.scores)
    rep = r.routing
    cross = Table(title="Accuracy (%) of each model on each source's test set, and on both mixed")
    cross.add_column("model")
    for s in sources:
        cross.add_column(f"{s} test", justify="right")
    cross.add_column("mixed", justify="right")
    for model, by_source in r.scores.items():
        cross.add_row(
            f"{model} LoRA",
            *(f"{100 * by_source[s]['accuracy']:.2f}" for s in sources),
            f"{100 * rep['single_model_accuracy'][model]:.2f}",
        )
    cross.add_row(
        "each image's own model",
        *(f"{100 * r.scores[s][s]['accuracy']:.2f}" for s in sources),
        f"{100 * rep['own_model_accuracy']:.2f}",
    )
    cross.add_row(
        "--source auto",
        *(f"{100 * rep['routed_accuracy_by_source'][s]:.2f}" for s in sources),
        f"{100 * rep['routed_accuracy']:.2f}",
    )
    rows = {}
    for s in sources:
        for m in sources:
            rows[f"{m} LoRA on {s}"] = r.scores[m][s]
    return [cross, metrics_table("Per-source test metrics (%, weighted averages as in the paper)", rows)]


def _routing_lines(r) -> list[str]:
    rep, gate, auto = r.routing, r.router_gate, r.auto
    o = rep.get("ood") or {}
    lines = [
        f"router: {router_gate_text(gate)}; on the test sets {rep['routing_accuracy']:.2%} "
        f"(confusion true x routed {rep['routing_confusion']['matrix']})"
    ]
    answered = rep["n_images"] - rep["id_rejected"]
    lines.append(
        f"on the {answered} test images --source auto answered: {rep['routed_accuracy_accepted']:.2%} "
        f"correct, each through its own source's model {rep['own_model_accuracy_accepted']:.2%}"
    )
    if o.get("auroc") is not None:
        lines.append(
            f"refused as out of distribution: {auto['ood_refused']}/{auto['ood_frames']} frames no source "
            f"covers, {auto['test_refused']}/{auto['rows'] - auto['ood_frames']} test images; OOD AUROC "
            f"{o['auroc']:.4f}, FPR@95TPR {o['fpr_at_95tpr']:.2%}"
        )
    return lines


def demo_cmd(
    out_dir: Annotated[Path, opt(DemoConfig, "out_dir", "--out")] = default_of(DemoConfig, "out_dir"),
) -> None:
    """Synthetic two-source demo: a findings-free base, one LoRA per source, export with the router,
    every model on every source, and --source auto on a mixed folder."""
    with reported():
        require_training_extra("demo")
    from gi_deploy.demo.pipeline import run_demo  # lazy: torch is the training extra's

    with reported():
        r = run_demo(DemoConfig(out_dir=out_dir), say=lambda s: out.print(f"demo: {s}", style="bold"))
    for table in _tables(r):
        out.print(table)
    out.print(r.effect["line"], soft_wrap=True)
    for line in _routing_lines(r):
        out.print(line, soft_wrap=True)
    for s in r.scores:
        trainable, total = r.params[s]
        out.print(
            f"{s} adapter: {trainable:,} trainable of {total:,}; merged ONNX parity "
            f"{r.verification[s]['onnx_fp32']['max_abs_logit_diff']:.1e}"
        )
    if r.triage is not None:
        for line in triage_lines(r.triage):  # the lines gi-deploy triage prints
            out.print(f"triage: {line}", soft_wrap=True)
    out.print(f"synthetic data: shows the pipeline, not clinical accuracy. {r.seconds:.0f}s, outputs in {r.out_dir}")
