"""Image decoding and preprocessing, shared by training, export and the runtime.

Training and inference must see the same pixels, so there is exactly one implementation,
written with Pillow and numpy only (no torch), and its parameters travel in every manifest
as a :class:`PreprocessSpec`.
"""

from __future__ import annotations

import io
import os
import stat
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from gi_deploy.errors import ConfigError, DataError

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp"})

RESIZE_MODES = ("direct", "crop")
# "draft": a JPEG at least twice the size the resize needs is decoded at 1/2, 1/4 or 1/8 scale by
# libjpeg first (Pillow's Image.draft, DCT-domain scaling), then resized: measured 2.5x faster on
# endoscope frames, with slightly different pixels, so training and inference both use it (the spec
# travels in every manifest). "full": decode every pixel, then resize (bundles made before "draft").
DECODE_MODES = ("full", "draft")
_INTERPOLATIONS = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC}


@dataclass(frozen=True)
class PreprocessSpec:
    """How an image becomes the model's input: RGB, resized, scaled to [0, 1], normalised by
    ``mean``/``std``, NCHW.

    ``resize="direct"`` resizes straight to ``size`` (the seed paper's 224x224, aspect not kept);
    ``resize="crop"`` resizes the shorter side to ``size / crop_pct`` and centre-crops ``size``
    (timm's evaluation transform; keeps the aspect, drops the border)."""

    size: tuple[int, int]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str = "bilinear"
    resize: str = "direct"
    crop_pct: float = 1.0
    decode: str = "full"

    def __post_init__(self) -> None:
        if len(self.size) != 2 or min(self.size) < 1:
            raise ConfigError(f"preprocess size must be (height, width) >= 1, got {self.size}")
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise ConfigError(f"mean/std must be 3 values with std > 0, got {self.mean}/{self.std}")
        if self.interpolation not in _INTERPOLATIONS:
            raise ConfigError(f"interpolation {self.interpolation!r} unknown; use one of {sorted(_INTERPOLATIONS)}")
        if self.resize not in RESIZE_MODES:
            raise ConfigError(f"resize {self.resize!r} unknown; use one of {', '.join(RESIZE_MODES)}")
        if not 0.0 < self.crop_pct <= 1.0:
            raise ConfigError(f"crop_pct must be in (0, 1], got {self.crop_pct}")
        if self.decode not in DECODE_MODES:
            raise ConfigError(f"decode {self.decode!r} unknown; use one of {', '.join(DECODE_MODES)}")

    def to_dict(self) -> dict:
        return {**asdict(self), "layout": "NCHW", "color": "RGB", "scale": "1/255"}

    @classmethod
    def from_dict(cls, d: dict) -> PreprocessSpec:
        return cls(
            size=tuple(d["size"]),
            mean=tuple(d["mean"]),
            std=tuple(d["std"]),
            interpolation=d.get("interpolation", "bilinear"),
            resize=d.get("resize", "direct"),
            crop_pct=d.get("crop_pct", 1.0),
            decode=d.get("decode", "full"),
        )


# Endoscopy frames are at most ~2 MP (1920x1072); a file declaring a canvas over this is a
# decompression bomb (a small file that would expand to gigabytes) or not a frame at all.
MAX_PIXELS = 64_000_000
# Transparent pixels (RGBA, LA, palette with transparency) are composited onto black, the colour
# of the capsule's vignette and of the frame around endoscope images.
BACKGROUND = (0, 0, 0)
_HIGH_BIT_MODES = {"I;16": 257.0, "I;16L": 257.0, "I;16B": 257.0, "I;16N": 257.0, "I": 257.0}


def _to_rgb(img: Image.Image) -> Image.Image:
    """Any Pillow mode -> 8-bit RGB: 16-bit grayscale scaled (not clipped) to 8 bits, alpha
    composited on ``BACKGROUND``, CMYK/grayscale/palette converted."""
    if img.mode in _HIGH_BIT_MODES:
        a = np.asarray(img, dtype=np.float64) / _HIGH_BIT_MODES[img.mode]
        return Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8), "L").convert("RGB")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        out = Image.new("RGB", rgba.size, BACKGROUND)
        out.paste(rgba, mask=rgba.getchannel("A"))
        return out
    return img.convert("RGB")


