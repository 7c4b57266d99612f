"""Which backend opens a bundle: ``open_backend`` by name, and ``auto``'s choice of the fastest one
this machine can run. One module per engine beside this one (onnxruntime.py, openvino.py,
tensorrt.py, torch.py), all behind the one :class:`~gi_deploy.runtime.backends.base.Backend`
contract; TensorRT and torch are imported only when asked for, so the onnxruntime path stays
torch-free.

On the CPU, ``auto`` chooses between onnxruntime and OpenVINO (where it is installed) by measuring
them: both run the same random batch a few times and the faster one is kept. The answer is cached
(``~/.cache/gi-deploy/auto-cpu.json``) per model file, precision, thread count, CPU model and the two
engines' versions, so only the first load on a machine pays the few seconds; a cached "onnxruntime"
does not even compile the OpenVINO model.
"""

from __future__ import annotations

import json
import os
import time
from importlib import metadata
from pathlib import Path

import numpy as np

from gi_deploy.core.bundles import BundleManifest
from gi_deploy.core.choices import BACKENDS, DEVICES, PRECISIONS
from gi_deploy.errors import ConfigError, GiDeployError
from gi_deploy.runtime.backends.base import Backend, cpu_threads
from gi_deploy.runtime.backends.onnxruntime import open_onnxruntime, ort_gpu_installed
from gi_deploy.runtime.backends.openvino import PLANS as OPENVINO_PRECISIONS
from gi_deploy.runtime.backends.openvino import open_openvino, openvino_installed
from gi_deploy.runtime.backends.tensorrt import open_tensorrt

# auto's CPU measurement: a batch like infer's smallest useful one, timed after a warm-up call (first-run
# allocations, OpenVINO's shape-specific kernels), the best of a few calls (other processes steal cores)
MEASURE_BATCH = 8
MEASURE_REPEATS = 3


def _auto(
    bundle_dir: Path,
    manifest: BundleManifest,
    precision: str,
    device: str,
    threads: int | None,
    check_hash: bool,
    compile: bool | None,
    batch_size: int,
) -> Backend:
    """The fastest backend this machine can run, in this order: a TensorRT engine (fp16, with
    TensorRT, a GPU and an engine for it), onnxruntime on a GPU provider, the torch backend on
    CUDA (when torch sees a GPU and the bundle's training run is here), then on the CPU onnxruntime
    or OpenVINO, whichever measured faster (:func:`_auto_cpu`).
    The first note says which was chosen and why the faster ones were not."""
    why: list[str] = []
    has_engine = (manifest.engine is not None and manifest.engine.status == "built") or any(
        bundle_dir.glob("model.*.engine")
    )
    if device != "cpu" and precision == "fp16" and has_engine:
        try:
            return _chosen(open_tensorrt(bundle_dir, manifest, precision), "TensorRT engine (fastest available)")
        except (GiDeployError, ImportError) as e:  # no TensorRT/GPU/engine for this GPU: the next one
            why.append(f"no TensorRT: {e}")
    elif device != "cpu":
        why.append(
            "no TensorRT engine in the bundle" if precision == "fp16" else f"TensorRT runs fp16, not {precision}"
        )
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
                return _chosen(
                    open_torch(bundle_dir, manifest, precision, "cuda", threads, compile, batch_size),
                    "torch on CUDA",
                    why,
                )
            except GiDeployError as e:  # e.g. the training run is not on this machine
                why.append(f"torch on CUDA: {e}")
        else:
            why.append(reason)
    return _auto_cpu(bundle_dir, manifest, precision, device, threads, check_hash, why)


def _auto_cpu(
    bundle_dir: Path,
    manifest: BundleManifest,
    precision: str,
    device: str,
    threads: int | None,
    check_hash: bool,
    why: list[str],
) -> Backend:
    """onnxruntime or OpenVINO, whichever measured faster on this CPU for this model (cached, see the
    module docstring); onnxruntime alone where OpenVINO is not installed, cannot run ``precision`` or
    fails its gate (the reason joins ``why``); OpenVINO alone for bf16 (onnxruntime has no bf16 model)."""
    ov_possible = device != "cuda" and precision in OPENVINO_PRECISIONS
    if ov_possible and not openvino_installed():
        why.append("OpenVINO is not installed (pip install 'gi-deploy[openvino]')")
        ov_possible = False
    if precision == "bf16" and ov_possible:
        b = open_openvino(bundle_dir, manifest, precision, "cpu", threads, check_hash)
        return _chosen(b, f"{b.detail} (onnxruntime has no bf16 model)", why)
    ort = open_onnxruntime(bundle_dir, manifest, precision, device, threads, check_hash)
    if not ov_possible or ort.device != "cpu":
        return _chosen(ort, ort.detail, why)
    key = _measure_key(manifest, precision, threads)
    cache = _read_cache()
    if cache.get(key, {}).get("fastest") == "onnxruntime":
        return _chosen(
            ort,
            f"{ort.detail}, measured faster than OpenVINO on this CPU ({_speeds(cache[key])}; cached "
            f"in {_cache_path()})",
            why,
        )
    try:
        ov = open_openvino(bundle_dir, manifest, precision, "cpu", threads, check_hash)
    except GiDeployError as e:  # its gate or its compile refused: onnxruntime, saying why
        why.append(f"OpenVINO: {e}")
        return _chosen(ort, ort.detail, why)
    cached = key in cache
    if not cached:
        x = _measure_batch(manifest)
        speeds = {b.name: round(measure_images_per_s(b, x), 2) for b in (ort, ov)}
        cache[key] = {**speeds, "fastest": max(speeds, key=speeds.get)}
        _write_cache(cache)
    best = ov if cache[key]["fastest"] == "openvino" else ort
    return _chosen(
        best,
        f"{best.detail}, measured fastest on this CPU ({_speeds(cache[key])}"
        + (f"; cached in {_cache_path()})" if cached else ")"),
        why,
    )


