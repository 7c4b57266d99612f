"""TensorRT engines, isolated here: build, stamp, run and the ``trtexec`` fallback script.

Written to TensorRT's Python API as it is in both 10.x and 11.x:

* Networks are built **strongly typed** from the fp16 ONNX, so precision comes from the graph
  itself, fp32 LayerNorm/GRN islands included. TensorRT 11 removed ``BuilderFlag.FP16``/``INT8``,
  calibrators and weak typing (NVIDIA's 10.x -> 11.x migration guide); on 11 the STRONGLY_TYPED
  creation flag is accepted and ignored, on 10 it selects the same behaviour. ``EXPLICIT_BATCH``
  is not used (ignored since 10, absent in 11).
* One optimisation profile on the batch axis: min 1, opt = max = ``max_batch``; H x W fixed.
  The runtime splits work into chunks of at most ``max_batch``.
* The timing cache is keyed by GPU compute capability and TensorRT version (a cache is only
  valid for the device and version that made it), kept in the user's cache folder.
* An engine only runs on the GPU architecture and TensorRT version that built it (TensorRT#2176):
  its file name and the manifest carry both, and :func:`check_stamp` refuses a mismatch.

Nothing here is mocked in tests: without TensorRT and a CUDA GPU, export writes
``build_engine.sh`` (the exact ``trtexec`` command) instead, and the tests that need an engine
skip with :func:`tensorrt_status`'s reason.
"""

from __future__ import annotations

import logging
import os
import shlex
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from gi_deploy.errors import BundleError, DependencyError, ExportError

log = logging.getLogger(__name__)

MIN_MAJOR = 10
WORKSPACE_BYTES = 4 << 30
BUILD_SCRIPT = "build_engine.sh"
JETSON_TRTEXEC = "/usr/src/tensorrt/bin/trtexec"  # JetPack installs it here, off PATH


@dataclass(frozen=True)
class EngineTarget:
    """The GPU and TensorRT version an engine is built for (and only runs on)."""

    gpu_name: str
    compute_capability: str  # "9.0"
    tensorrt_version: str  # "10.16.1.11"

    @property
    def tag(self) -> str:
        return f"sm{self.compute_capability.replace('.', '')}-trt{self.tensorrt_version}"

    @property
    def gpu_slug(self) -> str:
        return "".join(c if c.isalnum() else "-" for c in self.gpu_name.lower()).strip("-")

    @property
    def engine_file(self) -> str:
        return f"model.{self.tag}.engine"

    def to_dict(self) -> dict:
        return {"gpu_name": self.gpu_name, "compute_capability": self.compute_capability,
                "tensorrt_version": self.tensorrt_version}


def tensorrt_status() -> tuple[bool, str]:
    """(True, what) when an engine can be built and run here, else (False, why not)."""
    try:
        import tensorrt as trt
    except ImportError:
        return False, "TensorRT is not installed"
    major = int(trt.__version__.split(".")[0])
    if major < MIN_MAJOR:
        return False, f"TensorRT {trt.__version__} is older than {MIN_MAJOR}"
    try:
        import torch
    except ImportError:
        return False, "torch is needed to drive the CUDA buffers of the engine check"
    if not torch.cuda.is_available():
        return False, f"TensorRT {trt.__version__} but no CUDA GPU"
    return True, f"TensorRT {trt.__version__} on {current_target().gpu_name}"


def current_target() -> EngineTarget:
    """This machine's GPU 0 and TensorRT version."""
    import tensorrt as trt
    import torch

    major, minor = torch.cuda.get_device_capability(0)
    return EngineTarget(torch.cuda.get_device_name(0), f"{major}.{minor}", trt.__version__)


def check_stamp(stamp: dict, engine_path: Path) -> None:
    """Raise BundleError, with the rebuild command, when the engine was built for another GPU
    architecture or TensorRT version than this machine has."""
    here = current_target()
    for key, label in (("compute_capability", "GPU compute capability"), ("tensorrt_version", "TensorRT version")):
        if stamp.get(key) != getattr(here, key):
            raise BundleError(f"{engine_path.name} was built for {label} {stamp.get(key)}, this machine has "
                              f"{getattr(here, key)}; engines only run where they were built. Rebuild it here: "
                              f"bash {engine_path.parent / BUILD_SCRIPT}")


