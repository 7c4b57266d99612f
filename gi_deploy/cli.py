"""Thin Typer commands: read options, build the stage's config, call one library function,
report. Library errors (GiDeployError) become one line on stderr and exit code 1.

torch is imported only inside the commands that need it, so ``gi-deploy infer`` runs on a
torch-free install."""

from __future__ import annotations

import logging
import signal
from contextlib import contextmanager
from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table

from gi_deploy._deps import require_training_extra
from gi_deploy._io import read_json
from gi_deploy.errors import BundleError, ConfigError, GiDeployError, TrainingInterrupted

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Per-source LoRA classifiers for GI endoscopy: train, export, infer.")
# markup off: paths and messages may hold brackets ("gi-deploy[train]", "scan[2].jpg") that rich would
# swallow as markup; highlight off: no guessed colours on numbers in paths
out = Console(markup=False, highlight=False)
err = Console(stderr=True, markup=False, highlight=False)


class Method(str, Enum):
    lora = "lora"
    full = "full"
    linear = "linear"
    colora = "colora"
    lora_colora = "lora+colora"


class Device(str, Enum):
    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"


class Precision(str, Enum):
    fp32 = "fp32"
    fp16 = "fp16"
    int8 = "int8"


@contextmanager
def reported():
    """Turn library errors into one red line on stderr and exit code 1."""
    try:
        yield
    except TrainingInterrupted as e:  # Ctrl-C: the conventional 128 + SIGINT exit code
        err.print(str(e), style="yellow", soft_wrap=True)
        raise typer.Exit(code=130) from None
    except GiDeployError as e:
        # soft_wrap: keep paths and commands unbroken for copy-paste
        err.print(f"error: {e}", style="red", soft_wrap=True)
        raise typer.Exit(code=1) from None


