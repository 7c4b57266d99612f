"""``gi-deploy export``: verified bundles from trained runs, and ``--list`` of what is there.

The export library is imported inside the command: it needs the training extra (torch), which a
runtime-only install lacks."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from gi_deploy._deps import require_training_extra
from gi_deploy.cli._display import arg, opt, out, reported, size_text
from gi_deploy.core.bundles import bundle_summary, gates_line, interrupted_hint, list_bundles
from gi_deploy.core.fields import default_of
from gi_deploy.core.router import router_gate_text
from gi_deploy.errors import BundleError, ExportFailed
from gi_deploy.export.options import ExportConfig, Exporter, ExportOptions
from gi_deploy.serve.triton_repo import TritonRepoConfig, write_triton_repo

O, E = ExportOptions, ExportConfig


def bundles_table(deploy_dir: Path) -> Table:
    """``--list``: every bundle's files, sizes, gates and footprint."""
    names = list_bundles(deploy_dir)
    if not names:
        raise BundleError(f"no bundles under {deploy_dir}; run `gi-deploy export` first" + interrupted_hint(deploy_dir))
    table = Table(title=f"Bundles in {deploy_dir}")
    for col in ("source", "file", "size", "gate", "result"):
        table.add_column(col, justify="right" if col == "size" else "left", overflow="fold")
    for name in names:
        try:
            b = bundle_summary(deploy_dir / name)
        except BundleError as e:  # one damaged bundle does not hide the others
            table.add_row(name, "", "", "refused", str(e))
            table.add_section()
            continue
        heading = [b["source"], f"{b['model']} ({b['method']})", b["created"][:16].replace("T", " ")]
        for i, (file, size, gate, result) in enumerate(b["rows"]):
            table.add_row(
                heading[i] if i < len(heading) else "", file, size_text(size) if size is not None else "", gate, result
            )
        table.add_section()
    return table


def _report(results: dict, storage: dict | None) -> None:
    for name, r in results.items():
        b = r.manifest
        if r.skipped:
            out.print(f"{name}: unchanged since {b.created} ({r.bundle_dir}); --force to re-export", soft_wrap=True)
            continue
        out.print(
            f"{name}: {r.bundle_dir} ({b.model.parameters:,} params, {sum(b.timings_s.values()):.1f}s): "
            + gates_line(b.verification),
            soft_wrap=True,
        )
        fp = b.footprint
        out.print(
            f"  footprint: {fp['trained_artifact']} artifact {size_text(fp['artifact_bytes'])} vs merged model "
            f"{size_text(fp['merged_model_bytes'])} ({fp['artifact_vs_merged_model']:.1%})",
            soft_wrap=True,
        )
        for note in r.notes:
            out.print(f"  {note}", soft_wrap=True)
    if storage:  # the storage argument: one base plus small adapters vs a full model per source
        s = storage
        out.print(
            f"storage for {len(s['sources'])} adapted sources ({', '.join(s['sources'])}): one base "
            f"{size_text(s['base_bytes'])} + adapters {size_text(s['adapter_bytes'])} = "
            f"{size_text(s['base_bytes'] + s['adapter_bytes'])}, vs {size_text(s['merged_bytes'])} as merged "
            "models",
            soft_wrap=True,
        )