def require_regular_file(path: Path) -> None:
    """Raise DataError unless ``path`` is, after following links, a regular file: opening a FIFO
    (or a link to one) blocks until a writer appears, i.e. forever, and a device is no image. A
    folder here is one that could not be listed (its permissions)."""
    try:
        mode = os.stat(path).st_mode
    except OSError as e:
        raise DataError(f"cannot read image {path}: {e.strerror or e}") from e
    if stat.S_ISDIR(mode):
        raise DataError(
            f"cannot read folder {path}: it could not be listed (check its permissions); its images were not classified"
        )
    if not stat.S_ISREG(mode):
        kind = "a FIFO (named pipe)" if stat.S_ISFIFO(mode) else "a socket" if stat.S_ISSOCK(mode) else "a device"
        raise DataError(f"cannot read image {path}: it is {kind}, not a regular file; only regular files are read")


EXIF_ORIENTATION = 0x0112
_TRANSPOSED = (5, 6, 7, 8)  # EXIF orientations that swap width and height


def resize_target(size: tuple[int, int], spec: PreprocessSpec) -> tuple[int, int]:
    """The (width, height) :func:`resize_for` resizes an image of ``size`` (width, height) to,
    before any crop."""
    if spec.resize == "crop":
        return crop_geometry(size, spec)[:2]
    return spec.size[1], spec.size[0]


def _draft(img: Image.Image, spec: PreprocessSpec) -> None:
    """With ``spec.decode == "draft"``, ask libjpeg for the largest 1/2, 1/4 or 1/8 scale that is
    still at least the size the resize needs (a JPEG under twice that size is decoded whole)."""
    if spec.decode != "draft" or img.format != "JPEG":
        return
    w, h = img.size
    turned = img.getexif().get(EXIF_ORIENTATION, 1) in _TRANSPOSED  # stored sideways: the target turns too
    tw, th = resize_target((h, w) if turned else (w, h), spec)
    if turned:
        tw, th = th, tw
    if w >= 2 * tw and h >= 2 * th:
        img.draft(None, (tw, th))


def load_rgb(path: Path | bytes, spec: PreprocessSpec | None = None) -> Image.Image:
    """Decode an image file, or an encoded image's bytes (what a client sends to ``gi-deploy serve``),
    to upright 8-bit RGB (at reduced scale where ``spec`` asks for draft decoding). Raises DataError
    naming the file (or the byte count) and the reason (unreadable, not an image, truncated, a symlink
    loop, a canvas over ``MAX_PIXELS``)."""
    if isinstance(path, (bytes, bytearray, memoryview)):
        data = bytes(path)
        path, fp = f"<{len(data)} bytes>", io.BytesIO(data)  # never a path: the bytes are the image
    else:
        require_regular_file(path)  # a FIFO or device would block the open forever
        fp = path
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)  # Pillow's own check, as an error
            img = Image.open(fp)
        with img:
            w, h = img.size
            if w * h > MAX_PIXELS:
                raise DataError(
                    f"cannot read image {path}: it declares a {w}x{h} canvas ({w * h / 1e6:.0f} MP, over "
                    f"the {MAX_PIXELS / 1e6:.0f} MP limit): a decompression bomb, or not an endoscopy frame"
                )
            if spec is not None:
                _draft(img, spec)
            # apply the EXIF orientation, so a rotated JPEG is seen upright by training and runtime alike
            return _to_rgb(ImageOps.exif_transpose(img))
    except (
        UnidentifiedImageError,
        OSError,
        ValueError,
        SyntaxError,
        Image.DecompressionBombError,
        Image.DecompressionBombWarning,
    ) as e:
        raise DataError(f"cannot read image {path}: {e}") from e


