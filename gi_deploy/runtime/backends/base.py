"""What every runtime backend is (the :class:`Backend` record: a model that turns a batch into
logits, and what it really runs on) and how many cores this process may use."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from gi_deploy.core.preprocess import PreprocessSpec, normalize_pixels

# Notes that report a choice or a cost (not a problem the user must act on): shown as information.
INFO_NOTES = ("auto:", "torch.compile", "openvino:")


def is_info(note: str) -> bool:
    return note.startswith(INFO_NOTES)


@dataclass
class Backend:
    """A loaded model. ``run(x)`` gives logits for float32 (N, 3, H, W) normalised inputs;
    ``run_pixels(u8)``, where the backend has one, takes the decoder's uint8 (N, H, W, 3) pixels and
    normalises them where the model runs (on the GPU for torch and TensorRT), so the host never
    makes the 4x larger float32 copy. ``name`` is the backend, ``detail`` what it runs on (provider,
    engine, device), ``device`` "cpu" or "cuda", ``notes`` messages for the user."""

    name: str
    precision: str
    detail: str
    run: Callable[[np.ndarray], np.ndarray]
    notes: list[str] = field(default_factory=list)
    model_bytes: int = 0
    device: str = "cpu"
    spec: PreprocessSpec | None = None
    run_pixels: Callable[[np.ndarray], np.ndarray] | None = None
    # (logits, pooled features) in one model call, where the model gives both (bundle format 3)
    run_features: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]] | None = None
    # the numbers of a gate run when the model was loaded (OpenVINO's agreement with the fp32 ONNX)
    gate: dict | None = None

    def predict_logits(self, batch: np.ndarray) -> np.ndarray:
        """float32 (N, 3, H, W) normalised inputs, or the decoder's uint8 (N, H, W, 3) pixels ->
        float32 logits (N, num_classes)."""
        on_device = type(batch).__module__.startswith("torch")  # pixels the GPU decoder left on the device
        if on_device or batch.dtype == np.uint8:
            if self.run_pixels is not None:
                return np.asarray(self.run_pixels(batch), dtype=np.float32)
            assert self.spec is not None, "open_backend gives every backend its bundle's preprocessing"
            batch = normalize_pixels(batch, self.spec)
        return np.asarray(self.run(batch), dtype=np.float32)

    def predict_logits_and_features(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """Normalised float32 (N, 3, H, W), or the decoder's uint8 (N, H, W, 3) pixels -> logits (N, C)
        and pooled features (N, D), both float32, from one model call; features None when this model
        has no features output."""
        if self.run_features is None:
            return self.predict_logits(batch), None
        if type(batch).__module__.startswith("torch"):  # pixels the GPU decoder left on the device
            batch = batch.cpu().numpy()
        if batch.dtype == np.uint8:
            assert self.spec is not None, "open_backend gives every backend its bundle's preprocessing"
            batch = normalize_pixels(batch, self.spec)
        logits, feats = self.run_features(batch)
        return np.asarray(logits, dtype=np.float32), np.asarray(feats, dtype=np.float32)


def cpu_threads() -> int:
    """Cores this process may use (the affinity mask of a container or taskset, not the host's)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1
