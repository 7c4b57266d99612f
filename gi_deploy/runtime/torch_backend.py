"""The torch backend: the merged model rebuilt from the training run a bundle names, for debugging
and as the benchmark's baseline. Imported only for ``--backend torch`` (it needs the training
extra); the rest of the runtime never imports torch."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from gi_deploy._deps import require_training_extra
from gi_deploy.core.bundles import training_run_of
from gi_deploy.errors import ConfigError, DependencyError
from gi_deploy.runtime.base import Backend, cpu_threads


def open_torch(bundle_dir: Path, manifest: dict, precision: str, device: str, threads: int | None = None) -> Backend:
    """The merged torch model rebuilt from the training run the bundle names (checked to be the
    same run by its manifest hash): eager PyTorch, for debugging and as the benchmark's baseline."""
    require_training_extra("--backend torch")  # first, so a runtime-only install gets the fix, not a traceback
    import torch

    from gi_deploy.model.run import load_merged_model  # lazy with torch: the training extra's

    if precision == "int8":
        raise ConfigError("--backend torch runs fp32 (or fp16 on CUDA); int8 is the onnxruntime model")
    dev = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
    if dev == "cuda" and not torch.cuda.is_available():
        raise DependencyError("--device cuda but torch sees no CUDA GPU; use --device cpu")
    if precision == "fp16" and dev == "cpu":
        raise ConfigError("--backend torch --precision fp16 needs CUDA; on the CPU use fp32")
    if dev == "cpu":  # the same cores onnxruntime gets, so the benchmark compares like with like
        torch.set_num_threads(threads or cpu_threads())
    model = load_merged_model(training_run_of(manifest)).to(dev).eval()
    dtype = torch.float16 if precision == "fp16" else torch.float32
    model = model.to(dtype)
    n_bytes = sum(p.numel() * p.element_size() for p in model.parameters())

    @torch.inference_mode()
    def run(x: np.ndarray) -> np.ndarray:
        return model(torch.from_numpy(x).to(dev, dtype)).float().cpu().numpy()

    @torch.inference_mode()
    def run_features(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:  # what the ONNX graph's two outputs are
        f = model.forward_features(torch.from_numpy(x).to(dev, dtype))
        return (model.forward_head(f).float().cpu().numpy(),
                model.forward_head(f, pre_logits=True).float().cpu().numpy())

    has_features = callable(getattr(model, "forward_features", None)) and callable(getattr(model, "forward_head", None))
    return Backend("torch", precision, f"torch {torch.__version__} eager on {dev}"
                   + (f" ({torch.get_num_threads()} threads)" if dev == "cpu" else ""), run, [], n_bytes,
                   run_features=run_features if has_features else None)