@app.callback()
def _main(verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log details.")] = False) -> None:
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(message)s")


def metrics_table(title: str, rows: dict[str, dict]) -> Table:
    """One row per name: the paper's metrics (weighted averages) plus macro F1."""
    table = Table(title=title)
    table.add_column("", no_wrap=True)
    for col in ("n", "Acc", "Prec", "Rec", "F1", "F1 macro", "MCC"):
        table.add_column(col, justify="right")
    for name, m in rows.items():
        table.add_row(name, str(m["n"]), *(f"{100 * m[k]:.2f}" for k in (
            "accuracy", "precision_weighted", "recall_weighted", "f1_weighted", "f1_macro", "mcc")))
    return table


class TrainProgress:
    """Rich progress for training events: a summary at start, a live bar per epoch (batch, loss,
    img/s) and one line per finished epoch."""

    def __init__(self, source: str):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.source = source
        self.progress = Progress(TextColumn("{task.description}", markup=False), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("{task.fields[info]}", markup=False), TimeRemainingColumn(),
                                 console=out, transient=True)
        self.task = None

    def __enter__(self) -> TrainProgress:
        self.progress.start()
        return self

    def __exit__(self, *exc) -> None:
        self.progress.stop()

    def __call__(self, event: str, d: dict) -> None:
        say = self.progress.console.print
        if event == "start":
            if d.get("resumed_from") is not None:
                say(f"resuming {self.source} after epoch {d['resumed_from']}")
            say(f"{self.source}: {len(d['classes'])} classes ({d['layout']}), splits {d['counts']}, device "
                f"{d['device']} (amp {d['amp']}, channels-last {d['channels_last']}, workers {d['num_workers']})")
            say(f"base weights: {d['base_weights']}, licence {d['license']}")
            say(f"trainable params: {d['trainable']:,} / {d['total']:,} ({100 * d['trainable'] / d['total']:.2f}%)")
            if d.get("colora"):
                c = d["colora"]
                say(f"CoLoRA: {c['layers']} convolutions, {c['backprop_params']:,} parameters trained by "
                    f"backpropagation, merged into {c['merged_into_params']:,} of the {d['deployed']:,} deployed"
                    + (f"; {c['skipped_grouped']} depthwise/grouped convolutions stay frozen" if c["skipped_grouped"] else ""),
                    soft_wrap=True)
            if d.get("excluded"):
                say("left out (not in the paper's classes): "
                    + ", ".join(f"{k} ({v})" for k, v in d["excluded"].items()))
            for note in d.get("notes", []):
                err.print(f"warning: {note}", style="yellow")
        elif event == "batch":
            info = f"loss {d['loss']:.4f}  {d['img_per_s']:.1f} img/s"
            if self.task is None or d["step"] == 1:
                if self.task is not None:
                    self.progress.remove_task(self.task)
                self.task = self.progress.add_task(f"epoch {d['epoch']}", total=d["steps"], info=info)
            self.progress.update(self.task, completed=d["step"], info=info)
        elif event == "epoch":
            peak = f"  peak {d['peak_mem_mib']:.0f} MiB" if d.get("peak_mem_mib") is not None else ""
            say(f"epoch {d['epoch']:3d}  loss {d['train_loss']:.4f}  train acc {100 * d['train_accuracy']:.2f}"
                f"  val acc {100 * d['val_accuracy']:.2f}  {d['seconds']:.1f}s ({d['img_per_s']:.0f} img/s){peak}"
                f"{'  merged' if d.get('colora_merged') else ''}{'  *best' if d['best'] else ''}")
        elif event == "cell":
            say(f"== {d['method']} at {100 * d['label_fraction']:g}% of the labels"
                + (" (finished earlier, reused)" if d["reused"] else ""))


def _train_layers(config: Optional[Path], flags: dict, resume: bool, out_dir: Optional[Path], source: str) -> list[dict]:
    """Config layers, later winning: the stored config of the run being resumed, --config FILE,
    then the flags actually given (None = not given)."""
    from gi_deploy.training.config import load_config_file
    from gi_deploy.training.run import stored_config

    layers = []
    if resume:
        run_dir = (out_dir or Path(load_config_file(config).get("out_dir", "runs") if config else "runs")) / source
        if (run_dir / "run.json").is_file():
            layers.append(stored_config(run_dir))
    if config is not None:
        layers.append(load_config_file(config))
    layers.append({k: v for k, v in flags.items() if v is not None})
    return layers


def _print_config(cfg) -> None:
    import yaml

    out.print("resolved config:")
    out.print(yaml.safe_dump(cfg.to_dict(), sort_keys=False, default_flow_style=None).rstrip())


Opt = typer.Option


@app.command("train")
def train_cmd(
    source: Annotated[str, typer.Argument(help="kvasir, gastrovision (built-in layouts, see `gi-deploy sources`) "
                                               "or any name for an ImageFolder tree; the run goes to OUT/SOURCE.")],
    data_dir: Annotated[Optional[Path], Opt(help="The dataset folder (layout: `gi-deploy sources`).")] = None,
    config: Annotated[Optional[Path], Opt(help="YAML or TOML file of settings; flags override it.")] = None,
    method: Annotated[Optional[Method], Opt(help="lora: adapters on fc1/fc2 + new head; full: every weight; "
                                                 "linear: the head only; colora: convolution-kernel adapters "
                                                 "+ head; lora+colora: both.")] = None,
    model: Annotated[Optional[str], Opt(help="timm model name. (default: convnextv2_base)")] = None,
    pretrained: Annotated[Optional[bool], Opt("--pretrained/--no-pretrained",
                                              help="ImageNet weights from the Hugging Face hub. (default: on)")] = None,
    weights: Annotated[Optional[Path], Opt(help="Local base checkpoint (.pth/.safetensors); overrides --pretrained.")] = None,
    epochs: Annotated[Optional[int], Opt(help="Maximum epochs. (default: 30)")] = None,
    batch_size: Annotated[Optional[int], Opt(help="(default: 32)")] = None,
    lr: Annotated[Optional[float], Opt(help="AdamW learning rate. (default: 1e-4)")] = None,
    weight_decay: Annotated[Optional[float], Opt(help="AdamW weight decay. (default: 0.01)")] = None,
    scheduler: Annotated[Optional[str], Opt(help="none | cosine | plateau (on val accuracy). (default: none)")] = None,
    img_size: Annotated[Optional[int], Opt(help="Input height and width in pixels. (default: 224)")] = None,
    resize: Annotated[Optional[str], Opt(help="direct (squash, the paper) | crop (shorter side + centre crop).")] = None,
    crop_pct: Annotated[Optional[float], Opt(help="With --resize crop: crop size / resize size. (default: 0.875)")] = None,
    hflip: Annotated[Optional[bool], Opt("--hflip/--no-hflip", help="Random horizontal flip. (default: on)")] = None,
    vflip: Annotated[Optional[bool], Opt("--vflip/--no-vflip", help="Random vertical flip. (default: off)")] = None,
    rotation: Annotated[Optional[float], Opt(help="Random rotation range in degrees. (default: 10)")] = None,
    color_jitter: Annotated[Optional[float], Opt(help="Brightness/contrast/saturation jitter. (default: 0)")] = None,
    balance: Annotated[Optional[str], Opt(help="Class imbalance: none | weighted-loss | sampler. (default: none)")] = None,
    label_fraction: Annotated[Optional[float], Opt(help="Train on this share of each class's labels. (default: 1.0)")] = None,
    split: Annotated[Optional[str], Opt(help="seeded | official-0 | official-1 (kvasir's official folds).")] = None,
    patience: Annotated[Optional[int], Opt(help="Early stopping: epochs without a val accuracy gain. (default: 5)")] = None,
    seed: Annotated[Optional[int], Opt(help="(default: 0)")] = None,
    lora_r: Annotated[Optional[int], Opt(help="LoRA rank. (default: 16)")] = None,
    lora_alpha: Annotated[Optional[int], Opt(help="LoRA alpha. (default: 32)")] = None,
    lora_dropout: Annotated[Optional[float], Opt(help="LoRA dropout. (default: 0.1)")] = None,
    lora_dropout_position: Annotated[Optional[str], Opt(help="input (peft, the paper) | rank (on A's output: "
                                                             "cheaper, see README). (default: input)")] = None,
    colora_merge_every: Annotated[Optional[int], Opt(help="CoLoRA: merge into the kernels every N epochs; "
                                                          "0 = only at export. (default: 1, the paper)")] = None,
    colora_targets: Annotated[Optional[str], Opt(help="CoLoRA: comma-separated module-name patterns, e.g. "
                                                      "'layer3.*,layer4.*'. (default: every dense conv)")] = None,
    colora_min_kernel: Annotated[Optional[int], Opt(help="CoLoRA: skip convolutions with a smaller kernel; 3 "
                                                         "leaves 1x1 convs frozen. (default: 1)")] = None,
    colora_forward: Annotated[Optional[str], Opt(help="CoLoRA training forward: fused (one conv with K0 + dK) "
                                                      "| branch (the paper's extra convs; slower, same maths). "
                                                      "(default: fused)")] = None,
    out_dir: Annotated[Optional[Path], Opt("--out", help="Runs folder. (default: runs)")] = None,
    device: Annotated[Optional[Device], Opt(help="(default: auto)")] = None,
    amp: Annotated[Optional[str], Opt(help="auto (bf16, or fp16 + scaler, on CUDA; off on CPU) | off | bf16 | fp16.")] = None,
    channels_last: Annotated[Optional[bool], Opt("--channels-last/--no-channels-last",
                                                 help="(default: on for CUDA)")] = None,
    compile: Annotated[Optional[bool], Opt("--compile/--no-compile", help="torch.compile the model.")] = None,
    num_workers: Annotated[Optional[int], Opt(help="DataLoader workers. (default: 0 on CPU, up to 8 on CUDA)")] = None,
    resume: Annotated[bool, Opt(help="Continue an interrupted run from its last checkpoint.")] = False,
    overwrite: Annotated[bool, Opt(help="Replace an existing run of this source.")] = False,
) -> None:
    """Fine-tune one classifier for SOURCE; save the adapter, checkpoints, metrics and curves."""
    with reported():
        require_training_extra("train")
    from gi_deploy.training.config import TrainConfig
    from gi_deploy.training.trainer import train

    lora = {k: v for k, v in (("r", lora_r), ("alpha", lora_alpha), ("dropout", lora_dropout),
                              ("dropout_position", lora_dropout_position)) if v is not None}
    colora = {k: v for k, v in (("merge_every", colora_merge_every), ("min_kernel", colora_min_kernel),
                                ("forward_mode", colora_forward),
                                ("targets", [t.strip() for t in colora_targets.split(",") if t.strip()]
                                 if colora_targets is not None else None)) if v is not None}
    flags = dict(source=source, data_dir=data_dir, method=method.value if method else None, model=model,
                 pretrained=pretrained, weights=weights, epochs=epochs, batch_size=batch_size, lr=lr,
                 weight_decay=weight_decay, scheduler=scheduler, img_size=img_size, resize=resize, crop_pct=crop_pct,
                 hflip=hflip, vflip=vflip, rotation_degrees=rotation, color_jitter=color_jitter, balance=balance,
                 label_fraction=label_fraction, split=split, patience=patience, seed=seed, lora=lora or None,
                 colora=colora or None,
                 out_dir=out_dir, device=device.value if device else None, amp=amp, channels_last=channels_last,
                 compile=compile, num_workers=num_workers, resume=resume, overwrite=overwrite)
    with reported():
        cfg = TrainConfig.from_layers(*_train_layers(config, flags, resume, out_dir, source))
        _print_config(cfg)
        with TrainProgress(source) as progress:
            result = train(cfg, report=progress)
    rows = {"val (best epoch %d)" % result.best_epoch: result.best_val}
    if result.test:
        rows["test"] = result.test
    out.print(metrics_table(f"{source} ({cfg.method})", rows))
    out.print(f"saved {result.run_dir} in {result.seconds:.0f}s (curves.png, metrics.jsonl, splits/)")


@app.command("sources")
def sources_cmd() -> None:
    """List the built-in data sources: classes, split and the expected folder layout."""
    from gi_deploy.training.data import EXPECTED_LAYOUT
    from gi_deploy.training.sources import SOURCES

    for spec in SOURCES.values():
        out.print(f"{spec.name}: {spec.title}", style="bold", soft_wrap=True)
        out.print(f"  {len(spec.classes)} classes: {', '.join(spec.classes)}", soft_wrap=True)
        out.print(f"  left out: {', '.join(spec.excluded)}", soft_wrap=True)
        out.print(f"  split: {spec.split}", soft_wrap=True)
        out.print(f"  layout:\n{spec.layout}\n", soft_wrap=True)
    out.print("any other name: an ImageFolder tree", style="bold", soft_wrap=True)
    out.print("  " + EXPECTED_LAYOUT.replace("\n", "\n  "), soft_wrap=True)


@app.command("compare")
def compare_cmd(
    source: Annotated[str, typer.Argument(help="Source to compare methods on (as for `train`).")],
    data_dir: Annotated[Optional[Path], Opt(help="The dataset folder.")] = None,
    methods: Annotated[str, Opt(help="Comma-separated, from lora,full,linear,colora,lora+colora.")] = "lora,full,linear",
    label_fractions: Annotated[str, Opt(help="Comma-separated shares of the labels, e.g. 0.01,0.1,1.0.")] = "1.0",
    config: Annotated[Optional[Path], Opt(help="YAML or TOML file of training settings (as for `train`).")] = None,
    model: Annotated[Optional[str], Opt(help="timm model name. (default: convnextv2_base)")] = None,
    pretrained: Annotated[Optional[bool], Opt("--pretrained/--no-pretrained")] = None,
    weights: Annotated[Optional[Path], Opt(help="Local base checkpoint.")] = None,
    epochs: Annotated[Optional[int], Opt()] = None,
    batch_size: Annotated[Optional[int], Opt()] = None,
    lr: Annotated[Optional[float], Opt()] = None,
    img_size: Annotated[Optional[int], Opt()] = None,
    seed: Annotated[Optional[int], Opt()] = None,
    out_dir: Annotated[Optional[Path], Opt("--out", help="Runs folder; the grid goes to OUT/SOURCE-compare.")] = None,
    device: Annotated[Optional[Device], Opt()] = None,
    overwrite: Annotated[bool, Opt(help="Retrain cells that already finished.")] = False,
) -> None:
    """Train every method x label fraction on SOURCE and write one table (CSV + Markdown)."""
    with reported():
        require_training_extra("compare")
    from gi_deploy.training.compare import compare
    from gi_deploy.training.config import TrainConfig

    flags = dict(source=source, data_dir=data_dir, model=model, pretrained=pretrained, weights=weights,
                 epochs=epochs, batch_size=batch_size, lr=lr, img_size=img_size, seed=seed, out_dir=out_dir,
                 device=device.value if device else None, overwrite=overwrite)
    with reported():
        try:
            fractions = [float(f) for f in label_fractions.split(",") if f.strip()]
        except ValueError as e:
            raise ConfigError(f"--label-fractions {label_fractions!r}: {e}") from None
        base = TrainConfig.from_layers(*_train_layers(config, flags, False, out_dir, source))
        _print_config(base)
        with TrainProgress(source) as progress:
            result = compare(base, [m.strip() for m in methods.split(",") if m.strip()], fractions, report=progress)
    table = Table(title=f"{source}: methods x label fractions")
    for col in ("method", "labels", "Acc", "F1 (w)", "MCC", "trainable", "artifact MB", "s/epoch", "peak MiB"):
        table.add_column(col, justify="left" if col == "method" else "right", no_wrap=True)
    for r in result.rows:
        table.add_row(r["method"], f"{100 * r['label_fraction']:g}%", *(f"{100 * r[k]:.2f}" for k in
                      ("accuracy", "f1_weighted", "mcc")), f"{r['trainable_params']:,}",
                      f"{r['artifact_bytes'] / 1e6:.2f}", f"{r['epoch_seconds']:.1f}",
                      f"{r['peak_mem_mib']:.0f}" if r["peak_mem_mib"] is not None else "n/a")
    out.print(table)
    out.print(f"table -> {result.csv_path}, {result.markdown_path}")


class Exporter(str, Enum):
    torchscript = "torchscript"
    dynamo = "dynamo"


def _size(n: int) -> str:
    return f"{n / 1e6:.1f} MB" if n >= 1e5 else f"{n / 1e3:.1f} kB"


def _gate_line(v: dict) -> str:
    parts = []
    if "merge" in v:
        parts.append(f"merge max|Δlogit| {v['merge']['max_abs_logit_diff']:.1e}")
    f = v["onnx_fp32"]
    parts.append(f"fp32 ONNX max|Δlogit| {f['max_abs_logit_diff']:.1e}, top-1 {f['top1_agreement']:.0%}")
    if "onnx_fp16" in v:
        h, e = v["onnx_fp16"], v["fp16_emulated"]
        parts.append(f"fp16 top-1 {h['top1_agreement']:.1%} max|Δprob| {h['max_abs_prob_diff']:.1e} "
                     f"(true fp16: top-1 {e['top1_agreement']:.0%}, max|Δprob| {e['max_abs_prob_diff']:.1e})")
    if "int8" in v:
        i = v["int8"]
        parts.append(f"int8 top-1 {i['top1_agreement']:.1%} on {i['n']} val images, accuracy "
                     f"{i['accuracy_fp32']:.1%} -> {i['accuracy_int8']:.1%}")
    if "engine" in v:
        parts.append(f"engine top-1 {v['engine']['top1_agreement']:.1%} max|Δprob| {v['engine']['max_abs_prob_diff']:.1e}")
    return "; ".join(parts)


def _list_bundles(deploy_dir: Path) -> None:
    from gi_deploy.runtime.bundle import bundle_summary, list_bundles

    names = list_bundles(deploy_dir)
    if not names:
        raise BundleError(f"no bundles under {deploy_dir}; run `gi-deploy export` first")
    table = Table(title=f"Bundles in {deploy_dir}")
    for col, justify in (("source", "left"), ("file", "left"), ("size", "right"), ("gate", "left"),
                         ("result", "left")):
        table.add_column(col, justify=justify, overflow="fold")
    for name in names:
        b = bundle_summary(deploy_dir / name)
        heading = [b["source"], f"{b['model']} ({b['method']})", b["created"][:16].replace("T", " ")]
        for i, (file, size, gate, result) in enumerate(b["rows"]):
            table.add_row(heading[i] if i < len(heading) else "", file, _size(size) if size is not None else "",
                          gate, result)
        table.add_section()
    out.print(table)


@app.command("export")
def export_cmd(
    sources: Annotated[Optional[list[str]], typer.Argument(help="Sources to export (default: every trained run).")] = None,
    merge: Annotated[bool, Opt(help="Merge the adapters into the backbone (plain-backbone cost).")] = True,
    fp16: Annotated[bool, Opt("--fp16/--no-fp16", help="Also write model.fp16.onnx (fp32 LayerNorm/GRN islands), "
                                                       "gated in onnxruntime and in true fp16 arithmetic. (default: on)")] = True,
    int8: Annotated[bool, Opt(help="Also write model.int8.onnx (onnxruntime static QDQ), calibrated on the "
                                   "training split, gated on the validation split.")] = False,
    calib_images: Annotated[int, Opt(help="INT8: training images to calibrate on. (default: 200)")] = 200,
    int8_eval_images: Annotated[int, Opt(help="INT8: validation images scored by fp32 and int8. (default: 500)")] = 500,
    int8_min_agreement: Annotated[float, Opt(help="INT8 gate: least top-1 agreement with fp32. (default: 0.98)")] = 0.98,
    int8_max_drop: Annotated[float, Opt(help="INT8 gate: largest validation accuracy drop, as a fraction. "
                                             "(default: 0.01)")] = 0.01,
    engine: Annotated[bool, Opt(help="Build a TensorRT engine from the fp16 ONNX (needs TensorRT 10/11 and a GPU; "
                                     "otherwise writes build_engine.sh).")] = False,
    max_batch: Annotated[int, Opt(help="TensorRT profile: batch 1 to this. (default: 32)")] = 32,
    exporter: Annotated[Exporter, Opt(help="torch ONNX exporter: torchscript (legacy, verified default) | dynamo.")
                        ] = Exporter.torchscript,
    force: Annotated[bool, Opt(help="Re-export even when the bundle is up to date.")] = False,
    list_: Annotated[bool, Opt("--list", help="Show the bundles under --out (files, gates, footprint) and exit.")] = False,
    runs_dir: Annotated[Path, Opt("--runs", help="Runs folder.")] = Path("runs"),
    deploy_dir: Annotated[Path, Opt("--out", help="Bundles folder.")] = Path("deploy"),
) -> None:
    """Merge each run's adapter, export verified ONNX (fp32, fp16, int8) and TensorRT bundles."""
    if list_:
        with reported():
            _list_bundles(deploy_dir)
        return
    with reported():
        require_training_extra("export")
    from gi_deploy.errors import ExportFailed
    from gi_deploy.export.bundle import ExportConfig, ExportOptions, export_runs

    with reported():
        options = ExportOptions(merge=merge, fp16=fp16, int8=int8, calib_images=calib_images,
                                int8_eval_images=int8_eval_images, int8_min_top1=int8_min_agreement,
                                int8_max_accuracy_drop=int8_max_drop, engine=engine, max_batch=max_batch,
                                exporter=exporter.value)
        cfg = ExportConfig(runs_dir=runs_dir, deploy_dir=deploy_dir, sources=sources or [], options=options,
                           force=force)
        try:
            results, failure = export_runs(cfg), None
        except ExportFailed as e:  # report the sources that did export, then the failures
            results, failure = e.exported, e
    for name, r in results.items():
        b = r.manifest
        if r.skipped:
            out.print(f"{name}: unchanged since {b['created']} ({r.bundle_dir}); --force to re-export", soft_wrap=True)
            continue
        out.print(f"{name}: {r.bundle_dir} ({b['model']['parameters']:,} params, {sum(b['timings_s'].values()):.1f}s): "
                  + _gate_line(b["verification"]), soft_wrap=True)
        fp = b["footprint"]
        out.print(f"  footprint: {fp['trained_artifact']} artifact {_size(fp['artifact_bytes'])} vs merged model "
                  f"{_size(fp['merged_model_bytes'])} ({fp['artifact_vs_merged_model']:.1%})", soft_wrap=True)
        for note in r.notes:
            out.print(f"  {note}", soft_wrap=True)
    adapted = {n: r.manifest["footprint"] for n, r in results.items() if r.manifest["model"]["merged"]}
    if len(adapted) > 1:  # the storage argument: one base plus small adapters vs a full model per source
        artifacts = sum(f["artifact_bytes"] for f in adapted.values())
        merged = sum(f["merged_model_bytes"] for f in adapted.values())
        base = max(f["merged_model_bytes"] for f in adapted.values())  # a plain backbone costs what a merged one does
        out.print(f"storage for {len(adapted)} adapted sources ({', '.join(adapted)}): one base {_size(base)} + "
                  f"adapters {_size(artifacts)} = {_size(base + artifacts)}, vs {_size(merged)} as merged models",
                  soft_wrap=True)
    if failure is not None:
        with reported():
            raise failure


class Backend(str, Enum):
    auto = "auto"
    onnxruntime = "onnxruntime"
    tensorrt = "tensorrt"
    torch = "torch"


@contextmanager
def image_progress(label: str):
    """A rich bar for a folder run: images done of total, images/s, time left. Yields the
    ``progress(done, total)`` callback the library calls after every batch."""
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TaskProgressColumn, TextColumn,
                               TimeElapsedColumn, TimeRemainingColumn)

    bar = Progress(TextColumn(label, markup=False), BarColumn(), MofNCompleteColumn(), TaskProgressColumn(),
                   TextColumn("{task.fields[rate]}", markup=False), TimeElapsedColumn(), TimeRemainingColumn(),
                   console=err, transient=True)
    task, started = None, [0.0]

    def update(done: int, total: int) -> None:
        import time

        nonlocal task
        if task is None:
            task = bar.add_task(label, total=total, rate="")
            started[0] = time.perf_counter()
        elapsed = time.perf_counter() - started[0]
        bar.update(task, completed=done, total=total, rate=f"{done / elapsed:.1f} img/s" if elapsed > 0 else "")

    with bar:
        yield update


