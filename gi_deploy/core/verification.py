"""The verification batch and the agreement rule, shared by export's gates (export/verify.py, which
holds the full gate table and the merge / fp32 / INT8-drop thresholds) and the runtime's load-time
gates (runtime/backends/openvino.py checks its answers against the fp32 ONNX on this same batch).

The batch is not stored in the bundle: it is rebuilt, the same on every machine, from the run's
validation images (where they are on disk; spread over the classes, in a fixed order) and the
``STRESS_IMAGES``, synthesised at the model's input size from a fixed seed.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from gi_deploy.core.metrics import softmax
from gi_deploy.core.preprocess import PreprocessSpec, load_input, normalize
from gi_deploy.core.runs import RunRecord
from gi_deploy.errors import DataError, GateFailed

# fp16 keeps ~3 significant digits, so logits move by ~1e-3..1e-2 and only near-ties may flip:
# at most 1 decision in 200 may change (on a batch of fewer than 200 inputs: none).
FP16_MIN_TOP1 = 0.995
# An input whose fp32 top-2 logits are closer than this is a tie: fp16's rounding (~1e-3 on
# logits) may flip it, and that says nothing about the conversion. Ties are reported, and left
# out of the fp16 and engine agreement (measured: a flip at a 3e-4 margin with a 3e-4 error).
FP16_TIE_MARGIN = 0.01
# INT8 post-training quantisation with per-channel weights keeps CNN top-1 within about one point
# of fp32 (Krishnamoorthi 2018, arXiv:1806.08342, Table 2; ONNX Runtime's and TensorRT's published
# INT8 results). A larger drop means calibration failed (outliers, unrepresentative images), and
# the bundle would no longer have the metrics its manifest reports. Agreement guards the same
# thing where flips in both directions cancel in accuracy: a model that changes 1 decision in 50
# is not the validated model.
INT8_MIN_TOP1 = 0.98


def resolvable_share(min_share: float, n: int) -> float:
    """The share of ``n`` images a gate requires (the INT8 gate's top-1 agreement, the router's
    accuracy): ``min_share``, or all but one where the set is too small to resolve it (the same
    resolution rule as the drop)."""
    return min(min_share, 1.0 - 1.0 / n) if n > 1 else min_share


VERIFY_SEED = 0
VERIFY_REAL_IMAGES = 16  # validation images, spread over the classes
# Valid pixel images chosen to drive large activations (saturated flat colours, full-contrast
# edges, noise): where fp16 overflows if it is going to (LayerNorm/GRN, PITFALLS "FP16").
STRESS_IMAGES = ("white", "black", "red", "specular", "checker-1px", "checker-8px", "noise", "noise-red")


def compare_logits(reference: np.ndarray, candidate: np.ndarray, tie_margin: float | None = None) -> dict:
    """max |Δlogit|, max |Δprob|, top-1 agreement and finiteness of ``candidate`` vs ``reference``.

    With ``tie_margin``, inputs whose reference top-2 logits are closer than it are counted as
    ``ties`` and ``top1_agreement`` is over the others (``top1_agreement_all`` over every input)."""
    finite_rows = np.isfinite(candidate).all(axis=1)
    finite = bool(finite_rows.all())
    with np.errstate(invalid="ignore", over="ignore"):
        d_logit = np.abs(reference - candidate)
        d_prob = np.abs(softmax(reference) - softmax(candidate))
    agree = reference.argmax(1) == candidate.argmax(1)
    result = {
        "max_abs_logit_diff": float(d_logit.max()) if finite else float("inf"),
        "max_abs_prob_diff": float(d_prob.max()) if finite else float("inf"),
        "top1_agreement": float(agree.mean()) if finite else 0.0,
        "finite": finite,
        "finite_share": float(finite_rows.mean()),
        "n": int(len(reference)),
    }
    if tie_margin is not None:
        top2 = np.sort(reference, axis=1)[:, -2:] if reference.shape[1] > 1 else np.zeros((len(reference), 2))
        decisive = (top2[:, 1] - top2[:, 0]) >= tie_margin
        result.update(
            top1_agreement_all=result["top1_agreement"],
            ties=int((~decisive).sum()),
            tie_margin=tie_margin,
            top1_agreement=float(agree[decisive].mean()) if finite and decisive.any() else float(finite),
        )
    return result


def check(
    gate: str, what: str, result: dict, atol: float | None = None, min_top1: float | None = None, hint: str = ""
) -> dict:
    """Record the thresholds in ``result`` and raise GateFailed (gate, number, threshold) when
    ``result`` misses one. Non-finite outputs always fail."""
    if not result["finite"]:
        raise GateFailed(
            gate,
            what,
            "share of inputs with finite logits",
            result["finite_share"],
            1.0,
            "equal to",
            hint or "inf or NaN in the graph",
        )
    if atol is not None:
        result["tolerance"] = atol
        if result["max_abs_logit_diff"] > atol:
            raise GateFailed(gate, what, "max |Δlogit|", result["max_abs_logit_diff"], atol, "at most", hint)
    if min_top1 is not None:
        result["min_top1_agreement"] = min_top1
        if result["top1_agreement"] < min_top1:
            raise GateFailed(gate, what, "top-1 agreement", result["top1_agreement"], min_top1, "at least", hint)
    return result


def _stress_image(kind: str, h: int, w: int, rng: np.random.Generator) -> Image.Image:
    a = np.zeros((h, w, 3), np.uint8)
    yy, xx = np.mgrid[0:h, 0:w]
    if kind == "white":
        a[:] = 255
    elif kind == "red":
        a[..., 0] = 255
    elif kind == "specular":  # dark red mucosa with saturated highlights, as under an endoscope's light
        a[:] = (90, 20, 20)
        a[(yy // max(1, h // 8) + xx // max(1, w // 8)) % 5 == 0] = 255
    elif kind.startswith("checker-"):
        cell = int(kind.split("-")[1].removesuffix("px"))
        a[((yy // cell + xx // cell) % 2) == 0] = 255
    elif kind == "noise":
        a = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    elif kind == "noise-red":
        a[..., 0] = rng.integers(128, 256, (h, w), dtype=np.uint8)
        a[..., 1:] = rng.integers(0, 64, (h, w, 2), dtype=np.uint8)
    elif kind != "black":
        raise ValueError(f"unknown stress image {kind!r}")
    return Image.fromarray(a, "RGB")


def stress_inputs(spec: PreprocessSpec) -> np.ndarray:
    """The ``STRESS_IMAGES`` at the model's input size, normalised like any image: (8, 3, H, W)."""
    rng = np.random.default_rng(VERIFY_SEED)
    h, w = spec.size
    return np.stack([normalize(_stress_image(k, h, w, rng), spec) for k in STRESS_IMAGES])


