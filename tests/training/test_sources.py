"""Built-in sources read from small generated trees with the real downloads' layouts and spellings."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from conftest import TINY_PX, tiny_train_config
from PIL import Image

from gi_deploy.errors import DataError
from gi_deploy.training.data import check_no_leak
from gi_deploy.training.sources import GASTROVISION, KVASIR, load_splits

# the folder names of the Kvasir-Capsule labelled_images download (14 classes)
KVASIR_FOLDERS = [
    "Angiectasia",
    "Blood - fresh",
    "Blood - hematin",
    "Erosion",
    "Erythema",
    "Foreign body",
    "Ileocecal valve",
    "Lymphangiectasia",
    "Normal clean mucosa",
    "Polyp",
    "Pylorus",
    "Reduced mucosal view",
    "Ulcer",
    "Ampulla of vater",
]
# the spellings of the official split CSVs
OFFICIAL_LABELS = {
    "angiectasia": "Angiectasia",
    "blood-fresh": "Blood",
    "erosion": "Erosion",
    "erythema": "Erythematous",
    "foreign body": "Foreign Bodies",
    "ileocecal valve": "Ileo-cecal valve",
    "lymphangiectasia": "Lymphangiectasia",
    "normal clean mucosa": "Normal",
    "pylorus": "Pylorus",
    "reduced mucosal view": "Reduced Mucosal View",
    "ulcer": "Ulcer",
}
VIDEOS = [f"{i:02x}a1b2c3d4e5f6{i:02x}" for i in range(12)]


def _image(path: Path, shade: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (20, 20), (shade % 256, (shade * 7) % 256, (shade * 13) % 256)).save(path, quality=95)


@pytest.fixture(scope="module")
def kvasir_tree(tmp_path_factory) -> Path:
    """``labelled_images/<folder>/<videoID>_<frame>.jpg``: 6 frames per class, from 6 of 12 videos."""
    root = tmp_path_factory.mktemp("kvasir-capsule")
    for c, folder in enumerate(KVASIR_FOLDERS):
        for k in range(6):
            video = VIDEOS[(c + 2 * k) % len(VIDEOS)]
            _image(root / "labelled_images" / folder / f"{video}_{100 * c + k}.jpg", 40 * c + k)
    return root


@pytest.fixture(scope="module")
def gastrovision_tree(tmp_path_factory) -> Path:
    """The OSF archive's ``Gastrovision/Gastrovision/<27 class folders>``, file names repeating across classes."""
    root = tmp_path_factory.mktemp("gv")
    inner = root / "Gastrovision" / "Gastrovision"
    for c, folder in enumerate(GASTROVISION.classes + GASTROVISION.excluded):
        for k in range(5):
            _image(inner / folder / f"img{k}.jpg", 30 * c + k)  # img0.jpg ... in every class
    return root


@pytest.fixture
def kvasir_copy(kvasir_tree, tmp_path) -> Path:
    """A private copy of the Kvasir tree's labelled_images, for tests that change it."""
    import shutil

    root = tmp_path / "k"
    shutil.copytree(kvasir_tree / "labelled_images", root / "labelled_images")
    return root


def test_kvasir_maps_spellings_and_splits_by_video(kvasir_tree, tmp_path):
    ds = load_splits("kvasir", kvasir_tree, seed=0)
    assert ds.classes == sorted(KVASIR.classes) and len(ds.classes) == 11
    assert ds.excluded == {"Ampulla of vater": 6, "Blood - hematin": 6, "Polyp": 6}
    assert ds.group_kind == "video" and all(ds.counts()[s] > 0 for s in ("train", "val", "test"))
    videos = {s: {ds.groups[rel] for rel, _ in items} for s, items in ds.splits.items()}
    assert not (videos["train"] & videos["val"] or videos["train"] & videos["test"] or videos["val"] & videos["test"])
    assert sum(ds.counts().values()) == 66
    assert load_splits("kvasir", kvasir_tree, seed=0).splits == ds.splits  # seeded
    written = ds.write_csvs(tmp_path / "splits")
    rows = list(csv.DictReader(open(written[0])))
    assert rows[0].keys() == {"path", "class", "video"} and rows[0]["video"] in VIDEOS


def test_a_video_planted_in_two_splits_is_refused(kvasir_tree):
    ds = load_splits("kvasir", kvasir_tree, seed=0)
    rel, y = ds.splits["test"][0]
    video = ds.groups[rel]
    sibling = next(
        p
        for p in (kvasir_tree / "labelled_images").rglob(f"{video}_*.jpg")
        if p.relative_to(kvasir_tree).as_posix() != rel
    )
    moved = sibling.relative_to(kvasir_tree).as_posix()
    for split in ds.splits.values():  # move that video's other frame into training
        split[:] = [item for item in split if item[0] != moved]
    ds.splits["train"].append((moved, ds.classes.index(KVASIR.class_of(sibling.parent.name))))
    with pytest.raises(DataError, match=f"1 video\\(s\\) appear in more than one split.*{video}"):
        check_no_leak(ds)


