import shutil

import pytest

from gi_deploy.core.preprocess import PreprocessSpec, load_input
from gi_deploy.errors import DataError
from gi_deploy.training.data import Augment, ImageDataset, discover_splits

SPEC = PreprocessSpec(size=(32, 32), mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))


def test_split_folders_are_used_as_given(tiny_data):
    ds = discover_splits(tiny_data)
    assert ds.layout == "split-folders"
    assert ds.classes == ["bleeding", "normal", "polyp", "ulcer"]
    assert ds.counts() == {"train": 24, "val": 8, "test": 12}
    assert all(rel.startswith("val/") for rel, _ in ds.splits["val"])


def test_class_folders_are_split_stratified_and_seeded(tiny_data, tmp_path):
    flat = tmp_path / "flat"
    for p in tiny_data.rglob("*.jpg"):  # 11 images per class, no split folders
        (flat / p.parent.name).mkdir(parents=True, exist_ok=True)
        shutil.copy(p, flat / p.parent.name / p.name)
    a, b, c = discover_splits(flat, seed=0), discover_splits(flat, seed=0), discover_splits(flat, seed=1)
    assert a.layout == "class-folders" and a.splits == b.splits and a.splits != c.splits
    for split in ("val", "test"):  # every class is represented in every split
        assert sorted({y for _, y in a.splits[split]}) == [0, 1, 2, 3]
    all_files = [rel for items in a.splits.values() for rel, _ in items]
    assert len(all_files) == len(set(all_files)) == 44


def test_missing_val_is_carved_from_train(tiny_data, tmp_path):
    root = tmp_path / "d"
    shutil.copytree(tiny_data / "train", root / "train")
    ds = discover_splits(root, val_fraction=0.2)  # 1 of 6 per class
    assert ds.counts() == {"train": 20, "val": 4, "test": 0}


def test_leaked_image_is_refused(tiny_data, tmp_path):
    root = tmp_path / "d"
    shutil.copytree(tiny_data, root)
    leaked = next((root / "train" / "polyp").glob("*.jpg"))
    shutil.copy(leaked, root / "test" / "polyp" / leaked.name)
    with pytest.raises(DataError, match=f"{leaked.name}.*polyp.*both the train and the test split"):
        discover_splits(root)


def test_wrong_layout_shows_expected_tree_and_what_was_found(tmp_path):
    (tmp_path / "only_one_class").mkdir()
    (tmp_path / "readme.txt").write_text("x")
    with pytest.raises(DataError) as e:
        discover_splits(tmp_path)
    msg = str(e.value)
    assert "DATA/train/<class>/<image>.jpg" in msg and "readme.txt" in msg and "only_one_class/" in msg


def test_val_class_unknown_to_train_is_refused(tiny_data, tmp_path):
    root = tmp_path / "d"
    shutil.copytree(tiny_data, root)
    shutil.copytree(root / "val" / "ulcer", root / "val" / "tumour")
    with pytest.raises(DataError, match="classes not in .*train: tumour"):
        discover_splits(root)


def test_eval_dataset_sees_exactly_the_runtime_pixels(tiny_data):
    ds = discover_splits(tiny_data)
    dataset = ImageDataset(tiny_data, ds.splits["test"], SPEC)
    x, y = dataset[3]
    rel, label = ds.splits["test"][3]
    assert y == label
    assert (x.numpy() == load_input(tiny_data / rel, SPEC)).all()


def test_training_augmentation_changes_pixels_but_not_shape(tiny_data):
    ds = discover_splits(tiny_data)
    dataset = ImageDataset(tiny_data, ds.splits["train"], SPEC, augment=Augment(rotation_degrees=10))
    eval_x = ImageDataset(tiny_data, ds.splits["train"], SPEC)[0][0]
    xs = [dataset[0][0] for _ in range(4)]
    assert all(x.shape == eval_x.shape == (3, 32, 32) for x in xs)
    assert any((x - eval_x).abs().max() > 0.1 for x in xs)


@pytest.mark.parametrize("resize", ["direct", "crop"])
def test_training_geometry_is_the_runtime_geometry(tiny_data, resize):
    """With augmentation switched off, a training sample is bit-identical to the runtime's input
    for the same spec, in both resize modes (the crop mode keeps the aspect and drops a border)."""
    spec = PreprocessSpec(size=(24, 24), mean=SPEC.mean, std=SPEC.std, resize=resize, crop_pct=0.75)
    ds = discover_splits(tiny_data)
    still = Augment(hflip=False, rotation_degrees=0)
    x, _ = ImageDataset(tiny_data, ds.splits["train"], spec, augment=still)[0]
    assert (x.numpy() == load_input(tiny_data / ds.splits["train"][0][0], spec)).all()


def test_crop_resize_keeps_aspect_and_centres():
    from PIL import Image

    from gi_deploy.core.preprocess import resize_for

    img = Image.new("RGB", (200, 100), (0, 0, 0))
    img.paste((255, 0, 0), (0, 0, 50, 100))  # a red band on the left quarter: cropped away
    spec = PreprocessSpec(size=(50, 50), mean=SPEC.mean, std=SPEC.std, resize="crop", crop_pct=0.5)
    out = resize_for(img, spec)  # shorter side 100 -> 100 (50 / 0.5), width 200, centre 50x50
    assert out.size == (50, 50)
    assert out.getpixel((0, 0)) == (0, 0, 0) and out.getpixel((49, 49)) == (0, 0, 0)
    direct = resize_for(img, PreprocessSpec(size=(50, 50), mean=SPEC.mean, std=SPEC.std))
    assert direct.getpixel((2, 25))[0] > 200  # squashed: the red band survives
