"""Inference backends for a bundle: onnxruntime (TensorRT -> CUDA -> CPU providers), TensorRT
engines, and the merged torch model (for debugging and as the benchmark's baseline).

Each backend turns float32 (N, 3, H, W) into float32 logits (N, C) and says, in ``detail``, what it
really runs on; ``notes`` carries what the user must hear (a requested provider that is not the
active one, an unverified engine). The TensorRT runner (runtime/tensorrt.py) and the torch backend
(runtime/torch_backend.py) are imported only when asked for, so the onnxruntime path stays
torch-free.
"""

from __future__ import annotations

import os
from pathlib import Path

from gi_deploy._io import sha256_file
from gi_deploy.core.bundles import BUILD_SCRIPT
from gi_deploy.core.choices import BACKENDS, DEVICES, PRECISIONS
from gi_deploy.errors import BundleError, ConfigError, DependencyError, GiDeployError
from gi_deploy.runtime import tensorrt  # imports TensorRT itself only when an engine is opened
from gi_deploy.runtime.base import Backend, cpu_threads

# onnxruntime's providers, best first (the order: TensorRT -> CUDA -> CPU)
ORT_PROVIDERS = {"cuda": ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"],
                 "cpu": ["CPUExecutionProvider"]}


def model_file(bundle_dir: Path, manifest: dict, precision: str, check_hash: bool = True) -> Path:
    """The bundle's ONNX file for ``precision``, checked against its manifest hash."""
    if precision not in PRECISIONS:
        raise ConfigError(f"precision {precision!r} unknown; use one of {', '.join(PRECISIONS)}")
    models = manifest["models"]
    if precision not in models:
        raise ConfigError(f"bundle {bundle_dir} has no {precision} model; it has {sorted(models)}"
                          + {"fp16": "; export with --fp16", "int8": "; export with --int8"}.get(precision, ""))
    path = bundle_dir / models[precision]["file"]
    if not path.is_file():
        raise BundleError(f"bundle file missing: {path}")
    if check_hash and sha256_file(path) != models[precision]["sha256"]:
        raise BundleError(f"{path} does not match the sha256 in its manifest: the file was changed after export; "
                          "re-export it")
    return path


def _ort_options(threads: int | None):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # one model call at a time uses every core this process has; decoding runs in other processes
    so.intra_op_num_threads = threads or cpu_threads()
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    return so


def open_onnxruntime(bundle_dir: Path, manifest: dict, precision: str, device: str, threads: int | None = None,
                     check_hash: bool = True) -> Backend:
    """An onnxruntime session on the best provider installed for ``device`` (auto: TensorRT, CUDA,
    then CPU). A requested GPU provider that is not the active one (onnxruntime-gpu falls back to
    CPU silently when CUDA libraries are missing) is reported in ``notes``."""
    import onnxruntime as ort

    path = model_file(bundle_dir, manifest, precision, check_hash)
    available = ort.get_available_providers()
    wanted = ORT_PROVIDERS["cpu" if device == "cpu" else "cuda"]
    providers: list = [p for p in wanted if p in available] or ["CPUExecutionProvider"]
    if "TensorrtExecutionProvider" in providers:
        # the TensorRT provider caches engines by graph: two sources of one architecture would share one
        # engine (onnxruntime#6455); keying the cache folder by the model's hash keeps them apart
        digest = manifest["models"][precision]["sha256"][:16]
        cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "gi-deploy" / "ort-trt" / digest
        cache.mkdir(parents=True, exist_ok=True)
        providers[providers.index("TensorrtExecutionProvider")] = (
            "TensorrtExecutionProvider", {"trt_engine_cache_enable": True, "trt_engine_cache_path": str(cache),
                                          "trt_timing_cache_enable": True, "trt_timing_cache_path": str(cache)})
    try:
        session = ort.InferenceSession(str(path), sess_options=_ort_options(threads), providers=providers)
    except Exception as e:  # onnxruntime raises its own unrelated exception types; name the file and step
        raise BundleError(f"onnxruntime cannot load {path}: {e}") from e
    active = session.get_providers()[0]
    notes = []
    if device == "cuda" and active == "CPUExecutionProvider":
        notes.append(f"requested CUDA but onnxruntime is running {path.name} on the CPU (installed providers: "
                     f"{', '.join(available)}); install onnxruntime-gpu and the CUDA libraries it names, alone "
                     "(onnxruntime and onnxruntime-gpu side by side break each other)")
    elif device == "auto" and active == "CPUExecutionProvider" and len(available) > 1 and any(
            p in available for p in ("CUDAExecutionProvider", "TensorrtExecutionProvider")):
        notes.append(f"onnxruntime lists {', '.join(available)} but fell back to the CPU for {path.name}: the GPU "
                     "provider failed to start (missing CUDA/cuDNN libraries?); run with -v for its log")
    input_name = session.get_inputs()[0].name
    threads_used = session.get_session_options().intra_op_num_threads
    b = Backend("onnxruntime", precision, f"onnxruntime {ort.__version__} {active}"
                + (f" ({threads_used} threads)" if active == "CPUExecutionProvider" else ""),
                lambda x: session.run(None, {input_name: x})[0], notes, path.stat().st_size)
    if "features" in [o.name for o in session.get_outputs()]:  # bundle format 3: one call gives both
        b.run_features = lambda x: tuple(session.run(["logits", "features"], {input_name: x}))
    return b


