"""Load a deployment bundle (``deploy/<source>/``) with onnxruntime. No torch import here."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from gi_deploy._io import read_json, sha256_file
from gi_deploy.errors import BundleError, ConfigError, DataError
from gi_deploy.runtime.backends import Backend, open_backend
from gi_deploy.runtime.preprocess import PreprocessSpec

log = logging.getLogger(__name__)

BUNDLE_FORMAT = "gi-deploy-bundle"
BUNDLE_FORMAT_VERSION = 2  # 2: model.fp16.onnx, int8, engine, files/footprint/export_key
MANIFEST_NAME = "manifest.json"
MODEL_FILES = {"fp32": "model.onnx", "fp16": "model.fp16.onnx", "int8": "model.int8.onnx"}

def list_bundles(deploy_dir: Path) -> list[str]:
    """Names of the sources that have a bundle manifest under ``deploy_dir``."""
    if not deploy_dir.is_dir():
        return []
    return sorted(p.parent.name for p in deploy_dir.glob(f"*/{MANIFEST_NAME}")
                  if not p.parent.name.startswith("."))  # .<name>.staging / .old of an export in progress


def resolve_bundle_dir(deploy_dir: Path, source: str | None) -> Path:
    """The bundle folder for ``source``; with no source, the only bundle there is."""
    available = list_bundles(deploy_dir)
    if source is None:
        if len(available) == 1:
            return deploy_dir / available[0]
        if not available:
            raise BundleError(f"no bundles under {deploy_dir}; run `gi-deploy export` first")
        raise ConfigError(f"{len(available)} bundles under {deploy_dir} ({', '.join(available)}); "
                          "choose one with --source")
    if source not in available:
        raise BundleError(f"no bundle for source {source!r} under {deploy_dir}; "
                          f"available: {', '.join(available) or 'none'}")
    return deploy_dir / source


def resolve_bundle_dirs(deploy_dir: Path, sources: list[str] | None) -> list[Path]:
    """Bundle folders for ``sources`` (names, or ``["all"]`` for every bundle there); with none,
    the only bundle there is. Duplicates are dropped, the order kept."""
    if not sources:
        return [resolve_bundle_dir(deploy_dir, None)]
    if "all" in sources:
        available = list_bundles(deploy_dir)
        if not available:
            raise BundleError(f"no bundles under {deploy_dir}; run `gi-deploy export` first")
        return [deploy_dir / s for s in available]
    return [resolve_bundle_dir(deploy_dir, s) for s in dict.fromkeys(sources)]


@dataclass
class Bundle:
    """A verified classifier with its class names and preprocessing, loaded on a backend."""

    path: Path
    manifest: dict
    classes: list[str]
    preprocess: PreprocessSpec
    backend: Backend

    @property
    def source(self) -> str:
        return self.manifest["source"]

    @property
    def provider(self) -> str:
        return self.backend.detail

    def predict_logits(self, batch: np.ndarray) -> np.ndarray:
        """float32 (N, 3, H, W) -> float32 logits (N, num_classes)."""
        return self.backend.predict_logits(batch)


def read_bundle_manifest(bundle_dir: Path) -> dict:
    """The bundle's manifest; BundleError when missing or of another format version."""
    manifest = read_json(bundle_dir / MANIFEST_NAME, "bundle manifest")
    if manifest.get("format") != BUNDLE_FORMAT or manifest.get("format_version") != BUNDLE_FORMAT_VERSION:
        raise BundleError(f"{bundle_dir / MANIFEST_NAME} is not a {BUNDLE_FORMAT} v{BUNDLE_FORMAT_VERSION} "
                          "manifest; re-export with this version of gi-deploy")
    return manifest


