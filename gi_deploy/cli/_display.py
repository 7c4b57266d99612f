"""What the commands share: the consoles, turning library errors into one line and an exit code,
options whose help and defaults come from the library's config fields, progress bars and tables."""

from __future__ import annotations

import dataclasses
import errno
import functools
import inspect
import logging
import signal
import time
import typing
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.console import Console
from rich.table import Table
from typer.core import TyperCommand, TyperGroup

from gi_deploy.core.fields import help_of
from gi_deploy.errors import GiDeployError, TrainingInterrupted

# markup off: paths and messages may hold brackets ("gi-deploy[train]", "scan[2].jpg") that rich would
# swallow as markup; highlight off: no guessed colours on numbers in paths
out = Console(markup=False, highlight=False)
err = Console(stderr=True, markup=False, highlight=False)


def opt(cls: type, name: str, *flags: str, shown_default: bool = False, **kwargs: Any) -> Any:
    """A Typer option whose help is the config field's own (core/fields.py). With
    ``shown_default`` the help ends with the library's default: for options whose CLI default is
    None, meaning "not given" (a config file or a resumed run may set them)."""
    kwargs.setdefault("help", help_of(cls, name, default=shown_default))
    return typer.Option(*flags, **kwargs)


def arg(cls: type, name: str, **kwargs: Any) -> Any:
    return typer.Argument(help=help_of(cls, name, default=False), **kwargs)


def _sentences(text: str) -> str:
    """Help as written sentences: the lines of each paragraph of a docstring joined with spaces (rich
    keeps a docstring's line breaks in the command list, breaking sentences mid-line there), the
    paragraphs kept. A paragraph starting with click's no-rewrap marker ``\\b`` stays as it is."""
    paragraphs = inspect.cleandoc(text).split("\n\n")
    return "\n\n".join(
        p if p.startswith("\b") else " ".join(line.strip() for line in p.splitlines()) for p in paragraphs
    )


def _tidy_help(command: TyperCommand, ctx: typer.Context) -> TyperCommand:
    """One command's help as ``--help`` should show it: sentences without hard line breaks, and no
    value type beside a flag (this typer shows ``<bool>`` for ``--x/--no-x`` and ``--x``, which take
    no value). Idempotent: a command is tidied each time it is looked up."""
    if command.help:
        command.help = _sentences(command.help)
    for param in command.get_params(ctx):
        if getattr(param, "is_flag", False) and param.metavar is None:
            param.metavar = ""  # rich shows a non-None metavar instead of the type: nothing, for a flag
        if getattr(param, "help", None):
            param.help = _sentences(param.help)
    return command


class HelpGroup(TyperGroup):
    """The ``gi-deploy`` group (``typer.Typer(cls=HelpGroup)``): every command, the ones added later
    included, gets its help tidied (see ``_tidy_help``) when it is looked up, for ``--help``, the
    command list and scripts/cli_reference.py alike."""

    def get_command(self, ctx: typer.Context, cmd_name: str) -> TyperCommand | None:
        command = super().get_command(ctx, cmd_name)
        return None if command is None else _tidy_help(command, ctx)

    def get_params(self, ctx: typer.Context) -> list:
        params = super().get_params(ctx)
        for param in params:
            if getattr(param, "is_flag", False) and param.metavar is None:
                param.metavar = ""
        return params


def settings_options(tables: dict[str, type], after: str) -> Callable[[Callable], Callable]:
    """Decorate a Typer command with one option per field of each settings dataclass in ``tables``
    (an adapter kind's, model/settings.py), so an option is written once, on its field:
    ``--<table>-<field>`` (or ``--<table>-<flag>`` where the field names one; fields marked
    ``cli=False`` stay config-file only), its help and shown default the field's own, inserted
    after the command's parameter ``after``. Each option defaults to None ("not given"). The
    command receives what was given as ``adapters={table: {field: value}}``; a tuple field's
    option takes comma-separated text."""

    def decorate(command: Callable) -> Callable:
        options, source = [], {}
        for table, cls in tables.items():
            types = typing.get_type_hints(cls)
            for f in dataclasses.fields(cls):
                if not f.metadata.get("cli", True):
                    continue
                listed = typing.get_origin(types[f.name]) is tuple
                kind = str if listed else types[f.name]
                flag = f"--{table}-{(f.metadata.get('flag') or f.name).replace('_', '-')}"
                decls = (f"{flag}/--no-{flag[2:]}",) if kind is bool else (flag,)
                name = f"{table}_{f.name}"
                options.append(
                    inspect.Parameter(
                        name,
                        inspect.Parameter.POSITIONAL_OR_KEYWORD,
                        default=None,
                        annotation=Annotated[
                            Optional[kind],  # noqa: UP045 (Typer)
                            opt(cls, f.name, *decls, shown_default=True),
                        ],
                    )
                )
                source[name] = (table, f.name, listed)
        params = [p for p in inspect.signature(command, eval_str=True).parameters.values() if p.name != "adapters"]
        at = [p.name for p in params].index(after) + 1

        @functools.wraps(command)
        def with_options(**kwargs: Any) -> Any:
            adapters: dict[str, dict] = {table: {} for table in tables}
            for name, (table, field, listed) in source.items():
                value = kwargs.pop(name)
                if value is not None:
                    adapters[table][field] = [v.strip() for v in value.split(",") if v.strip()] if listed else value
            return command(**kwargs, adapters=adapters)

        params[at:at] = options
        with_options.__signature__ = inspect.Signature(params)  # what Typer reads
        with_options.__annotations__ = {p.name: p.annotation for p in params}
        return with_options

    return decorate


