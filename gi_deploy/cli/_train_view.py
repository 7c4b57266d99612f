"""What ``train`` and ``compare`` show while they run and when they finish."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from gi_deploy.cli._display import err


class TrainProgress:
    """Rich progress for training events: a summary at start, a live bar per epoch (batch, loss,
    img/s) and one line per finished epoch."""

    def __init__(self, source: str, console: Console):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.source = source
        self.progress = Progress(
            TextColumn("{task.description}", markup=False),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[info]}", markup=False),
            TimeRemainingColumn(),
            console=console,
            transient=True,
        )
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
            say(
                f"{self.source}: {len(d['classes'])} classes ({d['layout']}), splits {d['counts']}, device "
                f"{d['device']} (amp {d['amp']}, channels-last {d['channels_last']}, workers {d['num_workers']})"
            )
            if d.get("compile"):
                say(
                    f"torch.compile{' + fused AdamW' if d.get('fused_adamw') else ''}: epoch 1's first step compiles "
                    f"(or loads the kernels cached in {d.get('compile_cache')}); its time is printed with the epoch"
                )
            say(f"base weights: {d['base_weights']}, licence {d['license']}")
            say(f"trainable params: {d['trainable']:,} / {d['total']:,} ({100 * d['trainable'] / d['total']:.2f}%)")
            for line in d.get("adapter_lines", []):  # each adapter kind's own summary (its summary_line hook)
                say(line, soft_wrap=True)
            if d.get("excluded"):
                say(
                    "left out (not in the paper's classes): "
                    + ", ".join(f"{k} ({v})" for k, v in d["excluded"].items())
                )
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
            merged = any(v for k, v in d.items() if k.endswith("_merged"))  # <kind>_merged: an epoch_end hook merged
            peak = f"  peak {d['peak_mem_mib']:.0f} MiB" if d.get("peak_mem_mib") is not None else ""
            steady = (
                f", steady {d['steady_img_per_s']:.0f} img/s after a {d['first_step_s']:.1f}s first step"
                if d.get("steady_img_per_s")
                else ""
            )
            say(
                f"epoch {d['epoch']:3d}  loss {d['train_loss']:.4f}  train acc {100 * d['train_accuracy']:.2f}"
                f"  val acc {100 * d['val_accuracy']:.2f}  {d['seconds']:.1f}s ({d['img_per_s']:.0f} img/s{steady})"
                f"{peak}"
                f"{'  merged' if merged else ''}{'  *best' if d['best'] else ''}"
            )
        elif event == "cell":
            say(
                f"== {d['method']} at {100 * d['label_fraction']:g}% of the labels"
                + (" (finished earlier, reused)" if d["reused"] else "")
            )


def compare_table(source: str, rows: list[dict]) -> Table:
    """``gi-deploy compare``'s grid: one row per method x label fraction."""
    table = Table(title=f"{source}: methods x label fractions")
    for col in ("method", "labels", "Acc", "F1 (w)", "MCC", "trainable", "artifact MB", "s/epoch", "peak MiB"):
        table.add_column(col, justify="left" if col == "method" else "right", no_wrap=True)
    for r in rows:
        table.add_row(
            r["method"],
            f"{100 * r['label_fraction']:g}%",
            *(f"{100 * r[k]:.2f}" for k in ("accuracy", "f1_weighted", "mcc")),
            f"{r['trainable_params']:,}",
            f"{r['artifact_bytes'] / 1e6:.2f}",
            f"{r['epoch_seconds']:.1f}",
            f"{r['peak_mem_mib']:.0f}" if r["peak_mem_mib"] is not None else "n/a",
        )
    return table
