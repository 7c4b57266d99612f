"""The source router at export: fit core/router.py's linear classifier on the cheap global
features of every selected bundle's training images, gate it on their held-out validation
images, and write the verified artifact ``deploy/_router/`` (staged, then moved into place).

Numpy only: a multinomial logistic regression on ~90 standardised features is a convex problem
that full-batch gradient descent solves in a second; no library is worth a dependency here.
"""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from gi_deploy._io import library_versions, sha256_file, utc_now, write_json
from gi_deploy.core.bundles import list_bundles, read_bundle_manifest
from gi_deploy.core.metrics import confusion_matrix, softmax
from gi_deploy.core.ood import fit_id_stats
from gi_deploy.core.preprocess import load_input
from gi_deploy.core.router import (
    FEATURE_VERSION,
    NOVELTY_TPR,
    ROUTER_DIR,
    ROUTER_FILE,
    ROUTER_FORMAT,
    ROUTER_FORMAT_VERSION,
    ROUTER_MANIFEST,
    ROUTER_SPEC,
    Router,
    RouterManifest,
    feature_names,
    router_dir,
    router_features,
)
from gi_deploy.core.runs import read_run_manifest
from gi_deploy.errors import BundleError, ConfigError, DataError, GateFailed
from gi_deploy.export.verify import resolvable_share, split_images

# Held-out validation routing accuracy the router must reach (the goal): a misrouted image
# meets a model that was never trained on its source (the seed paper's 8-10% accuracy). Below
# 100 validation images one image is more than a point and the goal cannot be resolved: refused,
# unless --allow-small-val, which relaxes it to all but one image, says so and records it.
ROUTER_MIN_ACCURACY = 0.99
L2 = 1e-3  # weight decay of the logistic regression: features are standardised, so one value fits all
STEPS = 500
LR = 0.5
MAX_TRAIN_IMAGES = 3000  # per source: global statistics of a few thousand frames describe a device well
MAX_VAL_IMAGES = 1000


@dataclass
class RouterResult:
    path: Path
    manifest: RouterManifest
    notes: list[str] = field(default_factory=list)


def router_threshold(min_accuracy: float, n: int, allow_small_val: bool) -> tuple[float, str | None]:
    """The accuracy the router's gate holds it to on ``n`` validation images, and a loud note when
    that is not ``min_accuracy``. ``n`` resolves the goal when one misrouted image alone does not
    fail it (n >= 1 / (1 - min_accuracy): 100 images for 99%); below that, DataError unless
    ``allow_small_val``, and then all but one image (never quietly)."""
    need = resolvable_share(min_accuracy, n)
    if need >= min_accuracy:
        return min_accuracy, None
    enough = math.ceil(round(1.0 / (1.0 - min_accuracy), 9))
    where = (
        f"the router's gate (>= {min_accuracy:.1%} held-out routing accuracy) needs at least {enough} "
        f"validation images to resolve, and the sources have {n}"
    )
    if not allow_small_val:
        raise DataError(
            f"{where}: one misrouted image would already fail it. Add validation images, or pass "
            "--allow-small-val to gate on all but one image instead (said and recorded in the router's "
            "manifest); nothing written"
        )
    return need, (
        f"WARNING: {where}; gated on all but one image, >= {need:.1%} (--allow-small-val; recorded in "
        f"{ROUTER_DIR}/manifest.json as verification.router.small_val)"
    )


def _thumbs(items: list[tuple[Path, int]], source: str, split: str) -> np.ndarray:
    gone = [p for p, _ in items if not p.is_file()]
    if gone:
        raise DataError(
            f"router: {len(gone)} {split} image(s) of source {source} are gone, e.g. {gone[0]}; the "
            "router fits on each source's training images where training found them"
        )
    if not items:
        raise DataError(f"router: source {source} lists no {split} images")
    return router_features(np.stack([load_input(p, ROUTER_SPEC) for p, _ in items]))


