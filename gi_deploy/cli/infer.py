"""``gi-deploy infer``, ``evaluate`` and ``benchmark``: the runtime's commands, torch-free (only
``--explain-wrong`` needs the training extra, and imports it when asked)."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from gi_deploy._deps import require_training_extra
from gi_deploy._io import write_json
from gi_deploy.cli._display import (
    arg,
    err,
    image_progress,
    interrupted_keeps,
    opt,
    out,
    print_scores,
    reported,
    usage_error,
)
from gi_deploy.core.choices import BackendName, Device, Precision
from gi_deploy.core.fields import default_of
from gi_deploy.runtime.backends.base import is_info
from gi_deploy.runtime.benchmark import (
    ROUTER_MAX_COST,
    BenchmarkConfig,
    BenchmarkResult,
    goals,
    router_cost,
    run_benchmark,
)
from gi_deploy.runtime.cross import CrossResult, cross_evaluate, parse_tests
from gi_deploy.runtime.evaluate import evaluate_csv
from gi_deploy.runtime.infer import InferConfig, InferResult, infer_folder
from gi_deploy.runtime.ray_infer import RayOptions, infer_on_ray  # Ray itself is imported only with --ray
from gi_deploy.runtime.routing_eval import evaluate_routing

I, B, R = InferConfig, BenchmarkConfig, RayOptions


def _report_infer(r: InferResult, inputs: str) -> None:
    for s, run in r.sources.items():
        for note in run.notes:  # auto's choice and a compile's cost are news; anything else must be loud
            if is_info(note):
                out.print(f"{s}: {note}", soft_wrap=True)
            else:
                err.print(f"warning: {s}: {note}", style="bold yellow", soft_wrap=True)
        out.print(
            f"{s}: {run.n_rows} rows, {run.n_errors} unreadable, {run.n_unlabelled} unlabelled"
            + (f", {run.n_rejected} refused as out of distribution" if run.n_rejected else "")
            + f"; on {run.backend}",
            soft_wrap=True,
        )
    if r.decoder:
        out.print(f"decoded by {r.decoder}, {r.workers} worker process(es)", soft_wrap=True)
    out.print(
        f"{r.n_images} images -> {r.csv_path}: {r.n_classified} classified in {r.seconds:.1f}s "
        f"({r.images_per_second:.1f} img/s, {len(r.sources)} source(s))"
        + (f", {r.n_resumed} rows kept from the interrupted run" if r.n_resumed else "")
        + (f", {r.n_rejected} refused as out of distribution" if r.n_rejected else "")
        + (f"; {r.n_duplicates} input(s) listed twice, classified once" if r.n_duplicates else ""),
        soft_wrap=True,
    )
    if r.parquet:
        out.print(f"Parquet -> {r.parquet}", soft_wrap=True)
    print_scores(f"scored on {inputs}", r.sources)
    if r.n_errors:
        err.print(f"{r.n_errors} file(s) could not be read; see the error column of {r.csv_path}", style="yellow")


def infer_cmd(
    inputs: Annotated[str, arg(I, "inputs", metavar="INPUT")],
    source: Annotated[Optional[list[str]], opt(I, "sources", "--source")] = None,
    out_csv: Annotated[Path, opt(I, "out_csv", "--out")] = default_of(I, "out_csv"),
    deploy_dir: Annotated[Path, opt(I, "deploy_dir", "--deploy")] = default_of(I, "deploy_dir"),
    backend: Annotated[BackendName, opt(I, "backend")] = BackendName(default_of(I, "backend")),
    precision: Annotated[Precision, opt(I, "precision")] = Precision(default_of(I, "precision")),
    device: Annotated[Device, opt(I, "device")] = Device(default_of(I, "device")),
    batch_size: Annotated[int, opt(I, "batch_size")] = default_of(I, "batch_size"),
    workers: Annotated[Optional[int], opt(I, "workers")] = None,
    threads: Annotated[Optional[int], opt(I, "threads")] = None,
    compile: Annotated[Optional[bool], opt(I, "compile", "--compile/--no-compile")] = None,
    decode: Annotated[str, opt(I, "decode")] = default_of(I, "decode"),
    labels: Annotated[Optional[Path], opt(I, "labels")] = None,
    top_k: Annotated[int, opt(I, "top_k")] = default_of(I, "top_k"),
    resume: Annotated[bool, opt(I, "resume")] = False,
    strict: Annotated[bool, opt(I, "strict")] = False,
    explain_wrong: Annotated[int, opt(I, "explain_wrong")] = 0,
    ray: Annotated[
        bool,
        typer.Option(
            "--ray",
            help="Run the job on Ray Data (the scale extra): a local Ray, or "
            "the cluster of --ray-address / RAY_ADDRESS.",
        ),
    ] = False,
    ray_address: Annotated[Optional[str], opt(R, "address", "--ray-address")] = None,
    ray_actors: Annotated[Optional[int], opt(R, "actors", "--ray-actors")] = None,
    ray_gpus_per_actor: Annotated[Optional[float], opt(R, "gpus_per_actor", "--ray-gpus-per-actor")] = None,
    ray_cpus_per_actor: Annotated[float, opt(R, "cpus_per_actor", "--ray-cpus-per-actor")] = 1.0,
    parquet: Annotated[Optional[Path], opt(I, "parquet_dir", "--parquet")] = None,
) -> None:
    """Classify every image of INPUT with each selected source; score them when labels are known
    (class-named sub-folders, --labels, or a label column in the list)."""
    with reported(), interrupted_keeps(out_csv):
        cfg = InferConfig(
            inputs=inputs,
            labels=labels,
            deploy_dir=deploy_dir,
            sources=source,
            out_csv=out_csv,
            batch_size=batch_size,
            backend=backend.value,
            precision=precision.value,
            device=device.value,
            top_k=top_k,
            resume=resume,
            strict=strict,
            threads=threads,
            workers=workers,
            compile=compile,
            decode=decode,
            explain_wrong=explain_wrong,
            parquet_dir=parquet,
        )
        if ray:
            opts = RayOptions(
                address=ray_address,
                actors=ray_actors,
                gpus_per_actor=ray_gpus_per_actor,
                cpus_per_actor=ray_cpus_per_actor,
            )
            with image_progress("classifying on Ray") as progress:
                r = infer_on_ray(cfg, opts, progress)
        elif ray_address or ray_actors or ray_gpus_per_actor is not None:
            usage_error("--ray-address, --ray-actors and --ray-gpus-per-actor need --ray")
        else:
            with image_progress("classifying") as progress:
                r = infer_folder(cfg, progress)
    _report_infer(r, inputs)
    if explain_wrong > 0:
        with reported():
            require_training_extra("infer --explain-wrong")
            from gi_deploy.explain.maps import explain_wrong_sources  # lazy: torch is the training extra's

            done = explain_wrong_sources(r.csv_path, r.root, deploy_dir, list(r.sources), explain_wrong)
        for s, (folder, e) in done.items():
            out.print(
                f"{s}: no labelled image was wrong: no heatmaps to write"
                if e is None
                else f"{s}: heatmaps of the {len(e.images)} most confidently wrong image(s) -> {folder}",
                soft_wrap=True,
            )


def _cross_tables(r: CrossResult) -> list[Table]:
    tables = []
    for attr, title in (
        (
            "accuracy",
            "Accuracy (%) of each source's model (rows) on each source's test set "
            "(columns), over the classes the model has",
        ),
        ("accuracy_all", "The same over every test image (classes the model lacks count as wrong)"),
    ):
        table = Table(title=title)
        table.add_column("model")
        for t in r.tests:
            table.add_column(f"{t} test", justify="right")
        for m in r.models:
            cells = [r.cells[(m, t)] for t in r.tests]
            table.add_row(
                m,
                *(
                    "n/a"
                    if getattr(c, attr) is None
                    else f"{100 * getattr(c, attr):.2f} (n={c.n if attr == 'accuracy' else c.n + c.n_skipped})"
                    for c in cells
                ),
            )
        tables.append(table)
    return tables


def evaluate_cmd(
    predictions: Annotated[
        Optional[Path], typer.Argument(help="A predictions CSV written by `gi-deploy infer`.")
    ] = None,
    cross: Annotated[
        bool,
        typer.Option("--cross", help="Run every source's model on every source's test set (the seed paper's Table 1)."),
    ] = False,
    deploy_dir: Annotated[Path, opt(I, "deploy_dir", "--deploy")] = default_of(I, "deploy_dir"),
    test: Annotated[
        Optional[list[str]],
        typer.Option(
            help="SOURCE=FOLDER or SOURCE=LIST.csv, repeatable (--cross; default: each bundle's own test split)."
        ),
    ] = None,
    class_map: Annotated[
        Optional[Path], typer.Option(help="JSON mapping each source's class names to shared names (--cross).")
    ] = None,
    out_dir: Annotated[
        Optional[Path],
        typer.Option(
            "--out",
            help="Where the report files go (default: beside the CSV); with --cross, the matrices and "
            "predictions (default: cross/).",
        ),
    ] = None,
    n_wrong: Annotated[int, opt(I, "n_wrong")] = default_of(I, "n_wrong"),
    routing: Annotated[
        bool,
        typer.Option(
            "--routing",
            help="Score --source auto on the labelled test sets: routing "
            "confusion and accuracy, routed vs single-model accuracy "
            "on the mixed folder, OOD AUROC/FPR95 against --ood.",
        ),
    ] = False,
    ood: Annotated[
        Optional[Path],
        typer.Option(help="--routing: a folder of images no source covers (non-endoscopy, blank, saturated frames)."),
    ] = None,
) -> None:
    """Re-score a predictions CSV without running a model (metrics.json, confusion matrices, ROC
    curves, the most confidently wrong images), or with --cross build the cross-source matrix."""
    if routing:
        if predictions is not None or cross or class_map:
            usage_error("--routing runs the router and models itself; drop the CSV, --cross and --class-map")
        with reported():
            r = evaluate_routing(deploy_dir, out_dir or Path("routing"), parse_tests(test or []) or None, ood)
        _print_routing(r.report)
        out.print(f"details -> {r.files['json']}, per image -> {r.files['csv']}", soft_wrap=True)
        return
    if ood is not None:
        usage_error("--ood belongs to --routing")
    if cross and predictions is not None:
        usage_error(f"--cross runs the models itself; drop {predictions}")
    if not cross and predictions is None:
        usage_error("give a predictions CSV, or --cross")
    if not cross and (test or class_map):
        usage_error("--test and --class-map belong to --cross")
    if cross:
        with reported():
            r = cross_evaluate(deploy_dir, out_dir or Path("cross"), parse_tests(test or []) or None, class_map)
        for table in _cross_tables(r):
            out.print(table)
        out.print(
            f"matrices -> {r.files['matrix']}, {r.files['matrix_all']}; details -> {r.files['json']}", soft_wrap=True
        )
        return
    with reported():
        scores = evaluate_csv(predictions, out_dir, n_wrong)
    for s, sc in scores.items():
        out.print(f"{s}: {sc.n_rows} rows, {sc.n_errors} unreadable, {sc.n_unlabelled} unlabelled")
    print_scores(f"scored from {predictions}", scores)


def _print_routing(rep: dict) -> None:
    sources = rep["sources"]
    if "routing_confusion" in rep:
        table = Table(
            title=f"routing on {rep['n_images']} labelled test images: accuracy {rep['routing_accuracy']:.2%}"
        )
        table.add_column("true \\ routed")
        for s in sources:
            table.add_column(s, justify="right")
        for s, row in zip(sources, rep["routing_confusion"]["matrix"]):
            table.add_row(s, *map(str, row))
        out.print(table)
        acc = Table(title="accuracy on the mixed folder")
        acc.add_column("model")
        acc.add_column("accuracy", justify="right")
        for s, a in rep["single_model_accuracy"].items():
            acc.add_row(f"{s} model on everything", f"{a:.2%}")
        acc.add_row("each image's own source model", f"{rep['own_model_accuracy']:.2%}")
        acc.add_row(f"--source auto (refused = wrong; {rep['id_rejected']} refused)", f"{rep['routed_accuracy']:.2%}")
        if rep["routed_accuracy_accepted"] is not None:
            acc.add_row("--source auto on the images it answered", f"{rep['routed_accuracy_accepted']:.2%}")
            acc.add_row("  the same images, each through its own model", f"{rep['own_model_accuracy_accepted']:.2%}")
        out.print(acc)
    o = rep.get("ood")
    if o and o.get("auroc") is not None:
        out.print(
            f"out of distribution: AUROC {o['auroc']:.4f}, FPR@95TPR {o['fpr_at_95tpr']:.2%} on {o['n_ood']} "
            f"images; at the bundles' thresholds {o['ood_rejected']}/{o['n_ood']} refused "
            f"({rep.get('id_rejected', 0)}/{rep['n_images']} test images refused)",
            soft_wrap=True,
        )
        if "ood_rejected_by_router" in o:
            out.print(
                f"  refused by the router's novelty check (like no source's frames): {o['ood_rejected_by_router']}/"
                f"{o['n_ood']} OOD, {rep.get('id_rejected_by_router', 0)}/{rep['n_images']} test images; by the "
                f"routed model's check: {o['ood_rejected_by_model']}/{o['n_ood']} OOD; score: {o['score']}",
                soft_wrap=True,
            )
        for name, k in rep.get("ood_by_set", {}).items():
            out.print(
                f"  {name}: AUROC {k['auroc']:.4f}, FPR@95TPR {k['fpr_at_95tpr']:.2%}, refused "
                f"{k['ood_rejected']}/{k['n_ood']} (router {k['ood_rejected_by_router']}, model "
                f"{k['ood_rejected_by_model']})",
                soft_wrap=True,
            )
    elif o:
        out.print(f"out of distribution: {o['note']}", soft_wrap=True)


def _benchmark_table(r: BenchmarkResult) -> Table:
    table = Table(
        title=f"{r.source}: {r.model} at {r.input_size[1]}x{r.input_size[0]}, {r.n_images} images, "
        f"batch {r.batch_size}, {r.workers} decode workers, {r.machine}"
    )
    for col in ("backend", "e2e img/s", "model img/s", "p50 ms", "p95 ms", "e2e vs eager", "model vs eager", "MB"):
        table.add_column(col, justify="left" if col == "backend" else "right")
    for row in r.rows:
        if row.status == "ok":
            ratio = lambda v: "" if v is None else f"{v:.2f}x"  # noqa: E731
            table.add_row(
                row.name,
                f"{row.end_to_end:.1f}",
                f"{row.model_only:.1f}",
                f"{row.p50_ms:.1f}",
                f"{row.p95_ms:.1f}",
                ratio(row.e2e_vs_eager),
                ratio(row.model_vs_eager),
                f"{row.model_bytes / 1e6:.1f}",
            )
    return table


def benchmark_cmd(
    source: Annotated[Optional[str], opt(B, "source")] = None,
    images: Annotated[Optional[Path], opt(B, "images")] = None,
    deploy_dir: Annotated[Path, opt(B, "deploy_dir", "--deploy")] = default_of(B, "deploy_dir"),
    n_images: Annotated[int, opt(B, "n_images")] = default_of(B, "n_images"),
    batch_size: Annotated[int, opt(B, "batch_size")] = default_of(B, "batch_size"),
    workers: Annotated[Optional[int], opt(B, "workers")] = None,
    threads: Annotated[Optional[int], opt(B, "threads")] = None,
    device: Annotated[Device, opt(B, "device")] = Device(default_of(B, "device")),
    rows: Annotated[Optional[list[str]], opt(B, "rows", "--row")] = None,
    decode: Annotated[str, opt(B, "decode")] = default_of(B, "decode"),
    json_out: Annotated[Optional[Path], typer.Option("--json", help="Also write the table as JSON.")] = None,
) -> None:
    """One table: PyTorch eager, onnxruntime fp32/fp16/int8 and TensorRT on the same images and
    batch; images/s end to end and model-only, latency p50/p95 at batch 1, ratios, model size."""
    with reported():
        cfg = BenchmarkConfig(
            deploy_dir=deploy_dir,
            source=source,
            images=images,
            n_images=n_images,
            batch_size=batch_size,
            threads=threads,
            device=device.value,
            workers=workers,
            rows=rows or [],
            decode=decode,
        )
        r = run_benchmark(cfg, say=lambda m: err.print(m, style="dim"))
    out.print(_benchmark_table(r))
    out.print("e2e: the infer pipeline (decode workers + model); model: pre-decoded batches; p50/p95: batch 1")
    for row in sorted(r.rows, key=lambda row: row.status != "ok"):  # what ran, then what could not and why
        out.print(f"{row.name}: {row.detail}" if row.status == "ok" else f"{row.name}: {row.status}", soft_wrap=True)
    for what, value, target in goals(r):
        verdict = "not measured" if value is None else ("met" if value >= target else "NOT met")
        out.print(f"goal {what} >= {target}x: " + ("n/a" if value is None else f"{value:.2f}x") + f" ({verdict})")
    cost = router_cost(r)
    if cost is not None:  # an upper bound, unlike the speed-ups above
        out.print(
            f"goal router cost (thumbnail + features + classifier) vs one onnxruntime fp32 model, per image, <= "
            f"{ROUTER_MAX_COST:.0%}: {cost:.1%} ({'met' if cost <= ROUTER_MAX_COST else 'NOT met'})"
        )
    if json_out:
        write_json(json_out, asdict(r))
        out.print(f"-> {json_out}")