def _print_scores(title: str, scores: dict, n_wrong: int = 5) -> None:
    """The metrics table of every scored source, the files written, and the worst mistakes."""
    scored = {s: sc for s, sc in scores.items() if sc.metrics}
    if not scored:
        return
    out.print(metrics_table(title, {s: sc.metrics for s, sc in scored.items()}))
    for s, sc in scored.items():
        m = sc.metrics
        auc = f", ROC AUC macro {m['roc_auc_macro']:.4f}" if m.get("roc_auc_macro") is not None else ""
        out.print(f"{s}: specificity macro {m['specificity_macro']:.4f}{auc}; files: "
                  + ", ".join(str(p) for p in sc.files.values()), soft_wrap=True)
        for w in m.get("most_confidently_wrong", [])[:n_wrong]:
            out.print(f"  wrong at {w['confidence']:.3f}: {w['path']} (true {w['true_label']}, predicted "
                      f"{w['predicted']})", soft_wrap=True)


def _raise_interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


@contextmanager
def _interrupted_keeps(out_csv: Path):
    """Ctrl-C or SIGTERM (kill, timeout, a batch scheduler) during infer: stop the same way, so
    the decode workers are shut down, and say where the finished rows are and how to go on."""
    previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        yield
    except KeyboardInterrupt:
        err.print(f"interrupted: the rows written so far are in {out_csv}; run the same command with --resume to "
                  "classify the rest", style="yellow", soft_wrap=True)
        raise typer.Exit(code=130) from None
    finally:
        signal.signal(signal.SIGTERM, previous)