def fit_logistic(
    x: np.ndarray, y: np.ndarray, n_classes: int, l2: float = L2, steps: int = STEPS, lr: float = LR
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Standardisation (mean, scale) and a class-balanced multinomial logistic regression
    (weights (F, S), bias (S,)) by full-batch gradient descent. Deterministic."""
    mean = x.mean(axis=0)
    scale = x.std(axis=0)
    scale[scale < 1e-6] = 1.0  # a constant feature carries nothing; keep it finite
    z = (x - mean) / scale
    counts = np.bincount(y, minlength=n_classes).astype(np.float64)
    sample_w = (len(y) / (n_classes * np.maximum(counts, 1)))[y]  # each source weighs the same
    onehot = np.eye(n_classes)[y]
    w = np.zeros((x.shape[1], n_classes))
    b = np.zeros(n_classes)
    for _ in range(steps):
        g = (softmax(z @ w + b) - onehot) * sample_w[:, None] / len(y)
        w -= lr * (z.T @ g + l2 * w)
        b -= lr * g.sum(axis=0)
    return mean.astype(np.float32), scale.astype(np.float32), w.astype(np.float32), b.astype(np.float32)


def fit_novelty(
    router: Router, xs: list[np.ndarray], vxs: list[np.ndarray], tpr: float = NOVELTY_TPR
) -> tuple[list, dict]:
    """Per source: a one-class Ledoit-Wolf Mahalanobis model (core/ood.py's) on its training
    images' standardised router features, thresholded at the ``tpr`` quantile of its validation
    images' scores. Returns the models (``Router.novelty``) and the manifest's ``novelty`` entry."""
    models, info = [], {}
    for source, x, vx in zip(router.sources, xs, vxs):
        z, vz = (x - router.mean) / router.scale, (vx - router.mean) / router.scale
        stats, numbers = fit_id_stats(z, np.zeros(len(z), dtype=int), vz, tpr=tpr)
        models.append(stats)
        info[source] = {
            k: numbers[k] for k in ("threshold", "shrinkage", "n_train", "n_val", "val_accepted", "train_accepted")
        }
    router.novelty = models
    entry = {
        "score": "min over sources of Mahalanobis (Ledoit-Wolf, standardised router features) / threshold",
        "tpr": tpr,
        "refuses": "novelty > 1: no source's frames look like the image",
        "sources": info,
    }
    return models, entry


def write_router(
    deploy_dir: Path,
    sources: list[str] | None = None,
    min_accuracy: float = ROUTER_MIN_ACCURACY,
    allow_small_val: bool = False,
) -> RouterResult:
    """Fit, gate and write ``deploy_dir/_router/`` over ``sources`` (default: every bundle
    there). Raises ConfigError with fewer than two sources, BundleError for a missing bundle,
    DataError when a source's images are gone or too few validation images resolve
    ``min_accuracy`` (:func:`router_threshold`; ``allow_small_val`` relaxes it, loudly), GateFailed
    (nothing written) when held-out routing accuracy is below the gate."""
    deploy_dir = Path(deploy_dir)
    sources = list(dict.fromkeys(sources or list_bundles(deploy_dir)))
    if len(sources) < 2:
        raise ConfigError(
            f"a router chooses between sources: {deploy_dir} has {len(sources)} "
            f"({', '.join(sources) or 'none'}); export at least two"
        )
    missing = [s for s in sources if s not in list_bundles(deploy_dir)]
    if missing:
        raise BundleError(f"router: no bundle for {', '.join(missing)} under {deploy_dir}; export it first")
    xs, ys, vxs, vys, counts = [], [], [], [], {}
    bundles = {s: read_bundle_manifest(deploy_dir / s) for s in sources}
    for i, source in enumerate(sources):
        run = read_run_manifest(Path(bundles[source].training.run_dir))
        train = _thumbs(split_images(run, "train", MAX_TRAIN_IMAGES), source, "train")
        val = _thumbs(split_images(run, "val", MAX_VAL_IMAGES), source, "val")
        xs.append(train), ys.append(np.full(len(train), i)), vxs.append(val), vys.append(np.full(len(val), i))
        counts[source] = {"train": int(len(train)), "val": int(len(val))}
    x, y, vx, vy = np.concatenate(xs), np.concatenate(ys), np.concatenate(vxs), np.concatenate(vys)
    mean, scale, w, b = fit_logistic(x, y, len(sources))
    router = Router(sources, mean, scale, w, b)
    _, novelty = fit_novelty(router, xs, vxs)
    pred = router.probabilities_of_features(vx).argmax(axis=1)
    train_acc = float((router.probabilities_of_features(x).argmax(axis=1) == y).mean())
    accuracy = float((pred == vy).mean())
    need, note = router_threshold(min_accuracy, len(vy), allow_small_val)
    gate = {
        "accuracy": accuracy,
        "n": int(len(vy)),
        "train_accuracy": train_acc,
        "min_accuracy": need,
        "goal": min_accuracy,
        "small_val": note is not None,
        "confusion": confusion_matrix(vy, pred, len(sources)).tolist(),
        "split": "val",
    }
    if accuracy < need:
        raise GateFailed(
            "router",
            f"router over {', '.join(sources)}",
            "held-out routing accuracy",
            accuracy,
            need,
            "at least",
            "the sources' images look alike in global colour and layout; route with --source per folder instead",
        )
    final = router_dir(deploy_dir)
    staging = final.with_name(f".{final.name}.staging")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    np.savez(staging / ROUTER_FILE, **router.arrays())
    draft = {
        "format": ROUTER_FORMAT,
        "format_version": ROUTER_FORMAT_VERSION,
        "created": utc_now(),
        "sources": sources,
        "images": counts,
        "features": {
            "version": FEATURE_VERSION,
            "preprocess": ROUTER_SPEC.to_dict(),
            "names": feature_names(),
            "n": len(feature_names()),
        },
        "classifier": {
            "kind": "multinomial_logistic_regression",
            "l2": L2,
            "steps": STEPS,
            "lr": LR,
            "class_weight": "balanced",
        },
        "bundles": {s: bundles[s].export_key for s in sources},
        "novelty": novelty,
        "verification": {"router": gate},
        "files": {
            ROUTER_FILE: {"sha256": sha256_file(staging / ROUTER_FILE), "bytes": (staging / ROUTER_FILE).stat().st_size}
        },
        "versions": library_versions(("numpy",)),
    }
    manifest = RouterManifest.from_dict(json.loads(json.dumps(draft)), staging, check_seal=False).sealed()
    write_json(staging / ROUTER_MANIFEST, manifest.to_dict())
    old = final.with_name(f".{final.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        final.rename(old)
    staging.rename(final)
    shutil.rmtree(old, ignore_errors=True)
    return RouterResult(final, manifest, [note] if note else [])
