"""The torch backend: the merged model rebuilt from the training run a bundle names. On CUDA it is
the fast path where no onnxruntime-gpu or TensorRT is installed: fp16/bf16 autocast (LayerNorm and
GRN's norm stay fp32 under autocast, PITFALLS "FP16"), channels-last, ``torch.compile`` with the
batch padded to a fixed size (static shapes: one graph, CUDA graphs in "reduce-overhead" mode), and
the decoder's uint8 pixels normalised on the GPU from a pinned host buffer. On the CPU it is eager
fp32, the benchmark's baseline. Imported only when asked for (it needs the training extra); the rest
of the runtime never imports torch."""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np

from gi_deploy._deps import require_training_extra
from gi_deploy.core.bundles import BundleManifest, training_run_of
from gi_deploy.core.preprocess import PreprocessSpec
from gi_deploy.errors import ConfigError, DependencyError
from gi_deploy.runtime.backends.base import Backend, cpu_threads

# torch.compile's caches (inductor kernels, FX graphs) kept across runs: the first run of a model
# pays the compile, later ones load it (the cost is printed either way).
COMPILE_CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "gi-deploy" / "torch-compile"
COMPILE_MODE = "reduce-overhead"  # inductor + CUDA graphs: launch overhead gone at a fixed batch shape


def torch_cuda() -> tuple[bool, str]:
    """(True, what) when torch is installed and sees a CUDA GPU, else (False, why not). Imports
    torch only when it is installed."""
    from importlib.util import find_spec

    if find_spec("torch") is None:
        return False, "torch is not installed (the training extra)"
    import torch

    if not torch.cuda.is_available():
        return False, f"torch {torch.__version__} sees no CUDA GPU"
    return True, f"torch {torch.__version__} on {torch.cuda.get_device_name(0)}"


def _dtype(precision: str, dev: str):
    import torch

    if precision == "int8":
        raise ConfigError("--backend torch runs fp32, fp16 or bf16; int8 is the onnxruntime model")
    if precision in ("fp16", "bf16") and dev == "cpu":
        raise ConfigError(f"--backend torch --precision {precision} needs CUDA; on the CPU use fp32")
    return {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}[precision]


def open_torch(
    bundle_dir: Path,
    manifest: BundleManifest,
    precision: str,
    device: str,
    threads: int | None = None,
    compile: bool | None = None,
    batch_size: int = 32,
) -> Backend:
    """The merged torch model rebuilt from the training run the bundle names (checked to be the
    same run by its manifest hash). ``compile`` None: on CUDA only. Raises ConfigError for a
    precision it cannot run, DependencyError without torch or the GPU asked for."""
    require_training_extra("--backend torch")  # first, so a runtime-only install gets the fix, not a traceback
    import torch

    from gi_deploy.model.run import load_merged_model  # lazy with torch: the training extra's

    dev = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
    if dev == "cuda" and not torch.cuda.is_available():
        raise DependencyError("--device cuda but torch sees no CUDA GPU; use --device cpu")
    amp = _dtype(precision, dev)
    if dev == "cpu":  # the same cores onnxruntime gets, so the benchmark compares like with like
        torch.set_num_threads(threads or cpu_threads())
    model = load_merged_model(training_run_of(manifest)).to(dev).eval()
    if dev == "cuda":
        model = model.to(memory_format=torch.channels_last)
    n_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    compiled = dev == "cuda" if compile is None else compile
    runner = _Runner(model, dev, amp, manifest.preprocess, batch_size, compiled)
    detail = f"torch {torch.__version__} {'compiled' if compiled else 'eager'} on {dev}" + (
        f" ({torch.cuda.get_device_name(0)}, {precision} autocast)"
        if dev == "cuda"
        else f" ({torch.get_num_threads()} threads)"
    )
    notes = [runner.compile_note] if runner.compile_note else []
    has_features = callable(getattr(model, "forward_features", None)) and callable(getattr(model, "forward_head", None))
    return Backend(
        "torch",
        precision,
        detail,
        runner.run,
        notes,
        n_bytes,
        device=dev,
        run_pixels=runner.run_pixels if dev == "cuda" else None,
        run_features=runner.run_features if has_features else None,
    )


