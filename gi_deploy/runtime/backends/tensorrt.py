"""TensorRT engines at inference, isolated here: which GPU and TensorRT version an engine is for,
whether this machine can run one, the stamp check, and the runner the runtime keeps for a whole
run. The builder is export's (export/tensorrt.py). Written to TensorRT's Python API as it is in
both 10.x and 11.x.

An engine only runs on the GPU architecture and TensorRT version that built it (TensorRT#2176):
its file name and the manifest carry both, and :func:`check_stamp` refuses a mismatch. TensorRT and
torch (for the CUDA buffers) are imported inside the functions that need them: importing this
module needs neither.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from gi_deploy._io import sha256_file
from gi_deploy.core.bundles import BUILD_SCRIPT, BundleManifest, bundle_file
from gi_deploy.core.preprocess import PreprocessSpec
from gi_deploy.errors import BundleError, ConfigError, DependencyError
from gi_deploy.runtime.backends.base import Backend

MIN_MAJOR = 10


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
        return {
            "gpu_name": self.gpu_name,
            "compute_capability": self.compute_capability,
            "tensorrt_version": self.tensorrt_version,
        }


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
            raise BundleError(
                f"{engine_path.name} was built for {label} {stamp.get(key)}, this machine has "
                f"{getattr(here, key)}; engines only run where they were built. Rebuild it here: "
                f"bash {engine_path.parent / BUILD_SCRIPT}"
            )


class EngineRunner:
    """A deserialised engine with one execution context and CUDA stream, kept for many batches
    (the runtime's TensorRT backend); ``runner(x)`` runs float32 (N, 3, H, W) in chunks of at most
    ``max_batch`` and returns float32 logits (N, C); ``runner.run_pixels(u8)`` takes the decoder's
    uint8 (N, H, W, 3) pixels (numpy, or a CUDA tensor from the GPU decoder) and normalises them on
    the GPU with ``spec``'s mean and std first. Every output gets a buffer; the logits are picked by
    name (a format-3 bundle's graph also gives its pooled features, "features"; an engine with one
    output of another name is the logits)."""

    def __init__(self, engine_path: Path, max_batch: int, spec: PreprocessSpec | None = None):
        import tensorrt as trt
        import torch

        self.engine_path, self.max_batch, self.spec = engine_path, max_batch, spec
        logger = trt.Logger(trt.Logger.WARNING)
        self._engine = trt.Runtime(logger).deserialize_cuda_engine(engine_path.read_bytes())
        if self._engine is None:
            raise BundleError(f"TensorRT cannot load {engine_path}; rebuild it with {BUILD_SCRIPT}")
        self._context = self._engine.create_execution_context()
        names = [self._engine.get_tensor_name(i) for i in range(self._engine.num_io_tensors)]
        (self._inp,) = [n for n in names if self._engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self._outs = [n for n in names if self._engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        self._out = "logits" if "logits" in self._outs else self._outs[0]
        self._dtypes = {
            n: {trt.float32: torch.float32, trt.float16: torch.float16}[self._engine.get_tensor_dtype(n)]
            for n in self._outs
        }
        self.has_features = "features" in self._outs
        self._stream = torch.cuda.Stream()

    def _run_device(self, x) -> dict[str, np.ndarray]:
        """float32 (n, 3, H, W) already on the GPU, n <= max_batch -> every output on the host."""
        import torch

        with torch.cuda.stream(self._stream):  # allocation and the engine ordered on one stream
            x = x.contiguous()
            self._context.set_input_shape(self._inp, tuple(x.shape))
            ys = {
                n: torch.empty(tuple(self._context.get_tensor_shape(n)), dtype=self._dtypes[n], device="cuda")
                for n in self._outs
            }
            self._context.set_tensor_address(self._inp, x.data_ptr())
            for n, y in ys.items():
                self._context.set_tensor_address(n, y.data_ptr())
            if not self._context.execute_async_v3(self._stream.cuda_stream):
                raise BundleError(f"TensorRT failed to run {self.engine_path.name} on a batch of {len(x)}")
        self._stream.synchronize()
        return {n: y.float().cpu().numpy() for n, y in ys.items()}

    def run_outputs(self, inputs: np.ndarray) -> dict[str, np.ndarray]:
        """Every output of the engine on float32 (N, 3, H, W), by name, float32."""
        import torch

        results: dict[str, list] = {n: [] for n in self._outs}
        for i in range(0, len(inputs), self.max_batch):
            with torch.cuda.stream(self._stream):
                x = torch.from_numpy(np.ascontiguousarray(inputs[i : i + self.max_batch])).cuda(non_blocking=True)
            for n, y in self._run_device(x).items():
                results[n].append(y)
        return {n: np.concatenate(parts) for n, parts in results.items()}

    def __call__(self, inputs: np.ndarray) -> np.ndarray:
        return self.run_outputs(inputs)[self._out]

    def logits_and_features(self, inputs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        outs = self.run_outputs(inputs)
        return outs[self._out], outs["features"]

    def run_pixels(self, pixels) -> np.ndarray:
        import torch

        assert self.spec is not None, "the TensorRT backend gives its runner the bundle's preprocessing"
        mean = torch.tensor(self.spec.mean, device="cuda").view(1, 3, 1, 1)
        std = torch.tensor(self.spec.std, device="cuda").view(1, 3, 1, 1)
        results = []
        for i in range(0, len(pixels), self.max_batch):
            with torch.cuda.stream(self._stream):
                chunk = pixels[i : i + self.max_batch]
                u8 = chunk if isinstance(chunk, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(chunk))
                x = u8.to("cuda", non_blocking=True).permute(0, 3, 1, 2).float()
                x = (x * (1.0 / 255.0) - mean) / std
            results.append(self._run_device(x)[self._out])
        return np.concatenate(results)


def _engine_for_here(bundle_dir: Path, manifest: BundleManifest) -> tuple[Path, dict, list[str]]:
    """The bundle's engine for this GPU and TensorRT version: the one built and verified at export
    (stamp checked), else one built here by build_engine.sh (named for this target)."""
    ok, why = tensorrt_status()
    if not ok:
        raise DependencyError(f"--backend tensorrt: {why}; use --backend onnxruntime")
    engine = manifest.engine
    if engine is not None and engine.status == "built":
        path = bundle_file(bundle_dir, engine.file, "engine.file")
        check_stamp(engine.to_dict(), path)  # raises with the rebuild command on another GPU/TensorRT
        if not path.is_file():
            raise BundleError(f"bundle file missing: {path}; rebuild it: bash {bundle_dir / BUILD_SCRIPT}")
        if sha256_file(path) != manifest.files[engine.file].sha256:
            raise BundleError(
                f"{path} does not match the sha256 in its manifest; rebuild it: bash {bundle_dir / BUILD_SCRIPT}"
            )
        return path, engine.to_dict(), []
    here = current_target()
    path = bundle_dir / here.engine_file
    if not path.is_file():
        built = sorted(p.name for p in bundle_dir.glob("model.*.engine"))
        raise BundleError(
            f"no TensorRT engine for this GPU ({here.gpu_name}, {here.tag}) in {bundle_dir}"
            + (f" (it has {', '.join(built)}, built for another GPU or TensorRT)" if built else "")
            + f"; build it here: bash {bundle_dir / BUILD_SCRIPT}"
        )
    return (
        path,
        {"max_batch": manifest.options.get("max_batch", 32)},
        [
            f"{path.name} was built on this machine by {BUILD_SCRIPT}, not checked against the fp32 ONNX at "
            "export; compare a labelled folder with --backend onnxruntime before trusting it"
        ],
    )


def open_tensorrt(bundle_dir: Path, manifest: BundleManifest, precision: str) -> Backend:
    """The bundle's TensorRT engine (built from the fp16 ONNX, so ``precision`` must be fp16)."""
    if precision != "fp16":
        raise ConfigError(
            f"TensorRT engines are built strongly typed from the fp16 ONNX; use --precision fp16 "
            f"with --backend tensorrt (got {precision})"
        )
    path, stamp, notes = _engine_for_here(bundle_dir, manifest)
    spec = manifest.preprocess
    runner = EngineRunner(path, int(stamp.get("max_batch", 32)), spec)
    return Backend(
        "tensorrt",
        "fp16",
        f"TensorRT {current_target().tensorrt_version} {path.name}",
        runner,
        notes,
        path.stat().st_size,
        device="cuda",
        run_pixels=runner.run_pixels,
        run_features=runner.logits_and_features if runner.has_features else None,
    )