def _engine_for_here(bundle_dir: Path, manifest: dict) -> tuple[Path, dict, list[str]]:
    """The bundle's engine for this GPU and TensorRT version: the one built and verified at export
    (stamp checked), else one built here by build_engine.sh (named for this target)."""
    ok, why = tensorrt.tensorrt_status()
    if not ok:
        raise DependencyError(f"--backend tensorrt: {why}; use --backend onnxruntime")
    engine = manifest.get("engine") or {}
    if engine.get("status") == "built":
        path = bundle_dir / engine["file"]
        tensorrt.check_stamp(engine, path)  # raises with the rebuild command on another GPU/TensorRT
        if not path.is_file():
            raise BundleError(f"bundle file missing: {path}; rebuild it: bash {bundle_dir / BUILD_SCRIPT}")
        if sha256_file(path) != engine["sha256"]:
            raise BundleError(f"{path} does not match the sha256 in its manifest; rebuild it: "
                              f"bash {bundle_dir / BUILD_SCRIPT}")
        return path, engine, []
    here = tensorrt.current_target()
    path = bundle_dir / here.engine_file
    if not path.is_file():
        built = sorted(p.name for p in bundle_dir.glob("model.*.engine"))
        raise BundleError(f"no TensorRT engine for this GPU ({here.gpu_name}, {here.tag}) in {bundle_dir}"
                          + (f" (it has {', '.join(built)}, built for another GPU or TensorRT)" if built else "")
                          + f"; build it here: bash {bundle_dir / BUILD_SCRIPT}")
    return path, {"max_batch": manifest.get("options", {}).get("max_batch", 32)}, [
        f"{path.name} was built on this machine by {BUILD_SCRIPT}, not checked against the fp32 ONNX at "
        "export; compare a labelled folder with --backend onnxruntime before trusting it"]


def open_tensorrt(bundle_dir: Path, manifest: dict, precision: str) -> Backend:
    """The bundle's TensorRT engine (built from the fp16 ONNX, so ``precision`` must be fp16)."""
    if precision != "fp16":
        raise ConfigError(f"TensorRT engines are built strongly typed from the fp16 ONNX; use --precision fp16 "
                          f"with --backend tensorrt (got {precision})")
    path, stamp, notes = _engine_for_here(bundle_dir, manifest)
    runner = tensorrt.EngineRunner(path, int(stamp.get("max_batch", 32)))
    return Backend("tensorrt", "fp16", f"TensorRT {tensorrt.current_target().tensorrt_version} {path.name}",
                   runner, notes, path.stat().st_size,
                   run_features=runner.logits_and_features if runner.has_features else None)


def _auto(bundle_dir: Path, manifest: dict, precision: str, device: str, threads: int | None,
          check_hash: bool) -> Backend:
    """The fastest backend this machine can run: a TensorRT engine when TensorRT, a GPU and an
    engine for it are here (fp16 only), else onnxruntime on its best provider."""
    reason = ""
    has_engine = (manifest.get("engine") or {}).get("status") == "built" or any(bundle_dir.glob("model.*.engine"))
    if precision == "fp16" and device != "cpu" and not has_engine:  # do not even import TensorRT
        reason = " (no TensorRT engine in the bundle: export --engine, or run its build_engine.sh)"
    elif precision == "fp16" and device != "cpu":
        try:
            b = open_tensorrt(bundle_dir, manifest, precision)
            b.notes.insert(0, "auto: TensorRT engine (fastest available)")
            return b
        except (GiDeployError, ImportError) as e:  # no TensorRT/GPU/engine for this GPU: onnxruntime is next
            reason = f" (no TensorRT: {e})"
    b = open_onnxruntime(bundle_dir, manifest, precision, device, threads, check_hash)
    b.notes.insert(0, f"auto: {b.detail}{reason}")
    return b


def open_backend(bundle_dir: Path, manifest: dict, backend: str = "auto", precision: str = "fp32",
                 device: str = "auto", threads: int | None = None, check_hash: bool = True) -> Backend:
    """Load the bundle's model on ``backend`` (auto | onnxruntime | tensorrt | torch).

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
        return _auto(bundle_dir, manifest, precision, device, threads, check_hash)
    if backend == "onnxruntime":
        return open_onnxruntime(bundle_dir, manifest, precision, device, threads, check_hash)
    if backend == "tensorrt":
        return open_tensorrt(bundle_dir, manifest, precision)
    from gi_deploy.runtime.torch_backend import open_torch  # lazy: torch is the training extra's

    return open_torch(bundle_dir, manifest, precision, device, threads)
