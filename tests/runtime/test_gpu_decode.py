"""--decode gpu's code path, run here on the CPU device (torchvision's decode_jpeg takes the same
list of encoded JPEGs there): which files go to the GPU decoder and which fall back to the CPU one,
and that both give the same pixels within JPEG-decoder and filter rounding."""

import dataclasses

import numpy as np
import pytest
from PIL import Image

from gi_deploy.core.preprocess import PreprocessSpec, normalize_pixels
from gi_deploy.errors import ConfigError
from gi_deploy.runtime.decode import gpu as gpu_decode
from gi_deploy.runtime.infer import InferConfig, infer_folder
from gi_deploy.runtime.decode.cpu import decode_batch, decoded_batches

SPEC = PreprocessSpec(size=(48, 48), mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    """A baseline JPEG and every kind nvJPEG must not take: PNG, progressive, CMYK, grayscale,
    EXIF-rotated, and a broken file."""
    root = tmp_path_factory.mktemp("mixed")
    rng = np.random.default_rng(0)
    smooth = Image.fromarray(rng.integers(0, 255, (18, 24, 3), dtype=np.uint8)).resize((240, 180), Image.BICUBIC)
    paths = {"baseline": root / "a.jpg", "png": root / "b.png", "progressive": root / "c.jpg", "cmyk": root / "d.jpg",
             "gray": root / "e.jpg", "rotated": root / "f.jpg", "broken": root / "g.jpg"}
    smooth.save(paths["baseline"], quality=92)
    smooth.save(paths["png"])
    smooth.save(paths["progressive"], quality=92, progressive=True)
    smooth.convert("CMYK").save(paths["cmyk"], quality=92)
    smooth.convert("L").save(paths["gray"], quality=92)
    exif = Image.Exif()
    exif[0x0112] = 6
    smooth.save(paths["rotated"], quality=92, exif=exif)
    paths["broken"].write_bytes(b"\xff\xd8\xff\xe0 not a whole jpeg")
    return paths


def test_only_upright_baseline_rgb_jpegs_go_to_the_gpu(mixed):
    assert {k: gpu_decode.gpu_decodable(p) for k, p in mixed.items()} == {
        "baseline": True, "png": False, "progressive": False, "cmyk": False, "gray": False, "rotated": False,
        "broken": False}


@pytest.mark.parametrize("resize", ["direct", "crop"])
def test_gpu_path_gives_the_cpu_decoders_pixels_and_falls_back_per_file(mixed, resize):
    spec = dataclasses.replace(SPEC, resize=resize, crop_pct=0.875 if resize == "crop" else 1.0)
    paths = list(mixed.values())
    decoder = gpu_decode.GpuDecoder((spec,), device="cpu")
    gpu = decoder(gpu_decode.read_batch(paths, (spec,)))
    cpu = decode_batch(paths, (spec,))
    assert gpu.errors == cpu.errors and gpu.errors[-1] is not None and "g.jpg" in gpu.errors[-1]
    assert (decoder.n_gpu, decoder.n_cpu) == (1, 5)  # the baseline JPEG decoded by torchvision, the rest by Pillow
    a, b = gpu.inputs[0].numpy(), cpu.inputs[0]
    assert a.shape == b.shape == (6, 48, 48, 3) and a.dtype == np.uint8
    np.testing.assert_array_equal(a[1:], b[1:])  # the fallbacks are the CPU decoder's own pixels
    diff = np.abs(a[0].astype(int) - b[0].astype(int))
    assert diff.mean() < 1.0 and diff.max() <= 8  # IDCT and filter rounding, not another image
    x, y = normalize_pixels(a, spec), normalize_pixels(b, spec)
    assert np.abs(x - y).mean() < 0.02


def test_the_pipeline_runs_the_reader_in_workers_and_finishes_in_this_process(mixed):
    paths = list(mixed.values())
    batches = list(decoded_batches(paths, (SPEC,), batch_size=4, workers=2, reader=gpu_decode.read_batch,
                                   finish=gpu_decode.GpuDecoder((SPEC,), device="cpu")))
    assert [p for b in batches for p in b.paths] == paths and [b.n_good for b in batches] == [4, 2]


def test_gpu_decoding_is_refused_for_models_on_the_cpu(tiny_deploy, tiny_data, tmp_path):
    with pytest.raises(ConfigError, match="--decode gpu feeds models that run on the GPU.*use --decode cpu"):
        infer_folder(InferConfig(inputs=tiny_data / "test", deploy_dir=tiny_deploy, out_csv=tmp_path / "p.csv",
                                 decode="gpu", workers=0))
    r = infer_folder(InferConfig(inputs=tiny_data / "test", deploy_dir=tiny_deploy, out_csv=tmp_path / "p.csv",
                                 workers=0))  # auto: the CPU decoder, and the metrics say so
    assert r.decoder.startswith("cpu (Pillow")
