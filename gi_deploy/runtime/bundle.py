"""Load a deployment bundle (``deploy/<source>/``) with onnxruntime. No torch import here."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from gi_deploy._io import read_json, sha256_file
from gi_deploy.errors import BundleError, ConfigError
from gi_deploy.runtime.preprocess import PreprocessSpec

log = logging.getLogger(__name__)

BUNDLE_FORMAT = "gi-deploy-bundle"
BUNDLE_FORMAT_VERSION = 2  # 2: model.fp16.onnx, int8, engine, files/footprint/export_key
MANIFEST_NAME = "manifest.json"
MODEL_FILES = {"fp32": "model.onnx", "fp16": "model.fp16.onnx", "int8": "model.int8.onnx"}

_PROVIDERS = {
    "cpu": ["CPUExecutionProvider"],
    "cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"],
}


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


@dataclass
class Bundle:
    """A verified ONNX classifier with its class names and preprocessing."""

    path: Path
    manifest: dict
    classes: list[str]
    preprocess: PreprocessSpec
    session: "object"  # onnxruntime.InferenceSession
    input_name: str
    provider: str

    @property
    def source(self) -> str:
        return self.manifest["source"]

    def predict_logits(self, batch: np.ndarray) -> np.ndarray:
        """float32 (N, 3, H, W) -> float32 logits (N, num_classes)."""
        return self.session.run(None, {self.input_name: batch})[0].astype(np.float32, copy=False)


def load_bundle(bundle_dir: Path, precision: str = "fp32", device: str = "cpu",
                check_hash: bool = True) -> Bundle:
    """Open ``bundle_dir``: check its manifest and the model file's hash, start an ORT session.

    Raises BundleError when files are missing or altered, ConfigError for an unknown
    precision/device. Logs a warning when the requested provider is not the active one
    (onnxruntime-gpu silently falls back to CPU when CUDA libraries are missing).
    """
    import onnxruntime as ort

    if device not in _PROVIDERS:
        raise ConfigError(f"device {device!r} unknown; use one of {sorted(_PROVIDERS)}")
    manifest = read_json(bundle_dir / MANIFEST_NAME, "bundle manifest")
    if manifest.get("format") != BUNDLE_FORMAT or manifest.get("format_version") != BUNDLE_FORMAT_VERSION:
        raise BundleError(f"{bundle_dir / MANIFEST_NAME} is not a {BUNDLE_FORMAT} v{BUNDLE_FORMAT_VERSION} "
                          "manifest; re-export with this version of gi-deploy")
    models = manifest["models"]
    if precision not in models:
        raise ConfigError(f"bundle {bundle_dir} has no {precision} model; it has {sorted(models)}"
                          + {"fp16": "; export with --fp16", "int8": "; export with --int8"}.get(precision, ""))
    entry = models[precision]
    model_path = bundle_dir / entry["file"]
    if not model_path.is_file():
        raise BundleError(f"bundle file missing: {model_path}")
    if check_hash and sha256_file(model_path) != entry["sha256"]:
        raise BundleError(f"{model_path} does not match the sha256 in its manifest: the file was "
                          "changed after export; re-export it")
    requested = _PROVIDERS[device]
    available = ort.get_available_providers()
    session = ort.InferenceSession(str(model_path), providers=[p for p in requested if p in available])
    active = session.get_providers()[0]
    if active != requested[0]:
        log.warning("requested %s but onnxruntime is running on %s (installed providers: %s)",
                    requested[0], active, ", ".join(available))
    return Bundle(
        path=bundle_dir, manifest=manifest, classes=list(manifest["classes"]),
        preprocess=PreprocessSpec.from_dict(manifest["preprocess"]),
        session=session, input_name=session.get_inputs()[0].name, provider=active,
    )


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
