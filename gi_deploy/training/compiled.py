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


def compile_model(model: torch.nn.Module) -> tuple[torch.nn.Module, Path]:
    """``torch.compile(model)`` (inductor, default mode: training has dynamic last batches, so no CUDA
    graphs) and the folder inductor caches its FX graphs and kernels in: TORCHINDUCTOR_CACHE_DIR when
    set, else ``~/.cache/gi-deploy/torch-compile`` (the folder the runtime's --backend torch uses)."""
    default = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "gi-deploy" / "torch-compile"
    cache = Path(os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(default)))
    cache.mkdir(parents=True, exist_ok=True)
    return torch.compile(model), cache


def adamw_options(device: torch.device, compiled: bool) -> dict:
    """AdamW's keyword arguments: ``fused=True`` with --compile on CUDA or the CPU (torch >= 2.4 has the
    fused kernel for both); eager training keeps torch's default (foreach) so its numbers do not move."""
    return {"fused": True} if compiled and device.type in ("cuda", "cpu") else {}
