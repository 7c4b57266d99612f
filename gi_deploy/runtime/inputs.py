"""What ``gi-deploy infer`` classifies, and the labels it scores against. No torch import.

Inputs: a folder (recursive), a single image, a glob (``"scans/**/*.jpg"``), or a list file
(``.txt``: one path per line; ``.csv``: a ``path`` column, and optionally a ``label`` or ``class``
column). Relative paths in a list are relative to the list file's folder. Labels come from
class-named first-level sub-folders, from ``--labels CSV`` (path, class), or from the list's own
label column; names that are not classes of the bundle are a clear error.
"""

from __future__ import annotations

import csv
import glob
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

from gi_deploy.core.preprocess import IMAGE_EXTENSIONS, list_images
from gi_deploy.errors import ConfigError, DataError

LIST_SUFFIXES = (".txt", ".csv", ".lst")
PATH_COLUMNS = ("path", "file", "filename", "image")
LABEL_COLUMNS = ("label", "class", "true_label")
_GLOB_CHARS = set("*?[")

log = logging.getLogger(__name__)


@dataclass
class Inputs:
    """The images to classify, the folder their CSV paths are written relative to, and the
    labels given explicitly (resolved path -> class name), if any."""

    root: Path
    paths: list[Path]
    labels: dict[Path, str] = field(default_factory=dict)

    def rel(self, path: Path) -> str:
        """The path as the predictions CSV writes it: relative to ``root`` when inside it."""
        try:
            return path.relative_to(self.root).as_posix()
        except ValueError:
            return path.as_posix()


def _read_list(list_file: Path) -> tuple[list[Path], dict[Path, str]]:
    base = list_file.parent
    raw = list_file.read_bytes()
    try:
        text = raw.decode("utf-16") if raw[:2] in (b"\xff\xfe", b"\xfe\xff") else raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise DataError(
            f"{list_file} is not UTF-8 text ({e.reason} at byte {e.start}); save it as UTF-8 (or UTF-16 "
            "with its byte-order mark)"
        ) from e
    if list_file.suffix.lower() != ".csv":
        paths = [base / line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")]
        return paths, {}
    reader = csv.DictReader(text.splitlines())
    rows = list(reader)
    if not rows:
        raise DataError(f"list {list_file} has no rows")
    columns = {c.lower().strip(): c for c in reader.fieldnames or []}
    path_col = next((columns[c] for c in PATH_COLUMNS if c in columns), None)
    if path_col is None:
        raise DataError(
            f"list {list_file} has no path column; expected one of {', '.join(PATH_COLUMNS)}, "
            f"found {', '.join(reader.fieldnames or [])}"
        )
    label_col = next((columns[c] for c in LABEL_COLUMNS if c in columns), None)
    paths, labels = [], {}
    for line, row in enumerate(rows, start=2):
        if None in row or any(v is None for v in row.values()):  # more or fewer cells than the header
            raise DataError(
                f"{list_file} line {line} has more or fewer cells than its header's {len(columns)}; fix "
                "the row (a path with a comma must be quoted)"
            )
        p = base / row[path_col].strip()
        paths.append(p)
        if label_col and row[label_col].strip():
            label, key = row[label_col].strip(), p.resolve()
            if key in labels and labels[key] != label:
                raise DataError(
                    f"{list_file} line {line} labels {row[path_col].strip()!r} {label!r}, an earlier row "
                    f"labels it {labels[key]!r}; keep one label per image"
                )
            labels[key] = label
    return paths, labels


def collect_inputs(spec: str | Path, labels_csv: Path | None = None) -> Inputs:
    """Resolve what to classify (see the module docstring). Raises ConfigError when ``spec`` is
    none of the four forms, DataError when it holds no image."""
    text = str(spec)
    path = Path(text)
    labels: dict[Path, str] = {}
    if path.is_dir():
        inputs = Inputs(path, sorted(list_images(path) + unreadable_folders(path)))
    elif path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS:
        inputs = Inputs(path.parent, [path])
    elif path.is_file() and path.suffix.lower() in LIST_SUFFIXES:
        paths, labels = _read_list(path)
        inputs = Inputs(path.parent, paths)
    elif _GLOB_CHARS & set(text):
        parts = Path(text).parts
        fixed = list(parts[: next(i for i, p in enumerate(parts) if _GLOB_CHARS & set(p))])
        root = Path(*fixed) if fixed else Path(".")
        matches = sorted(Path(p) for p in glob.glob(text, recursive=True))
        inputs = Inputs(root, [p for p in matches if p.suffix.lower() in IMAGE_EXTENSIONS and not p.is_dir()])
    elif path.exists():
        raise ConfigError(
            f"cannot classify {path}: not a folder, an image ({', '.join(sorted(IMAGE_EXTENSIONS))}) "
            f"or a list file ({', '.join(LIST_SUFFIXES)})"
        )
    else:
        raise ConfigError(f"nothing to classify at {spec}: no such file or folder, and not a glob pattern")
    if not inputs.paths:
        raise DataError(f"no images ({', '.join(sorted(IMAGE_EXTENSIONS))}) found in {spec}")
    inputs.labels = labels
    if labels_csv is not None:
        labels_csv = Path(labels_csv)
        if not labels_csv.is_file():
            raise ConfigError(f"--labels {labels_csv}: no such file")
        listed, extra = _read_list(labels_csv)
        if not extra:
            raise DataError(f"--labels {labels_csv} has no label column (one of {', '.join(LABEL_COLUMNS)})")
        inputs.labels.update(extra)  # paths relative to the labels file...
        for p in listed:  # ...or to the folder being classified
            if p.resolve() in extra and p.is_relative_to(labels_csv.parent):  # absolute paths are what they say
                inputs.labels.setdefault((inputs.root / p.relative_to(labels_csv.parent)).resolve(), extra[p.resolve()])
    if labels_csv is not None:
        known = {p.resolve() for p in inputs.paths}
        unmatched = sorted(
            str(p)
            for p in listed
            if p.resolve() in extra
            and p.resolve() not in known
            and not (
                p.is_relative_to(labels_csv.parent)
                and (inputs.root / p.relative_to(labels_csv.parent)).resolve() in known
            )
        )
        if unmatched and len(unmatched) == len(extra):
            raise DataError(
                f"--labels {labels_csv}: none of its {len(unmatched)} paths is an image of {spec} (e.g. "
                f"{unmatched[0]}); paths are relative to the labels file or to the folder classified"
            )
        if unmatched:
            log.warning(
                "--labels %s: %d label(s) match no image classified, e.g. %s", labels_csv, len(unmatched), unmatched[0]
            )
    return inputs


def unreadable_folders(folder: Path) -> list[Path]:
    """Sub-folders of ``folder`` that cannot be listed (permissions): returned so that each gets an
    error row (:func:`gi_deploy.core.preprocess.require_regular_file`) rather than a silent skip."""
    failed: list[Path] = []
    for _ in os.walk(folder, onerror=lambda e: failed.append(Path(e.filename))):
        pass
    return [p for p in failed if not any(part.startswith(".") for part in p.relative_to(folder).parts)]


def check_label_names(labels: dict[Path, str], classes: list[str], where: str) -> None:
    """Raise ConfigError listing the label names that are not classes of the bundle."""
    unknown = sorted(set(labels.values()) - set(classes))
    if unknown:
        raise ConfigError(
            f"{where} has labels that are not classes of the bundle: {', '.join(unknown)}; its "
            f"classes are {', '.join(classes)}; rename them in the labels"
        )