def given(**flags: Any) -> dict:
    """The options the user gave: Enum choices as their values, None (not given) dropped."""
    return {k: getattr(v, "value", v) for k, v in flags.items() if v is not None}


_WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG}


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
    except OSError as e:  # a read-only folder, a full disk: the file and the reason, not a traceback
        if e.errno not in _WRITE_ERRNOS:
            raise
        err.print(
            f"error: cannot write {e.filename or 'the output'}: {e.strerror}; free space or choose a folder you "
            "can write to (--out), then run the same command again (train and infer: with --resume)",
            style="red",
            soft_wrap=True,
        )
        raise typer.Exit(code=1) from None


def usage_error(message: str) -> None:
    """A wrong combination of options: one line, exit code 2 (Typer's own usage errors use 2)."""
    err.print(f"error: {message}", style="red", soft_wrap=True)
    raise typer.Exit(code=2)


def setup_logging(verbose: bool) -> None:
    """Warnings by default; with --verbose, gi-deploy's info and debug lines (the quantiser's
    per-layer messages among them, export/int8.py) and the libraries' info."""
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(message)s")
    logging.getLogger("gi_deploy").setLevel(logging.DEBUG if verbose else logging.WARNING)


def size_text(n: int) -> str:
    return f"{n / 1e6:.1f} MB" if n >= 1e5 else f"{n / 1e3:.1f} kB"


def metrics_table(title: str, rows: dict[str, dict]) -> Table:
    """One row per name: the paper's metrics (weighted averages) plus macro F1."""
    table = Table(title=title)
    table.add_column("", no_wrap=True)
    for col in ("n", "Acc", "Prec", "Rec", "F1", "F1 macro", "MCC"):
        table.add_column(col, justify="right")
    for name, m in rows.items():
        table.add_row(
            name,
            str(m["n"]),
            *(
                f"{100 * m[k]:.2f}"
                for k in ("accuracy", "precision_weighted", "recall_weighted", "f1_weighted", "f1_macro", "mcc")
            ),
        )
    return table


def print_scores(title: str, scores: dict, n_wrong: int = 5) -> None:
    """The metrics table of every scored source, the files written, and the worst mistakes."""
    scored = {s: sc for s, sc in scores.items() if sc.metrics}
    if not scored:
        return
    out.print(metrics_table(title, {s: sc.metrics for s, sc in scored.items()}))
    for s, sc in scored.items():
        m = sc.metrics
        auc = f", ROC AUC macro {m['roc_auc_macro']:.4f}" if m.get("roc_auc_macro") is not None else ""
        out.print(
            f"{s}: specificity macro {m['specificity_macro']:.4f}{auc}; files: "
            + ", ".join(str(p) for p in sc.files.values()),
            soft_wrap=True,
        )
        for w in m.get("most_confidently_wrong", [])[:n_wrong]:
            out.print(
                f"  wrong at {w['confidence']:.3f}: {w['path']} (true {w['true_label']}, predicted {w['predicted']})",
                soft_wrap=True,
            )


@contextmanager
def image_progress(label: str):
    """A rich bar for a folder run: images done of total, images/s, time left. Yields the
    ``progress(done, total)`` callback the library calls after every batch."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TaskProgressColumn,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    bar = Progress(
        TextColumn(label, markup=False),
        BarColumn(),
        MofNCompleteColumn(),
        TaskProgressColumn(),
        TextColumn("{task.fields[rate]}", markup=False),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=err,
        transient=True,
    )
    task, started = None, [0.0]

    def update(done: int, total: int) -> None:
        nonlocal task
        if task is None:
            task = bar.add_task(label, total=total, rate="")
            started[0] = time.perf_counter()
        elapsed = time.perf_counter() - started[0]
        bar.update(task, completed=done, total=total, rate=f"{done / elapsed:.1f} img/s" if elapsed > 0 else "")

    with bar:
        yield update


def _raise_interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


@contextmanager
def interrupted_keeps(out_csv: Path):
    """Ctrl-C or SIGTERM (kill, timeout, a batch scheduler) during infer: stop the same way, so
    the decode workers are shut down, and say where the finished rows are and how to go on."""
    previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        yield
    except KeyboardInterrupt:
        err.print(
            f"interrupted: the rows written so far are in {out_csv}; run the same command with --resume to "
            "classify the rest",
            style="yellow",
            soft_wrap=True,
        )
        raise typer.Exit(code=130) from None
    finally:
        signal.signal(signal.SIGTERM, previous)