@app.command("infer")
def infer_cmd(
    inputs: Annotated[str, typer.Argument(metavar="INPUT", help="A folder (searched recursively), an image, a glob "
                                                                "('scans/**/*.jpg') or a .txt/.csv list of paths.")],
    source: Annotated[Optional[list[str]], typer.Option(
        help="Bundle(s) to run, repeatable, or 'all'; each image gets one row per source (default: the only "
             "bundle).")] = None,
    out_csv: Annotated[Path, typer.Option("--out", help="Predictions CSV.")] = Path("predictions.csv"),
    deploy_dir: Annotated[Path, typer.Option("--deploy", help="Bundles folder.")] = Path("deploy"),
    backend: Annotated[Backend, typer.Option(help="auto: the fastest available (TensorRT engine, else "
                                                  "onnxruntime on its best provider); torch: the merged model "
                                                  "rebuilt from its training run, for debugging.")] = Backend.auto,
    precision: Annotated[Precision, typer.Option()] = Precision.fp32,
    device: Annotated[Device, typer.Option(help="auto: TensorRT -> CUDA -> CPU, whichever is installed.")
                      ] = Device.auto,
    batch_size: Annotated[int, typer.Option()] = 32,
    workers: Annotated[Optional[int], typer.Option(help="Decoding processes (0: decode in the main process). "
                                                        "(default: up to 4)")] = None,
    threads: Annotated[Optional[int], typer.Option(help="The model's CPU threads. (default: every core)")] = None,
    labels: Annotated[Optional[Path], typer.Option(help="CSV of (path, label): the true class of each image.")] = None,
    top_k: Annotated[int, typer.Option(help="Classes and probabilities per row.")] = 3,
    resume: Annotated[bool, typer.Option(help="Keep the rows already in --out (a killed run's) and classify only "
                                              "the rest.")] = False,
    strict: Annotated[bool, typer.Option(help="Stop at the first unreadable file instead of writing an error "
                                              "row for it.")] = False,
    explain_wrong: Annotated[int, typer.Option(help="Write Grad-CAM heatmaps of the N most confidently wrong "
                                                    "images (needs the training extra and the bundle's run).")] = 0,
) -> None:
    """Classify every image of INPUT with each selected source; score them when labels are known
    (class-named sub-folders, --labels, or a label column in the list)."""
    from gi_deploy.runtime.infer import InferConfig, infer_folder

    with reported(), _interrupted_keeps(out_csv):
        cfg = InferConfig(inputs=inputs, labels=labels, deploy_dir=deploy_dir, sources=source, out_csv=out_csv,
                          batch_size=batch_size, backend=backend.value, precision=precision.value,
                          device=device.value, top_k=top_k, resume=resume, strict=strict, threads=threads,
                          **({} if workers is None else {"workers": workers}))
        with image_progress("classifying") as progress:
            r = infer_folder(cfg, progress)
    for s, run in r.sources.items():
        for note in run.notes:  # auto's choice is news; anything else (a provider fallback) must be loud
            if note.startswith("auto:"):
                out.print(f"{s}: {note}", soft_wrap=True)
            else:
                err.print(f"warning: {s}: {note}", style="bold yellow", soft_wrap=True)
        out.print(f"{s}: {run.n_rows} rows, {run.n_errors} unreadable, {run.n_unlabelled} unlabelled; on "
                  f"{run.backend}", soft_wrap=True)
    out.print(f"{r.n_images} images -> {r.csv_path}: {r.n_classified} classified in {r.seconds:.1f}s "
              f"({r.images_per_second:.1f} img/s, {len(r.sources)} source(s))"
              + (f", {r.n_resumed} rows kept from the interrupted run" if r.n_resumed else ""), soft_wrap=True)
    _print_scores(f"scored on {inputs}", r.sources)
    if r.n_errors:
        err.print(f"{r.n_errors} file(s) could not be read; see the error column of {r.csv_path}", style="yellow")
    if explain_wrong > 0:
        with reported():
            require_training_extra("infer --explain-wrong")
            from gi_deploy.explain import explain_wrong as explain_wrong_images

            for s in r.sources:
                manifest = read_json(deploy_dir / s / "manifest.json", "bundle manifest")
                out_dir = out_csv.with_name(out_csv.stem + ("_wrong" if len(r.sources) == 1 else f"_{s}_wrong"))
                e = explain_wrong_images(out_csv, r.root, manifest, explain_wrong, out_dir)
                if e is None:
                    out.print(f"{s}: no labelled image was wrong: no heatmaps to write")
                else:
                    out.print(f"{s}: heatmaps of the {len(e.images)} most confidently wrong image(s) -> {out_dir}",
                              soft_wrap=True)


