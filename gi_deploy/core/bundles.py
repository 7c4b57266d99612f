"""The deployment bundle's format (``deploy/<source>/``), readable without torch or onnxruntime:
file names, the manifest's format version, reading it, finding bundles, the training run a bundle
came from, and the one formatter of its verification gates.

Bundle layout::

    model.onnx                    merged fp32 classifier, dynamic batch axis
    model.fp16.onnx               fp16 with fp32 input/output and fp32 LayerNorm/GRN islands (default on)
    model.int8.onnx               with --int8: QDQ INT8, calibrated on the source's training images
    model.sm<CC>-trt<V>.engine    with --engine on a TensorRT + CUDA machine (else build_engine.sh)
    labels.json                   class names in logit order
    manifest.json                 source, classes, preprocessing, base weights and licence, adapter
                                  settings, training metrics, footprint, sha256 of every file,
                                  library versions and every verification gate's numbers
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from pathlib import Path

from gi_deploy._io import read_json, sha256_file
from gi_deploy.core.methods import method_spec
from gi_deploy.core.preprocess import PreprocessSpec
from gi_deploy.core.runs import RUN_MANIFEST
from gi_deploy.errors import BundleError, ConfigError, DataError

BUNDLE_FORMAT = "gi-deploy-bundle"
BUNDLE_FORMAT_VERSION = 3  # 2: model.fp16.onnx, int8, engine, files/footprint/export_key; 3: features output, ood
# Versions this gi-deploy still reads: a v2 bundle has no features output and no in-distribution
# statistics; it classifies as before, and --source auto says how to add them.
READABLE_FORMAT_VERSIONS = (2, 3)
MANIFEST_NAME = "manifest.json"
LABELS_NAME = "labels.json"
MODEL_FILES = {"fp32": "model.onnx", "fp16": "model.fp16.onnx", "int8": "model.int8.onnx"}
BUILD_SCRIPT = "build_engine.sh"  # written by export --engine where TensorRT or a GPU is missing


def list_bundles(deploy_dir: Path) -> list[str]:
    """Names of the sources that have a bundle manifest under ``deploy_dir``. The router's folder
    (``_router``, core/router.py) has a manifest too but is not a bundle: names starting with ``_``
    are never listed."""
    if not deploy_dir.is_dir():
        return []
    return sorted(p.parent.name for p in deploy_dir.glob(f"*/{MANIFEST_NAME}")
                  if not p.parent.name.startswith((".", "_")))  # .<name>.staging / .old of an export in progress


def interrupted_hint(deploy_dir: Path) -> str:
    """Where an export was killed between its two renames, the previous bundle sits in
    ``.<source>.old`` and no bundle is listed: a sentence saying so (empty when none is)."""
    if not Path(deploy_dir).is_dir():
        return ""
    old = sorted(p.parent.name[1:-len(".old")] for p in Path(deploy_dir).glob(f".*.old/{MANIFEST_NAME}")
                 if not (Path(deploy_dir) / p.parent.name[1:-len(".old")]).exists())
    if not old:
        return ""
    return (f" (an interrupted export left the bundle of {', '.join(old)} in "
            f"{', '.join(str(Path(deploy_dir) / f'.{s}.old') for s in old)}: the next `gi-deploy export` restores it, "
            "or rename it back by hand)")


def resolve_bundle_dir(deploy_dir: Path, source: str | None) -> Path:
    """The bundle folder for ``source``; with no source, the only bundle there is."""
    available = list_bundles(deploy_dir)
    if source is None:
        if len(available) == 1:
            return deploy_dir / available[0]
        if not available:
            raise BundleError(f"no bundles under {deploy_dir}; run `gi-deploy export` first"
                              + interrupted_hint(deploy_dir))
        raise ConfigError(f"{len(available)} bundles under {deploy_dir} ({', '.join(available)}); "
                          "choose one with --source")
    if source not in available:
        raise BundleError(f"no bundle for source {source!r} under {deploy_dir}; "
                          f"available: {', '.join(available) or 'none'}" + interrupted_hint(deploy_dir))
    return deploy_dir / source


def resolve_bundle_dirs(deploy_dir: Path, sources: list[str] | None) -> list[Path]:
    """Bundle folders for ``sources`` (names, or ``["all"]`` for every bundle there); with none,
    the only bundle there is. Duplicates are dropped, the order kept."""
    if not sources:
        return [resolve_bundle_dir(deploy_dir, None)]
    if "all" in sources:
        available = list_bundles(deploy_dir)
        if not available:
            raise BundleError(f"no bundles under {deploy_dir}; run `gi-deploy export` first"
                              + interrupted_hint(deploy_dir))
        return [deploy_dir / s for s in available]
    return [resolve_bundle_dir(deploy_dir, s) for s in dict.fromkeys(sources)]


# The largest model input side a manifest may ask for: endoscopy frames are at most ~2k px, and a
# 4096x4096 float32 batch of 32 is already 6 GB. A larger value is an edited manifest, refused
# before anything is allocated.
MAX_INPUT_SIDE = 4096
_SHA256 = re.compile(r"[0-9a-f]{64}")
# What the content hash covers: what decides how an image becomes a row (which classes, in which
# order, from which input). Recorded in the manifest and in every ONNX file's metadata at export.
CONTENT_KEYS = ("source", "classes", "preprocess")


def content_sha256(manifest: dict) -> str:
    """sha256 of the manifest's essentials (``CONTENT_KEYS``), canonical JSON."""
    payload = {k: manifest.get(k) for k in CONTENT_KEYS}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _bad(bundle_dir: Path, field: str, value, why: str) -> BundleError:
    shown = repr(value)
    shown = shown if len(shown) <= 80 else shown[:77] + "..."
    return BundleError(f"{bundle_dir / MANIFEST_NAME}: field {field} = {shown} {why}; the manifest was edited or "
                       "damaged: re-export the bundle with `gi-deploy export --force`")


