"""``gi-deploy explain``. The saliency library is imported inside the command: it needs the
training extra (torch) and the explain extra (grad-cam)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

from gi_deploy._deps import require_training_extra
from gi_deploy.cli._display import arg, err, opt, out, reported
from gi_deploy.core.fields import default_of
from gi_deploy.explain.config import ExplainConfig, SaliencyMethod

X = ExplainConfig


def explain_cmd(
    path: Annotated[Path, arg(X, "path")],
    source: Annotated[Optional[list[str]], opt(X, "sources", "--source")] = None,
    method: Annotated[SaliencyMethod, opt(X, "method")] = SaliencyMethod(default_of(X, "method")),
    target: Annotated[str, opt(X, "target")] = default_of(X, "target"),
    layer: Annotated[Optional[str], opt(X, "layer")] = None,
    sheet_rows: Annotated[int, opt(X, "sheet_rows")] = default_of(X, "sheet_rows"),
    limit: Annotated[Optional[int], opt(X, "limit")] = None,
    runs_dir: Annotated[Path, opt(X, "runs_dir", "--runs")] = default_of(X, "runs_dir"),
    out_dir: Annotated[Path, opt(X, "out_dir", "--out")] = default_of(X, "out_dir"),
) -> None:
    """Saliency heatmaps of each source's model: one PNG per image and a contact sheet."""
    with reported():
        require_training_extra("explain")
    from rich.progress import Progress

    from gi_deploy.explain.maps import explain_path  # lazy: torch and grad-cam are extras

    with reported(), Progress(console=out, transient=True) as bar:
        task = bar.add_task("explain", total=None)
        r = explain_path(
            ExplainConfig(
                path=path,
                runs_dir=runs_dir,
                sources=source or [],
                method=method.value,
                target=target,
                layer=layer,
                out_dir=out_dir,
                sheet_rows=sheet_rows,
                limit=limit,
            ),
            progress=lambda i, n: bar.update(task, completed=i, total=n),
        )
    out.print(
        f"{len(r.images)} image(s), {len(r.sources)} source(s) side by side ({', '.join(r.sources)}), "
        f"{method.value}: {out_dir}/ ; contact sheet {r.sheet}",
        soft_wrap=True,
    )
    if r.errors:
        err.print(f"{len(r.errors)} image(s) could not be read: {r.errors[0]}", style="yellow", soft_wrap=True)
