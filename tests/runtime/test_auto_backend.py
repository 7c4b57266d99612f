"""``--backend auto`` picks from what is installed, in speed order, and says why it passed over the
faster ones. The machines here have no GPU, so the GPU-side facts (an NVIDIA device, torch seeing
CUDA, onnxruntime's GPU providers) are planted; the choice logic is the code that runs on a GPU."""

import pytest

from gi_deploy.core.bundles import read_bundle_manifest
from gi_deploy.runtime.backends import select as backends
from gi_deploy.runtime.backends import torch as torch_backend
from gi_deploy.runtime.backends.base import Backend


@pytest.fixture
def bundle(tiny_deploy):
    d = tiny_deploy / "capsule"
    return d, read_bundle_manifest(d)


def _fake_torch(calls):
    def open_torch(bundle_dir, manifest, precision, device, threads=None, compile=None, batch_size=32):
        calls.append((precision, device, compile, batch_size))
        return Backend(
            "torch",
            precision,
            "torch compiled on cuda (planted)",
            lambda x: x,
            [],
            device="cuda",
            run_pixels=lambda x: x,
        )

    return open_torch


def test_a_gpu_without_onnxruntime_gpu_takes_torch_cuda_and_says_why(bundle, monkeypatch):
    calls = []
    monkeypatch.setattr(backends, "nvidia_gpu_present", lambda: True)
    monkeypatch.setattr(backends, "ort_gpu_installed", lambda: False)
    monkeypatch.setattr(torch_backend, "torch_cuda", lambda: (True, "torch on a planted GPU"))
    monkeypatch.setattr(torch_backend, "open_torch", _fake_torch(calls))
    b = backends.open_backend(*bundle, "auto", "fp16", "auto", batch_size=64)
    assert b.name == "torch" and b.device == "cuda" and calls == [("fp16", "cuda", None, 64)]
    assert b.notes[0].startswith(
        "auto: torch on CUDA (no TensorRT engine in the bundle; onnxruntime has no GPU "
        "provider here (onnxruntime-gpu is not installed))"
    )


def test_torch_that_cannot_start_falls_back_to_onnxruntime_with_every_reason(bundle, monkeypatch):
    monkeypatch.setattr(backends, "nvidia_gpu_present", lambda: True)
    monkeypatch.setattr(backends, "ort_gpu_installed", lambda: False)
    monkeypatch.setattr(torch_backend, "torch_cuda", lambda: (False, "torch 2.x sees no CUDA GPU"))
    b = backends.open_backend(*bundle, "auto", "fp32", "auto")
    assert b.name == "onnxruntime" and b.device == "cpu"
    assert "TensorRT runs fp16, not fp32" in b.notes[0] and "torch 2.x sees no CUDA GPU" in b.notes[0]


def test_a_cpu_machine_never_imports_torch_for_auto(bundle, monkeypatch):
    monkeypatch.setattr(backends, "nvidia_gpu_present", lambda: False)
    monkeypatch.setattr(torch_backend, "torch_cuda", lambda: pytest.fail("auto asked torch on a machine without a GPU"))
    b = backends.open_backend(*bundle, "auto", "fp32", "auto")
    assert b.name == "onnxruntime" and b.notes[0].startswith("auto: onnxruntime")


def test_int8_stays_on_onnxruntime(bundle, monkeypatch):
    monkeypatch.setattr(backends, "nvidia_gpu_present", lambda: True)
    monkeypatch.setattr(backends, "ort_gpu_installed", lambda: False)
    monkeypatch.setattr(torch_backend, "open_torch", lambda *a, **k: pytest.fail("torch has no int8 model"))
    with pytest.raises(Exception, match="no int8 model"):  # the tiny bundle was exported without --int8
        backends.open_backend(*bundle, "auto", "int8", "auto")
