"""ImageFolder datasets: discovery, seeded stratified splits, leak checks and the torch Dataset.

Two layouts are accepted::

    DATA/<class>/.../<image>                       split here, stratified, with a seed
    DATA/train/<class>/... [val/<class>/...] [test/<class>/...]   splits as given

Images may be nested below their class folder (some dataset releases nest by anatomy).
"""

from __future__ import annotations

import random
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import Dataset

from gi_deploy.errors import DataError
from gi_deploy.runtime.preprocess import PreprocessSpec, list_images, load_rgb, to_input

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
    """Class names and, per split, (path relative to the data dir, class index) pairs."""

    root: Path
    classes: list[str]
    splits: dict[str, list[tuple[str, int]]]
    layout: str

    def counts(self) -> dict[str, int]:
        return {name: len(items) for name, items in self.splits.items()}

    def to_dict(self) -> dict:
        return {
            "root": str(self.root), "layout": self.layout, "classes": self.classes,
            "counts": self.counts(),
            "files": {name: [[rel, self.classes[y]] for rel, y in items] for name, items in self.splits.items()},
        }


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


def _stratified_take(items: list[tuple[str, int]], fraction: float, rng: random.Random,
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


def discover_splits(data_dir: Path, val_fraction: float = 0.1, test_fraction: float = 0.1,
                    seed: int = 0) -> DatasetSplits:
    """Find classes and splits under ``data_dir``; raises DataError showing the expected tree."""
    data_dir = Path(data_dir).resolve()  # stored in the run manifest: must not depend on the cwd
    if not data_dir.is_dir():
        raise DataError(f"data folder {data_dir} does not exist\n{EXPECTED_LAYOUT}")
    split_dirs = {name: next((data_dir / a for a in aliases if (data_dir / a).is_dir()), None)
                  for name, aliases in _SPLIT_ALIASES.items()}
    rng = random.Random(seed)
    if split_dirs["train"] is not None:
        per_split = {name: _class_folders(d) for name, d in split_dirs.items() if d is not None}
        classes = sorted(per_split["train"])
        if not classes:
            raise DataError(f"{split_dirs['train']} has no class folders with images\n"
                            f"{EXPECTED_LAYOUT}\n{_describe(split_dirs['train'])}")
        splits: dict[str, list[tuple[str, int]]] = {}
        for name, folders in per_split.items():
            unknown = sorted(set(folders) - set(classes))
            if unknown:
                raise DataError(f"{split_dirs[name]} has classes not in {split_dirs['train']}: "
                                f"{', '.join(unknown)}; every class needs training images")
            splits[name] = sorted((p.relative_to(data_dir).as_posix(), classes.index(c))
                                  for c, paths in folders.items() for p in paths)
        if "val" not in splits:
            splits["train"], splits["val"] = _stratified_take(splits["train"], val_fraction, rng)
        splits.setdefault("test", [])
        layout = "split-folders"
    else:
        folders = _class_folders(data_dir)
        if len(folders) < 2:
            raise DataError(f"{data_dir} needs at least two class folders with images\n"
                            f"{EXPECTED_LAYOUT}\n{_describe(data_dir)}")
        classes = sorted(folders)
        items = sorted((p.relative_to(data_dir).as_posix(), classes.index(c))
                       for c, paths in folders.items() for p in paths)
        rest, test = _stratified_take(items, test_fraction, rng)
        train, val = _stratified_take(rest, val_fraction / (1 - test_fraction), rng)
        splits = {"train": train, "val": val, "test": test}
        layout = "class-folders"
    result = DatasetSplits(root=data_dir, classes=classes, splits={s: splits[s] for s in SPLITS}, layout=layout)
    check_no_leak(result)
    if not result.splits["val"]:
        raise DataError(f"no validation images could be formed under {data_dir}: add a val/ folder "
                        "or more images per class")
    return result


def check_no_leak(ds: DatasetSplits) -> None:
    """Refuse splits that share an image, keyed by (class, file name): file names repeat across
    classes in real datasets (GastroVision), so the name alone is not a key."""
    seen: dict[tuple[str, str], str] = {}
    for split, items in ds.splits.items():
        for rel, y in items:
            key = (ds.classes[y], Path(rel).name)
            if key in seen and seen[key] != split:
                raise DataError(f"image {key[1]!r} of class {key[0]!r} is in both the {seen[key]} and the "
                                f"{split} split under {ds.root}; remove one copy so evaluation is honest")
            seen[key] = split


class ImageDataset(Dataset):
    """(float32 tensor (3, H, W), class index) pairs. Training adds a random horizontal flip and
    a small rotation (the paper's augmentation) before the shared runtime preprocessing."""

    def __init__(self, root: Path, items: list[tuple[str, int]], spec: PreprocessSpec,
                 train: bool = False, hflip: bool = True, rotation_degrees: float = 0.0):
        self.root, self.items, self.spec = Path(root), items, spec
        self.train, self.hflip, self.rotation_degrees = train, hflip, rotation_degrees

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        rel, y = self.items[i]
        img = load_rgb(self.root / rel)
        if self.train:
            h, w = self.spec.size
            img = img.resize((w, h), Image.Resampling.BILINEAR)
            if self.hflip and torch.rand(()) < 0.5:
                img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            if self.rotation_degrees > 0:
                angle = float((torch.rand(()) * 2 - 1) * self.rotation_degrees)
                img = img.rotate(angle, resample=Image.Resampling.BILINEAR)
        return torch.from_numpy(to_input(img, self.spec)), y
