"""Which backend opens a bundle: ``open_backend`` by name, and ``auto``'s choice of the fastest one
this machine can run. One module per engine beside this one (onnxruntime.py, tensorrt.py,
torch.py), all behind the one :class:`~gi_deploy.runtime.backends.base.Backend` contract; TensorRT
and torch are imported only when asked for, so the onnxruntime path stays torch-free.
"""

from __future__ import annotations

import os
from pathlib import Path

from gi_deploy.core.choices import BACKENDS, DEVICES, PRECISIONS
from gi_deploy.errors import ConfigError, GiDeployError
from gi_deploy.runtime.backends.base import Backend
from gi_deploy.runtime.backends.onnxruntime import open_onnxruntime, ort_gpu_installed
from gi_deploy.runtime.backends.tensorrt import open_tensorrt


def _auto(bundle_dir: Path, manifest: dict, precision: str, device: str, threads: int | None,
          check_hash: bool, compile: bool | None, batch_size: int) -> Backend:
    """The fastest backend this machine can run, in this order: a TensorRT engine (fp16, with
    TensorRT, a GPU and an engine for it), onnxruntime on a GPU provider, the torch backend on
    CUDA (when torch sees a GPU and the bundle's training run is here), onnxruntime on the CPU.
    The first note says which was chosen and why the faster ones were not."""
    why: list[str] = []
    has_engine = (manifest.engine is not None and manifest.engine.status == "built") or any(
        bundle_dir.glob("model.*.engine"))
    if device != "cpu" and precision == "fp16" and has_engine:
        try:
            return _chosen(open_tensorrt(bundle_dir, manifest, precision), "TensorRT engine (fastest available)")
        except (GiDeployError, ImportError) as e:  # no TensorRT/GPU/engine for this GPU: the next one
            why.append(f"no TensorRT: {e}")
    elif device != "cpu":
        why.append("no TensorRT engine in the bundle" if precision == "fp16" else f"TensorRT runs fp16, not {precision}")
    gpu_providers = device != "cpu" and ort_gpu_installed()
    if gpu_providers:
        b = open_onnxruntime(bundle_dir, manifest, precision, device, threads, check_hash)
        if b.device == "cuda":
            return _chosen(b, b.detail, why)
        why.append(f"onnxruntime's GPU provider did not start ({b.detail})")
    elif device != "cpu":
        why.append("onnxruntime has no GPU provider here (onnxruntime-gpu is not installed)")
    if device != "cpu" and precision != "int8" and (device == "cuda" or nvidia_gpu_present()):
        from gi_deploy.runtime.backends.torch import open_torch, torch_cuda  # lazy: torch is optional

        ok, reason = torch_cuda()
        if ok:
            try:
                return _chosen(open_torch(bundle_dir, manifest, precision, "cuda", threads, compile, batch_size),
                               "torch on CUDA", why)
            except GiDeployError as e:  # e.g. the training run is not on this machine
                why.append(f"torch on CUDA: {e}")
        else:
            why.append(reason)
    b = open_onnxruntime(bundle_dir, manifest, precision, device, threads, check_hash)
    return _chosen(b, b.detail, why)


def _chosen(b: Backend, what: str, why: list[str] | None = None) -> Backend:
    b.notes.insert(0, f"auto: {what}" + (f" ({'; '.join(why)})" if why else ""))
    return b


def nvidia_gpu_present() -> bool:
    """Whether this machine shows an NVIDIA GPU, asked without importing torch or CUDA (the device
    nodes the driver creates), so ``auto`` on a CPU machine never pays torch's import."""
    if os.environ.get("CUDA_VISIBLE_DEVICES", None) in ("", "-1"):
        return False
    return any(Path("/dev").glob("nvidia[0-9]*")) or any(Path("/proc/driver/nvidia/gpus").glob("*"))


def open_backend(bundle_dir: Path, manifest: dict, backend: str = "auto", precision: str = "fp32",
                 device: str = "auto", threads: int | None = None, check_hash: bool = True,
                 compile: bool | None = None, batch_size: int = 32) -> Backend:
    """Load the bundle's model on ``backend`` (auto | onnxruntime | tensorrt | torch). ``compile``:
    torch.compile the torch backend (None: on CUDA only), at ``batch_size`` rows.

    Raises ConfigError for an unknown name or a combination that does not exist (int8 on
    TensorRT or torch, TensorRT with device cpu), BundleError for missing/altered files or an
    engine built for another GPU (with the rebuild command), DependencyError when the backend's
    library or GPU is missing."""
    if backend not in BACKENDS:
        raise ConfigError(f"backend {backend!r} unknown; use one of {', '.join(BACKENDS)}")
    if device not in DEVICES:
        raise ConfigError(f"device {device!r} unknown; use one of {', '.join(DEVICES)}")
    if precision not in PRECISIONS:
        raise ConfigError(f"precision {precision!r} unknown; use one of {', '.join(PRECISIONS)}")
    if backend == "tensorrt" and device == "cpu":  # an engine runs on the GPU only: never silently ignore --device
        raise ConfigError("--backend tensorrt runs on a CUDA GPU, not with --device cpu; use --backend onnxruntime "
                          "on the CPU")
    if backend == "auto":
        b = _auto(bundle_dir, manifest, precision, device, threads, check_hash, compile, batch_size)
    elif backend == "onnxruntime":
        b = open_onnxruntime(bundle_dir, manifest, precision, device, threads, check_hash)
    elif backend == "tensorrt":
        b = open_tensorrt(bundle_dir, manifest, precision)
    else:
        from gi_deploy.runtime.backends.torch import open_torch  # lazy: torch is the training extra's

        b = open_torch(bundle_dir, manifest, precision, device, threads, compile, batch_size)
    b.spec = manifest.preprocess
    return b
