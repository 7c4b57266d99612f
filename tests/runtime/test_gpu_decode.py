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
from gi_deploy.runtime.decode.cpu import decode_batch, decoded_batches
from gi_deploy.runtime.infer import InferConfig, infer_folder

SPEC = PreprocessSpec(size=(48, 48), mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    """A baseline JPEG and every kind nvJPEG must not take: PNG, progressive, CMYK, grayscale,
    EXIF-rotated, and a broken file."""
    root = tmp_path_factory.mktemp("mixed")
    rng = np.random.default_rng(0)
    smooth = Image.fromarray(rng.integers(0, 255, (18, 24, 3), dtype=np.uint8)).resize((240, 180), Image.BICUBIC)
    paths = {
        "baseline": root / "a.jpg",
        "png": root / "b.png",
        "progressive": root / "c.jpg",
        "cmyk": root / "d.jpg",
        "gray": root / "e.jpg",
        "rotated": root / "f.jpg",
        "broken": root / "g.jpg",
    }
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
        "baseline": True,
        "png": False,
        "progressive": False,
        "cmyk": False,
        "gray": False,
        "rotated": False,
        "broken": False,
    }


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
    batches = list(
        decoded_batches(
            paths,
            (SPEC,),
            batch_size=4,
            workers=2,
            reader=gpu_decode.read_batch,
            finish=gpu_decode.GpuDecoder((SPEC,), device="cpu"),
        )
    )
    assert [p for b in batches for p in b.paths] == paths and [b.n_good for b in batches] == [4, 2]


def test_gpu_decoding_is_refused_for_models_on_the_cpu(tiny_deploy, tiny_data, tmp_path):
    with pytest.raises(ConfigError, match="--decode gpu feeds models that run on the GPU.*use --decode cpu"):
        infer_folder(
            InferConfig(
                inputs=tiny_data / "test", deploy_dir=tiny_deploy, out_csv=tmp_path / "p.csv", decode="gpu", workers=0
            )
        )
    r = infer_folder(
        InferConfig(inputs=tiny_data / "test", deploy_dir=tiny_deploy, out_csv=tmp_path / "p.csv", workers=0)
    )  # auto: the CPU decoder, and the metrics say so
    assert r.decoder.startswith("cpu (Pillow")


def _frames(root, sizes):
    rng = np.random.default_rng(1)
    paths = []
    for k, (w, h) in enumerate(sizes):
        img = Image.fromarray(rng.integers(0, 255, (12, 16, 3), dtype=np.uint8)).resize((w, h), Image.BICUBIC)
        paths.append(root / f"frame_{k}.jpg")
        img.save(paths[-1], quality=90)
    return paths


@pytest.mark.parametrize("resize", ["direct", "crop"])
def test_frames_are_resized_in_one_call_per_size_with_the_per_frame_pixels(tmp_path, monkeypatch, resize):
    spec = dataclasses.replace(SPEC, resize=resize, crop_pct=0.875 if resize == "crop" else 1.0)
    paths = _frames(tmp_path, [(200, 150), (120, 96), (200, 150), (200, 150), (120, 96)])
    decoder = gpu_decode.GpuDecoder((spec,), device="cpu")
    from torch.nn import functional as F

    calls, real = [], F.interpolate
    monkeypatch.setattr(F, "interpolate", lambda x, **k: calls.append(len(x)) or real(x, **k))
    batch = decoder(gpu_decode.read_batch(paths, (spec,)))
    assert sorted(calls) == [2, 3] and decoder.n_gpu == 5  # two sizes: two calls, not five
    monkeypatch.setattr(F, "interpolate", real)
    from torchvision.io import ImageReadMode, decode_jpeg, read_file

    for row, path in zip(batch.inputs[0], paths):  # the same pixels as resizing each frame alone
        one = decoder._resize_batch(decode_jpeg(read_file(str(path)), mode=ImageReadMode.RGB)[None], spec)[0]
        np.testing.assert_array_equal(row.numpy(), one.numpy())


def test_a_jpeg_the_batched_decode_fails_on_falls_back_alone(tmp_path):
    paths = _frames(tmp_path, [(200, 150)] * 3)
    truncated = tmp_path / "truncated.jpg"  # a baseline header, so it is sent as bytes; the scan data is cut
    truncated.write_bytes(paths[0].read_bytes()[: len(paths[0].read_bytes()) // 2])
    assert gpu_decode.gpu_decodable(truncated)
    order = [paths[0], truncated, paths[1], paths[2]]
    decoder = gpu_decode.GpuDecoder((SPEC,), device="cpu")
    batch = decoder(gpu_decode.read_batch(order, (SPEC,)))
    assert decoder.n_gpu == 3 and batch.errors[0] is None and batch.errors[2:] == [None, None]
    assert "truncated.jpg" in batch.errors[1]  # the CPU decoder's own reason for the one bad file
    assert batch.inputs[0].shape == (3, 48, 48, 3)


def test_gpu_finishing_runs_one_batch_ahead_and_hands_each_over_ready(tmp_path):
    paths = _frames(tmp_path, [(64, 48)] * 6)
    events = []

    def finish(raw):
        events.append(f"finish {raw.paths[0].name}")
        out = gpu_decode.GpuDecoder((SPEC,), device="cpu")(raw)
        out.ready = lambda: events.append(f"ready {raw.paths[0].name}")
        return out

    for b in decoded_batches(paths, (SPEC,), 2, 0, reader=gpu_decode.read_batch, finish=finish):
        events.append(f"model {b.paths[0].name}")
    assert events == [
        "finish frame_0.jpg",
        "finish frame_2.jpg",
        "ready frame_0.jpg",
        "model frame_0.jpg",
        "finish frame_4.jpg",
        "ready frame_2.jpg",
        "model frame_2.jpg",
        "ready frame_4.jpg",
        "model frame_4.jpg",
    ]


@pytest.mark.slow  # torch's antialiased resize of 720x576 frames on a shared CPU: tens of seconds here
def test_decoder_rates_measure_both_paths_on_the_same_frames(monkeypatch):
    from gi_deploy.runtime.decode import measure

    monkeypatch.setattr(measure, "FRAMES", 4)
    rates = measure.decoder_rates((SPEC,), workers=3, device="cpu")  # the GPU decoder's code, on the CPU device
    assert rates["cpu"] > 0 and rates["gpu"] > 0 and rates["workers"] == 3


@pytest.mark.parametrize("gpu_faster, chosen", [(True, "gpu"), (False, "cpu")])
def test_decode_auto_follows_the_measurement_not_the_core_count(monkeypatch, gpu_faster, chosen):
    from gi_deploy.runtime import infer
    from gi_deploy.runtime.backends.base import Backend
    from gi_deploy.runtime.decode import measure

    on_gpu = Backend("torch", "fp16", "planted GPU model", lambda x: x, device="cuda", run_pixels=lambda x: x)
    monkeypatch.setattr(gpu_decode, "nvjpeg_status", lambda: (True, "nvJPEG (planted)"))
    monkeypatch.setattr(gpu_decode, "GpuDecoder", lambda specs: "gpu decoder")
    monkeypatch.setattr(measure, "gpu_decoding_faster", lambda specs: (gpu_faster, "measured: planted"))
    what, reader, finish = infer.choose_decoder("auto", [on_gpu], (SPEC,))
    assert what.startswith(chosen) and "measured: planted" in what
    assert (reader, finish) == ((gpu_decode.read_batch, "gpu decoder") if gpu_faster else (decode_batch, None))
