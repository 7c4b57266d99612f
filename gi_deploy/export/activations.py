"""One forward pass of a torch model that also records, per input, the largest activation entering
any normalisation layer: where fp16 overflows first (the fp16 gate checks those inputs in true
fp16 arithmetic)."""

from __future__ import annotations

import numpy as np
import torch


def logits_and_peaks(model, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """One forward pass: the logits, and per input the largest |value| entering any normalisation
    layer (LayerNorm, GRN, BatchNorm, GroupNorm) of ``model``, where fp16 overflows first."""
    peaks = torch.zeros(len(x))

    def hook(module, inputs, output):
        t = inputs[0].detach()
        peaks.copy_(torch.maximum(peaks, t.abs().reshape(len(t), -1).amax(1).float()))

    handles = [m.register_forward_hook(hook) for m in model.modules() if "Norm" in type(m).__name__]
    try:
        with torch.no_grad():
            logits = model(torch.as_tensor(x))
    finally:
        for h in handles:
            h.remove()
    return logits.numpy(), peaks.numpy()
