"""In-distribution statistics of a source's model (numpy only): fitted at export on the model's
pooled features, used by ``infer --source auto`` to refuse an image its model was not trained for.

The score is the Mahalanobis distance to the nearest class mean under one shared covariance
(Lee et al. 2018; Fort et al., arXiv:2106.09022): feature-space scores beat softmax confidence
on endoscopy shifts (OpenMIBOOD, CVPR 2025), and softmax can be inflated by artefacts
(arXiv:2408.17337). The covariance is Ledoit-Wolf shrunk towards a scaled identity: a source has
a few hundred training images and the features hundreds of dimensions, so the sample covariance
is singular. The threshold is the validation split's ``TPR`` quantile of the score: 95% of the
source's own held-out images are accepted.

Stored in the bundle as ``id_stats.npz`` (means (K, D), precision (D, D), threshold), hashed in the
sealed manifest, whose ``ood`` entry repeats the threshold and holds the calibration numbers; the
runtime reads the threshold from the file.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from gi_deploy._io import sha256_file
from gi_deploy.errors import BundleError, ConfigError

ID_STATS_FILE = "id_stats.npz"
TPR = 0.95  # share of the source's own validation images accepted (the threshold's quantile)


def ledoit_wolf(x: np.ndarray) -> tuple[np.ndarray, float]:
    """Ledoit-Wolf shrunk covariance of centred rows ``x`` (N, D) and the shrinkage used
    (the same estimator as ``sklearn.covariance.ledoit_wolf`` with ``assume_centered=True``)."""
    n, d = x.shape
    x = x.astype(np.float64)
    emp = x.T @ x / n
    mu = np.trace(emp) / d
    x2 = x**2
    delta_ = np.sum(emp**2)  # sklearn's delta_ / n_samples**2
    beta = (np.sum(x2.T @ x2) / n - delta_) / (d * n)
    delta = (delta_ - 2.0 * mu * np.trace(emp) + d * mu**2) / d
    beta = min(beta, delta)
    shrinkage = 0.0 if beta == 0 else float(beta / delta)
    cov = (1 - shrinkage) * emp + shrinkage * mu * np.eye(d)
    return cov, float(shrinkage)


@dataclass
class IdStats:
    """Class means and the shared precision matrix; ``threshold`` on :meth:`score`."""

    means: np.ndarray  # (K, D) float64
    precision: np.ndarray  # (D, D) float64
    threshold: float

    def score(self, feats: np.ndarray) -> np.ndarray:
        """float (N, D) pooled features -> (N,) squared Mahalanobis distance to the nearest class
        mean: larger is farther from anything the model was trained on."""
        f = np.asarray(feats, dtype=np.float64)
        if f.ndim != 2 or f.shape[1] != self.means.shape[1]:
            raise BundleError(f"in-distribution statistics are for {self.means.shape[1]}-dim features, got {f.shape}")
        fp = f @ self.precision  # (N, D)
        mp = self.means @ self.precision  # (K, D)
        d = (
            np.einsum("nd,nd->n", fp, f)[:, None]
            - 2 * fp @ self.means.T
            + np.einsum("kd,kd->k", mp, self.means)[None, :]
        )
        return np.maximum(d.min(axis=1), 0.0)

    def rejects(self, feats: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        s = self.score(feats)
        return s, s > self.threshold


def fit_id_stats(
    train_feats: np.ndarray, train_labels: np.ndarray, val_feats: np.ndarray, tpr: float = TPR
) -> tuple[IdStats, dict]:
    """Class means and a Ledoit-Wolf shared covariance from the training split's features,
    the threshold from the validation split's scores. Returns the stats and the numbers for the
    manifest. Raises ConfigError for empty splits or a ``tpr`` outside (0, 1]."""
    if not 0 < tpr <= 1:
        raise ConfigError(f"tpr must be in (0, 1], got {tpr}")
    if len(train_feats) < 2 or len(val_feats) < 1:
        raise ConfigError(
            f"in-distribution statistics need >= 2 training and >= 1 validation images, got "
            f"{len(train_feats)} and {len(val_feats)}"
        )
    x = np.asarray(train_feats, dtype=np.float64)
    labels = np.asarray(train_labels)
    classes = np.unique(labels)
    means = np.zeros((int(labels.max()) + 1, x.shape[1]))
    for k in classes:
        means[k] = x[labels == k].mean(axis=0)
    present = means[classes]
    cov, shrinkage = ledoit_wolf(x - means[labels])
    precision = np.linalg.pinv(cov, hermitian=True)
    stats = IdStats(present, precision, 0.0)
    val_scores = stats.score(val_feats)
    train_scores = stats.score(x)
    stats.threshold = float(np.quantile(val_scores, tpr, method="higher"))
    info = {
        "score": "mahalanobis_min_class",
        "covariance": "ledoit_wolf_shared",
        "shrinkage": round(shrinkage, 6),
        "tpr": tpr,
        "threshold": stats.threshold,
        "n_train": int(len(x)),
        "n_val": int(len(val_feats)),
        "feature_dim": int(x.shape[1]),
        "classes_with_means": [int(k) for k in classes],
        "val_accepted": float((val_scores <= stats.threshold).mean()),
        "train_accepted": float((train_scores <= stats.threshold).mean()),
        "file": ID_STATS_FILE,
    }
    return stats, info


def save_id_stats(stats: IdStats, path: Path) -> None:
    np.savez(path, means=stats.means, precision=stats.precision, threshold=np.array(stats.threshold))


def load_id_stats(bundle_dir: Path, manifest, check_hash: bool = True) -> IdStats | None:
    """The bundle's in-distribution statistics (``manifest`` a core/bundles.BundleManifest), or None
    for a model without pooled features or whose run's images were gone at export. Everything,
    the threshold included, comes from the sealed ``id_stats.npz`` (its sha256 is in the sealed
    manifest); the manifest's copy of the threshold must be the same number. Raises BundleError
    naming the file or field when the file is missing, altered, malformed or disagrees."""
    entry = manifest.ood
    if entry is None or entry.file is None:  # no pooled features, or the run's images were gone
        return None
    path = Path(bundle_dir) / entry.file
    if not path.is_file():
        raise BundleError(f"bundle file missing: {path}; re-export the bundle")
    if check_hash and sha256_file(path) != manifest.files[entry.file].sha256:
        raise BundleError(
            f"{path} does not match the sha256 in its manifest: the file was changed after export; re-export it"
        )
    try:
        with np.load(path) as z:
            means, precision, threshold = (
                np.asarray(z["means"], np.float64),
                np.asarray(z["precision"], np.float64),
                float(z["threshold"]),
            )
    except (OSError, ValueError, KeyError) as e:
        raise BundleError(f"{path} is not in-distribution statistics ({e}); re-export the bundle") from e
    if means.ndim != 2 or precision.shape != (means.shape[1], means.shape[1]):
        raise BundleError(
            f"{path}: means {means.shape} and precision {precision.shape} do not fit together; re-export the bundle"
        )
    if not (np.isfinite(threshold) and threshold > 0):
        raise BundleError(f"{path}: threshold {threshold!r} must be a finite number > 0; re-export the bundle")
    if threshold != entry.threshold:
        raise BundleError(
            f"{Path(bundle_dir) / 'manifest.json'}: field ood.threshold = {entry.threshold!r} differs "
            f"from the threshold {threshold!r} in the sealed {entry.file}; the manifest was edited: "
            "re-export the bundle with `gi-deploy export --force`"
        )
    return IdStats(means, precision, threshold)