def _parse_tests(tests: list[str]) -> dict[str, str]:
    parsed = {}
    for t in tests:
        name, sep, where = t.partition("=")
        if not sep or not name or not where:
            raise ConfigError(f"--test {t!r}: expected SOURCE=FOLDER (or SOURCE=LIST.csv)")
        parsed[name] = where
    return parsed


@app.command("evaluate")
def evaluate_cmd(
    predictions: Annotated[Optional[Path], typer.Argument(help="A predictions CSV written by `gi-deploy infer`.")
                           ] = None,
    cross: Annotated[bool, typer.Option("--cross", help="Run every source's model on every source's test set "
                                                        "(the seed paper's Table 1).")] = False,
    deploy_dir: Annotated[Path, typer.Option("--deploy", help="Bundles folder (--cross).")] = Path("deploy"),
    test: Annotated[Optional[list[str]], typer.Option(
        help="SOURCE=FOLDER or SOURCE=LIST.csv, repeatable (--cross; default: each bundle's own test split).")
                    ] = None,
    class_map: Annotated[Optional[Path], typer.Option(help="JSON mapping each source's class names to shared "
                                                           "names (--cross).")] = None,
    out_dir: Annotated[Optional[Path], typer.Option(
        "--out", help="Where the report files go (default: beside the CSV); with --cross, the matrices and "
                      "predictions (default: cross/).")] = None,
    n_wrong: Annotated[int, typer.Option(help="Most confidently wrong images to list.")] = 20,
) -> None:
    """Re-score a predictions CSV without running a model (metrics.json, confusion matrices, ROC
    curves, the most confidently wrong images), or with --cross build the cross-source matrix."""
    if cross:
        from gi_deploy.runtime.cross import cross_evaluate

        if predictions is not None:
            err.print(f"error: --cross runs the models itself; drop {predictions}", style="red")
            raise typer.Exit(code=2)
        with reported():
            r = cross_evaluate(deploy_dir, out_dir or Path("cross"), _parse_tests(test or []) or None, class_map)
        for attr, title in (("accuracy", "Accuracy (%) of each source's model (rows) on each source's test set "
                                          "(columns), over the classes the model has"),
                            ("accuracy_all", "The same over every test image (classes the model lacks count as "
                                             "wrong)")):
            table = Table(title=title)
            table.add_column("model")
            for t in r.tests:
                table.add_column(f"{t} test", justify="right")
            for m in r.models:
                cells = [r.cells[(m, t)] for t in r.tests]
                table.add_row(m, *("n/a" if getattr(c, attr) is None else
                                   f"{100 * getattr(c, attr):.2f} (n={c.n if attr == 'accuracy' else c.n + c.n_skipped})"
                                   for c in cells))
            out.print(table)
        out.print(f"matrices -> {r.files['matrix']}, {r.files['matrix_all']}; details -> {r.files['json']}",
                  soft_wrap=True)
        return
    if predictions is None:
        err.print("error: give a predictions CSV, or --cross", style="red")
        raise typer.Exit(code=2)
    if test or class_map:
        err.print("error: --test and --class-map belong to --cross", style="red")
        raise typer.Exit(code=2)
    from gi_deploy.runtime.evaluate import score_predictions

    prefix = None
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        prefix = out_dir / predictions.stem
    with reported():
        scores = score_predictions(predictions, n_wrong=n_wrong, out_prefix=prefix)
    for s, sc in scores.items():
        out.print(f"{s}: {sc.n_rows} rows, {sc.n_errors} unreadable, {sc.n_unlabelled} unlabelled")
    if not any(sc.metrics for sc in scores.values()):
        err.print(f"no labelled rows in {predictions}: nothing to score", style="yellow")
        raise typer.Exit(code=1)
    _print_scores(f"scored from {predictions}", scores)


