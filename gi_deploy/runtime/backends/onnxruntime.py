"""The onnxruntime backend: a bundle's ONNX file (fp32, fp16 or the INT8 QDQ file) on the best
provider installed (TensorRT -> CUDA -> CPU), the file checked against its manifest hash and its
own metadata. onnxruntime is imported inside the functions: importing this module needs nothing."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from gi_deploy._deps import onnxruntime_builds, require_onnxruntime
from gi_deploy._io import sha256_file
from gi_deploy.core.bundles import BundleManifest, bundle_file, check_model_metadata
from gi_deploy.core.choices import PRECISIONS
from gi_deploy.errors import BundleError, ConfigError
from gi_deploy.runtime.backends.base import Backend, cpu_threads

# onnxruntime's providers, best first (the order: TensorRT -> CUDA -> CPU)
ORT_PROVIDERS = {
    "cuda": ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"],
    "cpu": ["CPUExecutionProvider"],
}


def model_file(bundle_dir: Path, manifest: BundleManifest, precision: str, check_hash: bool = True) -> Path:
    """The bundle's ONNX file for ``precision``, checked against its manifest hash."""
    if precision not in PRECISIONS:
        raise ConfigError(f"precision {precision!r} unknown; use one of {', '.join(PRECISIONS)}")
    models = manifest.models
    if precision not in models:
        raise ConfigError(
            f"bundle {bundle_dir} has no {precision} model; it has {sorted(models)}"
            + {
                "fp16": "; export with --fp16",
                "int8": "; export with --int8",
                "bf16": "; bf16 is the torch backend's (--backend torch on CUDA)",
            }.get(precision, "")
        )
    path = bundle_file(bundle_dir, models[precision].file, f"models.{precision}.file")  # inside, not a link
    if not path.is_file():
        raise BundleError(f"bundle file missing: {path}")
    if check_hash and sha256_file(path) != models[precision].sha256:
        raise BundleError(
            f"{path} does not match the sha256 in its manifest: the file was changed after export; re-export it"
        )
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


def open_onnxruntime(
    bundle_dir: Path,
    manifest: BundleManifest,
    precision: str,
    device: str,
    threads: int | None = None,
    check_hash: bool = True,
) -> Backend:
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
        digest = manifest.models[precision].sha256[:16]
        cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "gi-deploy" / "ort-trt" / digest
        cache.mkdir(parents=True, exist_ok=True)
        providers[providers.index("TensorrtExecutionProvider")] = (
            "TensorrtExecutionProvider",
            {
                "trt_engine_cache_enable": True,
                "trt_engine_cache_path": str(cache),
                "trt_timing_cache_enable": True,
                "trt_timing_cache_path": str(cache),
            },
        )
    try:
        session = ort.InferenceSession(str(path), sess_options=_ort_options(threads), providers=providers)
    except Exception as e:  # onnxruntime raises its own unrelated exception types; name the file and step
        raise BundleError(f"onnxruntime cannot load {path}: {e}") from e
    width = session.get_outputs()[0].shape[-1]
    check_model_metadata(
        bundle_dir,
        manifest,
        path,
        session.get_modelmeta().custom_metadata_map,
        width if isinstance(width, int) else None,
    )
    active = session.get_providers()[0]
    notes = []
    if len(builds := onnxruntime_builds()) > 1:
        notes.append(
            f"{' and '.join(builds)} are installed side by side: they install the same module and break each "
            "other; uninstall both and install one (pip install 'gi-deploy[cpu]' or 'gi-deploy[gpu]')"
        )
    if device == "cuda" and active == "CPUExecutionProvider":
        notes.append(
            f"requested CUDA but onnxruntime is running {path.name} on the CPU (installed providers: "
            f"{', '.join(available)}); install onnxruntime-gpu and the CUDA libraries it names, alone "
            "(onnxruntime and onnxruntime-gpu side by side break each other)"
        )
    elif (
        device == "auto"
        and active == "CPUExecutionProvider"
        and len(available) > 1
        and any(p in available for p in ("CUDAExecutionProvider", "TensorrtExecutionProvider"))
    ):
        notes.append(
            f"onnxruntime lists {', '.join(available)} but fell back to the CPU for {path.name}: the GPU "
            "provider failed to start (missing CUDA/cuDNN libraries?); run with -v for its log"
        )
    input_name = session.get_inputs()[0].name
    threads_used = session.get_session_options().intra_op_num_threads
    on_gpu = active in ("CUDAExecutionProvider", "TensorrtExecutionProvider")
    b = Backend(
        "onnxruntime",
        precision,
        f"onnxruntime {ort.__version__} {active}" + ("" if on_gpu else f" ({threads_used} threads)"),
        _bound_run(session, input_name) if on_gpu else (lambda x: session.run(["logits"], {input_name: x})[0]),
        notes,
        path.stat().st_size,
        device="cuda" if on_gpu else "cpu",
    )
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


def ort_gpu_installed() -> bool:
    """Whether the installed onnxruntime has a GPU provider (onnxruntime-gpu)."""
    require_onnxruntime()
    import onnxruntime as ort

    return any(p in ort.get_available_providers() for p in ORT_PROVIDERS["cuda"][:-1])
