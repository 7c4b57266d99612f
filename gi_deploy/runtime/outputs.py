"""What a job writes, checked before it starts, and its Parquet copy: every output path by real
path (the CSV and everything named after it, the ``--explain-wrong`` folders, the Parquet file),
refused where it would touch an input; ``write_parquet`` writes the finished CSV with an explicit
schema. Torch-free (pyarrow is imported inside ``write_parquet``)."""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

from gi_deploy._io import create_exclusive, real_path
from gi_deploy.errors import ConfigError
from gi_deploy.runtime.evaluate import PROB_PREFIX
from gi_deploy.runtime.inputs import Inputs
from gi_deploy.runtime.job_types import InferConfig
from gi_deploy.runtime.report import SUFFIXES

PARQUET_NAME = "predictions.parquet"  # --parquet DIR: the one file a run writes there


def sidecar_of(csv_path: Path) -> Path:
    """``<csv>.bundles.json``: which models wrote a predictions CSV's rows."""
    return csv_path.with_name(csv_path.name + ".bundles.json")


def job_outputs(cfg: InferConfig, sources: Iterable[str] = ()) -> tuple[list[Path], list[Path]]:
    """(files, folders) the job writes or deletes, by real path (a folder that is a symlink: where
    it points): the CSV and everything named after it (sidecar, temporary files, lock, metrics and
    report files ``<stem>.*``, the ``--explain-wrong`` folders ``<stem>_wrong`` and, per source,
    ``<stem>_<source>_wrong``) and the Parquet file."""
    out = real_path(cfg.out_csv)
    files = [out, sidecar_of(out), out.with_name(f".{out.name}.lock")]
    folders = (
        [real_path(out.parent / f"{out.stem}{part}_wrong") for part in ("", *(f"_{s}" for s in sources))]
        if cfg.explain_wrong
        else []
    )
    if cfg.parquet_dir is not None:
        files.append(real_path(cfg.parquet_dir) / PARQUET_NAME)
    return files, folders


# What the scoring writes beside the CSV: <stem>[.<source>]<ending> (runtime/evaluate.py, runtime/report.py)
REPORT_ENDINGS = (".metrics.json", *SUFFIXES.values())


def _in_family(p: Path, out: Path) -> bool:
    """Whether ``p`` has a name the job derives from ``out`` in its folder: ``<name>.<anything>``
    (sidecar, temporary files), its lock, ``<stem>[.<source>].metrics.json`` and the report files,
    ``<stem>_wrong`` and ``<stem>_<source>_wrong``. (``<stem>.jpg``, an image beside a CSV of the
    same stem, is not one: ``infer a.jpg --out a.csv`` writes nothing over it.)"""
    n = p.name
    return p.parent == out.parent and (
        n.startswith(out.name + ".")
        or n == f".{out.name}.lock"
        or (n.startswith(out.stem + ".") and n.endswith(REPORT_ENDINGS))
        or (n.startswith(out.stem + "_") and n.endswith("_wrong"))
    )


def check_outputs(cfg: InferConfig, inputs: Inputs, sources: Iterable[str] = ()) -> list[Path]:
    """Refuse, before anything starts, any output that is an input, the list or labels file, inside
    the input folder, or a folder that holds an input: ConfigError naming both. ``sources``: the
    models' (their ``--explain-wrong`` folders). Returns the outputs."""
    out = cfg.out_csv
    if out.is_dir() or str(out).endswith(("/", "\\")):
        raise ConfigError(
            f"--out {out} is a folder; give the predictions CSV's file name, e.g. {out / 'predictions.csv'}"
        )
    files, folders = job_outputs(cfg, sources)
    spec = Path(str(cfg.inputs))
    given = [p for p in (spec, cfg.labels) if p is not None and Path(p).is_file()]
    protected = {real_path(p): str(p) for p in [*inputs.paths, *given]}
    out_real = files[0]
    for p, shown in protected.items():
        if p == out_real:
            raise ConfigError(
                f"--out {out} is one of the inputs; writing the predictions there would destroy it. "
                "Choose another --out"
            )
        if p in files or any(_in_family(a, out_real) for a in (p, *p.parents)):
            raise ConfigError(
                f"--out {out} would write {p.name} beside it, and {shown} is one of the inputs of this "
                "run: it would be overwritten or deleted. Choose another --out (another name or folder)"
            )
        for d in folders:
            if p == d or p.is_relative_to(d):
                raise ConfigError(
                    f"{shown} is an input of this run, inside {d}, which this run writes and clears; "
                    "choose another --out or --parquet"
                )
    if spec.is_dir():
        root = real_path(spec)
        for o in [*files, *folders]:
            if o.is_relative_to(root) or o == root or root.is_relative_to(o):
                raise ConfigError(
                    f"--out {out} writes {o}, which lies inside the input folder {spec} (or holds it): the next run "
                    f"over that folder would classify (or lose) it. Write it outside, e.g. --out "
                    f"{spec.resolve().parent / out.name}"
                )
    if cfg.parquet_dir is not None and cfg.parquet_dir.exists():
        if not cfg.parquet_dir.is_dir():
            raise ConfigError(
                f"--parquet {cfg.parquet_dir} exists and is not a folder; give a folder (this run "
                f"writes {PARQUET_NAME} into it)"
            )
        # a reader of the folder (pyarrow, Spark, Ray) takes every Parquet file in it as one table
        others = sorted(
            p.name
            for p in cfg.parquet_dir.iterdir()
            if p.name.endswith(".parquet") and p.name != PARQUET_NAME and not p.name.startswith((".", "_"))
        )
        if others:
            raise ConfigError(
                f"--parquet {cfg.parquet_dir} already holds other Parquet files ({', '.join(others[:3])}"
                f"{', ...' if len(others) > 3 else ''}), which a reader of the folder would mix with "
                "this run's rows; move them away or give another folder"
            )
    return [*files, *folders]


def write_parquet(csv_path: Path, columns: tuple[str, ...], folder: Path) -> Path:
    """The finished CSV as ``<folder>/predictions.parquet`` with an explicit schema (probabilities
    and confidences float64, everything else text; an error row's empty numbers are nulls), written
    to a new temporary file in ``folder`` that then replaces that one file: never appended to, never
    mixed with an earlier run's, and nothing else in the folder touched (it may hold the CSV, or the
    user's files). Needs pyarrow (the scale extra)."""
    try:
        import pyarrow as pa
        import pyarrow.csv as pacsv
        import pyarrow.parquet as pq
    except ImportError as e:
        from gi_deploy.errors import DependencyError

        raise DependencyError(f"--parquet needs pyarrow ({e}); install it with: pip install 'gi-deploy[scale]'") from e
    numeric = lambda c: (
        c.startswith(PROB_PREFIX)
        or c == "confidence"
        or c.endswith("_prob")
        or c
        in (  # noqa: E731
            "router_confidence",
            "id_score",
            "id_threshold",
        )
    )
    types = {c: pa.float64() if numeric(c) else pa.string() for c in columns}
    table = pacsv.read_csv(
        csv_path,
        convert_options=pacsv.ConvertOptions(
            column_types=types, strings_can_be_null=False, null_values=[""], quoted_strings_can_be_null=False
        ),
    )
    table = table.cast(pa.schema([(c, types[c]) for c in columns]))
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".{PARQUET_NAME}.tmp"  # hidden: Parquet readers skip it
    with create_exclusive(tmp, "wb") as f:  # new, never through a planted link
        pq.write_table(table, f)
    os.replace(tmp, folder / PARQUET_NAME)
    return folder / PARQUET_NAME
