"""``--decode auto`` on a GPU model: which decoder feeds it faster on this machine, measured, not
guessed from the core count. Both decode the same synthetic endoscope-sized JPEG frames (720x576,
smooth colour fields with noise, so they cost what real frames cost) to the bundle's input:
the CPU path as one worker process would (Pillow, with draft scaling where the spec allows it),
scaled by the number of decode workers this machine runs; the GPU path as a whole batch through
:class:`~gi_deploy.runtime.decode.gpu.GpuDecoder` (batched nvJPEG + batched resize). The answer is
cached per GPU, core count and input spec (``~/.cache/gi-deploy/decode-auto.json``), so only the
first run on a machine pays the few seconds. Imported only where a GPU model asks for ``auto``.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np

from gi_deploy.core.preprocess import PreprocessSpec
from gi_deploy.runtime.decode.cpu import decode_batch, default_workers

FRAMES = 32
FRAME_SIZE = (720, 576)


def _cache_path() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "gi-deploy" / "decode-auto.json"


def _frames(folder: Path, n: int = FRAMES) -> list[Path]:
    from PIL import Image

    rng = np.random.default_rng(0)
    w, h = FRAME_SIZE
    paths = []
    for i in range(n):
        coarse = rng.integers(0, 255, (h // 48 + 1, w // 48 + 1, 3), dtype=np.uint8)
        base = np.asarray(Image.fromarray(coarse).resize((w, h), Image.Resampling.BICUBIC), np.int16)
        paths.append(folder / f"frame_{i:03d}.jpg")
        Image.fromarray(np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)).save(
            paths[-1], quality=90
        )
    return paths


def _rate(fn, n: int, sync=lambda: None) -> float:
    fn()  # warm-up: nvJPEG's handles, the allocator, Pillow's first import of its plugins
    sync()
    t = time.perf_counter()
    fn()
    sync()
    return n / (time.perf_counter() - t)


def decoder_rates(specs: tuple[PreprocessSpec, ...], workers: int | None = None, device: str = "cuda") -> dict:
    """{"cpu": img/s of ``workers`` CPU decode processes (one measured, times workers), "gpu": img/s of
    the batched GPU decoder}, on the same frames."""
    import torch

    from gi_deploy.runtime.decode.gpu import GpuDecoder, read_batch

    workers = workers or default_workers(gpu=True)
    with tempfile.TemporaryDirectory(prefix="gi-deploy-decode-") as tmp:
        paths = _frames(Path(tmp))
        cpu = _rate(lambda: decode_batch(paths, specs), len(paths)) * workers
        raw = read_batch(paths, specs)  # the workers' part (reading bytes) is not the GPU's cost
        decoder = GpuDecoder(specs, device)
        sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
        gpu = _rate(lambda: decoder(raw), len(paths), sync)
    return {"cpu": round(cpu, 1), "gpu": round(gpu, 1), "workers": workers}


def gpu_decoding_faster(specs: tuple[PreprocessSpec, ...]) -> tuple[bool, str]:
    """(whether the GPU decoder outpaces this machine's CPU workers, the measured rates), cached."""
    import torch

    workers = default_workers(gpu=True)
    key = f"{torch.cuda.get_device_name(0)}|{workers} workers|" + ";".join(
        json.dumps(s.to_dict(), sort_keys=True) for s in specs
    )
    path = _cache_path()
    try:
        cache = json.loads(path.read_text())
    except (OSError, ValueError):
        cache = {}
    if key not in cache:
        cache[key] = decoder_rates(specs, workers)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(cache, indent=1))
        except OSError:  # a read-only home: measure again next time
            pass
    r = cache[key]
    return r["gpu"] > r["cpu"], f"measured: GPU {r['gpu']:.0f} img/s vs {r['workers']} CPU workers {r['cpu']:.0f} img/s"