def crop_geometry(size: tuple[int, int], spec: PreprocessSpec) -> tuple[int, int, int, int]:
    """For ``resize="crop"`` and an image of ``size`` (width, height): the resized width and
    height (shorter side -> size / crop_pct) and the top-left corner of the centre crop in them."""
    h, w = spec.size
    scale = max(h / size[1], w / size[0]) / spec.crop_pct
    rw, rh = max(w, round(size[0] * scale)), max(h, round(size[1] * scale))
    return rw, rh, (rw - w) // 2, (rh - h) // 2


def resize_for(img: Image.Image, spec: PreprocessSpec) -> Image.Image:
    """The geometry step of ``spec``: a PIL image of exactly ``spec.size`` (height, width)."""
    h, w = spec.size
    resample = _INTERPOLATIONS[spec.interpolation]
    if spec.resize == "crop":
        rw, rh, left, top = crop_geometry(img.size, spec)
        if (rw, rh) != img.size:
            img = img.resize((rw, rh), resample)
        return img.crop((left, top, left + w, top + h))
    return img if img.size == (w, h) else img.resize((w, h), resample)


def normalize(img: Image.Image, spec: PreprocessSpec) -> np.ndarray:
    """An RGB PIL image already of ``spec.size`` -> float32 array (3, H, W), scaled and normalised."""
    if img.size != (spec.size[1], spec.size[0]):
        raise ConfigError(
            f"normalize expects a {spec.size[1]}x{spec.size[0]} image, got {img.size[0]}x{img.size[1]}; "
            "resize it with resize_for first"
        )
    x = np.asarray(img, dtype=np.float32) * (1.0 / 255.0)
    x = (x - np.asarray(spec.mean, dtype=np.float32)) / np.asarray(spec.std, dtype=np.float32)
    return np.ascontiguousarray(x.transpose(2, 0, 1))


def to_input(img: Image.Image, spec: PreprocessSpec) -> np.ndarray:
    """RGB PIL image -> float32 array (3, H, W): :func:`resize_for`, then :func:`normalize`."""
    return normalize(resize_for(img, spec), spec)


def to_pixels(img: Image.Image, spec: PreprocessSpec) -> np.ndarray:
    """RGB PIL image -> uint8 array (H, W, 3) of ``spec.size``: the geometry step alone, a quarter
    of the bytes of the normalised input (what decode workers send; see :func:`normalize_pixels`)."""
    return np.array(resize_for(img, spec), dtype=np.uint8)  # a writable copy (torch.from_numpy needs one)


def normalize_pixels(pixels: np.ndarray, spec: PreprocessSpec) -> np.ndarray:
    """uint8 (N, H, W, 3) -> float32 (N, 3, H, W), scaled and normalised with the same float32
    operations as :func:`normalize` (bit-identical results)."""
    x = pixels.astype(np.float32) * np.float32(1.0 / 255.0)
    x = (x - np.asarray(spec.mean, dtype=np.float32)) / np.asarray(spec.std, dtype=np.float32)
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2))


def load_input(path: Path, spec: PreprocessSpec) -> np.ndarray:
    """Decode ``path`` and preprocess it: float32 (3, H, W). Raises DataError for bad files."""
    return to_input(load_rgb(path, spec), spec)


def list_images(folder: Path) -> list[Path]:
    """All image files under ``folder`` (recursive, sorted, extension case-insensitive, hidden
    files skipped). Symlinked folders are not descended into, so a symlink loop cannot recurse;
    a broken or looping symlink with an image extension is listed, so that reading it gives an
    error row naming it instead of a silent skip."""
    if not folder.is_dir():
        raise DataError(f"not a folder: {folder}")
    return sorted(
        p
        for p in folder.rglob("*")  # by default rglob never follows directory symlinks
        if p.suffix.lower() in IMAGE_EXTENSIONS
        and not p.is_dir()  # a FIFO named .jpg too: it gets an error row
        and not any(part.startswith(".") for part in p.relative_to(folder).parts)
    )
