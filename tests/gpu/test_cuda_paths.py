"""The CUDA paths no CPU test reaches: pinned-memory ``run_pixels``, compiled inference's padding to one static
shape, the GPU decoder's per-file fallback, NCCL DDP in one process, the fp16 GradScaler path and a training run
that augments on the GPU. Marked ``gpu`` and skipped with the reason without a CUDA device; run on the device by
``benchmarks/gpu_check.sh`` (``python -m pytest -m gpu tests/gpu``)."""

from __future__ import annotations

import json
import math
import socket
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from gi_deploy.core.preprocess import PreprocessSpec, normalize_pixels


def _cuda() -> tuple[bool, str]:
    try:
        import torch
    except ImportError:
        return False, "torch is not installed (the training extra)"
    return torch.cuda.is_available(), f"needs a CUDA GPU; torch {torch.__version__} sees none"


_HAS_CUDA, _WHY = _cuda()
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not _HAS_CUDA, reason=_WHY)]


@pytest.fixture
def exact_fp32():
    """TF32 off for the test (cuDNN convolutions and matmuls in full fp32), so two paths that should give the
    same numbers can be held to a tight tolerance; restored afterwards."""
    import torch

    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def _torch_backend(tiny_deploy: Path, **kwargs):
    from gi_deploy.core.bundles import read_bundle_manifest
    from gi_deploy.runtime.backends.select import open_backend

    bundle = tiny_deploy / "capsule"
    return open_backend(
        bundle, read_bundle_manifest(bundle), backend="torch", precision="fp32", device="cuda", **kwargs
    )


def _pixels(spec: PreprocessSpec, n: int) -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (n, *spec.size, 3), dtype=np.uint8)


def test_run_pixels_copies_through_pinned_memory_and_equals_the_float_path(tiny_deploy, exact_fp32):
    """uint8 pixels normalised on the GPU give the logits the host-normalised float32 input gives; the pinned
    buffer is made at the batch size, grows for a larger batch and is reused for a smaller one."""
    b = _torch_backend(tiny_deploy, compile=False, batch_size=4)
    assert b.run_pixels is not None, "on CUDA the torch backend takes the decoder's uint8 pixels"
    px = _pixels(b.spec, 6)
    ref = b.run(normalize_pixels(px, b.spec))
    runner = b.run_pixels.__self__
    for n, buffer_rows in ((3, 4), (6, 6), (2, 6)):
        got = b.predict_logits(px[:n])  # uint8 -> run_pixels
        np.testing.assert_allclose(got, ref[:n], atol=1e-4, rtol=0)
        assert runner._pinned.is_pinned() and len(runner._pinned) == buffer_rows


def test_compiled_inference_pads_every_batch_to_one_static_shape(tiny_deploy, exact_fp32):
    """Compiled at batch 8: batches of 8, 3, 1 and 5 rows run on the one captured graph (a recompile would raise)
    and give the eager model's logits for their own rows only."""
    import torch

    compiled = _torch_backend(tiny_deploy, compile=True, batch_size=8)
    eager = _torch_backend(tiny_deploy, compile=False, batch_size=8)
    assert "compiled" in compiled.detail and any("torch.compile" in n for n in compiled.notes)
    x = normalize_pixels(_pixels(compiled.spec, 8), compiled.spec)
    try:
        with torch._dynamo.config.patch(error_on_recompile=True):
            for n in (8, 3, 1, 5):
                got = compiled.run(x[:n])
                assert got.shape == (n, 4)
                np.testing.assert_allclose(got, eager.run(x[:n]), atol=1e-3, rtol=0)
    finally:
        torch._dynamo.reset()


def _jpeg(path: Path, seed: int) -> Path:
    a = np.random.default_rng(seed).integers(0, 256, (6, 8, 3), dtype=np.uint8)
    Image.fromarray(a).resize((64, 48), Image.Resampling.BICUBIC).save(path, quality=92)  # baseline, RGB
    return path