def bundle_file(bundle_dir: Path, name, field: str = "file") -> Path:
    """``bundle_dir / name`` for a file the manifest names: a plain file name inside the bundle
    folder, not a path that leaves it (absolute, ``..``, a sub-folder) and not a symlink. A bundle
    is self-contained; anything else is refused with BundleError."""
    if not isinstance(name, str) or not name or name in (".", "..") or "/" in name or "\\" in name \
            or "\x00" in name or Path(name).is_absolute():
        raise _bad(bundle_dir, field, name, "must be a plain file name inside the bundle folder (a bundle is "
                   "self-contained: no absolute paths, no '..', no sub-folders)")
    path = bundle_dir / name
    if path.is_symlink():
        raise BundleError(f"{path} is a symlink (to {path.readlink()}); a bundle is self-contained and its files are "
                          "refused as links: copy the real file in, or re-export")
    return path


def _number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def validate_bundle_manifest(bundle_dir: Path, manifest) -> dict:
    """Check every field the runtime reads, for type and range, before anything heavy: the
    source, the classes (unique non-empty names, as many as the model's outputs, the same as
    ``labels.json``), the preprocessing (input sides 1..MAX_INPUT_SIDE), the model files (plain
    names inside the bundle, no symlinks, sha256 given) and, when recorded, the content hash.
    Raises BundleError naming the field and its value."""
    if not isinstance(manifest, dict):
        raise _bad(bundle_dir, "(top level)", type(manifest).__name__, "must be a JSON object")
    if manifest.get("format") != BUNDLE_FORMAT or manifest.get("format_version") not in READABLE_FORMAT_VERSIONS:
        raise BundleError(f"{bundle_dir / MANIFEST_NAME} is not a {BUNDLE_FORMAT} v{BUNDLE_FORMAT_VERSION} "
                          "manifest; re-export with this version of gi-deploy")
    for key in ("source", "classes", "preprocess", "models", "model"):
        if key not in manifest:
            raise BundleError(f"{bundle_dir / MANIFEST_NAME} has no {key!r} field; the manifest was edited or "
                              "damaged: re-export the bundle with `gi-deploy export --force`")
    source = manifest["source"]
    if not isinstance(source, str) or not source.strip() or "/" in source or "\\" in source:
        raise _bad(bundle_dir, "source", source, "must be a non-empty name (a string without '/')")
    classes = manifest["classes"]
    if not isinstance(classes, list) or not classes:
        raise _bad(bundle_dir, "classes", classes, "must be a non-empty list of class names")
    bad = [c for c in classes if not isinstance(c, str) or not c.strip()]
    if bad:
        raise _bad(bundle_dir, "classes", bad[0], "is not a class name (a non-empty string)")
    dupes = sorted({c for c in classes if classes.count(c) > 1})
    if dupes:
        raise _bad(bundle_dir, "classes", dupes, "appear more than once (their columns would collapse)")
    pre = manifest["preprocess"]
    if not isinstance(pre, dict):
        raise _bad(bundle_dir, "preprocess", pre, "must be an object")
    size = pre.get("size")
    if not (isinstance(size, list) and len(size) == 2 and all(isinstance(v, int) and not isinstance(v, bool)
                                                               and 1 <= v <= MAX_INPUT_SIDE for v in size)):
        raise _bad(bundle_dir, "preprocess.size", size, f"must be [height, width], integers in 1..{MAX_INPUT_SIDE}")
    for key in ("mean", "std"):
        v = pre.get(key)
        if not (isinstance(v, list) and len(v) == 3 and all(_number(x) for x in v)):
            raise _bad(bundle_dir, f"preprocess.{key}", v, "must be 3 finite numbers")
    for key in ("interpolation", "resize"):
        if key in pre and not isinstance(pre[key], str):
            raise _bad(bundle_dir, f"preprocess.{key}", pre[key], "must be a string")
    if "crop_pct" in pre and not _number(pre["crop_pct"]):
        raise _bad(bundle_dir, "preprocess.crop_pct", pre["crop_pct"], "must be a number in (0, 1]")
    try:
        PreprocessSpec.from_dict(pre)
    except ConfigError as e:
        raise _bad(bundle_dir, "preprocess", pre, f"is refused: {e}") from e
    model = manifest["model"]
    if not isinstance(model, dict):
        raise _bad(bundle_dir, "model", model, "must be an object")
    n = model.get("num_classes", len(classes))
    if not isinstance(n, int) or isinstance(n, bool) or n != len(classes):
        raise _bad(bundle_dir, "model.num_classes", n, f"does not match the {len(classes)} classes listed")
    models = manifest["models"]
    if not isinstance(models, dict) or not models:
        raise _bad(bundle_dir, "models", models, "must name at least one model file")
    for precision, entry in models.items():
        if precision not in MODEL_FILES:
            raise _bad(bundle_dir, "models", precision, f"is not a precision ({', '.join(MODEL_FILES)})")
        if not isinstance(entry, dict):
            raise _bad(bundle_dir, f"models.{precision}", entry, "must be an object")
        bundle_file(bundle_dir, entry.get("file"), f"models.{precision}.file")
        if not isinstance(entry.get("sha256"), str) or not _SHA256.fullmatch(entry["sha256"]):
            raise _bad(bundle_dir, f"models.{precision}.sha256", entry.get("sha256"), "must be a sha256 hex digest")
    files = manifest.get("files", {})
    if not isinstance(files, dict):
        raise _bad(bundle_dir, "files", files, "must be an object")
    for name in files:
        bundle_file(bundle_dir, name, "files")
    engine = manifest.get("engine")
    if engine is not None:
        if not isinstance(engine, dict):
            raise _bad(bundle_dir, "engine", engine, "must be an object or null")
        for key in ("file", "script"):
            if key in engine:
                bundle_file(bundle_dir, engine[key], f"engine.{key}")
    labels_path = bundle_file(bundle_dir, LABELS_NAME, LABELS_NAME)
    labels = read_json(labels_path, "bundle labels")
    if labels != classes:
        raise BundleError(f"{labels_path} lists {_short(labels)} but {bundle_dir / MANIFEST_NAME} lists classes "
                          f"{_short(classes)}: one of them was edited after export and the predictions would be "
                          "mislabelled; re-export the bundle with `gi-deploy export --force`")
    if "content_sha256" in manifest and manifest["content_sha256"] != content_sha256(manifest):
        raise BundleError(f"{bundle_dir / MANIFEST_NAME}: its source, classes or preprocessing were changed after "
                          "export (content hash differs); re-export the bundle with `gi-deploy export --force`")
    return manifest