def _measure_batch(manifest: BundleManifest) -> np.ndarray:
    h, w = manifest.preprocess.size
    return np.random.default_rng(0).standard_normal((MEASURE_BATCH, 3, h, w)).astype(np.float32)


def measure_images_per_s(b: Backend, x: np.ndarray) -> float:
    """Images/s of ``b.run`` on ``x``: one warm-up call, then the best of MEASURE_REPEATS."""
    b.run(x)
    best = float("inf")
    for _ in range(MEASURE_REPEATS):
        t = time.perf_counter()
        b.run(x)
        best = min(best, time.perf_counter() - t)
    return len(x) / best


def _speeds(entry: dict) -> str:
    return ", ".join(f"{name} {v:.1f} img/s" for name, v in entry.items() if name != "fastest")


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "none"


def _measure_key(manifest: BundleManifest, precision: str, threads: int | None) -> str:
    """What a measurement holds for: the model file, the precision, the cores, the CPU, the engines."""
    file_precision = OPENVINO_PRECISIONS[precision][0]
    entry = manifest.models.get(file_precision)
    sha = entry.sha256[:16] if entry is not None else "?"
    return (
        f"{sha}|{precision}|{threads or cpu_threads()} threads|{_cpu_model()}|onnxruntime "
        f"{_version('onnxruntime')}|openvino {_version('openvino')}"
    )


def _cache_path() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "gi-deploy" / "auto-cpu.json"


def _read_cache() -> dict:
    try:
        return json.loads(_cache_path().read_text())
    except (OSError, ValueError):  # none yet, or unreadable: measure again
        return {}


def _write_cache(cache: dict) -> None:
    path = _cache_path()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(cache, indent=1))
        tmp.replace(path)  # two processes measuring at once: the last complete file wins
    except OSError:  # a read-only home: measure each time rather than fail
        pass


def _chosen(b: Backend, what: str, why: list[str] | None = None) -> Backend:
    b.notes.insert(0, f"auto: {what}" + (f" ({'; '.join(why)})" if why else ""))
    return b


def nvidia_gpu_present() -> bool:
    """Whether this machine shows an NVIDIA GPU, asked without importing torch or CUDA (the device
    nodes the driver creates), so ``auto`` on a CPU machine never pays torch's import."""
    if os.environ.get("CUDA_VISIBLE_DEVICES", None) in ("", "-1"):
        return False
    return any(Path("/dev").glob("nvidia[0-9]*")) or any(Path("/proc/driver/nvidia/gpus").glob("*"))


def open_backend(
    bundle_dir: Path,
    manifest: BundleManifest,
    backend: str = "auto",
    precision: str = "fp32",
    device: str = "auto",
    threads: int | None = None,
    check_hash: bool = True,
    compile: bool | None = None,
    batch_size: int = 32,
) -> Backend:
    """Load the bundle's model on ``backend`` (auto | onnxruntime | openvino | tensorrt | torch). ``compile``:
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
        raise ConfigError(
            "--backend tensorrt runs on a CUDA GPU, not with --device cpu; use --backend onnxruntime on the CPU"
        )
    if backend == "auto":
        b = _auto(bundle_dir, manifest, precision, device, threads, check_hash, compile, batch_size)
    elif backend == "onnxruntime":
        b = open_onnxruntime(bundle_dir, manifest, precision, device, threads, check_hash)
    elif backend == "openvino":
        b = open_openvino(bundle_dir, manifest, precision, device, threads, check_hash)
    elif backend == "tensorrt":
        b = open_tensorrt(bundle_dir, manifest, precision)
    else:
        from gi_deploy.runtime.backends.torch import open_torch  # lazy: torch is the training extra's

        b = open_torch(bundle_dir, manifest, precision, device, threads, compile, batch_size)
    b.spec = manifest.preprocess
    return b
