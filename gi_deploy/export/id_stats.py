"""A source's in-distribution statistics at export: the exported fp32 ONNX's pooled features
(its ``features`` output, the numbers the runtime will see) on the run's training split fit class
means and a shared Ledoit-Wolf covariance; the validation split calibrates the threshold
(core/ood.py holds the maths and the runtime half)."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from gi_deploy.core.ood import ID_STATS_FILE, fit_id_stats, save_id_stats
from gi_deploy.core.preprocess import PreprocessSpec, load_input
from gi_deploy.core.runs import RunRecord
from gi_deploy.export.onnx_export import FEATURES_NAME, ort_session, run_onnx_output
from gi_deploy.export.verify import split_images

log = logging.getLogger(__name__)
CHUNK = 64  # images decoded and run at a time: memory stays flat on thousands of 224 px images


def _features(model_path: Path, items: list[tuple[Path, int]], spec: PreprocessSpec) -> np.ndarray:
    session = ort_session(model_path)  # once: a session per chunk would reload the model file
    parts = []
    for i in range(0, len(items), CHUNK):
        x = np.stack([load_input(p, spec) for p, _ in items[i : i + CHUNK]]).astype(np.float32)
        parts.append(run_onnx_output(session, x, FEATURES_NAME))
    return np.concatenate(parts)


def write_id_stats(
    name: str, manifest: RunRecord, spec: PreprocessSpec, model_path: Path, staging: Path, max_images: int
) -> dict:
    """Fit the statistics on up to ``max_images`` training and ``max_images // 2`` validation
    images (spread over the classes), write ``id_stats.npz`` into ``staging``; returns the
    manifest's ``ood`` entry. When the run's images are gone, returns ``{"status": "missing",
    "reason": ...}`` and writes nothing: the bundle still classifies; ``--source auto`` will not
    be able to refuse for it, and says so."""
    train = split_images(manifest, "train", max_images)
    val = split_images(manifest, "val", max(1, max_images // 2))
    gone = [p for p, _ in train + val if not p.is_file()]
    if gone or not train or not val:
        reason = (
            f"{len(gone)} of the run's images are gone (e.g. {gone[0]})"
            if gone
            else "the run lists no training or validation images"
        )
        log.warning("%s: no in-distribution statistics: %s", name, reason)
        return {"status": "missing", "reason": reason}
    train_feats = _features(model_path, train, spec)
    val_feats = _features(model_path, val, spec)
    classes = list(manifest.classes)  # split files name their class (older runs: its index)
    labels = np.array([classes.index(lab) if isinstance(lab, str) else int(lab) for _, lab in train])
    stats, info = fit_id_stats(train_feats, labels, val_feats)
    save_id_stats(stats, staging / ID_STATS_FILE)
    return {"status": "fitted", **info}