def timing_cache_path(target: EngineTarget) -> Path:
    """Per GPU model (two GPUs of one architecture time tactics differently) and TensorRT version."""
    base = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return base / "gi-deploy" / "tensorrt" / f"timing.{target.gpu_slug}.{target.tag}.cache"


def build_engine(onnx_path: Path, out_dir: Path, input_name: str, input_size: tuple[int, int],
                 max_batch: int) -> tuple[Path, dict]:
    """Build the strongly typed engine of ``onnx_path`` (the fp16 ONNX) into ``out_dir``.
    Returns its path and the manifest stamp. Raises DependencyError without TensorRT or a GPU,
    ExportError when parsing or building fails (with TensorRT's own messages)."""
    ok, why = tensorrt_status()
    if not ok:
        raise DependencyError(why)
    import tensorrt as trt

    target = current_target()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise ExportError(f"TensorRT {target.tensorrt_version} cannot parse {onnx_path.name}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, WORKSPACE_BYTES)
    h, w = input_size
    profile = builder.create_optimization_profile()
    profile.set_shape(input_name, (1, 3, h, w), (max_batch, 3, h, w), (max_batch, 3, h, w))
    config.add_optimization_profile(profile)
    cache_path = timing_cache_path(target)
    cache = config.create_timing_cache(cache_path.read_bytes() if cache_path.is_file() else b"")
    if cache is None or not config.set_timing_cache(cache, ignore_mismatch=False):
        log.warning("timing cache %s is unreadable or from another device; starting a new one", cache_path)
        cache = config.create_timing_cache(b"")
        config.set_timing_cache(cache, ignore_mismatch=False)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise ExportError(f"TensorRT {target.tensorrt_version} failed to build an engine from {onnx_path.name} "
                          "(see its log above)")
    cache_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache_path.with_name(cache_path.name + f".{os.getpid()}.tmp")
    tmp.write_bytes(bytes(memoryview(config.get_timing_cache().serialize())))
    os.replace(tmp, cache_path)  # atomic: a concurrent build never reads half a cache
    engine_path = out_dir / target.engine_file
    engine_path.write_bytes(bytes(memoryview(serialized)))
    stamp = {**target.to_dict(), "max_batch": max_batch, "input_size": list(input_size), "strongly_typed": True,
             "built_from": onnx_path.name, "timing_cache": str(cache_path)}
    return engine_path, stamp


class EngineRunner:
    """A deserialised engine with one execution context and CUDA stream, kept for many batches
    (the runtime's TensorRT backend); ``runner(x)`` runs float32 (N, 3, H, W) in chunks of at most
    ``max_batch`` and returns float32 logits (N, C)."""

    def __init__(self, engine_path: Path, max_batch: int):
        import tensorrt as trt
        import torch

        self.engine_path, self.max_batch = engine_path, max_batch
        logger = trt.Logger(trt.Logger.WARNING)
        self._engine = trt.Runtime(logger).deserialize_cuda_engine(engine_path.read_bytes())
        if self._engine is None:
            raise BundleError(f"TensorRT cannot load {engine_path}; rebuild it with {BUILD_SCRIPT}")
        self._context = self._engine.create_execution_context()
        names = [self._engine.get_tensor_name(i) for i in range(self._engine.num_io_tensors)]
        (self._inp,) = [n for n in names if self._engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        (self._out,) = [n for n in names if self._engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        self._out_dtype = {trt.float32: torch.float32, trt.float16: torch.float16}[
            self._engine.get_tensor_dtype(self._out)]
        self._stream = torch.cuda.Stream()

    def __call__(self, inputs: np.ndarray) -> np.ndarray:
        import torch

        results = []
        for i in range(0, len(inputs), self.max_batch):
            with torch.cuda.stream(self._stream):  # copy, allocation and the engine ordered on one stream
                x = torch.from_numpy(np.ascontiguousarray(inputs[i:i + self.max_batch])).cuda(non_blocking=True)
                self._context.set_input_shape(self._inp, tuple(x.shape))
                y = torch.empty(tuple(self._context.get_tensor_shape(self._out)), dtype=self._out_dtype,
                                device="cuda")
                self._context.set_tensor_address(self._inp, x.data_ptr())
                self._context.set_tensor_address(self._out, y.data_ptr())
                if not self._context.execute_async_v3(self._stream.cuda_stream):
                    raise ExportError(f"TensorRT failed to run {self.engine_path.name} on a batch of {len(x)}")
            self._stream.synchronize()
            results.append(y.float().cpu().numpy())
        return np.concatenate(results)


def run_engine(engine_path: Path, inputs: np.ndarray, max_batch: int) -> np.ndarray:
    """Logits of the engine on float32 ``inputs`` (N, 3, H, W), in chunks of at most ``max_batch``."""
    return EngineRunner(engine_path, max_batch)(inputs)


def trtexec_command(onnx_name: str, input_name: str, input_size: tuple[int, int], max_batch: int,
                    engine_file: str = "$ENGINE", cache_file: str = "$CACHE") -> str:
    """The trtexec equivalent of :func:`build_engine` (TensorRT 10: add --stronglyTyped; 11 always is)."""
    h, w = input_size
    shape = lambda b: f"{input_name}:{b}x3x{h}x{w}"  # noqa: E731
    return (f"trtexec --onnx={onnx_name} --minShapes={shape(1)} --optShapes={shape(max_batch)} "
            f"--maxShapes={shape(max_batch)} --memPoolSize=workspace:{WORKSPACE_BYTES >> 20} "
            f"--timingCacheFile={cache_file} --saveEngine={engine_file}")


def write_build_script(bundle_dir: Path, onnx_name: str, input_name: str, input_size: tuple[int, int],
                       max_batch: int) -> tuple[Path, str]:
    """Write ``build_engine.sh``: run on the target (GPU box or Jetson), it names the engine after
    that machine's compute capability and TensorRT version, as :func:`build_engine` does. Returns
    the script's path and the trtexec command it runs."""
    command = trtexec_command(onnx_name, input_name, input_size, max_batch, '"$ENGINE"', '"$CACHE"')
    script = f"""#!/usr/bin/env bash
# Build this bundle's TensorRT engine on the machine that will run it (an engine only runs on the
# GPU architecture and TensorRT version that built it). Written by gi-deploy export --engine on a
# machine without TensorRT or a GPU. Overrides: TRTEXEC, GPU_CC (e.g. 87 for Jetson Orin), TRT_VERSION.
set -euo pipefail
cd "$(dirname "$0")"
TRTEXEC=${{TRTEXEC:-$(command -v trtexec || echo {JETSON_TRTEXEC})}}
[ -x "$TRTEXEC" ] || {{ echo "trtexec not found: set TRTEXEC=/path/to/trtexec" >&2; exit 2; }}
GPU_CC=${{GPU_CC:-$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -n1 | tr -d '.' || true)}}
[ -n "$GPU_CC" ] || {{ echo "cannot read the GPU's compute capability (no nvidia-smi, e.g. on a Jetson): set GPU_CC, e.g. GPU_CC=87 bash $0" >&2; exit 2; }}
TRT_VERSION=${{TRT_VERSION:-$(python3 -c 'import tensorrt; print(tensorrt.__version__)' 2>/dev/null || dpkg-query -W -f='${{Version}}' libnvinfer-bin 2>/dev/null | cut -d- -f1 || true)}}
[ -n "$TRT_VERSION" ] || {{ echo "cannot read the TensorRT version: set TRT_VERSION, e.g. TRT_VERSION=10.3.0 bash $0" >&2; exit 2; }}
GPU_NAME=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -n1 | tr '[:upper:]' '[:lower:]' | tr -c 'a-z0-9\\n' '-' || true)
ENGINE="model.sm${{GPU_CC}}-trt${{TRT_VERSION}}.engine"
CACHE="${{XDG_CACHE_HOME:-$HOME/.cache}}/gi-deploy/tensorrt/timing.${{GPU_NAME:-sm$GPU_CC}}.sm${{GPU_CC}}-trt${{TRT_VERSION}}.cache"
mkdir -p "$(dirname "$CACHE")"
STRONG=""
if [ "${{TRT_VERSION%%.*}}" -lt 11 ]; then STRONG="--stronglyTyped"; fi  # TensorRT 11 is always strongly typed
"$TRTEXEC" {command.removeprefix("trtexec ")} $STRONG
echo "built $ENGINE from {shlex.quote(onnx_name)}; verify it against model.onnx before use"
"""
    path = bundle_dir / BUILD_SCRIPT
    path.write_text(script)
    path.chmod(0o755)
    return path, command
