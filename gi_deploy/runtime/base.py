"""What every runtime backend is (the :class:`Backend` record: a model that turns an NCHW batch
into logits, and what it really runs on) and how many cores this process may use."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np


@dataclass
class Backend:
    """A loaded model: ``run(batch)`` gives logits. ``name`` is the backend, ``detail`` what it
    runs on (provider, engine, device), ``notes`` messages for the user."""

    name: str
    precision: str
    detail: str
    run: Callable[[np.ndarray], np.ndarray]
    notes: list[str] = field(default_factory=list)
    model_bytes: int = 0
    # (logits, pooled features) in one model call, where the model gives both (bundle format 3)
    run_features: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]] | None = None

    def predict_logits(self, batch: np.ndarray) -> np.ndarray:
        """float32 (N, 3, H, W) -> float32 logits (N, num_classes)."""
        return np.asarray(self.run(batch), dtype=np.float32)

    def predict_logits_and_features(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """float32 (N, 3, H, W) -> logits (N, C) and pooled features (N, D), both float32, from
        one model call; features None when this model has no features output."""
        if self.run_features is None:
            return self.predict_logits(batch), None
        logits, feats = self.run_features(batch)
        return np.asarray(logits, dtype=np.float32), np.asarray(feats, dtype=np.float32)


def cpu_threads() -> int:
    """Cores this process may use (the affinity mask of a container or taskset, not the host's)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1
