"""``gi-deploy evaluate --cross``: every source's model on every source's test set (the seed
paper's Table 1, where a model trained on one source scored 8% on another).

Models and test sets speak in their own class names (Kvasir-Capsule's "Erythematous" is another
dataset's "erythema"). Both sides are mapped to shared names, by identity or by a ``--class-map``
JSON file: ``{"<source>": {"<its class>": "<shared name>", ...}, ...}`` (a flat
``{"<class>": "<shared name>"}`` applies to every source). A test image counts for a model only
when its shared true class is one the model can predict; the others are counted, not scored.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path

from gi_deploy._io import write_json
from gi_deploy.core.bundles import list_bundles, read_bundle_manifest
from gi_deploy.core.runs import RUN_MANIFEST, SPLITS_DIR, read_run_manifest
from gi_deploy.errors import ConfigError, DataError
from gi_deploy.runtime.infer import InferConfig, infer_folder
from gi_deploy.runtime.inputs import collect_inputs


@dataclass
class CrossCell:
    model: str
    test: str
    n: int  # test images whose (shared) class the model has
    n_skipped: int  # test images of classes the model cannot predict
    correct: int

    @property
    def accuracy(self) -> float | None:
        """Over the test images of classes the model has."""
        return self.correct / self.n if self.n else None

    @property
    def accuracy_all(self) -> float | None:
        """Over every readable test image, those of classes the model lacks counted wrong: the
        stricter reading, and the one a single model deployed on every source would live with."""
        return self.correct / (self.n + self.n_skipped) if self.n + self.n_skipped else None


@dataclass
class CrossResult:
    models: list[str]
    tests: list[str]
    cells: dict[tuple[str, str], CrossCell]  # (model, test)
    files: dict[str, Path]


def parse_tests(tests: list[str]) -> dict[str, str]:
    """``--test SOURCE=FOLDER`` (or ``SOURCE=LIST.csv``) options as {source: where}."""
    parsed = {}
    for t in tests:
        name, sep, where = t.partition("=")
        if not sep or not name or not where:
            raise ConfigError(f"--test {t!r}: expected SOURCE=FOLDER (or SOURCE=LIST.csv)")
        parsed[name] = where
    return parsed


def read_class_map(path: Path | None, sources: list[str]) -> dict[str, dict[str, str]]:
    """Per source, its class name -> the shared name (empty: identity)."""
    if path is None:
        return {s: {} for s in sources}
    try:
        raw = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"--class-map {path}: cannot read it as JSON ({e})") from e
    if not isinstance(raw, dict) or not all(isinstance(v, (str, dict)) for v in raw.values()):
        raise ConfigError(f"--class-map {path}: expected {{source: {{class: shared}}}} or {{class: shared}}")
    if all(isinstance(v, str) for v in raw.values()):
        return {s: dict(raw) for s in sources}
    if not all(isinstance(v, dict) and all(isinstance(x, str) for x in v.values()) for v in raw.values()):
        raise ConfigError(
            f"--class-map {path} mixes the two forms: use either {{source: {{class: shared}}}} for "
            "every entry, or a flat {class: shared}"
        )
    unknown = sorted(set(raw) - set(sources))
    if unknown:
        raise ConfigError(
            f"--class-map {path} names sources with no bundle: {', '.join(unknown)}; bundles: {', '.join(sources)}"
        )
    return {s: dict(raw.get(s, {})) for s in sources}


def default_test_set(deploy_dir: Path, source: str, scratch: Path) -> Path:
    """The test split of the run a bundle was exported from (``runs/<source>/splits/test.csv``,
    its paths relative to the run's data folder), as a list file of absolute paths and labels."""
    manifest = read_bundle_manifest(deploy_dir / source)
    run_dir = Path(manifest.training.run_dir)
    split = run_dir / SPLITS_DIR / "test.csv"
    run_json = run_dir / RUN_MANIFEST
    if not split.is_file() or not run_json.is_file():
        raise ConfigError(
            f"no test set for {source}: its training run {run_dir} is not here; give one with --test {source}=FOLDER"
        )
    data_dir = Path(read_run_manifest(run_dir, finished=False).config["data_dir"])
    if not data_dir.is_absolute():  # recorded as typed: relative to where training ran
        data_dir = next((d for d in (Path.cwd() / data_dir, run_dir.parent.parent / data_dir) if d.is_dir()), data_dir)
    if not data_dir.is_dir():
        raise ConfigError(
            f"no test set for {source}: its run's data folder {data_dir} is not here; give one with "
            f"--test {source}=FOLDER"
        )
    out = scratch / f"{source}.test.csv"
    with open(split, newline="", encoding="utf-8") as f_in, open(out, "w", newline="", encoding="utf-8") as f_out:
        w = csv.writer(f_out)
        w.writerow(("path", "label"))
        for row in csv.DictReader(f_in):
            w.writerow(((data_dir / row["path"]).resolve().as_posix(), row["class"]))
    return out


def _truth(test: str | Path) -> dict[str, str]:
    """The test set's own labels by the path the predictions CSV writes: the list file's label
    column, else the class-named first folder."""
    inputs = collect_inputs(test)
    truth = {}
    for p in inputs.paths:
        rel = inputs.rel(p)
        inside = not Path(rel).is_absolute() and ".." not in Path(rel).parts  # a class folder under the root
        label = inputs.labels.get(p.resolve()) or (Path(rel).parts[0] if inside and len(Path(rel).parts) > 1 else None)
        if label is None:
            raise DataError(
                f"test set {test}: {rel} has no label (use class-named sub-folders or a list with a label column)"
            )
        truth[rel] = label
    return truth


def cross_evaluate(
    deploy_dir: Path,
    out_dir: Path,
    tests: dict[str, str | Path] | None = None,
    class_map: Path | None = None,
    **infer_options,
) -> CrossResult:
    """Run every bundle on every test set (``tests``: source -> folder or list; default: each
    bundle's own run's test split) and write ``cross_accuracy.csv`` and ``cross.json`` to
    ``out_dir``, with each test set's predictions CSV. ``infer_options`` go to InferConfig."""
    models = list_bundles(deploy_dir)
    if len(models) < 2:
        raise ConfigError(f"--cross needs at least two bundles under {deploy_dir}; found {models or 'none'}")
    out_dir.mkdir(parents=True, exist_ok=True)
    tests = dict(tests) if tests else {s: default_test_set(deploy_dir, s, out_dir) for s in models}
    maps = read_class_map(class_map, sorted(set(models) | set(tests)))
    classes = {m: list(read_bundle_manifest(deploy_dir / m).classes) for m in models}
    cells, files = {}, {}
    for test, where in tests.items():
        truth = {rel: maps.get(test, {}).get(c, c) for rel, c in _truth(where).items()}
        csv_path = out_dir / f"{test}.predictions.csv"
        infer_folder(
            InferConfig(
                inputs=where,
                deploy_dir=deploy_dir,
                sources=models,
                out_csv=csv_path,
                top_k=1,
                score=False,
                **infer_options,
            )
        )
        files[f"{test}.predictions"] = csv_path
        with open(csv_path, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
        for m in models:
            shared = {maps[m].get(c, c) for c in classes[m]}
            mine = [r for r in rows if r["source"] == m and not r["error"]]
            scored = [r for r in mine if truth[r["path"]] in shared]
            correct = sum(maps[m].get(r["predicted"], r["predicted"]) == truth[r["path"]] for r in scored)
            cells[(m, test)] = CrossCell(m, test, len(scored), len(mine) - len(scored), correct)
    if not any(c.n for c in cells.values()):
        if not any(c.n_skipped for c in cells.values()):
            raise DataError(f"no test image could be read; see the error column of the predictions in {out_dir}")
        raise DataError("no test image has a class any model predicts: the class names differ; give --class-map")
    names = list(tests)
    for key, attr in (("matrix", "accuracy"), ("matrix_all", "accuracy_all")):
        files[key] = out_dir / ("cross_accuracy.csv" if attr == "accuracy" else "cross_accuracy_all_images.csv")
        with open(files[key], "w", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            w.writerow(["model \\ test", *names])
            for m in models:
                values = (getattr(cells[(m, t)], attr) for t in names)
                w.writerow([m, *("" if v is None else f"{v:.4f}" for v in values)])
    files["json"] = out_dir / "cross.json"
    write_json(
        files["json"],
        {
            "models": models,
            "tests": {t: str(w) for t, w in tests.items()},
            "class_map": str(class_map) if class_map else None,
            "cells": [
                {
                    "model": c.model,
                    "test": c.test,
                    "accuracy": c.accuracy,
                    "accuracy_all_images": c.accuracy_all,
                    "n": c.n,
                    "n_skipped": c.n_skipped,
                    "correct": c.correct,
                }
                for c in cells.values()
            ],
        },
    )
    return CrossResult(models, names, cells, files)
