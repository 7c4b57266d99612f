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

from pathlib import Path

from gi_deploy._io import read_json, sha256_file
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


def read_bundle_manifest(bundle_dir: Path) -> dict:
    """The bundle's manifest; BundleError when missing or of another format version."""
    manifest = read_json(bundle_dir / MANIFEST_NAME, "bundle manifest")
    if manifest.get("format") != BUNDLE_FORMAT or manifest.get("format_version") not in READABLE_FORMAT_VERSIONS:
        raise BundleError(f"{bundle_dir / MANIFEST_NAME} is not a {BUNDLE_FORMAT} v{BUNDLE_FORMAT_VERSION} "
                          "manifest; re-export with this version of gi-deploy")
    return manifest


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
    if m.get("format") != BUNDLE_FORMAT:
        raise BundleError(f"{bundle_dir / MANIFEST_NAME} is not a {BUNDLE_FORMAT} manifest")
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
