"""``--decode gpu``: JPEGs decoded in batches on the GPU (nvJPEG through
``torchvision.io.decode_jpeg(..., device="cuda")``), resized there, and handed to a GPU backend
without leaving the device. The decode workers only read the files' bytes and check that each is a
JPEG nvJPEG decodes as the CPU decoder would: baseline (not progressive), 3 colour components (not
CMYK or grayscale), upright (EXIF orientation 1) and under the canvas limit. Every other file (PNG,
CMYK, progressive, rotated, broken) is decoded by the CPU decoder in the worker, per file, so every
bad-input guarantee of the CPU path still holds.

The batch is decoded in one call (torchvision's batched nvJPEG, which uses the GPU's hardware JPEG
engines where it has them), resized in one call per distinct frame size (a video's frames share one),
on a side CUDA stream; the consumer's stream waits for that batch only, so with the pipeline finishing
one batch ahead (``decoded_batches(..., ahead=True)``) the next batch decodes while the model computes
this one (double buffering). A file the batched call fails on is found by decoding one by one, and
goes to the CPU decoder alone.

The pixels differ slightly from the CPU path's (another IDCT, and no draft scaling: the GPU decodes
every pixel and resizes with antialiasing, as Pillow does), so the decoder that ran is recorded
with the predictions. Imported only with ``--decode gpu`` (it needs torch and torchvision).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from gi_deploy.core.preprocess import EXIF_ORIENTATION, MAX_PIXELS, PreprocessSpec, crop_geometry
from gi_deploy.errors import DataError
from gi_deploy.runtime.decode.cpu import DecodedBatch, _decode_once


def nvjpeg_status() -> tuple[bool, str]:
    """(True, what) when torchvision can decode JPEGs on a CUDA GPU here, else (False, why)."""
    from importlib.util import find_spec

    if find_spec("torch") is None or find_spec("torchvision") is None:
        return False, "GPU decoding needs torch and torchvision (the training extra)"
    import torch

    if not torch.cuda.is_available():
        return False, "GPU decoding needs a CUDA GPU; torch sees none"
    return True, "nvJPEG (torchvision.io.decode_jpeg on CUDA)"


def gpu_decodable(path: Path) -> bool:
    """Whether nvJPEG decodes ``path`` as the CPU decoder would (see the module docstring). Reads
    the header only; any failure means "let the CPU decoder handle it" (and report it)."""
    try:
        with Image.open(path) as img:
            return (
                img.format == "JPEG"
                and img.mode == "RGB"
                and not img.info.get("progressive")
                and not img.info.get("progression")
                and img.size[0] * img.size[1] <= MAX_PIXELS
                and img.getexif().get(EXIF_ORIENTATION, 1) == 1
            )
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError, Image.DecompressionBombWarning):
        return False  # the CPU decoder takes it, and reports what is wrong with it


@dataclass
class RawBatch:
    """What a worker sends for ``--decode gpu``: per path, the JPEG's bytes (``encoded``), or the
    CPU decoder's pixels per spec (``pixels``), or the reason it could not be read (``errors``)."""

    paths: list[Path]
    errors: list[str | None]
    encoded: list[bytes | None]
    pixels: list[list[np.ndarray] | None]


def read_batch(paths: list[Path], specs: tuple[PreprocessSpec, ...]) -> RawBatch:
    """In a decode worker: bytes for the GPU, or CPU-decoded pixels for the files it cannot take."""
    raw = RawBatch(list(paths), [None] * len(paths), [None] * len(paths), [None] * len(paths))
    for i, path in enumerate(paths):
        try:
            if gpu_decodable(path):
                raw.encoded[i] = Path(path).read_bytes()
            else:
                raw.pixels[i] = _decode_once(path, specs)
        except DataError as e:
            raw.errors[i] = str(e)
        except OSError as e:  # the file went away or became unreadable between the check and the read
            raw.errors[i] = f"cannot read image {path}: {e}"
    return raw