class _Runner:
    """One model on one device. Inputs are padded to ``batch`` rows when compiled, so every call
    has the shape the graph was captured at; the padding rows are dropped from the logits."""

    def __init__(self, model, dev: str, amp, spec: PreprocessSpec, batch: int, compiled: bool):
        import torch

        self.dev, self.amp, self.batch, self.compiled = dev, amp, batch, compiled
        self.mean = torch.tensor(spec.mean, device=dev).view(1, 3, 1, 1) * 255.0
        self.inv_std = 1.0 / (torch.tensor(spec.std, device=dev).view(1, 3, 1, 1) * 255.0)
        self.h, self.w = spec.size
        self._pinned = None
        self.compile_note = ""
        self.model = self.module = model  # module: the eager model (the features path never compiles)
        if compiled:
            COMPILE_CACHE.mkdir(parents=True, exist_ok=True)
            os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(COMPILE_CACHE))
            self.model = torch.compile(model, mode=COMPILE_MODE if dev == "cuda" else "default", dynamic=False)
            t = time.perf_counter()
            self.run(np.zeros((batch, 3, self.h, self.w), np.float32))  # compile (or load it) now, not mid-run
            self.compile_note = (
                f"torch.compile ({COMPILE_MODE if dev == 'cuda' else 'default'}, batch {batch}): "
                f"{time.perf_counter() - t:.1f}s to compile or load from {COMPILE_CACHE}"
            )

    def _forward(self, x):
        import torch

        n = len(x)
        if self.compiled and n < self.batch:  # one static shape: pad, then drop the padding rows
            x = torch.cat([x, x.new_zeros((self.batch - n, *x.shape[1:]))])
            if self.dev == "cuda":  # cat with the NCHW zeros gave NCHW strides: a stride guard would recompile
                x = x.contiguous(memory_format=torch.channels_last)
        with (
            torch.inference_mode(),
            torch.autocast(self.dev, dtype=self.amp or torch.float32, enabled=self.amp is not None),
        ):
            y = self.model(x)
        return y[:n].float().cpu().numpy()

    def run(self, x: np.ndarray) -> np.ndarray:
        import torch

        t = torch.from_numpy(np.ascontiguousarray(x)).to(self.dev, non_blocking=False)
        if self.dev == "cuda":
            t = t.contiguous(memory_format=torch.channels_last)
        return self._forward(t)

    def run_features(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Logits and pooled features (what the ONNX graph's two outputs are) from one forward."""
        import torch

        t = torch.from_numpy(np.ascontiguousarray(x)).to(self.dev)
        with (
            torch.inference_mode(),
            torch.autocast(self.dev, dtype=self.amp or torch.float32, enabled=self.amp is not None),
        ):
            f = self.module.forward_features(t)
            logits, feats = self.module.forward_head(f), self.module.forward_head(f, pre_logits=True)
        return logits.float().cpu().numpy(), feats.float().cpu().numpy()

    def run_pixels(self, pixels: np.ndarray) -> np.ndarray:
        """uint8 (N, H, W, 3) from the decoder: copied through a pinned buffer (a quarter of the
        float32 bytes), normalised on the GPU. NHWC permuted to NCHW is channels-last as it is."""
        import torch

        n = len(pixels)
        if isinstance(pixels, torch.Tensor):  # decoded on the GPU (runtime/decode/gpu.py): already there
            return self._forward((pixels.to(self.dev).permute(0, 3, 1, 2).float() - self.mean) * self.inv_std)
        if self._pinned is None or len(self._pinned) < n:
            self._pinned = torch.empty((max(n, self.batch), self.h, self.w, 3), dtype=torch.uint8).pin_memory()
        self._pinned[:n].numpy()[...] = pixels
        x = self._pinned[:n].to(self.dev, non_blocking=True).permute(0, 3, 1, 2).float()
        return self._forward((x - self.mean) * self.inv_std)
