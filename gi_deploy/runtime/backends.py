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

import numpy as np

from gi_deploy._deps import onnxruntime_builds, require_onnxruntime
from gi_deploy._io import sha256_file
from gi_deploy.core.bundles import BUILD_SCRIPT, bundle_file, check_model_metadata
from gi_deploy.core.choices import BACKENDS, DEVICES, PRECISIONS
from gi_deploy.core.preprocess import PreprocessSpec
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
                          + {"fp16": "; export with --fp16", "int8": "; export with --int8",
                             "bf16": "; bf16 is the torch backend's (--backend torch on CUDA)"}.get(precision, ""))
    path = bundle_file(bundle_dir, models[precision]["file"], f"models.{precision}.file")  # inside, not a link
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
    CPU silently when CUDA libraries are missing) is reported in ``notes``, and so are two
    onnxruntime builds installed side by side. Raises DependencyError naming both installs when
    no onnxruntime is installed."""
    require_onnxruntime()
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
    width = session.get_outputs()[0].shape[-1]
    check_model_metadata(bundle_dir, manifest, path, session.get_modelmeta().custom_metadata_map,
                         width if isinstance(width, int) else None)
    active = session.get_providers()[0]
    notes = []
    if len(builds := onnxruntime_builds()) > 1:
        notes.append(f"{' and '.join(builds)} are installed side by side: they install the same module and break each "
                     "other; uninstall both and install one (pip install 'gi-deploy[cpu]' or 'gi-deploy[gpu]')")
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
    on_gpu = active in ("CUDAExecutionProvider", "TensorrtExecutionProvider")
    b = Backend("onnxruntime", precision, f"onnxruntime {ort.__version__} {active}"
                + ("" if on_gpu else f" ({threads_used} threads)"),
                _bound_run(session, input_name) if on_gpu else (lambda x: session.run(["logits"], {input_name: x})[0]),
                notes, path.stat().st_size, device="cuda" if on_gpu else "cpu")
    if "features" in [o.name for o in session.get_outputs()]:  # bundle format 3: one call gives both
        b.run_features = lambda x: tuple(session.run(["logits", "features"], {input_name: x}))
    return b


def _bound_run(session, input_name: str):
    """onnxruntime on a GPU provider with I/O binding: the input is copied to the device once and the
    logits are bound on the device, so no intermediate host copy is made (onnxruntime's guidance for
    CUDA). Unmeasured here: no onnxruntime-gpu on the machines this was written on."""
    import onnxruntime as ort

    names = [o.name for o in session.get_outputs()]
    output_name = "logits" if "logits" in names else names[0]

    def run(x: np.ndarray) -> np.ndarray:
        binding = session.io_binding()
        binding.bind_ortvalue_input(input_name, ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(x), "cuda", 0))
        binding.bind_output(output_name, "cuda", 0)
        session.run_with_iobinding(binding)
        return binding.copy_outputs_to_cpu()[0]

    return run


def _engine_for_here(bundle_dir: Path, manifest: dict) -> tuple[Path, dict, list[str]]:
    """The bundle's engine for this GPU and TensorRT version: the one built and verified at export
    (stamp checked), else one built here by build_engine.sh (named for this target)."""
    ok, why = tensorrt.tensorrt_status()
    if not ok:
        raise DependencyError(f"--backend tensorrt: {why}; use --backend onnxruntime")
    engine = manifest.get("engine") or {}
    if engine.get("status") == "built":
        path = bundle_file(bundle_dir, engine["file"], "engine.file")
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
    spec = PreprocessSpec.from_dict(manifest["preprocess"])
    runner = tensorrt.EngineRunner(path, int(stamp.get("max_batch", 32)), spec)
    return Backend("tensorrt", "fp16", f"TensorRT {tensorrt.current_target().tensorrt_version} {path.name}",
                   runner, notes, path.stat().st_size, device="cuda", run_pixels=runner.run_pixels,
                   run_features=runner.logits_and_features if runner.has_features else None)


def _auto(bundle_dir: Path, manifest: dict, precision: str, device: str, threads: int | None,
          check_hash: bool, compile: bool | None, batch_size: int) -> Backend:
    """The fastest backend this machine can run, in this order: a TensorRT engine (fp16, with
    TensorRT, a GPU and an engine for it), onnxruntime on a GPU provider, the torch backend on
    CUDA (when torch sees a GPU and the bundle's training run is here), onnxruntime on the CPU.
    The first note says which was chosen and why the faster ones were not."""
    why: list[str] = []
    has_engine = (manifest.get("engine") or {}).get("status") == "built" or any(bundle_dir.glob("model.*.engine"))
    if device != "cpu" and precision == "fp16" and has_engine:
        try:
            return _chosen(open_tensorrt(bundle_dir, manifest, precision), "TensorRT engine (fastest available)")
        except (GiDeployError, ImportError) as e:  # no TensorRT/GPU/engine for this GPU: the next one
            why.append(f"no TensorRT: {e}")
    elif device != "cpu":
        why.append("no TensorRT engine in the bundle" if precision == "fp16" else f"TensorRT runs fp16, not {precision}")
    gpu_providers = device != "cpu" and _ort_gpu_installed()
    if gpu_providers:
        b = open_onnxruntime(bundle_dir, manifest, precision, device, threads, check_hash)
        if b.device == "cuda":
            return _chosen(b, b.detail, why)
        why.append(f"onnxruntime's GPU provider did not start ({b.detail})")
    elif device != "cpu":
        why.append("onnxruntime has no GPU provider here (onnxruntime-gpu is not installed)")
    if device != "cpu" and precision != "int8" and (device == "cuda" or nvidia_gpu_present()):
        from gi_deploy.runtime.torch_backend import open_torch, torch_cuda  # lazy: torch is optional

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


def _ort_gpu_installed() -> bool:
    require_onnxruntime()
    import onnxruntime as ort

    return any(p in ort.get_available_providers() for p in ORT_PROVIDERS["cuda"][:-1])


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
        from gi_deploy.runtime.torch_backend import open_torch  # lazy: torch is the training extra's

        b = open_torch(bundle_dir, manifest, precision, device, threads, compile, batch_size)
    b.spec = PreprocessSpec.from_dict(manifest["preprocess"])
    return b