class GpuDecoder:
    """Turns a worker's RawBatch into a DecodedBatch whose ``inputs[j]`` are CUDA uint8 tensors
    (n_good, H, W, 3) under ``specs[j]``. ``n_gpu`` / ``n_cpu`` count which decoder each image had."""

    def __init__(self, specs: tuple[PreprocessSpec, ...], device: str = "cuda"):
        import torch

        self.specs, self.device = specs, device
        self.n_gpu = self.n_cpu = 0
        # the side stream the batch is decoded and resized on, so it overlaps the model's kernels
        self._stream = torch.cuda.Stream() if str(device).startswith("cuda") else None

    def _decode(self, blobs: list[bytes], raw: RawBatch, idx: list[int]) -> list:
        import torch
        from torchvision.io import ImageReadMode, decode_jpeg

        data = [torch.frombuffer(bytearray(b), dtype=torch.uint8) for b in blobs]
        try:
            return decode_jpeg(data, mode=ImageReadMode.RGB, device=self.device)
        except RuntimeError:  # one bad file fails the batch call: decode one by one, the CPU takes the rest
            out = []
            for i, d in zip(idx, data):
                try:
                    out.append(decode_jpeg(d, mode=ImageReadMode.RGB, device=self.device))
                except RuntimeError:
                    out.append(None)
                    try:
                        raw.pixels[i] = _decode_once(raw.paths[i], self.specs)
                    except DataError as e:
                        raw.errors[i] = str(e)
            return out

    def _resize(self, chw, spec: PreprocessSpec):
        """(3, h, w) uint8 on the device -> (H, W, 3) uint8 (one frame: :meth:`_resize_batch`)."""
        return self._resize_batch(chw[None], spec)[0]

    def _resize_batch(self, nchw, spec: PreprocessSpec):
        """(n, 3, h, w) uint8 frames of one size on the device -> (n, H, W, 3) uint8 with Pillow's
        geometry (resize or resize + centre crop) and antialiased bilinear/bicubic filtering, in one
        interpolate call."""
        import torch
        from torch.nn import functional as F

        h, w = spec.size
        size = (nchw.shape[3], nchw.shape[2])
        rw, rh, left, top = crop_geometry(size, spec) if spec.resize == "crop" else (w, h, 0, 0)
        x = nchw.float()
        if (rw, rh) != size:
            x = F.interpolate(x, size=(rh, rw), mode=spec.interpolation, antialias=True, align_corners=False)
        x = x[..., top : top + h, left : left + w]
        return torch.clamp(torch.round(x), 0, 255).to(torch.uint8).permute(0, 2, 3, 1)

    def _resized(self, decoded: dict, spec: PreprocessSpec) -> dict:
        """{row: (H, W, 3)} for every decoded frame, resized in one call per distinct frame size."""
        import torch

        by_size: dict[tuple, list[int]] = {}
        for i, chw in decoded.items():
            if chw is not None:
                by_size.setdefault(tuple(chw.shape), []).append(i)
        out = {}
        for rows in by_size.values():
            out.update(zip(rows, self._resize_batch(torch.stack([decoded[i] for i in rows]), spec)))
        return out

    def __call__(self, raw: RawBatch) -> DecodedBatch:
        import contextlib

        import torch

        on_side = torch.cuda.stream(self._stream) if self._stream is not None else contextlib.nullcontext()
        with on_side:
            idx = [i for i, b in enumerate(raw.encoded) if b is not None]
            decoded = dict(zip(idx, self._decode([raw.encoded[i] for i in idx], raw, idx))) if idx else {}
            inputs = []
            for j, spec in enumerate(self.specs):
                resized, rows = self._resized(decoded, spec), []
                for i in range(len(raw.paths)):
                    if raw.errors[i] is not None:
                        continue
                    rows.append(
                        resized[i]
                        if i in resized
                        else torch.from_numpy(np.array(raw.pixels[i][j])).to(self.device, non_blocking=True)
                    )
                inputs.append(
                    torch.stack(rows)
                    if rows
                    else torch.zeros((0, *spec.size, 3), dtype=torch.uint8, device=self.device)
                )
        n_gpu = sum(decoded.get(i) is not None for i in range(len(raw.paths)))
        self.n_gpu += n_gpu
        self.n_cpu += sum(e is None for e in raw.errors) - n_gpu
        return DecodedBatch(raw.paths, raw.errors, inputs, ready=self._ready(inputs))

    def _ready(self, inputs: list):
        """What the consumer calls when it takes the batch: its stream waits (on the GPU, the host does
        not block) for the event recorded after this batch's work on the side stream, and the tensors
        are marked as used there (allocated on the side stream, freed only after the consumer's use)."""
        if self._stream is None:
            return None
        import torch

        done = torch.cuda.Event()
        done.record(self._stream)

        def ready() -> None:
            consumer = torch.cuda.current_stream()
            consumer.wait_event(done)
            for x in inputs:
                x.record_stream(consumer)

        return ready
