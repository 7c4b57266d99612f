"""ImageFolder datasets: discovery, seeded stratified splits, leak checks and the torch Dataset.

Two layouts are accepted::

    DATA/<class>/.../<image>                       split here, stratified, with a seed
    DATA/train/<class>/... [val/<class>/...] [test/<class>/...]   splits as given

Images may be nested below their class folder (some dataset releases nest by anatomy).
"""

from __future__ import annotations

import csv
import logging
import random
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.utils.data import Dataset

from gi_deploy.core.preprocess import PreprocessSpec, list_images, load_rgb, normalize, resize_for, to_input, to_pixels
from gi_deploy.errors import DataError

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
_SPLIT_ALIASES = {"train": ("train",), "val": ("val", "valid", "validation"), "test": ("test",)}

EXPECTED_LAYOUT = """expected either
  DATA/<class>/<image>.jpg                  (split 80/10/10 here, per class, with --seed)
or
  DATA/train/<class>/<image>.jpg
  DATA/val/<class>/<image>.jpg              (optional: taken from train when missing)
  DATA/test/<class>/<image>.jpg             (optional)"""


@dataclass
class DatasetSplits:
    """Class names and, per split, (path relative to the data dir, class index) pairs.

    ``groups`` maps a relative path to the id of the unit that must not straddle splits (a
    Kvasir-Capsule video); empty for sources without one. ``notes`` are warnings the user must see
    (shown at start and stored in the run manifest)."""

    root: Path
    classes: list[str]
    splits: dict[str, list[tuple[str, int]]]
    layout: str
    groups: dict[str, str] = field(default_factory=dict)
    group_kind: str | None = None
    allow_group_overlap: bool = False  # official folds that share videos: overlap is warned, not refused
    excluded: dict[str, int] = field(default_factory=dict)  # dataset folders left out -> image count
    notes: list[str] = field(default_factory=list)
    label_fraction: float = 1.0

    def counts(self) -> dict[str, int]:
        return {name: len(items) for name, items in self.splits.items()}

    def to_dict(self) -> dict:
        def row(rel: str, y: int) -> list:
            return [rel, self.classes[y]] + ([self.groups[rel]] if self.groups else [])

        return {
            "root": str(self.root),
            "layout": self.layout,
            "classes": self.classes,
            "counts": self.counts(),
            "group_kind": self.group_kind,
            "excluded": self.excluded,
            "notes": self.notes,
            "label_fraction": self.label_fraction,
            "files": {name: [row(rel, y) for rel, y in items] for name, items in self.splits.items()},
        }

    def write_csvs(self, folder: Path) -> list[Path]:
        """One ``<split>.csv`` per split (path, class[, group]) under ``folder``, so a split can be
        audited and reused without reading the run manifest."""
        folder.mkdir(parents=True, exist_ok=True)
        written = []
        for name, items in self.splits.items():
            path = folder / f"{name}.csv"
            tmp = path.with_suffix(".csv.tmp")
            with open(tmp, "w", newline="", encoding="utf-8") as f:
                w = csv.writer(f)
                w.writerow(["path", "class"] + ([self.group_kind or "group"] if self.groups else []))
                for rel, y in items:
                    w.writerow([rel, self.classes[y]] + ([self.groups[rel]] if self.groups else []))
            tmp.replace(path)
            written.append(path)
        return written


def _class_folders(folder: Path) -> dict[str, list[Path]]:
    found = {}
    for d in sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")):
        images = list_images(d)
        if images:
            found[d.name] = images
    return found


def _describe(folder: Path) -> str:
    entries = sorted(p.name + ("/" if p.is_dir() else "") for p in folder.iterdir())
    shown = ", ".join(entries[:12]) + (f", ... ({len(entries)} entries)" if len(entries) > 12 else "")
    return f"found in {folder}: {shown or 'nothing'}"


def _stratified_take(
    items: list[tuple[str, int]],
    fraction: float,
    rng: random.Random,
) -> tuple[list[tuple[str, int]], list[tuple[str, int]]]:
    """Split off ``fraction`` of each class (at least one image while two or more remain)."""
    by_class: dict[int, list[tuple[str, int]]] = defaultdict(list)
    for item in items:
        by_class[item[1]].append(item)
    keep, taken = [], []
    for y in sorted(by_class):
        group = sorted(by_class[y])
        rng.shuffle(group)
        n = round(len(group) * fraction)
        n = min(max(n, 1 if len(group) >= 2 and fraction > 0 else 0), len(group) - 1)
        taken += group[:n]
        keep += group[n:]
    return sorted(keep), sorted(taken)