def test_a_file_planted_in_two_splits_is_refused(gastrovision_tree):
    ds = load_splits("gastrovision", gastrovision_tree, seed=0)
    ds.splits["train"].append(ds.splits["test"][0])
    with pytest.raises(DataError, match="img.*of class .* is in both the train and the test split"):
        check_no_leak(ds)


def test_kvasir_official_folds_are_accepted_with_a_warning(kvasir_tree, tmp_path):
    ds0 = load_splits("kvasir", kvasir_tree, seed=0)
    everything = sorted(item for items in ds0.splits.values() for item in items)
    folds = ([], [])
    for rel, y in everything:  # frame-wise, as the official folds are: videos end up in both
        folds[int(Path(rel).stem.split("_")[1]) % 2].append((Path(rel).name, OFFICIAL_LABELS[ds0.classes[y]]))
    fold_videos = [{name.split("_")[0] for name, _ in fold} for fold in folds]
    assert fold_videos[0] & fold_videos[1]
    (kvasir_tree / "official_splits").mkdir(exist_ok=True)
    for i, rows in enumerate(folds):
        with open(kvasir_tree / "official_splits" / f"split_{i}.csv", "w", newline="") as f:
            csv.writer(f).writerows([("filename", "label"), *rows])
    ds = load_splits("kvasir", kvasir_tree, seed=0, split="official-0")
    assert {Path(rel).name for rel, _ in ds.splits["test"]} == {name for name, _ in folds[1]}
    assert len(ds.splits["train"]) + len(ds.splits["val"]) == len(folds[0])
    assert any("not video-disjoint" in n for n in ds.notes) and any("official" in n for n in ds.notes)
    val_videos = {ds.groups[rel] for rel, _ in ds.splits["val"]}
    assert not val_videos & {ds.groups[rel] for rel, _ in ds.splits["train"]}  # val carved by video


def test_kvasir_metadata_csv_gives_the_video_ids(kvasir_copy):
    root = kvasir_copy
    with open(root / "metadata.csv", "w", newline="") as f:
        w = csv.writer(f, delimiter=";")
        w.writerow(["filename", "video_id", "frame_number", "finding_category", "finding_class"])
        for p in (root / "labelled_images").rglob("*.jpg"):
            w.writerow([p.name, "one-video" if "Ulcer" in p.parent.name else p.name.split("_")[0], 0, "", ""])
    ds = load_splits("kvasir", root, seed=0)
    ulcer = ds.classes.index("ulcer")
    assert {ds.groups[rel] for items in ds.splits.values() for rel, y in items if y == ulcer} == {"one-video"}


def test_kvasir_unknown_or_missing_classes_fail_with_the_layout(kvasir_copy):
    import shutil

    root = kvasir_copy
    _image(root / "labelled_images" / "Worms" / "aa_1.jpg", 1)
    with pytest.raises(DataError, match="unknown class 'Worms'; known classes: angiectasia"):
        load_splits("kvasir", root)
    shutil.rmtree(root / "labelled_images" / "Worms")
    shutil.rmtree(root / "labelled_images" / "Ulcer")
    with pytest.raises(DataError, match=r"no images for class\(es\) ulcer(.|\n)*labelled_images/<class>/<videoID>"):
        load_splits("kvasir", root)


def test_kvasir_frame_without_video_id_is_named(kvasir_copy):
    _image(kvasir_copy / "labelled_images" / "Ulcer" / "frame7.jpg", 1)
    with pytest.raises(DataError, match="frame7.jpg: Kvasir-Capsule images are named <videoID>_<frame>"):
        load_splits("kvasir", kvasir_copy)


def test_gastrovision_uses_the_papers_20_classes_keyed_by_class_and_name(gastrovision_tree):
    ds = load_splits("gastrovision", gastrovision_tree, seed=3)
    assert ds.classes == sorted(GASTROVISION.classes) and len(ds.classes) == 20
    assert set(ds.excluded) == set(GASTROVISION.excluded)
    assert ds.counts() == {"train": 60, "val": 20, "test": 20}  # 5 per class: 3 / 1 / 1
    for split in ("val", "test"):
        assert {y for _, y in ds.splits[split]} == set(range(20))
    names = [rel.rsplit("/", 1)[1] for items in ds.splits.values() for rel, _ in items]
    assert len(set(names)) == 5 < len(names)  # repeated names, yet no leak error


@pytest.mark.parametrize("source", ["kvasir", "gastrovision"])
def test_built_in_sources_train_from_their_layouts(source, kvasir_tree, gastrovision_tree, tmp_path):
    from gi_deploy.training.trainer import train

    data = kvasir_tree if source == "kvasir" else gastrovision_tree
    result = train(tiny_train_config(data, tmp_path / "runs", source=source, batch_size=16))
    manifest = json.loads((result.run_dir / "run.json").read_text())
    assert manifest["status"] == "done" and manifest["model"]["num_classes"] == (11 if source == "kvasir" else 20)
    assert manifest["splits"]["group_kind"] == ("video" if source == "kvasir" else None)
    assert {p.name for p in (result.run_dir / "splits").iterdir()} == {"train.csv", "val.csv", "test.csv"}
    assert manifest["preprocess"]["size"] == [TINY_PX, TINY_PX]