@app.command("benchmark")
def benchmark_cmd(
    source: Annotated[Optional[str], typer.Option(help="Bundle to measure (default: the only one).")] = None,
    images: Annotated[Optional[Path], typer.Option(help="Folder of images (default: synthetic 720x576 frames).")
                      ] = None,
    deploy_dir: Annotated[Path, typer.Option("--deploy", help="Bundles folder.")] = Path("deploy"),
    n_images: Annotated[int, typer.Option(help="Images per throughput run (the folder is cycled).")] = 256,
    batch_size: Annotated[int, typer.Option()] = 32,
    workers: Annotated[Optional[int], typer.Option(help="Decoding processes. (default: up to 4)")] = None,
    threads: Annotated[Optional[int], typer.Option(help="The model's CPU threads. (default: every core)")] = None,
    device: Annotated[Device, typer.Option()] = Device.auto,
    json_out: Annotated[Optional[Path], typer.Option("--json", help="Also write the table as JSON.")] = None,
) -> None:
    """One table: PyTorch eager, onnxruntime fp32/fp16/int8 and TensorRT on the same images and
    batch; images/s end to end and model-only, latency p50/p95 at batch 1, ratios, model size."""
    from dataclasses import asdict

    from gi_deploy._io import write_json
    from gi_deploy.runtime.benchmark import BenchmarkConfig, goals, run_benchmark

    with reported():
        cfg = BenchmarkConfig(deploy_dir=deploy_dir, source=source, images=images, n_images=n_images,
                              batch_size=batch_size, threads=threads, device=device.value,
                              **({} if workers is None else {"workers": workers}))
        r = run_benchmark(cfg, say=lambda m: err.print(m, style="dim"))
    table = Table(title=f"{r.source}: {r.model} at {r.input_size[1]}x{r.input_size[0]}, {r.n_images} images, "
                        f"batch {r.batch_size}, {r.workers} decode workers, {r.machine}")
    for col in ("backend", "e2e img/s", "model img/s", "p50 ms", "p95 ms", "e2e vs eager", "model vs eager",
                "MB"):
        table.add_column(col, justify="left" if col == "backend" else "right")
    skipped = []
    for row in r.rows:
        if row.status != "ok":
            skipped.append(f"{row.name}: {row.status}")
            continue
        ratio = lambda v: "" if v is None else f"{v:.2f}x"  # noqa: E731
        table.add_row(row.name, f"{row.end_to_end:.1f}", f"{row.model_only:.1f}", f"{row.p50_ms:.1f}",
                      f"{row.p95_ms:.1f}", ratio(row.e2e_vs_eager), ratio(row.model_vs_eager),
                      f"{row.model_bytes / 1e6:.1f}")
    out.print(table)
    out.print("e2e: the infer pipeline (decode workers + model); model: pre-decoded batches; p50/p95: batch 1")
    for row in r.rows:
        if row.status == "ok":
            out.print(f"{row.name}: {row.detail}", soft_wrap=True)
    for line in skipped:
        out.print(line, soft_wrap=True)
    for what, value, target in goals(r):
        verdict = "not measured" if value is None else ("met" if value >= target else "NOT met")
        out.print(f"goal {what} >= {target}x: " + ("n/a" if value is None else f"{value:.2f}x") + f" ({verdict})")
    if json_out:
        write_json(json_out, asdict(r))
        out.print(f"-> {json_out}")