def discover_splits(
    data_dir: Path, val_fraction: float = 0.1, test_fraction: float = 0.1, seed: int = 0
) -> DatasetSplits:
    """Find classes and splits under ``data_dir``; raises DataError showing the expected tree."""
    data_dir = Path(data_dir).resolve()  # stored in the run manifest: must not depend on the cwd
    if not data_dir.is_dir():
        raise DataError(f"data folder {data_dir} does not exist\n{EXPECTED_LAYOUT}")
    split_dirs = {
        name: next((data_dir / a for a in aliases if (data_dir / a).is_dir()), None)
        for name, aliases in _SPLIT_ALIASES.items()
    }
    rng = random.Random(seed)
    if split_dirs["train"] is not None:
        per_split = {name: _class_folders(d) for name, d in split_dirs.items() if d is not None}
        classes = sorted(per_split["train"])
        if not classes:
            raise DataError(
                f"{split_dirs['train']} has no class folders with images\n"
                f"{EXPECTED_LAYOUT}\n{_describe(split_dirs['train'])}"
            )
        splits: dict[str, list[tuple[str, int]]] = {}
        for name, folders in per_split.items():
            unknown = sorted(set(folders) - set(classes))
            if unknown:
                raise DataError(
                    f"{split_dirs[name]} has classes not in {split_dirs['train']}: "
                    f"{', '.join(unknown)}; every class needs training images"
                )
            splits[name] = sorted(
                (p.relative_to(data_dir).as_posix(), classes.index(c)) for c, paths in folders.items() for p in paths
            )
        if "val" not in splits:
            splits["train"], splits["val"] = _stratified_take(splits["train"], val_fraction, rng)
        splits.setdefault("test", [])
        layout = "split-folders"
    else:
        folders = _class_folders(data_dir)
        if len(folders) < 2:
            raise DataError(
                f"{data_dir} needs at least two class folders with images\n{EXPECTED_LAYOUT}\n{_describe(data_dir)}"
            )
        classes = sorted(folders)
        items = sorted(
            (p.relative_to(data_dir).as_posix(), classes.index(c)) for c, paths in folders.items() for p in paths
        )
        rest, test = _stratified_take(items, test_fraction, rng)
        train, val = _stratified_take(rest, val_fraction / (1 - test_fraction), rng)
        splits = {"train": train, "val": val, "test": test}
        layout = "class-folders"
    result = DatasetSplits(root=data_dir, classes=classes, splits={s: splits[s] for s in SPLITS}, layout=layout)
    check_no_leak(result)
    if not result.splits["val"]:
        raise DataError(
            f"no validation images could be formed under {data_dir}: add a val/ folder or more images per class"
        )
    return result


def check_no_leak(ds: DatasetSplits) -> None:
    """Refuse splits that share an image, keyed by (class, file name): file names repeat across
    classes in real datasets (GastroVision), so the name alone is not a key. For sources with
    groups (Kvasir-Capsule videos), also refuse a group in two splits: neighbouring frames of one
    video are near-duplicates, so a video on both sides leaks the answer. Official folds known to
    share videos (``allow_group_overlap``) get a note instead, naming the shared groups."""
    seen: dict[tuple[str, str], str] = {}
    for split, items in ds.splits.items():
        for rel, y in items:
            key = (ds.classes[y], Path(rel).name)
            if key in seen and seen[key] != split:
                raise DataError(
                    f"image {key[1]!r} of class {key[0]!r} is in both the {seen[key]} and the "
                    f"{split} split under {ds.root}; remove one copy so evaluation is honest"
                )
            seen[key] = split
    if not ds.groups:
        return
    where: dict[str, set[str]] = defaultdict(set)
    for split, items in ds.splits.items():
        for rel, _ in items:
            where[ds.groups[rel]].add(split)
    shared = sorted(g for g, splits in where.items() if len(splits) > 1)
    if not shared:
        return
    kind = ds.group_kind or "group"
    detail = ", ".join(f"{g} ({'/'.join(sorted(where[g]))})" for g in shared[:5]) + (
        f" and {len(shared) - 5} more" if len(shared) > 5 else ""
    )
    if not ds.allow_group_overlap:
        raise DataError(
            f"{len(shared)} {kind}(s) appear in more than one split under {ds.root}: {detail}. "
            f"Frames of one {kind} are near-duplicates; split at the {kind} level"
        )
    note = (
        f"{len(shared)} {kind}(s) are shared between splits ({detail}): these folds are not "
        f"{kind}-disjoint, so test scores are optimistic"
    )
    if note not in ds.notes:
        ds.notes.append(note)