def _short(v) -> str:
    text = json.dumps(v)
    return text if len(text) <= 80 else text[:77] + "..."


def check_model_metadata(bundle_dir: Path, manifest: dict, model_path: Path, metadata: dict[str, str],
                         n_outputs: int | None) -> None:
    """The model file's own record (its ``gi_deploy.`` metadata_props stamped at export) and its
    output width against the manifest: classes, preprocessing, source and content hash must agree,
    or every prediction could be silently relabelled. Raises BundleError."""
    classes = manifest["classes"]
    if n_outputs is not None and n_outputs != len(classes):
        raise BundleError(f"{model_path} outputs {n_outputs} scores but {bundle_dir / MANIFEST_NAME} lists "
                          f"{len(classes)} classes; re-export the bundle with `gi-deploy export --force`")
    meta = {k.removeprefix("gi_deploy."): v for k, v in metadata.items() if k.startswith("gi_deploy.")}
    if "classes" not in meta:
        raise BundleError(f"{model_path} carries no gi-deploy metadata (not written by `gi-deploy export`, or "
                          "replaced); re-export the bundle")
    recorded = {"classes": _json_or_none(meta.get("classes")), "preprocess": _json_or_none(meta.get("preprocess")),
                "source": meta.get("source")}
    for key, value in recorded.items():
        if value != manifest[key]:
            raise BundleError(f"{bundle_dir / MANIFEST_NAME} says {key} {_short(manifest[key])} but {model_path.name} "
                              f"was exported with {_short(value)}: the manifest was edited after export; re-export "
                              "the bundle with `gi-deploy export --force`")
    if "content_sha256" in meta and meta["content_sha256"] != content_sha256(manifest):
        raise BundleError(f"{model_path.name}'s content hash differs from {bundle_dir / MANIFEST_NAME}'s source, "
                          "classes and preprocessing; re-export the bundle with `gi-deploy export --force`")


