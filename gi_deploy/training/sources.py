"""Built-in data sources: how each real dataset download is laid out, which classes the seed
paper uses, and how it is split. A new source is one :class:`SourceSpec` entry in ``SOURCES``;
any other source name is read as a plain ImageFolder tree (:func:`~gi_deploy.training.data.discover_splits`).

- ``kvasir``: Kvasir-Capsule labelled images, the paper's 11 classes, split at the video level
  (or the official two folds, which share videos: allowed, with a warning).
- ``gastrovision``: GastroVision, the paper's 20 of its 27 classes, stratified 80/10/10 with a seed,
  images keyed by (class, file name) because file names repeat across classes.
"""

from __future__ import annotations

import csv
import logging
import random
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from gi_deploy.core.preprocess import list_images
from gi_deploy.errors import DataError
from gi_deploy.training.config import SPLIT_MODES
from gi_deploy.training.data import (
    DatasetSplits,
    _describe,
    _stratified_take,
    check_no_leak,
    discover_splits,
    group_split,
)

log = logging.getLogger(__name__)


def normalize_label(name: str) -> str:
    """Spelling-insensitive key of a class name: "Ileo-cecal valve", "ileocecal_valve" and
    "Ileocecal valve" all give "ileocecalvalve"."""
    return re.sub(r"[^a-z0-9]", "", name.lower())


@dataclass(frozen=True)
class SourceSpec:
    """One built-in dataset: its classes (the names models predict), every spelling of each class
    the dataset uses (folders, CSVs), the dataset classes the paper leaves out, and its layout."""

    name: str
    title: str
    classes: tuple[str, ...]
    spellings: dict[str, tuple[str, ...]]  # class -> other spellings used by the dataset's files
    excluded: tuple[str, ...]  # dataset classes the paper does not use (skipped, counted)
    layout: str
    split: str  # how the seeded split works, in words
    discover: Callable[..., DatasetSplits] = field(repr=False, compare=False)

    def class_of(self, folder: str) -> str | None:
        """The class a dataset folder/label spelling belongs to; None for an excluded class.
        Raises DataError for a spelling the source does not know."""
        key = normalize_label(folder)
        for cls in self.classes:
            if key in {normalize_label(cls), *map(normalize_label, self.spellings.get(cls, ()))}:
                return cls
        if key in set(map(normalize_label, self.excluded)):
            return None
        raise DataError(
            f"{self.name}: unknown class {folder!r}; known classes: {', '.join(self.classes)} "
            f"(left out on purpose: {', '.join(self.excluded)})"
        )


def _map_class_folders(spec: SourceSpec, root: Path) -> tuple[dict[str, list[Path]], dict[str, int]]:
    """{class: images} over the class folders under ``root`` (several spellings may feed one class),
    and {excluded folder: image count}. Fails with the expected tree when classes are missing."""
    folders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    by_class: dict[str, list[Path]] = {c: [] for c in spec.classes}
    excluded: dict[str, int] = {}
    for folder in folders:
        images = list_images(folder)
        cls = spec.class_of(folder.name)
        if cls is None:
            excluded[folder.name] = len(images)
        else:
            by_class[cls] += images
    missing = [c for c, imgs in by_class.items() if not imgs]
    if missing:
        raise DataError(
            f"{spec.name}: no images for class(es) {', '.join(missing)} under {root}\n"
            f"expected:\n{spec.layout}\n{_describe(root)}"
        )
    return by_class, excluded


