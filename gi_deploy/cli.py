"""Thin Typer commands: read options, build the stage's config, call one library function,
report. Library errors (GiDeployError) become one line on stderr and exit code 1.

torch is imported only inside the commands that need it, so ``gi-deploy infer`` runs on a
torch-free install."""

from __future__ import annotations

import logging
from contextlib import contextmanager
from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table

from gi_deploy._deps import require_training_extra
from gi_deploy.errors import GiDeployError

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Per-source LoRA classifiers for GI endoscopy: train, export, infer.")
# markup off: paths and messages may hold brackets ("gi-deploy[train]", "scan[2].jpg") that rich would
# swallow as markup; highlight off: no guessed colours on numbers in paths
out = Console(markup=False, highlight=False)
err = Console(stderr=True, markup=False, highlight=False)


class Method(str, Enum):
    lora = "lora"
    full = "full"


class Device(str, Enum):
    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"


class RuntimeDevice(str, Enum):
    cpu = "cpu"
    cuda = "cuda"


class Precision(str, Enum):
    fp32 = "fp32"
    fp16 = "fp16"


@contextmanager
def reported():
    """Turn library errors into one red line on stderr and exit code 1."""
    try:
        yield
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


@app.command("train")
def train_cmd(
    source: Annotated[str, typer.Argument(help="Source name; the run goes to OUT/SOURCE.")],
    data_dir: Annotated[Path, typer.Option(help="ImageFolder tree: <class>/ folders, or train/ val/ test/.")],
    method: Annotated[Method, typer.Option(help="lora: adapters on fc1/fc2 + new head; full: every weight.")] = Method.lora,
    model: Annotated[str, typer.Option(help="timm model name.")] = "convnextv2_base",
    pretrained: Annotated[bool, typer.Option(help="ImageNet weights from the Hugging Face hub.")] = True,
    weights: Annotated[Optional[Path], typer.Option(help="Local base checkpoint (.pth/.safetensors); overrides --pretrained.")] = None,
    epochs: Annotated[int, typer.Option(help="Maximum epochs.")] = 30,
    batch_size: Annotated[int, typer.Option()] = 32,
    lr: Annotated[float, typer.Option(help="AdamW learning rate.")] = 1e-4,
    img_size: Annotated[int, typer.Option(help="Input height and width in pixels.")] = 224,
    patience: Annotated[int, typer.Option(help="Early stopping: epochs without a val accuracy gain.")] = 5,
    seed: Annotated[int, typer.Option()] = 0,
    out_dir: Annotated[Path, typer.Option("--out", help="Runs folder.")] = Path("runs"),
    device: Annotated[Device, typer.Option()] = Device.auto,
    num_workers: Annotated[int, typer.Option(help="DataLoader worker processes.")] = 0,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing run of this source.")] = False,
) -> None:
    """Fine-tune one classifier for SOURCE; save the adapter and a run manifest."""
    with reported():
        require_training_extra("train")
    from gi_deploy.training.config import TrainConfig
    from gi_deploy.training.trainer import train

    def report(event: str, d: dict) -> None:
        if event == "start":
            out.print(f"{source}: {len(d['classes'])} classes, splits {d['counts']}, device {d['device']}, "
                      f"base {d['base_weights']}")
            out.print(f"trainable params: {d['trainable']:,} / {d['total']:,} ({100 * d['trainable'] / d['total']:.2f}%)")
        else:
            out.print(f"epoch {d['epoch']:3d}  loss {d['train_loss']:.4f}  val acc {100 * d['val_accuracy']:.2f}"
                      f"  {d['seconds']:.1f}s{'  *best' if d['best'] else ''}")

    with reported():
        cfg = TrainConfig(source=source, data_dir=data_dir, method=method.value, model=model, pretrained=pretrained,
                          weights=weights, epochs=epochs, batch_size=batch_size, lr=lr, img_size=img_size,
                          patience=patience, seed=seed, out_dir=out_dir, device=device.value, num_workers=num_workers,
                          overwrite=overwrite)
        result = train(cfg, report=report)
    rows = {"val (best epoch %d)" % result.best_epoch: result.best_val}
    if result.test:
        rows["test"] = result.test
    out.print(metrics_table(f"{source} ({method.value})", rows))
    out.print(f"saved {result.run_dir} in {result.seconds:.0f}s")


@app.command("export")
def export_cmd(
    sources: Annotated[Optional[list[str]], typer.Argument(help="Sources to export (default: every trained run).")] = None,
    merge: Annotated[bool, typer.Option(help="Merge W + BA into the backbone (plain-backbone cost).")] = True,
    fp16: Annotated[bool, typer.Option(help="Also write a verified fp16 ONNX (fp32 LayerNorm/GRN islands).")] = False,
    runs_dir: Annotated[Path, typer.Option("--runs", help="Runs folder.")] = Path("runs"),
    deploy_dir: Annotated[Path, typer.Option("--out", help="Bundles folder.")] = Path("deploy"),
) -> None:
    """Merge each run's adapter, export ONNX, verify it against the un-merged model."""
    with reported():
        require_training_extra("export")
    from gi_deploy.export.bundle import ExportConfig, export_runs

    with reported():
        bundles = export_runs(ExportConfig(runs_dir=runs_dir, deploy_dir=deploy_dir, sources=sources or [],
                                           merge=merge, fp16=fp16))
    for name, b in bundles.items():
        v = b["verification"]
        parts = [f"{k} max|Δlogit| {v[k]['max_abs_logit_diff']:.2e}" for k in ("merge", "onnx_fp32") if k in v]
        if "onnx_fp16" in v:
            parts.append(f"fp16 top-1 agreement {100 * v['onnx_fp16']['top1_agreement']:.1f}%")
        out.print(f"{name}: {deploy_dir / name} ({b['model']['parameters']:,} params) " + ", ".join(parts))


@app.command("infer")
def infer_cmd(
    folder: Annotated[Path, typer.Argument(help="Folder of images (searched recursively).")],
    source: Annotated[Optional[str], typer.Option(help="Bundle to use (default: the only one).")] = None,
    out_csv: Annotated[Path, typer.Option("--out", help="Predictions CSV.")] = Path("predictions.csv"),
    deploy_dir: Annotated[Path, typer.Option("--deploy", help="Bundles folder.")] = Path("deploy"),
    batch_size: Annotated[int, typer.Option()] = 32,
    precision: Annotated[Precision, typer.Option()] = Precision.fp32,
    device: Annotated[RuntimeDevice, typer.Option(help="onnxruntime execution provider.")] = RuntimeDevice.cpu,
) -> None:
    """Classify every image under FOLDER; score them when sub-folders are class names."""
    from gi_deploy.runtime.infer import InferConfig, infer_folder

    with reported():
        r = infer_folder(InferConfig(folder=folder, deploy_dir=deploy_dir, source=source, out_csv=out_csv,
                                     batch_size=batch_size, precision=precision.value, device=device.value))
    out.print(f"{r.source}: {r.n_images} images, {r.n_errors} unreadable, on {r.provider} -> {r.csv_path}")
    if r.metrics:
        out.print(metrics_table(f"{r.source} on {folder}", {folder.name or str(folder): r.metrics}))
        out.print(f"metrics -> {r.metrics_path}")
    if r.n_errors:
        err.print(f"{r.n_errors} file(s) could not be read; see the error column of {r.csv_path}", style="yellow")


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