def load_bundle(bundle_dir: Path, precision: str = "fp32", device: str = "cpu", check_hash: bool = True,
                backend: str = "onnxruntime", threads: int | None = None) -> Bundle:
    """Open ``bundle_dir``: check its manifest and the model file's hash, load the model on
    ``backend`` (runtime/backends.py; onnxruntime by default, no torch import).

    Raises BundleError when files are missing or altered, ConfigError for an unknown
    precision/device/backend. A requested provider that is not the active one is logged as a
    warning and kept in ``bundle.backend.notes`` (onnxruntime-gpu silently falls back to CPU when
    CUDA libraries are missing)."""
    manifest = read_bundle_manifest(bundle_dir)
    b = open_backend(bundle_dir, manifest, backend, precision, device, threads, check_hash)
    for note in b.notes:
        if not note.startswith("auto:"):
            log.warning("%s: %s", manifest["source"], note)
    return Bundle(path=bundle_dir, manifest=manifest, classes=list(manifest["classes"]),
                  preprocess=PreprocessSpec.from_dict(manifest["preprocess"]), backend=b)


def training_run_of(manifest: dict) -> Path:
    """The training run a bundle was exported from, checked to be unchanged since (its run
    manifest's hash): what --backend torch and --explain-wrong rebuild the model from."""
    training = manifest.get("training") or {}
    if "run_dir" not in training:
        raise BundleError("this bundle's manifest does not name the training run it came from; re-export it "
                          "with this version of gi-deploy")
    run_dir = Path(training["run_dir"])
    run_manifest = run_dir / "run.json"
    if not run_manifest.is_file():
        raise DataError(f"the training run this bundle came from, {run_dir}, is gone; use the ONNX backends, or "
                        "run on the machine that trained it")
    if sha256_file(run_manifest) != training.get("run_manifest_sha256"):
        raise BundleError(f"the run {run_dir} changed after this bundle was exported (retrained or resumed): it "
                          "is another model now. Re-export the bundle")
    return run_dir


def _gate_text(gate: str, g: dict) -> str:
    if gate in ("merge", "onnx_fp32"):
        return f"max|Δlogit| {g['max_abs_logit_diff']:.1e}"
    if gate == "int8":
        return f"top-1 {g['top1_agreement']:.1%}, acc {g['accuracy_fp32']:.1%}→{g['accuracy_int8']:.1%}"
    return f"top-1 {g['top1_agreement']:.1%}, max|Δp| {g['max_abs_prob_diff']:.0e}"


def bundle_summary(bundle_dir: Path) -> dict:
    """What ``gi-deploy export --list`` shows of one bundle: one row per file with its size and
    the gates it passed (with their headline numbers), and the footprint. Raises BundleError for
    a missing or foreign manifest."""
    m = read_json(bundle_dir / MANIFEST_NAME, "bundle manifest")
    if m.get("format") != BUNDLE_FORMAT:
        raise BundleError(f"{bundle_dir / MANIFEST_NAME} is not a {BUNDLE_FORMAT} manifest")
    v = m.get("verification", {})
    files = {name: e["bytes"] for name, e in m.get("files", {}).items()}
    gates_of = {MODEL_FILES["fp32"]: ("onnx_fp32",), MODEL_FILES["fp16"]: ("onnx_fp16", "fp16_emulated"),
                MODEL_FILES["int8"]: ("int8",)}
    engine = m.get("engine") or {}
    if engine.get("status") == "built":
        gates_of[engine["file"]] = ("engine",)
    rows = []
    order = [*MODEL_FILES.values(), engine.get("file"), engine.get("script")]
    for name, size in sorted(files.items(), key=lambda kv: order.index(kv[0]) if kv[0] in order else len(order)):
        gates = [g for g in gates_of.get(name, ()) if g in v]
        if name == engine.get("script"):
            rows.append((name, size, "engine", f"not built ({engine.get('reason', '')})"))
        elif not gates:
            rows.append((name, size, "", ""))
        for i, gate in enumerate(gates):
            rows.append((name if i == 0 else "", size if i == 0 else None, gate, _gate_text(gate, v[gate])))
    fp = m.get("footprint") or {}
    if "merge" in v:
        rows.append((f"{fp.get('trained_artifact', 'adapter')} (run)", fp.get("artifact_bytes"), "merge",
                     _gate_text("merge", v["merge"])))
    if fp:
        rows.append(("", None, "footprint", f"{fp['artifact_vs_merged_model']:.1%} of {MODEL_FILES['fp32']}"))
    return {"source": m.get("source", bundle_dir.name), "model": m["model"]["name"], "method": m["model"]["method"],
            "created": m.get("created", ""), "rows": rows}
