"""``train --compile``: the model through ``torch.compile`` (inductor fuses the elementwise work that
dominates a ConvNeXtV2 step: GELU, GRN, LayerNorm, the adapters' adds), its kernels cached on disk so
the second run of the same model loads them instead of compiling, and AdamW's fused kernel (one
kernel per step for every parameter, instead of a loop of small ones) where torch has it.

The compile itself happens in the first training step: ``first_step_s`` in each epoch's record (and
the line ``train`` prints) is the compile time on the first run, the cache load on later ones.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

# the same folder the runtime's --backend torch compiles into (runtime/backends/torch.py COMPILE_CACHE)
COMPILE_CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "gi-deploy" / "torch-compile"


def compile_model(model: torch.nn.Module) -> torch.nn.Module:
    """``torch.compile(model)`` (inductor, default mode: training has dynamic last batches, so no CUDA
    graphs), with inductor's FX-graph and kernel caches in COMPILE_CACHE."""
    COMPILE_CACHE.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(COMPILE_CACHE))
    return torch.compile(model)


def adamw_options(device: torch.device, compiled: bool) -> dict:
    """AdamW's keyword arguments: ``fused=True`` with --compile on CUDA or the CPU (torch >= 2.4 has the
    fused kernel for both); eager training keeps torch's default (foreach) so its numbers do not move."""
    return {"fused": True} if compiled and device.type in ("cuda", "cpu") else {}