def group_split(
    items: list[tuple[str, int]], groups: dict[str, str], val_fraction: float, test_fraction: float, rng: random.Random
) -> dict[str, list[tuple[str, int]]]:
    """Split whole groups (videos) into train/val/test, aiming at the given image fractions per class.

    Greedy and seeded: groups in a shuffled order, largest first, each to the split whose per-class
    deficit (target minus current, relative to the class size) it reduces most. Every split with a
    non-zero fraction gets at least one group when there are enough groups."""
    by_group: dict[str, list[tuple[str, int]]] = defaultdict(list)
    for item in items:
        by_group[groups[item[0]]].append(item)
    order = sorted(by_group)
    rng.shuffle(order)
    order.sort(key=lambda g: -len(by_group[g]))  # stable: ties keep the seeded order
    class_total = Counter(y for _, y in items)
    fractions = {"train": 1.0 - val_fraction - test_fraction, "val": val_fraction, "test": test_fraction}
    current = {s: Counter() for s in fractions}
    assigned: dict[str, list[str]] = {s: [] for s in fractions}

    def gain(split: str, counts: Counter) -> float:
        return sum(
            n * (fractions[split] * class_total[c] - current[split][c]) / class_total[c] for c, n in counts.items()
        )

    for g in order:
        counts = Counter(y for _, y in by_group[g])
        best = max((s for s in fractions if fractions[s] > 0), key=lambda s: gain(s, counts))
        current[best].update(counts)
        assigned[best].append(g)
    for split in ("val", "test"):  # a split that got nothing takes the smallest training group
        if fractions[split] > 0 and not assigned[split] and len(assigned["train"]) > 1:
            g = min(assigned["train"], key=lambda g: (len(by_group[g]), g))
            assigned["train"].remove(g)
            assigned[split].append(g)
    return {s: sorted(item for g in gs for item in by_group[g]) for s, gs in assigned.items()}


def subsample_per_class(items: list[tuple[str, int]], fraction: float, seed: int) -> list[tuple[str, int]]:
    """Keep ``fraction`` of each class (at least one image), seeded: MED-PEFT's 1% / 10% / 100%
    label setting. The same seed and fraction always keep the same images."""
    if fraction >= 1.0:
        return list(items)
    rng = random.Random(f"label-fraction:{seed}:{fraction}")
    by_class: dict[int, list[tuple[str, int]]] = defaultdict(list)
    for item in items:
        by_class[item[1]].append(item)
    kept = []
    for y in sorted(by_class):
        group = sorted(by_class[y])
        rng.shuffle(group)
        kept += group[: max(1, round(len(group) * fraction))]
    return sorted(kept)


@dataclass(frozen=True)
class Augment:
    """Training-time augmentation, applied to the resized (or resized and cropped) image before the
    shared runtime normalisation. The seed paper uses horizontal flips and small rotations; vertical
    flips and colour jitter are options its notebooks also used."""

    hflip: bool = True
    vflip: bool = False
    rotation_degrees: float = 10.0
    color_jitter: float = 0.0  # brightness/contrast/saturation factor range 1 +- x; hue +- x/4

    def transform(self):
        """A torchvision transform on PIL images (draws from torch's global RNG, which training
        checkpoints and restores, so a resumed run sees the same augmentations)."""
        from torchvision.transforms import v2

        steps = []
        if self.hflip:
            steps.append(v2.RandomHorizontalFlip())
        if self.vflip:
            steps.append(v2.RandomVerticalFlip())
        if self.rotation_degrees > 0:
            steps.append(v2.RandomRotation(self.rotation_degrees, interpolation=v2.InterpolationMode.BILINEAR))
        if self.color_jitter > 0:
            j = self.color_jitter
            steps.append(v2.ColorJitter(brightness=j, contrast=j, saturation=j, hue=min(0.5, j / 4)))
        return v2.Compose(steps) if steps else None


class ImageDataset(Dataset):
    """(float32 tensor (3, H, W), class index) pairs. Every image goes through the runtime's
    geometry (:func:`resize_for`, the same resize or resize-and-crop the deployed model sees);
    training images are then augmented, and all are normalised by the shared :func:`normalize`."""

    def __init__(
        self,
        root: Path,
        items: list[tuple[str, int]],
        spec: PreprocessSpec,
        augment: Augment | None = None,
        pixels: bool = False,
    ):
        self.root, self.items, self.spec, self.pixels = Path(root), items, spec, pixels
        self.augment = augment.transform() if augment is not None and not pixels else None

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        rel, y = self.items[i]
        img = load_rgb(self.root / rel, self.spec)
        if self.pixels:  # uint8 (H, W, 3): augmented and normalised on the GPU (training/device_input.py)
            return torch.from_numpy(to_pixels(img, self.spec)), y
        if self.augment is None:
            return torch.from_numpy(to_input(img, self.spec)), y
        return torch.from_numpy(normalize(self.augment(resize_for(img, self.spec)), self.spec)), y
