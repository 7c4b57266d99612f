"""The runtime's decode pipeline: the same pixels as training, the same batches in worker processes
as inline, bounded prefetch, and the same CSV whatever the number of workers."""

import csv
import dataclasses
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from gi_deploy._io import read_json
from gi_deploy.core.bundles import read_bundle_manifest
from gi_deploy.core.preprocess import PreprocessSpec, list_images, load_input, normalize_pixels
from gi_deploy.runtime.decode import cpu as pipeline
from gi_deploy.runtime.decode.cpu import decode_batch, decoded_batches
from gi_deploy.runtime.infer import InferConfig, infer_folder


def read_rows(path: Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def odd_images(tmp_path_factory, tiny_data) -> Path:
    """Class folders holding the tiny test images plus non-square, RGBA, grayscale and 16-bit files."""
    root = tmp_path_factory.mktemp("odd")
    shutil.copytree(tiny_data / "test", root, dirs_exist_ok=True)
    rng = np.random.default_rng(7)
    Image.fromarray(rng.integers(0, 256, (37, 50, 3), dtype=np.uint8)).save(root / "normal" / "wide.jpg", quality=90)
    Image.fromarray(rng.integers(0, 256, (61, 29, 3), dtype=np.uint8)).save(root / "polyp" / "tall.png")
    Image.fromarray(rng.integers(0, 256, (40, 45, 4), dtype=np.uint8), "RGBA").save(root / "ulcer" / "alpha.png")
    Image.fromarray(rng.integers(0, 256, (33, 70), dtype=np.uint8), "L").save(root / "bleeding" / "gray.png")
    Image.fromarray(rng.integers(0, 65535, (30, 44), dtype=np.uint16)).save(root / "bleeding" / "deep16.png")
    return root


def bundle_spec(tiny_deploy: Path) -> PreprocessSpec:
    return read_bundle_manifest(tiny_deploy / "capsule").preprocess


def training_eval_arrays(root: Path, paths: list[Path], spec: PreprocessSpec, tmp_path: Path) -> dict[str, np.ndarray]:
    """What the trainer feeds the model for its val and test splits: its own DataLoaders
    (trainer._loaders, the ImageDataset without augmentation), as numpy (N, 3, H, W)."""
    import torch
    from conftest import tiny_train_config

    from gi_deploy.training.data import DatasetSplits
    from gi_deploy.training.trainer import _loaders

    classes = sorted({p.parent.name for p in paths})
    items = [(p.relative_to(root).as_posix(), classes.index(p.parent.name)) for p in paths]
    ds = DatasetSplits(
        root=root, classes=classes, splits={"train": items, "val": items, "test": items}, layout="class-folders"
    )
    cfg = tiny_train_config(root, tmp_path, batch_size=4, num_workers=0)
    _, val, test = _loaders(ds, spec, cfg, torch.device("cpu"), torch.Generator().manual_seed(0))
    return {name: torch.cat([x for x, _ in loader]).numpy() for name, loader in (("val", val), ("test", test))}


def test_bundle_spec_is_the_runs_spec(tiny_deploy, tiny_run):
    run = read_json(tiny_run / "run.json", "run manifest")
    assert bundle_spec(tiny_deploy) == PreprocessSpec.from_dict(run["preprocess"])


@pytest.mark.parametrize("resize", ["direct", "crop"])
def test_runtime_input_equals_the_training_evaluation_transform(resize, odd_images, tiny_deploy, tmp_path):
    spec = bundle_spec(tiny_deploy)
    if resize == "crop":
        spec = dataclasses.replace(spec, resize="crop", crop_pct=0.875)
    paths = list_images(odd_images)
    sizes = {Image.open(p).size for p in paths}
    assert any(w != h for w, h in sizes)  # the geometry of non-square images is exercised
    trained = training_eval_arrays(odd_images, paths, spec, tmp_path)
    pixels = np.concatenate([b.inputs[0] for b in decoded_batches(paths, (spec,), batch_size=4, workers=0)])
    assert pixels.shape == (len(paths), *spec.size, 3) and pixels.dtype == np.uint8  # workers send uint8
    runtime = normalize_pixels(pixels, spec)  # what a backend feeds its model
    assert runtime.shape == (len(paths), 3, *spec.size) and runtime.dtype == np.float32
    for split in ("val", "test"):
        np.testing.assert_allclose(runtime, trained[split], atol=1e-6, rtol=0)
    single = np.stack([load_input(p, spec) for p in paths])
    np.testing.assert_allclose(single, trained["test"], atol=1e-6, rtol=0)


def test_several_specs_are_each_the_training_transform(odd_images, tiny_deploy, tmp_path):
    """One decode, several specs (sources that differ in preprocessing): each array is what
    training with that spec sees, including a non-square target size."""
    direct = bundle_spec(tiny_deploy)
    crop = dataclasses.replace(direct, size=(24, 40), resize="crop", crop_pct=0.9, interpolation="bicubic")
    paths = list_images(odd_images)
    batch = decode_batch(paths, (direct, crop))
    assert batch.errors == [None] * len(paths)
    for spec, array in zip((direct, crop), batch.inputs):
        np.testing.assert_allclose(
            normalize_pixels(array, spec),
            training_eval_arrays(odd_images, paths, spec, tmp_path)["test"],
            atol=1e-6,
            rtol=0,
        )
    assert batch.inputs[1].shape == (len(paths), 24, 40, 3)


@pytest.fixture(scope="module")
def with_broken(tmp_path_factory, tiny_data) -> list[Path]:
    """The 12 tiny test images with an unreadable file in the middle (position 5 of 13)."""
    root = tmp_path_factory.mktemp("broken")
    shutil.copytree(tiny_data / "test", root, dirs_exist_ok=True)
    paths = list_images(root)
    broken = root / "broken.jpg"
    broken.write_bytes(b"\xff\xd8 truncated")
    return paths[:5] + [broken] + paths[5:]


def test_worker_processes_give_the_inline_batches(with_broken, tiny_deploy):
    specs = (bundle_spec(tiny_deploy), dataclasses.replace(bundle_spec(tiny_deploy), resize="crop", crop_pct=0.875))
    inline = list(decoded_batches(with_broken, specs, batch_size=4, workers=0))
    spawned = list(decoded_batches(with_broken, specs, batch_size=4, workers=2))
    assert [len(b.paths) for b in spawned] == [4, 4, 4, 1]  # full batches, the last one short
    assert [p for b in spawned for p in b.paths] == with_broken  # input order
    assert len(spawned) == len(inline)
    for a, b in zip(inline, spawned):
        assert a.paths == b.paths and a.errors == b.errors
        for x, y in zip(a.inputs, b.inputs):
            np.testing.assert_array_equal(x, y)
    errors = [e for b in spawned for e in b.errors]
    assert [i for i, e in enumerate(errors) if e] == [5]
    assert "cannot read image" in errors[5] and "broken.jpg" in errors[5]
    assert spawned[1].n_good == 3 and spawned[1].inputs[0].shape[0] == 3  # the broken file has no array


def test_prefetch_is_bounded_with_a_slow_consumer(with_broken, tiny_deploy, monkeypatch):
    submitted = []

    class CountingPool(pipeline.ProcessPoolExecutor):
        def submit(self, fn, *args, **kwargs):
            submitted.append(args[0])
            return super().submit(fn, *args, **kwargs)

    monkeypatch.setattr(pipeline, "ProcessPoolExecutor", CountingPool)
    paths = with_broken[:12]
    ahead, consumed = [], 0
    for batch in decoded_batches(paths, (bundle_spec(tiny_deploy),), batch_size=2, workers=2, prefetch=2):
        consumed += 1
        ahead.append(len(submitted) - consumed)  # submitted but not yet handed to the consumer
        assert batch.paths == submitted[consumed - 1]
        time.sleep(0.05)  # a slow model: the workers must not run further ahead
    assert consumed == 6 and len(submitted) == 6  # each batch submitted once
    assert max(ahead) == 2  # it does prefetch, and never more than prefetch batches
    assert ahead == [2, 2, 2, 2, 1, 0]


def test_infer_with_worker_processes_writes_the_inline_csv(with_broken, tiny_deploy, tmp_path):
    folder = with_broken[0].parent.parent
    csvs = {}
    for workers in (0, 2):
        out = tmp_path / f"w{workers}.csv"
        result = infer_folder(
            InferConfig(inputs=folder, deploy_dir=tiny_deploy, out_csv=out, batch_size=4, workers=workers)
        )
        assert result.n_images == 13 and result.n_errors == 1
        csvs[workers] = out.read_text(encoding="utf-8")
    assert csvs[0] == csvs[2]
    rows = read_rows(tmp_path / "w2.csv")
    assert len(rows) == 13 and [r["path"] for r in rows if r["error"]] == ["broken.jpg"]


def test_benchmark_decodes_only_the_images_it_measures(tiny_data, tiny_deploy, monkeypatch):
    """A folder bigger than --n-images is not decoded whole (memory stays bounded by n_images)."""
    from gi_deploy.runtime import benchmark

    decoded = []

    def counting_decode(paths, specs):
        decoded.append(len(paths))
        return decode_batch(paths, specs)

    monkeypatch.setattr(benchmark, "decode_batch", counting_decode)
    monkeypatch.setattr(benchmark, "CANDIDATES", (("onnxruntime fp32", "onnxruntime", "fp32", None),))
    cfg = benchmark.BenchmarkConfig(
        deploy_dir=tiny_deploy,
        images=tiny_data / "test",
        n_images=8,
        batch_size=4,
        latency_runs=5,
        workers=0,
        device="cpu",
    )
    result = benchmark.run_benchmark(cfg)
    assert len(list_images(tiny_data / "test")) == 12 and decoded == [8]
    assert result.row("onnxruntime fp32").status == "ok" and result.n_images == 8
