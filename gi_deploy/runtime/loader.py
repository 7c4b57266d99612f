"""Open a deployment bundle (``deploy/<source>/``) on a backend. No torch import here."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from gi_deploy.core.bundles import BundleManifest, read_bundle_manifest
from gi_deploy.core.preprocess import PreprocessSpec
from gi_deploy.runtime.backends import open_backend
from gi_deploy.runtime.backends.base import Backend, is_info

log = logging.getLogger(__name__)


@dataclass
class Bundle:
    """A verified classifier with its class names and preprocessing, loaded on a backend."""

    path: Path
    manifest: BundleManifest
    classes: list[str]
    preprocess: PreprocessSpec
    backend: Backend

    @property
    def source(self) -> str:
        return self.manifest.source

    @property
    def provider(self) -> str:
        return self.backend.detail

    @property
    def device(self) -> str:
        return self.backend.device

    def predict_logits(self, batch: np.ndarray) -> np.ndarray:
        """The decoder's uint8 (N, H, W, 3) pixels or normalised float32 (N, 3, H, W) -> float32
        logits (N, num_classes)."""
        return self.backend.predict_logits(batch)

    def predict_logits_and_features(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """float32 (N, 3, H, W) -> logits (N, C) and pooled features (N, D) (None: no features output)."""
        return self.backend.predict_logits_and_features(batch)


def load_bundle(
    bundle_dir: Path,
    precision: str = "fp32",
    device: str = "cpu",
    check_hash: bool = True,
    backend: str = "onnxruntime",
    threads: int | None = None,
    compile: bool | None = None,
    batch_size: int = 32,
) -> Bundle:
    """Open ``bundle_dir``: check its manifest and the model file's hash, load the model on
    ``backend`` (runtime/backends/select.py; onnxruntime by default, no torch import).

    Raises BundleError when files are missing or altered, ConfigError for an unknown
    precision/device/backend. A requested provider that is not the active one is logged as a
    warning and kept in ``bundle.backend.notes`` (onnxruntime-gpu silently falls back to CPU when
    CUDA libraries are missing)."""
    manifest = read_bundle_manifest(bundle_dir)
    b = open_backend(bundle_dir, manifest, backend, precision, device, threads, check_hash, compile, batch_size)
    for note in b.notes:
        if not is_info(note):
            log.warning("%s: %s", manifest.source, note)
    return Bundle(
        path=bundle_dir, manifest=manifest, classes=list(manifest.classes), preprocess=manifest.preprocess, backend=b
    )


class BundleInfo:
    """What a driver that loads no model (the Ray driver) knows of a bundle: its manifest."""

    def __init__(self, path: Path):
        self.path, self.manifest = Path(path), read_bundle_manifest(Path(path))
        self.source, self.classes = self.manifest.source, list(self.manifest.classes)
        self.preprocess = self.manifest.preprocess


def bundle_identity(b, precision: str) -> dict:
    """What makes one source's rows one model's: the bundle's export key and content hash, and the
    model file (precision and sha256) that ran."""
    m = b.manifest
    return {
        "bundle": str(b.path),
        "export_key": m.export_key,
        "content_sha256": m.content_sha256,
        "precision": precision,
        "model_sha256": m.models[precision].sha256 if precision in m.models else None,
    }


def open_for(cfg, bundle_dir: Path, load: bool = True):
    """One bundle as a run's config (runtime/job_types.InferConfig) asks: loaded on its backend,
    precision, device, threads and batch, or (``load=False``) its manifest only, for a planner that
    loads no model."""
    if not load:
        return BundleInfo(bundle_dir)
    return load_bundle(
        bundle_dir,
        cfg.precision,
        cfg.device,
        backend=cfg.backend,
        threads=cfg.threads,
        compile=cfg.compile,
        batch_size=cfg.batch_size,
    )