def _json_or_none(text: str | None):
    try:
        return None if text is None else json.loads(text)
    except json.JSONDecodeError:
        return None


def read_bundle_manifest(bundle_dir: Path) -> dict:
    """The bundle's manifest, every field the runtime reads checked (:func:`validate_bundle_manifest`);
    BundleError naming the field when missing, malformed, out of range, leaving the bundle, or of
    another format version."""
    manifest_path = bundle_dir / MANIFEST_NAME
    if manifest_path.is_symlink():
        raise BundleError(f"{manifest_path} is a symlink; a bundle is self-contained: copy the real file in, or "
                          "re-export")
    return validate_bundle_manifest(bundle_dir, read_json(manifest_path, "bundle manifest"))


def training_run_of(manifest: dict) -> Path:
    """The training run a bundle was exported from, checked to be unchanged since (its run
    manifest's hash): what --backend torch and --explain-wrong rebuild the model from."""
    training = manifest.get("training") or {}
    if "run_dir" not in training:
        raise BundleError("this bundle's manifest does not name the training run it came from; re-export it "
                          "with this version of gi-deploy")
    run_dir = Path(training["run_dir"])
    run_manifest = run_dir / RUN_MANIFEST
    if not run_manifest.is_file():
        raise DataError(f"the training run this bundle came from, {run_dir}, is gone; use the ONNX backends, or "
                        "run on the machine that trained it")
    if sha256_file(run_manifest) != training.get("run_manifest_sha256"):
        raise BundleError(f"the run {run_dir} changed after this bundle was exported (retrained or resumed): it "
                          "is another model now. Re-export the bundle")
    spec = method_spec(manifest["model"]["method"])
    for path in spec.artifact_files(run_dir):
        recorded = (training.get("artifact_sha256") or {}).get(path.name)
        if recorded is None or not path.is_file() or sha256_file(path) != recorded:
            raise BundleError(f"{path} changed after this bundle was exported (its sha256 is not the one the bundle "
                              "records): the torch model would not be the exported one. Restore it, or retrain and "
                              "re-export")
    spec.check_artifact(run_dir, (read_json(run_manifest, "run manifest").get("best") or {}).get("artifact_sha256"),
                        "training")
    return run_dir