def export_cmd(
    sources: Annotated[Optional[list[str]], arg(E, "sources")] = None,
    merge: Annotated[bool, opt(O, "merge")] = default_of(O, "merge"),
    fp16: Annotated[bool, opt(O, "fp16", "--fp16/--no-fp16")] = default_of(O, "fp16"),
    int8: Annotated[bool, opt(O, "int8")] = default_of(O, "int8"),
    calib_images: Annotated[int, opt(O, "calib_images")] = default_of(O, "calib_images"),
    int8_eval_images: Annotated[int, opt(O, "int8_eval_images")] = default_of(O, "int8_eval_images"),
    int8_min_agreement: Annotated[Optional[float], opt(O, "int8_min_top1")] = None,
    int8_max_drop: Annotated[Optional[float], opt(O, "int8_max_accuracy_drop")] = None,
    allow_no_val: Annotated[bool, opt(O, "allow_no_val")] = default_of(O, "allow_no_val"),
    engine: Annotated[bool, opt(O, "engine")] = default_of(O, "engine"),
    max_batch: Annotated[int, opt(O, "max_batch")] = default_of(O, "max_batch"),
    exporter: Annotated[Exporter, opt(O, "exporter")] = Exporter(default_of(O, "exporter")),
    force: Annotated[bool, opt(E, "force")] = default_of(E, "force"),
    router: Annotated[Optional[bool], opt(E, "router", "--router/--no-router")] = None,
    router_source: Annotated[Optional[list[str]], opt(E, "router_sources", "--router-source")] = None,
    router_min_accuracy: Annotated[float, opt(E, "router_min_accuracy")] = default_of(E, "router_min_accuracy"),
    allow_small_val: Annotated[bool, opt(E, "allow_small_val")] = default_of(E, "allow_small_val"),
    list_: Annotated[
        bool, typer.Option("--list", help="Show the bundles under --out (files, gates, footprint) and exit.")
    ] = False,
    runs_dir: Annotated[Path, opt(E, "runs_dir", "--runs")] = default_of(E, "runs_dir"),
    deploy_dir: Annotated[Path, opt(E, "deploy_dir", "--out")] = default_of(E, "deploy_dir"),
    triton_repo: Annotated[
        Optional[Path],
        typer.Option(
            "--triton-repo",
            help="Write a Triton model repository of the bundles under --out (and their router) into "
            "this folder, for a full Triton server, and exit; torch-free.",
        ),
    ] = None,
) -> None:
    """Merge each run's adapter, export verified ONNX (fp32, fp16, int8) and TensorRT bundles."""
    if list_:
        with reported():
            out.print(bundles_table(deploy_dir))
        return
    if triton_repo is not None:
        with reported():
            r = write_triton_repo(
                TritonRepoConfig(
                    deploy_dir=deploy_dir, out_dir=triton_repo, sources=sources, max_batch=max_batch, force=force
                )
            )
        out.print(
            f"Triton model repository: {r.out_dir} ({', '.join(r.models)}); run it as {r.out_dir}/README.txt says",
            soft_wrap=True,
        )
        for note in r.notes:
            out.print(f"  {note}", soft_wrap=True)
        return
    with reported():
        require_training_extra("export")
    from gi_deploy.export.writer import export_router, export_runs, storage_summary  # lazy: the training extra's

    with reported():
        options = ExportOptions(
            merge=merge,
            fp16=fp16,
            int8=int8,
            calib_images=calib_images,
            int8_eval_images=int8_eval_images,
            int8_min_top1=int8_min_agreement,
            int8_max_accuracy_drop=int8_max_drop,
            allow_no_val=allow_no_val,
            engine=engine,
            max_batch=max_batch,
            exporter=exporter.value,
        )
        cfg = ExportConfig(
            runs_dir=runs_dir,
            deploy_dir=deploy_dir,
            sources=sources or [],
            options=options,
            force=force,
            router=router,
            router_sources=router_source,
            router_min_accuracy=router_min_accuracy,
            allow_small_val=allow_small_val,
        )
        try:
            results, failure = export_runs(cfg), None
        except ExportFailed as e:  # report the sources that did export, then the failures
            results, failure = e.exported, e
    _report(results, storage_summary(results))
    if failure is not None:
        with reported():
            raise failure
    with reported():
        routed = export_router(cfg, results)
    if routed is not None:
        out.print(
            f"router: {routed.path} over {', '.join(routed.manifest.sources)}: "
            + router_gate_text(routed.manifest.gate),
            soft_wrap=True,
        )
        for note in routed.notes:
            out.print(f"  {note}", soft_wrap=True)