class SaliencyMethod(str, Enum):
    gradcam = "gradcam"
    gradcam_pp = "gradcam++"
    smoothgrad = "smoothgrad"


@app.command("explain")
def explain_cmd(
    path: Annotated[Path, typer.Argument(help="An image or a folder of images (searched recursively).")],
    source: Annotated[Optional[list[str]], Opt(help="Source(s) to explain, side by side; repeat the option. "
                                                    "(default: every trained run)")] = None,
    method: Annotated[SaliencyMethod, Opt(help="gradcam | gradcam++ (grad-cam package) | smoothgrad.")
                      ] = SaliencyMethod.gradcam,
    target: Annotated[str, Opt(help="Explain the predicted class, or this class name.")] = "predicted",
    layer: Annotated[Optional[str], Opt(help="Target layer for Grad-CAM (default: the backbone's last feature "
                                             "map, e.g. stages.3, layer4).")] = None,
    sheet_rows: Annotated[int, Opt(help="Images on the contact sheet, at most 48. (default: 24)")] = 24,
    limit: Annotated[Optional[int], Opt(help="Only the first N images of the folder (sorted).")] = None,
    runs_dir: Annotated[Path, Opt("--runs", help="Runs folder.")] = Path("runs"),
    out_dir: Annotated[Path, Opt("--out", help="Where the PNGs go.")] = Path("explain"),
) -> None:
    """Saliency heatmaps of each source's model: one PNG per image and a contact sheet."""
    with reported():
        require_training_extra("explain")
    from gi_deploy.explain import ExplainConfig, explain_path

    from rich.progress import Progress

    with reported(), Progress(console=out, transient=True) as bar:
        task = bar.add_task("explain", total=None)
        r = explain_path(ExplainConfig(path=path, runs_dir=runs_dir, sources=source or [], method=method.value,
                                       target=target, layer=layer, out_dir=out_dir, sheet_rows=sheet_rows,
                                       limit=limit),
                         progress=lambda i, n: bar.update(task, completed=i, total=n))
    out.print(f"{len(r.images)} image(s), {len(r.sources)} source(s) side by side ({', '.join(r.sources)}), "
              f"{method.value}: {out_dir}/ ; contact sheet {r.sheet}", soft_wrap=True)
    if r.errors:
        err.print(f"{len(r.errors)} image(s) could not be read: {r.errors[0]}", style="yellow", soft_wrap=True)