def _spread_over_classes(files: list, n: int) -> list:
    """Up to ``n`` of ``files`` ((path, label[, group]) rows), taking each class in turn."""
    by_class: dict = {}
    for rel, label, *_ in files:  # rows may carry a group (Kvasir-Capsule: the video)
        by_class.setdefault(label, []).append(rel)
    picked, queues = [], [list(v) for _, v in sorted(by_class.items(), key=lambda kv: str(kv[0]))]
    while len(picked) < n and any(queues):
        for q in queues:
            if q and len(picked) < n:
                picked.append(q.pop(0))
    return picked


def split_images(manifest: RunRecord, split: str, n: int | None = None) -> list[tuple[Path, int]]:
    """(path, class index) of up to ``n`` images of a run's split (None: all), spread over the
    classes, in a fixed order."""
    splits = manifest.splits
    root = Path(splits["root"])
    files = splits["files"][split]
    if n is None:
        return [(root / rel, label) for rel, label, *_ in files]
    labels = {rel: label for rel, label, *_ in files}
    return [(root / rel, labels[rel]) for rel in _spread_over_classes(files, n)]


def verification_batch(manifest: RunRecord, spec: PreprocessSpec) -> tuple[np.ndarray, dict]:
    """The fixed batch every gate runs on: up to ``VERIFY_REAL_IMAGES`` validation images of the
    run (those still on disk) and the ``STRESS_IMAGES``. float32 (N, 3, H, W) and a description."""
    real, unread = [], []
    wanted = split_images(manifest, "val", VERIFY_REAL_IMAGES)
    for path, _ in wanted:
        try:
            real.append(load_input(path, spec))
        except DataError:
            unread.append(str(path))  # moved since training: counted, and export refuses when none is left
    stress = stress_inputs(spec)
    batch = np.concatenate([np.stack(real), stress]) if real else stress
    return batch.astype(np.float32), {
        "real_images": len(real),
        "real_images_wanted": len(wanted),
        "real_images_unreadable": unread[:3],
        "stress_images": list(STRESS_IMAGES),
        "n": int(len(batch)),
    }
