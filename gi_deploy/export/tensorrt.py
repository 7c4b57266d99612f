"""TensorRT engine building, isolated here (the runner and the stamp check are the runtime's,
runtime/backends/tensorrt.py): build, stamp and the ``trtexec`` fallback script.

Written to TensorRT's Python API as it is in both 10.x and 11.x:

* Networks are built **strongly typed** from the fp16 ONNX, so precision comes from the graph
  itself, fp32 LayerNorm/GRN islands included. TensorRT 11 removed ``BuilderFlag.FP16``/``INT8``,
  calibrators and weak typing (NVIDIA's 10.x -> 11.x migration guide); on 11 the STRONGLY_TYPED
  creation flag is accepted and ignored, on 10 it selects the same behaviour. ``EXPLICIT_BATCH``
  is not used (ignored since 10, absent in 11).
* One optimisation profile on the batch axis: min 1, opt = max = ``max_batch``; H x W fixed.
  The runtime splits work into chunks of at most ``max_batch``.
* The timing cache is keyed by GPU model and TensorRT version (a cache is only valid for the
  device and version that made it), kept in the user's cache folder.

Nothing here is mocked in tests: without TensorRT and a CUDA GPU, export writes
``build_engine.sh`` (the exact ``trtexec`` command) instead, and the tests that need an engine
skip with :func:`~gi_deploy.runtime.backends.tensorrt.tensorrt_status`'s reason.
"""

from __future__ import annotations

import logging
import os
import shlex
from pathlib import Path

import numpy as np

from gi_deploy.core.bundles import BUILD_SCRIPT
from gi_deploy.errors import DependencyError, ExportError
from gi_deploy.export import verify
from gi_deploy.export.onnx_export import INPUT_NAME
from gi_deploy.runtime.backends.tensorrt import EngineRunner, EngineTarget, current_target, tensorrt_status

log = logging.getLogger(__name__)

WORKSPACE_BYTES = 4 << 30
JETSON_TRTEXEC = "/usr/src/tensorrt/bin/trtexec"  # JetPack installs it here, off PATH


def timing_cache_path(target: EngineTarget) -> Path:
    """Per GPU model (two GPUs of one architecture time tactics differently) and TensorRT version."""
    base = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return base / "gi-deploy" / "tensorrt" / f"timing.{target.gpu_slug}.{target.tag}.cache"


def build_engine(
    onnx_path: Path, out_dir: Path, input_name: str, input_size: tuple[int, int], max_batch: int
) -> tuple[Path, dict]:
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
        raise ExportError(
            f"TensorRT {target.tensorrt_version} failed to build an engine from {onnx_path.name} (see its log above)"
        )
    cache_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache_path.with_name(cache_path.name + f".{os.getpid()}.tmp")
    tmp.write_bytes(bytes(memoryview(config.get_timing_cache().serialize())))
    os.replace(tmp, cache_path)  # atomic: a concurrent build never reads half a cache
    engine_path = out_dir / target.engine_file
    engine_path.write_bytes(bytes(memoryview(serialized)))
    stamp = {
        **target.to_dict(),
        "max_batch": max_batch,
        "input_size": list(input_size),
        "strongly_typed": True,
        "built_from": onnx_path.name,
        "timing_cache": str(cache_path),
    }
    return engine_path, stamp


def run_engine(engine_path: Path, inputs: np.ndarray, max_batch: int) -> np.ndarray:
    """Logits of the engine on float32 ``inputs`` (N, 3, H, W), in chunks of at most ``max_batch``."""
    return EngineRunner(engine_path, max_batch)(inputs)


def trtexec_command(
    onnx_name: str,
    input_name: str,
    input_size: tuple[int, int],
    max_batch: int,
    engine_file: str = "$ENGINE",
    cache_file: str = "$CACHE",
) -> str:
    """The trtexec equivalent of :func:`build_engine` (TensorRT 10: add --stronglyTyped; 11 always is)."""
    h, w = input_size
    shape = lambda b: f"{input_name}:{b}x3x{h}x{w}"  # noqa: E731
    return (
        f"trtexec --onnx={onnx_name} --minShapes={shape(1)} --optShapes={shape(max_batch)} "
        f"--maxShapes={shape(max_batch)} --memPoolSize=workspace:{WORKSPACE_BYTES >> 20} "
        f"--timingCacheFile={cache_file} --saveEngine={engine_file}"
    )


def write_build_script(
    bundle_dir: Path, onnx_name: str, input_name: str, input_size: tuple[int, int], max_batch: int
) -> tuple[Path, str]:
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


def export_engine(
    name: str,
    fp16_path: Path,
    staging: Path,
    input_size: tuple[int, int],
    inputs: np.ndarray,
    fp32_logits: np.ndarray,
    max_batch: int,
) -> tuple[dict | None, dict, str | None]:
    """The TensorRT engine and its parity gate, or build_engine.sh when TensorRT or a GPU is
    missing. Returns (verification or None, the manifest entry, a note for the user or None)."""
    ok, why = tensorrt_status()
    if not ok:
        script, command = write_build_script(staging, fp16_path.name, INPUT_NAME, input_size, max_batch)
        return (
            None,
            {"status": "not built", "reason": why, "script": script.name, "command": command},
            (f"no TensorRT engine here ({why}): wrote {script.name}, the trtexec command that builds it on the target"),
        )
    path, stamp = build_engine(fp16_path, staging, INPUT_NAME, input_size, max_batch)
    logits = run_engine(path, inputs, max_batch)
    result = verify.check(
        "engine",
        f"{name} TensorRT engine vs fp32 ONNX",
        verify.compare_logits(fp32_logits, logits, verify.FP16_TIE_MARGIN),
        min_top1=verify.FP16_MIN_TOP1,
    )
    return result, {"status": "built", "file": path.name, **stamp}, None  # hashed with the other files
