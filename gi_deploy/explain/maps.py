"""Saliency maps: where each per-source model looks (the seed paper's Fig. 3).

Grad-CAM and Grad-CAM++ come from the maintained ``grad-cam`` package (pytorch_grad_cam), on the
merged model of each run (the same function as the adapter model, see model/run.py). The
target layer is the backbone's deepest feature map with at least 4 cells per side at the run's
input size, read from timm's ``feature_info`` (at 224 px ConvNeXt ``stages.3``, ResNet ``layer4``,
VGG ``features.30``); ``layer`` overrides it.
SmoothGrad (Smilkov et al. 2017; the paper's GastroVision notebooks) is not in grad-cam, so it is
here: the input gradient of the target logit averaged over noisy copies of the image.

Images are shown at their original size and aspect ratio: the map, computed on the model's input
(the run's preprocessing: direct resize or resize + centre crop), is mapped back onto the pixels
it saw.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from gi_deploy._io import read_json, write_json
from gi_deploy.core.bundles import BundleManifest, read_bundle_manifest, training_run_of
from gi_deploy.core.preprocess import PreprocessSpec, crop_geometry, list_images, load_rgb, to_input
from gi_deploy.core.runs import read_run_manifest, select_runs
from gi_deploy.errors import ConfigError, DataError, DependencyError
from gi_deploy.explain.config import METHODS, ExplainConfig
from gi_deploy.model.run import load_merged_model
from gi_deploy.runtime.evaluate import most_confidently_wrong

log = logging.getLogger(__name__)

SMOOTHGRAD_SAMPLES = 25
SMOOTHGRAD_NOISE = 0.15  # noise sd as a share of the input's value range (the SmoothGrad paper's 10-20%)


MIN_CAM_CELLS = 4  # a Grad-CAM map needs a few cells per side to localise anything


def target_layer_name(model: nn.Module, input_size: tuple[int, int] = (224, 224)) -> str:
    """The deepest feature map of the backbone (timm's feature_info) that still has at least
    ``MIN_CAM_CELLS`` cells per side at ``input_size``: ``stages.3`` / ``layer4`` at 224 px, an
    earlier stage for small inputs (at 48 px ConvNeXt's last stage is 1x1, a constant map)."""
    info = getattr(model, "feature_info", None)
    if not info:
        raise ConfigError(f"{type(model).__name__} has no timm feature_info; name the target layer with --layer")
    for entry in reversed(list(info)):
        if min(input_size) // entry["reduction"] >= MIN_CAM_CELLS:
            return entry["module"]
    return info[0]["module"]


def get_module(model: nn.Module, name: str) -> nn.Module:
    modules = dict(model.named_modules())
    if name not in modules:
        stages = [n for n in modules if n and n.count(".") <= 1][:40]
        raise ConfigError(f"layer {name!r} is not in {type(model).__name__}; some of its layers: {', '.join(stages)}")
    return modules[name]


def smoothgrad(
    model: nn.Module,
    x: torch.Tensor,
    targets: list[int],
    samples: int = SMOOTHGRAD_SAMPLES,
    noise: float = SMOOTHGRAD_NOISE,
    seed: int = 0,
) -> np.ndarray:
    """SmoothGrad maps (N, H, W) in [0, 1]: the gradient of logit[target] w.r.t. the input,
    averaged over ``samples`` noisy copies (the noise's own gradients cancel in the mean), then
    |.|, max over colour channels, normalised per image."""
    g = torch.Generator().manual_seed(seed)
    total = torch.zeros_like(x)
    sd = noise * (x.amax(dim=(1, 2, 3), keepdim=True) - x.amin(dim=(1, 2, 3), keepdim=True))
    idx = torch.tensor(targets)
    for _ in range(samples):
        xn = (x + sd * torch.randn(x.shape, generator=g)).requires_grad_(True)
        score = model(xn).gather(1, idx[:, None]).sum()
        (grad,) = torch.autograd.grad(score, xn)
        total += grad
    maps = (total / samples).abs().amax(dim=1)
    return _normalise(maps.numpy())


def _normalise(maps: np.ndarray) -> np.ndarray:
    lo = maps.reshape(len(maps), -1).min(1)[:, None, None]
    hi = maps.reshape(len(maps), -1).max(1)[:, None, None]
    return ((maps - lo) / np.maximum(hi - lo, 1e-12)).astype(np.float32)


def saliency(
    model: nn.Module, x: torch.Tensor, targets: list[int], method: str = "gradcam", layer: str | None = None
) -> np.ndarray:
    """Maps (N, H, W) in [0, 1] at the input's size, one per image, for class ``targets[i]``."""
    if method not in METHODS:
        raise ConfigError(f"saliency method {method!r} unknown; use one of {', '.join(METHODS)}")
    model = model.eval()
    if method == "smoothgrad":
        return smoothgrad(model, x, targets)
    try:
        from pytorch_grad_cam import GradCAM, GradCAMPlusPlus
        from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
    except ImportError as e:
        raise DependencyError('Grad-CAM needs the grad-cam package: pip install "gi-deploy[explain]"') from e
    cls = GradCAM if method == "gradcam" else GradCAMPlusPlus
    name = layer or target_layer_name(model, tuple(x.shape[-2:]))
    module = get_module(model, name)
    _check_feature_map(model, module, name, x)
    try:
        with cls(model=model, target_layers=[module]) as cam:
            maps = cam(input_tensor=x, targets=[ClassifierOutputTarget(t) for t in targets])
    except (ValueError, IndexError) as e:  # grad-cam's own shape errors
        raise ConfigError(
            f"Grad-CAM cannot use layer {name!r}: {e}; pick a stage output such as stages.N or layerN"
        ) from e
    return np.clip(maps.astype(np.float32), 0.0, 1.0)


def _check_feature_map(model: nn.Module, module: nn.Module, name: str, x: torch.Tensor) -> None:
    """Grad-CAM needs an NCHW feature map: refuse a layer whose output is pooled (2-d) or
    channels-last (ConvNeXt's block internals), which would give an error or a meaningless map."""
    shapes = []
    handle = module.register_forward_hook(lambda m, i, o: shapes.append(tuple(o.shape) if torch.is_tensor(o) else None))
    try:
        with torch.no_grad():
            model(x[:1])
    finally:
        handle.remove()
    shape = shapes[-1] if shapes else None
    h, w = x.shape[-2:]
    nchw = shape is not None and len(shape) == 4 and abs(shape[2] / shape[3] - h / w) <= 0.5 * h / w
    if not nchw or (shape[2] > h or shape[3] > w):
        raise ConfigError(
            f"layer {name!r} outputs {shape}, not an NCHW feature map; Grad-CAM needs one: pick a "
            "stage output such as stages.N (ConvNeXt) or layerN (ResNet)"
        )


def map_to_original(saliency_map: np.ndarray, size: tuple[int, int], spec: PreprocessSpec) -> np.ndarray:
    """A map on the model's input (H, W) placed back on the original image of ``size`` (width,
    height): stretched back for ``resize="direct"``; for ``resize="crop"`` put on the centre crop
    the model saw (the inverse of preprocess.resize_for), zero on the border it did not."""
    w, h = size
    img = Image.fromarray((np.clip(saliency_map, 0, 1) * 255).astype(np.uint8))
    if spec.resize == "direct":
        return np.asarray(img.resize((w, h), Image.Resampling.BILINEAR), np.float32) / 255.0
    th, tw = spec.size
    rw, rh, left, top = crop_geometry((w, h), spec)  # the crop resize_for took, in resized pixels
    x0, y0 = round(left * w / rw), round(top * h / rh)
    cw, ch = max(1, min(w - x0, round(tw * w / rw))), max(1, min(h - y0, round(th * h / rh)))
    out = np.zeros((h, w), np.float32)
    out[y0 : y0 + ch, x0 : x0 + cw] = np.asarray(img.resize((cw, ch), Image.Resampling.BILINEAR), np.float32) / 255.0
    return out


def overlay(image: Image.Image, heat: np.ndarray, alpha: float = 0.45) -> np.ndarray:
    """RGB float image in [0, 1]: ``image`` blended with the jet colour map of ``heat``."""
    from matplotlib import colormaps

    rgb = np.asarray(image, np.float32) / 255.0
    return (1 - alpha) * rgb + alpha * colormaps["jet"](heat)[..., :3]


@dataclass
class ExplainSource:
    """One source's merged torch model, with what explain needs to label it."""

    name: str
    model: nn.Module
    classes: list[str]
    spec: PreprocessSpec


def load_source(run_dir: Path) -> ExplainSource:
    """The run's merged model (adapters folded in: the deployed function) in eval mode."""
    manifest = read_run_manifest(run_dir)
    return ExplainSource(Path(run_dir).name, load_merged_model(run_dir), list(manifest.classes), manifest.preprocess)


@dataclass
class ExplainResult:
    images: list[Path]  # one PNG per input image
    sheet: Path
    sources: list[str]
    errors: list[str]


DISPLAY_MAX_SIDE = 320  # panels are drawn ~200 px wide: maps and overlays are made at this size
SHEET_MAX_ROWS = 48
SHEET_NAME = "contact_sheet.png"


def _thumbnail(image: Image.Image) -> Image.Image:
    """The image at display size, aspect ratio kept (saliency of a 1920x1080 frame is shown, not printed)."""
    scale = DISPLAY_MAX_SIDE / max(image.size)
    if scale >= 1:
        return image
    return image.resize(
        (max(1, round(image.width * scale)), max(1, round(image.height * scale))), Image.Resampling.BILINEAR
    )


def _plain(text: str) -> str:
    return text.replace("$", r"\$")  # matplotlib reads $...$ as math text


def explain_images(
    paths: list[Path],
    sources: list[ExplainSource],
    method: str = "gradcam",
    target: str | list[str] = "predicted",
    layer: str | None = None,
    out_dir: Path = Path("explain"),
    sheet_rows: int = 24,
    names: list[str] | None = None,
    progress=None,
) -> ExplainResult:
    """For each image: the original and one overlay per source (predicted class + confidence, and
    the target class when it is not the prediction) in ``out_dir/<name>.png``, plus a contact
    sheet ``out_dir/contact_sheet.png`` of the first ``sheet_rows`` images (at most 48).

    ``target`` is "predicted", a class name, or one of those per image. A file that cannot be
    read is skipped with its error listed; the others are still written. ``progress(i, n)`` is
    called after each image."""
    targets = target if isinstance(target, list) else [target] * len(paths)
    if len(targets) != len(paths):
        raise ConfigError(f"{len(targets)} targets for {len(paths)} images")
    for t in set(targets) - {"predicted"}:
        for s in sources:
            if t not in s.classes:
                raise ConfigError(f"--target {t!r} is not a class of {s.name}: {', '.join(s.classes)}")
    names = _unique_names(names or [p.stem for p in paths])
    out_dir.mkdir(parents=True, exist_ok=True)
    rows, written, errors = [], [], []
    for i, path in enumerate(paths):
        try:
            image = load_rgb(path)
        except DataError as e:
            errors.append(str(e))
            continue
        shown = _thumbnail(image)
        panels = [("original", np.asarray(shown, np.float32) / 255.0)]
        for s in sources:
            x = torch.from_numpy(to_input(image, s.spec))[None]
            with torch.no_grad():
                probs = torch.softmax(s.model(x), 1)[0]
            k = int(probs.argmax())
            t = k if targets[i] == "predicted" else s.classes.index(targets[i])
            heat = map_to_original(saliency(s.model, x, [t], method, layer)[0], shown.size, s.spec)
            title = f"{s.name}: {s.classes[k]} ({probs[k]:.0%})"
            if t != k:
                title += f"\nmap for {s.classes[t]} ({probs[t]:.0%})"
            panels.append((_plain(title), overlay(shown, heat).astype(np.float32)))
        _save_grid([panels], out_dir / names[i], _plain(f"{path.name} ({method})"))
        written.append(out_dir / names[i])
        if len(rows) < min(sheet_rows, SHEET_MAX_ROWS):
            rows.append(panels)
        if progress is not None:
            progress(i + 1, len(paths))
    if not rows:
        raise DataError(f"none of the {len(paths)} image(s) could be read: {errors[0] if errors else ''}")
    sheet = out_dir / SHEET_NAME
    _save_grid(rows, sheet, f"{method} saliency, {len(rows)} of {len(paths)} image(s)")
    return ExplainResult(written, sheet, [s.name for s in sources], errors)


def _unique_names(stems: list[str]) -> list[str]:
    """``<stem>.png`` per image, unique case-insensitively and never the contact sheet's name."""
    taken, out = {SHEET_NAME.lower()}, []
    for stem in stems:
        name, k = f"{stem}.png", 1
        while name.lower() in taken:
            k += 1
            name = f"{stem}-{k}.png"
        taken.add(name.lower())
        out.append(name)
    return out


def _save_grid(rows: list[list[tuple[str, np.ndarray]]], path: Path, title: str) -> None:
    """A grid: one row per image, one column per panel (original, then each source). Uses a bare
    matplotlib Figure (no pyplot, no global backend switch)."""
    from matplotlib.figure import Figure

    n_rows, n_cols = len(rows), len(rows[0])
    aspect = rows[0][0][1].shape[1] / rows[0][0][1].shape[0]
    fig = Figure(figsize=(2.6 * n_cols * min(max(aspect, 0.5), 2.5), 2.9 * n_rows))
    axes = fig.subplots(n_rows, n_cols, squeeze=False)
    for r, panels in enumerate(rows):
        for c, (label, img) in enumerate(panels):
            ax = axes[r][c]
            ax.imshow(np.clip(img, 0, 1))
            ax.set_title(label, fontsize=8)
            ax.axis("off")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    try:
        fig.savefig(path, dpi=80)
    except OSError as e:
        raise DataError(f"cannot write {path}: {e}") from e


def explain_path(cfg: ExplainConfig, progress=None) -> ExplainResult:
    """``gi-deploy explain``: an image or a folder (recursive), every selected source side by side."""
    if cfg.path.is_file():
        paths = [cfg.path]
    else:
        out = cfg.out_dir.resolve()
        paths = [p for p in list_images(cfg.path) if out not in p.resolve().parents]  # not our own PNGs
    if cfg.limit is not None:
        paths = paths[: cfg.limit]
    if not paths:
        raise DataError(f"no images found under {cfg.path}")
    sources = [load_source(run) for run in select_runs(cfg.runs_dir, cfg.sources, finished_only=True)]
    root = cfg.path if cfg.path.is_dir() else cfg.path.parent
    names = ["__".join(p.relative_to(root).with_suffix("").parts) for p in paths]
    return explain_images(
        paths, sources, cfg.method, cfg.target, cfg.layer, cfg.out_dir, cfg.sheet_rows, names, progress
    )


def explain_wrong(
    csv_path: Path, folder: Path, bundle_manifest: BundleManifest, n: int, out_dir: Path, method: str = "gradcam"
) -> ExplainResult | None:
    """Heatmaps of the ``n`` most confidently wrong images of an ``infer`` run, for the class the
    bundle predicted, from the training run the bundle was exported from (checked to be the same
    run by the hashes in the bundle's manifest). ``out_dir`` is emptied of earlier PNGs first.
    None when nothing was wrong."""
    wrong = [
        (w["path"], w["true_label"], w["predicted"], w["confidence"])
        for w in most_confidently_wrong(csv_path, n, bundle_manifest.source)
    ]
    if not wrong:
        return None
    run_dir = training_run_of(bundle_manifest)  # the same run, unchanged since the export
    model = load_source(run_dir)
    _remove_recorded(out_dir)
    names = [f"{i + 1:03d}_{Path(p).stem}_true-{t}_pred-{k}" for i, (p, t, k, _) in enumerate(wrong)]
    result = explain_images(
        [folder / p for p, *_ in wrong],
        [model],
        method,
        [k for _, _, k, _ in wrong],
        None,
        out_dir,
        min(n, SHEET_MAX_ROWS),
        names,
    )
    written = sorted(p.name for p in out_dir.glob("*.png"))  # this run's maps and sheet: all it may remove later
    write_json(out_dir / WRITTEN_RECORD, {"written": written})
    return result


# The files an --explain-wrong run wrote into its folder: the next run removes those and nothing else
# (a folder the user pointed somewhere else, or put their own images in, keeps them).
WRITTEN_RECORD = ".gi-deploy-written.json"


def _remove_recorded(out_dir: Path) -> None:
    record = out_dir / WRITTEN_RECORD
    if not record.is_file():
        return
    names = read_json(record, "explain-wrong record").get("written", [])
    for name in names:
        p = out_dir / str(name)
        if isinstance(name, str) and "/" not in name and p.parent == out_dir and p.is_file() and not p.is_symlink():
            p.unlink()
    record.unlink()


def explain_wrong_sources(
    csv_path: Path,
    folder: Path,
    deploy_dir: Path,
    sources: list[str],
    n: int,
) -> dict[str, tuple[Path, ExplainResult | None]]:
    """``infer --explain-wrong N``: for each source of an infer run, the heatmaps of its ``n`` most
    confidently wrong images in ``<csv stem>_wrong/`` (``<csv stem>_<source>_wrong/`` with several
    sources). Returns {source: (folder, result or None when nothing was wrong)}."""
    csv_path = Path(csv_path)
    done = {}
    for s in sources:
        out_dir = csv_path.with_name(csv_path.stem + ("_wrong" if len(sources) == 1 else f"_{s}_wrong"))
        done[s] = (out_dir, explain_wrong(csv_path, folder, read_bundle_manifest(Path(deploy_dir) / s), n, out_dir))
    return done