def gate_text(gate: str, g: dict) -> str:
    """One verification gate's headline numbers, as the export summary and ``export --list`` show them."""
    if gate == "merge":
        return f"merge max|Δlogit| {g['max_abs_logit_diff']:.1e}"
    if gate == "onnx_fp32":
        return f"fp32 ONNX max|Δlogit| {g['max_abs_logit_diff']:.1e}, top-1 {g['top1_agreement']:.0%}"
    if gate == "onnx_features":
        return f"features max|Δ| {g['max_abs_feature_diff']:.1e}"
    if gate == "onnx_fp16":
        return f"fp16 top-1 {g['top1_agreement']:.1%} max|Δprob| {g['max_abs_prob_diff']:.1e}"
    if gate == "fp16_emulated":
        return f"true fp16: top-1 {g['top1_agreement']:.0%}, max|Δprob| {g['max_abs_prob_diff']:.1e}"
    if gate == "int8":
        return (f"int8 top-1 {g['top1_agreement']:.1%} on {g['n']} val images, accuracy {g['accuracy_fp32']:.1%} -> "
                f"{g['accuracy_int8']:.1%}")
    return f"{gate} top-1 {g['top1_agreement']:.1%} max|Δprob| {g['max_abs_prob_diff']:.1e}"


def gates_line(verification: dict) -> str:
    """Every gate a bundle passed, on one line (the true-fp16 check beside the fp16 one)."""
    parts = []
    for gate in ("merge", "onnx_fp32", "onnx_features", "onnx_fp16", "int8", "engine"):
        if gate in verification:
            text = gate_text(gate, verification[gate])
            if gate == "onnx_fp16" and "fp16_emulated" in verification:
                text += f" ({gate_text('fp16_emulated', verification['fp16_emulated'])})"
            parts.append(text)
    return "; ".join(parts)


def bundle_summary(bundle_dir: Path) -> dict:
    """What ``gi-deploy export --list`` shows of one bundle: one row per file with its size and
    the gates it passed (with their headline numbers), and the footprint. Raises BundleError for
    a missing or foreign manifest."""
    m = read_json(bundle_dir / MANIFEST_NAME, "bundle manifest")
    if not isinstance(m, dict) or m.get("format") != BUNDLE_FORMAT:
        raise BundleError(f"{bundle_dir / MANIFEST_NAME} is not a {BUNDLE_FORMAT} manifest")
    if m.get("format_version") == BUNDLE_FORMAT_VERSION:
        validate_bundle_manifest(bundle_dir, m)  # a damaged manifest is named, not a traceback
    v = m.get("verification", {})
    files = {name: e["bytes"] for name, e in m.get("files", {}).items()}
    gates_of = {MODEL_FILES["fp32"]: ("onnx_fp32", "onnx_features"),
                MODEL_FILES["fp16"]: ("onnx_fp16", "fp16_emulated"),
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
            rows.append((name if i == 0 else "", size if i == 0 else None, gate, gate_text(gate, v[gate])))
    fp = m.get("footprint") or {}
    if "merge" in v:
        rows.append((f"{fp.get('trained_artifact', 'adapter')} (run)", fp.get("artifact_bytes"), "merge",
                     gate_text("merge", v["merge"])))
    if fp:
        rows.append(("", None, "footprint", f"{fp['artifact_vs_merged_model']:.1%} of {MODEL_FILES['fp32']}"))
    return {"source": m.get("source", bundle_dir.name), "model": m["model"]["name"], "method": m["model"]["method"],
            "created": m.get("created", ""), "rows": rows}