def test_gpu_decoder_falls_back_to_the_cpu_per_file(tmp_path):
    """One file nvJPEG rejects fails the batched call; the decoder then decodes file by file: the good ones on
    the GPU, the rejected one by the CPU decoder from disk, and a file neither can read gets its error row."""
    import torch

    from gi_deploy.runtime.decode.cpu import decode_batch
    from gi_deploy.runtime.decode.gpu import GpuDecoder, read_batch

    spec = PreprocessSpec(size=(32, 32), mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25), decode="full")
    paths = [_jpeg(tmp_path / f"{i}.jpg", i) for i in range(3)]
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8\xff\xe0" + bytes(range(256)) * 4)
    raw = read_batch(paths, (spec,))
    assert all(e is not None for e in raw.encoded), "baseline RGB JPEGs go to the GPU"
    garbage = b"\xff\xd8\xff\xe0" + bytes(range(255, -1, -1)) * 4
    raw.encoded[1] = garbage  # as if nvJPEG rejected a file the header check let through
    raw.paths.append(broken)  # and a file that passed the header check but no decoder reads
    raw.errors.append(None), raw.encoded.append(garbage), raw.pixels.append(None)
    decoder = GpuDecoder((spec,))
    out = decoder(raw)
    assert (decoder.n_gpu, decoder.n_cpu) == (2, 1)
    assert out.errors[:3] == [None, None, None] and "broken.jpg" in out.errors[3]
    got = out.inputs[0]
    assert got.is_cuda and got.dtype == torch.uint8 and tuple(got.shape) == (3, 32, 32, 3)
    cpu = decode_batch(paths, (spec,)).inputs[0]
    assert np.array_equal(got[1].cpu().numpy(), cpu[1])  # the fallback row is the CPU decoder's, exactly
    for i in (0, 2):  # nvJPEG's IDCT and the GPU resize differ from Pillow's by a few levels, not more
        assert np.abs(got[i].cpu().numpy().astype(int) - cpu[i].astype(int)).mean() < 4


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


@pytest.fixture
def one_process_job(monkeypatch):
    """The environment torchrun --nproc-per-node 1 gives its one rank."""
    monkeypatch.setenv("MASTER_ADDR", "localhost")
    monkeypatch.setenv("MASTER_PORT", str(_free_port()))
    for k in ("RANK", "LOCAL_RANK"):
        monkeypatch.setenv(k, "0")
    monkeypatch.setenv("WORLD_SIZE", "1")


def test_nccl_ddp_in_one_process(one_process_job, exact_fp32, monkeypatch, tiny_data, tmp_path):
    """Under torchrun on CUDA the rank joins an NCCL group on cuda:LOCAL_RANK, sums over NCCL, and its DDP model's
    gradients are the plain model's (one rank's average is itself); the trainer runs a whole job that way and
    leaves no group behind."""
    import copy

    import torch
    import torch.distributed as dist
    from conftest import tiny_train_config
    from torch import nn
    from torch.nn.parallel import DistributedDataParallel

    from gi_deploy.training import distributed
    from gi_deploy.training.trainer import train

    d, device = distributed.setup(torch.device("cuda"))
    try:
        assert d.active and d.world == 1 and dist.get_backend() == "nccl" and device == torch.device("cuda", 0)
        assert distributed.all_sum(d, 1.5, 2.0) == [1.5, 2.0]
        torch.manual_seed(0)
        plain = nn.Sequential(nn.Conv2d(3, 8, 3), nn.GELU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4)).to(
            device
        )
        ddp = distributed.wrap(copy.deepcopy(plain), d, device)
        assert isinstance(ddp, DistributedDataParallel)
        x, y = torch.randn(6, 3, 16, 16, device=device), torch.arange(6, device=device) % 4
        for m in (plain, ddp):
            nn.functional.cross_entropy(m(x), y).backward()
        for p, q in zip(plain.parameters(), ddp.module.parameters()):
            torch.testing.assert_close(q.grad, p.grad, atol=1e-6, rtol=1e-5)
    finally:
        distributed.teardown(d)
    assert not dist.is_initialized()

    monkeypatch.setenv("MASTER_PORT", str(_free_port()))  # a fresh store for the trainer's own group
    backends = []
    real_init = dist.init_process_group
    monkeypatch.setattr(
        dist, "init_process_group", lambda backend=None, **kw: (backends.append(backend), real_init(backend, **kw))[1]
    )
    result = train(tiny_train_config(tiny_data, tmp_path, device="cuda", amp="off"))
    manifest = json.loads((result.run_dir / "run.json").read_text())
    assert backends == ["nccl"] and manifest["runtime"]["processes"] == 1 and manifest["status"] == "done"
    assert all(math.isfinite(h["train_loss"]) for h in result.history)
    assert not dist.is_initialized()