def _unwrap(spec: SourceSpec, root: Path) -> Path:
    """Descend through lone wrapper folders (``Gastrovision/Gastrovision/``) to the class folders."""
    while True:
        subdirs = [p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")]
        if len(subdirs) != 1:
            return root
        try:
            spec.class_of(subdirs[0].name)
            return root  # a lone class folder: let the missing-classes check speak
        except DataError:
            root = subdirs[0]


def _indexed(by_class: dict[str, list[Path]], data_dir: Path) -> tuple[list[str], list[tuple[str, int]]]:
    """Sorted class names and (path relative to ``data_dir``, class index) pairs."""
    classes = sorted(by_class)
    return classes, sorted(
        (p.relative_to(data_dir).as_posix(), classes.index(c)) for c, paths in by_class.items() for p in paths
    )


def _find_dir(data_dir: Path, names: tuple[str, ...]) -> Path | None:
    for name in names:
        if (data_dir / name).is_dir():
            return data_dir / name
    return None


# --- Kvasir-Capsule ------------------------------------------------------------------------------


def _kvasir_video_ids(root: Path, data_dir: Path, files: list[tuple[str, int]]) -> dict[str, str]:
    """Video id of each image: from ``metadata.csv`` (``filename;video_id;...``) when present,
    else the ``<videoID>_<frame>.jpg`` file-name prefix."""
    from_metadata: dict[str, str] = {}
    for candidate in (data_dir / "metadata.csv", root / "metadata.csv", root.parent / "metadata.csv"):
        if candidate.is_file():
            with open(candidate, newline="", encoding="utf-8-sig") as f:
                reader = csv.DictReader(f, delimiter=";")
                if not {"filename", "video_id"} <= set(reader.fieldnames or ()):
                    raise DataError(
                        f"{candidate}: expected a semicolon-separated CSV with columns filename;video_id;"
                        f"... (found {reader.fieldnames})"
                    )
                from_metadata = {row["filename"]: row["video_id"] for row in reader if row.get("video_id")}
            break
    groups = {}
    for rel, _ in files:
        name = Path(rel).name
        if name in from_metadata:
            groups[rel] = from_metadata[name]
        elif "_" in Path(name).stem:
            groups[rel] = Path(name).stem.split("_", 1)[0]
        else:
            raise DataError(
                f"{root / rel}: Kvasir-Capsule images are named <videoID>_<frame>.jpg and this one "
                "has no video id; add a metadata.csv (filename;video_id) or rename it"
            )
    return groups


def _official_folds(
    spec: SourceSpec, data_dir: Path, root: Path, classes: list[str], by_name: dict[tuple[str, str], str]
) -> list[list[tuple[str, int]]]:
    """The two official folds (``official_splits/split_0.csv``, ``split_1.csv``: filename,label)."""
    split_dir = _find_dir(data_dir, ("official_splits", "splits")) or _find_dir(root.parent, ("official_splits",))
    if split_dir is None:
        raise DataError(
            f"{spec.name}: --split official-N needs official_splits/split_0.csv and split_1.csv "
            f"(from github.com/simula/kvasir-capsule) under {data_dir}"
        )
    folds = []
    for i in (0, 1):
        path = split_dir / f"split_{i}.csv"
        if not path.is_file():
            raise DataError(f"{spec.name}: official split file {path} is missing")
        items, missing = set(), []
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            if not {"filename", "label"} <= set(reader.fieldnames or ()):
                raise DataError(f"{path}: expected columns filename,label (found {reader.fieldnames})")
            for line, row in enumerate(reader, start=2):
                try:
                    cls = spec.class_of(row["label"])
                except DataError as e:
                    raise DataError(f"{path}, line {line}: {e}") from None
                if cls is None:
                    continue
                rel = by_name.get((cls, row["filename"]))
                if rel is None:
                    missing.append(f"{row['filename']} ({row['label']})")
                else:
                    items.add((rel, classes.index(cls)))
        if missing:
            raise DataError(
                f"{path}: {len(missing)} listed image(s) not found under {root}, e.g. "
                f"{', '.join(missing[:3])}; is the labelled_images download complete?"
            )
        folds.append(sorted(items))
    return folds


def discover_kvasir(
    spec: SourceSpec, data_dir: Path, val_fraction: float, test_fraction: float, seed: int, split: str = "seeded"
) -> DatasetSplits:
    data_dir = Path(data_dir).resolve()
    root = _find_dir(data_dir, ("labelled_images", "labeled_images")) or _unwrap(spec, data_dir)
    by_class, excluded = _map_class_folders(spec, root)
    classes, items = _indexed(by_class, data_dir)
    groups = _kvasir_video_ids(root, data_dir, items)
    rng = random.Random(seed)
    notes = []
    if split == "seeded":
        splits = group_split(items, groups, val_fraction, test_fraction, rng)
        layout = "kvasir-capsule, video-level split"
    else:
        train_fold = int(split.rsplit("-", 1)[1])
        by_name = {(classes[y], Path(rel).name): rel for rel, y in items}
        folds = _official_folds(spec, data_dir, root, classes, by_name)
        train_val, test = folds[train_fold], folds[1 - train_fold]
        # validation: whole videos of the training fold, so early stopping does not peek at test videos
        carved = group_split(train_val, groups, val_fraction, 0.0, rng)
        splits = {"train": carved["train"], "val": carved["val"], "test": test}
        layout = f"kvasir-capsule, official fold {train_fold} -> train/val, fold {1 - train_fold} -> test"
        notes.append(
            "the official Kvasir-Capsule folds share videos (7 of 43 in the release): test frames have "
            "near-duplicates in training, so scores are optimistic; the default video-level split avoids it"
        )
    ds = DatasetSplits(
        root=data_dir,
        classes=classes,
        splits=splits,
        layout=layout,
        groups=groups,
        group_kind="video",
        allow_group_overlap=split != "seeded",
        excluded=excluded,
        notes=notes,
    )
    check_no_leak(ds)
    _warn_missing_classes(ds)
    return ds


# --- GastroVision --------------------------------------------------------------------------------


def discover_gastrovision(
    spec: SourceSpec, data_dir: Path, val_fraction: float, test_fraction: float, seed: int, split: str = "seeded"
) -> DatasetSplits:
    if split != "seeded":
        raise DataError(f"{spec.name} has no official split files; use --split seeded")
    data_dir = Path(data_dir).resolve()
    root = _unwrap(spec, data_dir)  # the OSF archive unpacks as Gastrovision/ (sometimes twice)
    by_class, excluded = _map_class_folders(spec, root)
    classes, items = _indexed(by_class, data_dir)
    rng = random.Random(seed)
    rest, test = _stratified_take(items, test_fraction, rng)
    train, val = _stratified_take(rest, val_fraction / (1 - test_fraction), rng)
    ds = DatasetSplits(
        root=data_dir,
        classes=classes,
        splits={"train": train, "val": val, "test": test},
        layout="gastrovision, stratified per class",
        excluded=excluded,
    )
    check_no_leak(ds)
    _warn_missing_classes(ds)
    return ds


def _warn_missing_classes(ds: DatasetSplits) -> None:
    for split in ("val", "test"):
        present = Counter(y for _, y in ds.splits[split])
        absent = [c for i, c in enumerate(ds.classes) if not present[i]]
        if ds.splits[split] and absent:
            ds.notes.append(
                f"the {split} split has no images of {', '.join(absent)} (too few "
                f"{ds.group_kind or 'image'}s of those classes); their {split} metrics are undefined"
            )


KVASIR = SourceSpec(
    name="kvasir",
    title="Kvasir-Capsule (video capsule endoscopy), labelled images",
    classes=(
        "angiectasia",
        "blood-fresh",
        "erosion",
        "erythema",
        "foreign body",
        "ileocecal valve",
        "lymphangiectasia",
        "normal clean mucosa",
        "pylorus",
        "reduced mucosal view",
        "ulcer",
    ),
    spellings={
        "blood-fresh": ("Blood - fresh", "Blood", "blood_fresh"),
        "erythema": ("Erythematous",),
        "foreign body": ("Foreign Bodies",),
        "ileocecal valve": ("Ileo-cecal valve",),
        "normal clean mucosa": ("Normal", "Normal mucosa"),
    },
    excluded=("Ampulla of vater", "Blood - hematin", "Polyp"),
    layout="""  DATA/labelled_images/<class>/<videoID>_<frame>.jpg   (14 class folders; Ampulla of vater,
                                                       Blood - hematin and Polyp are left out)
  DATA/metadata.csv                                    (optional: filename;video_id;...)
  DATA/official_splits/split_0.csv, split_1.csv        (optional: --split official-0 / official-1)""",
    split="80/10/10 of the images per class, by whole videos (no video in two splits), seeded",
    discover=discover_kvasir,
)

GASTROVISION = SourceSpec(
    name="gastrovision",
    title="GastroVision (conventional endoscopy, two hospitals), the paper's 20 of 27 classes",
    classes=(
        "Accessory tools",
        "Barrett's esophagus",
        "Blood in lumen",
        "Cecum",
        "Colon polyps",
        "Colorectal cancer",
        "Duodenal bulb",
        "Dyed-lifted-polyps",
        "Dyed-resection-margins",
        "Esophagitis",
        "Gastric polyps",
        "Gastroesophageal_junction_normal z-line",
        "Ileocecal valve",
        "Normal esophagus",
        "Normal mucosa and vascular pattern in the large bowel",
        "Normal stomach",
        "Pylorus",
        "Resected polyps",
        "Retroflex rectum",
        "Small bowel_terminal ileum",
    ),
    spellings={"Barrett's esophagus": ("Barretts esophagus", "Barrett\u2019s esophagus")},
    excluded=(
        "Angiectasia",
        "Colon diverticula",
        "Erythema",
        "Esophageal varices",
        "Mucosal inflammation large bowel",
        "Resection margins",
        "Ulcer",
    ),
    layout="""  DATA/<class>/<file>.jpg        (the 27 class folders of the download; the 7 classes the paper
                                  leaves out are skipped; file names repeat across classes)""",
    split="80/10/10 stratified per class, seeded; images keyed by (class, file name)",
    discover=discover_gastrovision,
)

SOURCES: dict[str, SourceSpec] = {s.name: s for s in (KVASIR, GASTROVISION)}


def load_splits(
    source: str,
    data_dir: Path,
    val_fraction: float = 0.1,
    test_fraction: float = 0.1,
    seed: int = 0,
    split: str = "seeded",
) -> DatasetSplits:
    """The splits of ``source``: a built-in dataset by name, otherwise an ImageFolder tree."""
    if split not in SPLIT_MODES:
        raise DataError(f"split {split!r} unknown; use one of {', '.join(SPLIT_MODES)}")
    spec = SOURCES.get(source)
    if spec is None:
        if split != "seeded":
            raise DataError(
                f"--split {split} is only for built-in sources with official splits (kvasir); "
                f"{source!r} is read as an ImageFolder tree"
            )
        return discover_splits(data_dir, val_fraction, test_fraction, seed)
    if not Path(data_dir).is_dir():
        raise DataError(f"data folder {data_dir} does not exist\nexpected:\n{spec.layout}")
    return spec.discover(spec, data_dir, val_fraction, test_fraction, seed, split=split)
