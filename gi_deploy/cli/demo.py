"""``gi-deploy demo``. The demo pipeline is imported inside the command: it trains (torch)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

from rich.table import Table

from gi_deploy._deps import require_training_extra
from gi_deploy.cli._display import metrics_table, opt, out, reported
from gi_deploy.core.fields import default_of
from gi_deploy.demo.config import BASE, DemoConfig


def _tables(r) -> list[Table]:
    sources = [s for s in r.scores if s != BASE]
    cross = Table(title="Accuracy of each model on each source's test set")
    cross.add_column("model")
    for s in sources:
        cross.add_column(f"{s} test", justify="right")
    for model, by_source in r.scores.items():
        label = f"{model} (pooled, full FT)" if model == BASE else f"{model} LoRA"
        cross.add_row(label, *(f"{100 * by_source[s]['accuracy']:.2f}" for s in sources))
    rows = {}
    for s in sources:
        rows[f"{s}: base"] = r.scores[BASE][s]
        rows[f"{s}: LoRA"] = r.scores[s][s]
    return [cross, metrics_table("Per-source test metrics (%, weighted averages as in the paper)", rows)]


def demo_cmd(
    out_dir: Annotated[Path, opt(DemoConfig, "out_dir", "--out")] = default_of(DemoConfig, "out_dir"),
) -> None:
    """Synthetic two-source demo: base model, one LoRA per source, export, infer, metrics."""
    with reported():
        require_training_extra("demo")
    from gi_deploy.demo.pipeline import run_demo  # lazy: torch is the training extra's

    with reported():
        r = run_demo(DemoConfig(out_dir=out_dir), say=lambda s: out.print(f"demo: {s}", style="bold"))
    for table in _tables(r):
        out.print(table)
    for s in (s for s in r.scores if s != BASE):
        trainable, total = r.params[s]
        out.print(f"{s} adapter: {trainable:,} trainable of {total:,}; merged ONNX parity "
                  f"{r.verification[s]['onnx_fp32']['max_abs_logit_diff']:.1e}")
    out.print(f"synthetic data: shows the pipeline, not clinical accuracy. {r.seconds:.0f}s, outputs in {r.out_dir}")