@pytest.fixture(scope="module")
def fp16_cuda_run(tiny_data, tmp_path_factory):
    """Two epochs of the tiny LoRA run on CUDA with --amp fp16 and the default augmentation (flips, rotation)."""
    from conftest import tiny_train_config

    from gi_deploy.training.trainer import train

    return train(tiny_train_config(tiny_data, tmp_path_factory.mktemp("fp16"), device="cuda", amp="fp16", epochs=2))


def test_fp16_training_steps_through_the_grad_scaler(fp16_cuda_run):
    """fp16 autocast trains with a live GradScaler: its scale and growth tracker are in the checkpoint (a disabled
    scaler has an empty state), and every epoch's loss is finite."""
    from gi_deploy.core.runs import CHECKPOINT, RUN_MANIFEST
    from gi_deploy.training.checkpoint import load_checkpoint

    run = fp16_cuda_run.run_dir
    assert json.loads((run / RUN_MANIFEST).read_text())["runtime"]["amp"] == "float16"
    scaler = load_checkpoint(run / CHECKPOINT)["scaler"]
    assert scaler["scale"] > 0 and "_growth_tracker" in scaler
    assert len(fp16_cuda_run.history) == 2
    assert all(
        math.isfinite(v) for h in fp16_cuda_run.history for k, v in h.items() if "loss" in k and isinstance(v, float)
    )


def test_training_on_cuda_augments_on_the_gpu(fp16_cuda_run):
    """A CUDA run without colour jitter ships uint8 pixels and augments on the device (its manifest says so)."""
    from gi_deploy.core.runs import RUN_MANIFEST

    runtime = json.loads((fp16_cuda_run.run_dir / RUN_MANIFEST).read_text())["runtime"]
    assert runtime["augment_on"] == "gpu" and runtime["channels_last"] is True


def test_device_augmentation_flips_per_image_and_only_in_training():
    """On the GPU each image is flipped or not by its own draw (both happen in a batch of 64), the rest of the
    pixels untouched and normalised like the CPU path; evaluation batches are never augmented."""
    import torch

    from gi_deploy.training.data import Augment
    from gi_deploy.training.device_input import DeviceFeed, augments_on_device

    cuda = torch.device("cuda")
    aug = Augment(hflip=True, vflip=False, rotation_degrees=0.0)
    assert augments_on_device(cuda, aug) and not augments_on_device(cuda, Augment(color_jitter=0.1))
    spec = PreprocessSpec(size=(8, 8), mean=(0.5, 0.4, 0.3), std=(0.25, 0.2, 0.3))
    feed = DeviceFeed(spec, cuda, channels_last=False, augment=aug, on_device=True)
    x = torch.from_numpy(_pixels(spec, 64))
    ref = torch.from_numpy(normalize_pixels(x.numpy(), spec))
    torch.cuda.manual_seed(0)
    out = feed(x, train=True).cpu()
    same = (out - ref).abs().amax(dim=(1, 2, 3)) < 1e-5
    flipped = (out - ref.flip(3)).abs().amax(dim=(1, 2, 3)) < 1e-5
    assert (same | flipped).all() and same.any() and flipped.any()
    torch.testing.assert_close(feed(x, train=False).cpu(), ref, atol=1e-5, rtol=0)
