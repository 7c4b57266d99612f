"""The ``gi-deploy`` command line: thin Typer commands that read options, build the stage's config
(help and defaults come from its fields), call one library function and report. Library errors
(GiDeployError) become one line on stderr and exit code 1.

torch is imported only inside the commands that need it, so ``gi-deploy infer`` runs on a
torch-free install."""

from __future__ import annotations

from typing import Annotated

import typer

from gi_deploy.cli import demo, explain, export, infer, serve, train, triage
from gi_deploy.cli._display import HelpGroup, setup_logging

app = typer.Typer(
    cls=HelpGroup,
    add_completion=False,
    no_args_is_help=True,
    help="Per-source LoRA classifiers for GI endoscopy: train, export, infer.",
)


@app.callback()
def _main(verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log details.")] = False) -> None:
    setup_logging(verbose)


app.command("train")(train.train_cmd)
app.command("sources")(train.sources_cmd)
app.command("compare")(train.compare_cmd)
app.command("export")(export.export_cmd)
app.command("infer")(infer.infer_cmd)
app.command("evaluate")(infer.evaluate_cmd)
app.command("benchmark")(infer.benchmark_cmd)
app.command("triage")(triage.triage_cmd)
app.command("explain")(explain.explain_cmd)
app.command("demo")(demo.demo_cmd)
app.command("serve")(serve.serve_cmd)