@app.command("demo")
def demo_cmd(
    out_dir: Annotated[Path, typer.Option("--out", help="Where data, runs, bundles and predictions go.")] = Path("gi-deploy-demo"),
) -> None:
    """Synthetic two-source demo: base model, one LoRA per source, export, infer, metrics."""
    with reported():
        require_training_extra("demo")
    from gi_deploy.demo.pipeline import BASE, DemoConfig, run_demo

    with reported():
        r = run_demo(DemoConfig(out_dir=out_dir), say=lambda s: out.print(f"demo: {s}", style="bold"))
    sources = [s for s in r.scores if s != BASE]
    cross = Table(title="Accuracy of each model on each source's test set")
    cross.add_column("model")
    for s in sources:
        cross.add_column(f"{s} test", justify="right")
    for model, by_source in r.scores.items():
        label = f"{model} (pooled, full FT)" if model == BASE else f"{model} LoRA"
        cross.add_row(label, *(f"{100 * by_source[s]['accuracy']:.2f}" for s in sources))
    out.print(cross)
    rows = {}
    for s in sources:
        rows[f"{s}: base"] = r.scores[BASE][s]
        rows[f"{s}: LoRA"] = r.scores[s][s]
    out.print(metrics_table("Per-source test metrics (%, weighted averages as in the paper)", rows))
    for s in sources:
        trainable, total = r.params[s]
        out.print(f"{s} adapter: {trainable:,} trainable of {total:,}; merged ONNX parity "
                  f"{r.verification[s]['onnx_fp32']['max_abs_logit_diff']:.1e}")
    out.print(f"synthetic data: shows the pipeline, not clinical accuracy. {r.seconds:.0f}s, outputs in {r.out_dir}")


if __name__ == "__main__":
    app()
