"""Export stage: trained run -> verified deployment bundle ``deploy/<source>/`` (the layout is in
core/bundles.py).

Each ONNX file also carries the essentials in its ``metadata_props``. Everything is written to a
staging folder and moved into place only after every gate has passed, so a failed export never
leaves an unverified file (nor destroys the previous bundle). Re-exporting an unchanged run with
the same options is a no-op unless ``force``. Each conversion checks itself in its own module
(onnx_export, fp16, int8, tensorrt); this one runs them in order and writes the manifest.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

import gi_deploy
from gi_deploy._io import exclusive_lock, library_versions, sha256_file, utc_now, write_json
from gi_deploy.core.bundles import (
    BUNDLE_FORMAT,
    BUNDLE_FORMAT_VERSION,
    LABELS_NAME,
    MANIFEST_NAME,
    MODEL_FILES,
    BundleManifest,
    read_bundle_manifest,
)
from gi_deploy.core.methods import method_spec
from gi_deploy.core.preprocess import PreprocessSpec
from gi_deploy.core.records import canonical_json, canonical_sha256
from gi_deploy.core.runs import RUN_MANIFEST, RunRecord, read_run_manifest, select_runs
from gi_deploy.errors import BundleError, DataError, ExportError, ExportFailed, GiDeployError
from gi_deploy.export import fp16, id_stats, int8, onnx_export, tensorrt, verify
from gi_deploy.export.activations import logits_and_peaks
from gi_deploy.export.options import ExportConfig, ExportOptions
from gi_deploy.export.router import RouterResult, write_router
from gi_deploy.model.colora import branch_form
from gi_deploy.model.run import RunModels, load_run_models

log = logging.getLogger(__name__)


@dataclass
class ExportResult:
    bundle_dir: Path
    manifest: BundleManifest
    skipped: bool = False  # the bundle was already up to date
    notes: list[str] = field(default_factory=list)


def _adapter_entry(manifest: RunRecord) -> dict | None:
    """The settings of each adapter kind the run carries, with what its ``summary`` hook recorded in
    run.json under its name (CoLoRA's parameter counts and merges)."""
    spec = method_spec(manifest.method)
    entry = {name: {**manifest.config[name], **(manifest.adapter_summary(name) or {})} for name in spec.adapters}
    return entry or None


def run_hashes(run_dir: Path, manifest: RunRecord) -> dict:
    """sha256 of the run's manifest and of its trained files (the bundle's ``training`` record)."""
    spec = method_spec(manifest.method)
    files = spec.artifact_files(run_dir)
    missing = [p for p in files if not p.is_file()]
    if missing:
        raise BundleError(
            f"trained weights missing: {missing[0]}; the run did not finish an epoch (train or --resume it)"
        )
    recorded = manifest.best_artifact_sha256
    if recorded:
        spec.check_artifact(run_dir, recorded, "training")  # a tampered adapter never exports with the run's metrics
    else:
        log.warning(
            "%s was trained before gi-deploy recorded its artifact's sha256; its trained files cannot be "
            "checked against training (retrain to record them)",
            run_dir,
        )
    return {
        "run_manifest_sha256": sha256_file(run_dir / RUN_MANIFEST),
        "artifact_sha256": {p.name: sha256_file(p) for p in files},
    }


def export_key(hashes: dict, options: ExportOptions) -> str:
    """What a bundle was made from and how: the run's manifest and trained files (``run_hashes``),
    the export options, this gi-deploy version and, with --engine, the TensorRT/GPU found."""
    payload = {
        "run_manifest": hashes["run_manifest_sha256"],
        "artifacts": hashes["artifact_sha256"],
        "options": asdict(options),
        "gi_deploy": gi_deploy.__version__,
        "format_version": BUNDLE_FORMAT_VERSION,
        "engine_target": tensorrt.tensorrt_status()[1] if options.engine else None,
        "int8_reduce_range": not int8.cpu_has_vnni() if options.int8 else None,  # chosen for this CPU
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def current_bundle(bundle_dir: Path, key: str, run: RunRecord | None = None) -> BundleManifest | None:
    """The manifest of the bundle in ``bundle_dir`` when it was made with ``key``, passes every
    check the runtime makes (:func:`read_bundle_manifest`: fields, seal, labels.json), still says
    what the run says (source, classes, preprocessing), and every file it lists is still there,
    unchanged; None when it must be (re-)exported. A tampered bundle is never "unchanged"."""
    if not (bundle_dir / MANIFEST_NAME).is_file():
        return None
    try:
        manifest = read_bundle_manifest(bundle_dir)
    except BundleError as e:
        log.warning("%s: re-exporting: %s", bundle_dir, e)
        return None
    if manifest.export_key != key:
        return None
    if run is not None and (manifest.source, manifest.classes, manifest.preprocess) != (
        run.source,
        run.classes,
        run.preprocess,
    ):
        log.warning("%s: re-exporting: its source, classes or preprocessing differ from the run's", bundle_dir)
        return None
    for name, entry in manifest.files.items():
        f = bundle_dir / name
        if not f.is_file() or f.stat().st_size != entry.bytes or sha256_file(f) != entry.sha256:
            return None
    return manifest


class _Timer:
    """Seconds per export step, for the manifest."""

    def __init__(self):
        self.seconds: dict[str, float] = {}
        self.last: str | None = None
        self._t = time.perf_counter()

    def lap(self, step: str) -> None:
        now = time.perf_counter()
        self.seconds[step] = round(now - self._t, 3)
        self.last, self._t = step, now


def _stamp(path: Path, run: RunRecord, content: dict, precision: str, key: str) -> None:
    """The essentials, in the ONNX file's own metadata_props: the bundle's whole content (what the
    manifest's ``content_sha256`` covers) and its hash, checked against the manifest at load."""
    onnx_export.set_metadata(
        path,
        {
            "format": f"{BUNDLE_FORMAT}/{BUNDLE_FORMAT_VERSION}",
            "source": content["source"],
            "classes": content["classes"],
            "preprocess": content["preprocess"],
            "model": content["model"]["name"],
            "method": content["model"]["method"],
            "merged": content["model"]["merged"],
            "precision": precision,
            "base_weights_license": run.base_weights.get("license", "unknown"),
            "gi_deploy_version": gi_deploy.__version__,
            "export_key": key,
            "content": canonical_json(content),
            "content_sha256": canonical_sha256(content),
            "input": onnx_export.INPUT_NAME,
            "output": onnx_export.OUTPUT_NAME,
        },
    )


def export_source(
    run_dir: Path, bundle_dir: Path, options: ExportOptions | None = None, force: bool = False, **overrides
) -> ExportResult:
    """Export one run to ``bundle_dir`` (``options``, or ExportOptions(**overrides)).

    Raises GateFailed (naming the gate, the number and the threshold) and writes nothing when any
    verification gate fails; returns the existing bundle untouched (``skipped``) when it was made
    from the same run with the same options, unless ``force``. Anything the libraries underneath
    raise (tracer, ONNX checker, onnxruntime, quantiser) becomes an ExportError naming the step."""
    options = options or ExportOptions(**overrides)
    run_dir, bundle_dir = Path(run_dir), Path(bundle_dir)
    manifest = read_run_manifest(run_dir)
    hashes = run_hashes(run_dir, manifest)
    key = export_key(hashes, options)
    with exclusive_lock(bundle_dir, "wait for the other export to finish"):  # two exports never swap one folder
        _restore_interrupted(bundle_dir)
        if not force and (existing := current_bundle(bundle_dir, key, manifest)) is not None:
            return ExportResult(bundle_dir, existing, skipped=True)
        return _export_timed(run_dir, bundle_dir, manifest, options, key, hashes)


def _export_timed(
    run_dir: Path, bundle_dir: Path, manifest: RunRecord, options: ExportOptions, key: str, hashes: dict
) -> ExportResult:
    timer = _Timer()
    try:
        return _export(run_dir, bundle_dir, manifest, options, key, hashes, timer)
    except GiDeployError:
        raise
    except Exception as e:  # a library failure: typed, with the step it happened in; the cause is chained
        raise ExportError(
            f"{run_dir.name}: export failed after step {timer.last or 'start'!r} with "
            f"{type(e).__name__}: {e}. Nothing was written; rerun with -v for details"
        ) from e


def _restore_interrupted(bundle_dir: Path) -> None:
    """A crash between the two renames of a previous export leaves ``.<name>.old`` and no bundle:
    put the old bundle back before starting."""
    old = bundle_dir.with_name(f".{bundle_dir.name}.old")
    if old.is_dir() and not bundle_dir.exists():
        old.rename(bundle_dir)


def _check_validation_images(run_dir: Path, info: dict, options: ExportOptions) -> str | None:
    """None when the verification batch holds some of the run's validation images. With none of them
    readable, the gates would judge the export on the synthetic stress images alone: refused with
    DataError unless ``options.allow_no_val``, and then a loud note (``info`` records it in the manifest)."""
    if info["real_images"] or not info["real_images_wanted"]:
        info["no_validation_images"] = False
        return None
    where = (
        f"none of the {info['real_images_wanted']} validation images of {run_dir} can be read (e.g. "
        f"{info['real_images_unreadable'][0]})"
    )
    if not options.allow_no_val:
        raise DataError(
            f"{where}: the verification gates would run on the {len(verify.STRESS_IMAGES)} synthetic "
            "stress images alone. Put the images back where training found them, or pass --allow-no-val "
            "to export anyway (recorded in the manifest); nothing written"
        )
    info["no_validation_images"] = True
    log.warning("%s; exporting on the synthetic stress images alone (--allow-no-val)", where)
    return (
        f"WARNING: {where}; the gates ran on the {len(verify.STRESS_IMAGES)} synthetic stress images alone "
        "(--allow-no-val; recorded in the manifest as verification.inputs.no_validation_images)"
    )


def _merge_gate(name: str, models: RunModels, inputs: np.ndarray) -> tuple[dict, np.ndarray, np.ndarray]:
    """The adapter model's logits (the reference every later gate is held to), the merge gate when
    the adapters were merged, and the deployed model's peak activations (for the fp16 check)."""
    if not models.merged:
        ref_logits, peaks = logits_and_peaks(models.deployed, inputs)
        return {}, ref_logits, peaks
    # CoLoRA layers in the paper's branch form: not the fused K0 + ΔK that the merge itself computes
    with torch.no_grad(), branch_form(models.reference):
        ref_logits = models.reference(torch.from_numpy(inputs)).numpy()
    merged_logits, peaks = logits_and_peaks(models.deployed, inputs)
    gate = verify.check(
        "merge",
        f"{name} merged model vs adapter model",
        verify.compare_logits(ref_logits, merged_logits),
        atol=verify.MERGE_ATOL,
    )
    return {"merge": gate}, ref_logits, peaks


@dataclass
class _Job:
    """One export in progress: the run, what to make, where, and the fixed verification batch with
    the reference logits every gate is held to."""

    name: str
    run_dir: Path
    manifest: RunRecord
    spec: PreprocessSpec
    options: ExportOptions
    key: str
    hashes: dict
    staging: Path
    timer: _Timer
    inputs: np.ndarray
    ref_logits: np.ndarray | None = None
    peaks: np.ndarray | None = None


def _export(
    run_dir: Path, bundle_dir: Path, manifest: RunRecord, options: ExportOptions, key: str, hashes: dict, timer: _Timer
) -> ExportResult:
    spec = manifest.preprocess
    inputs, inputs_info = verify.verification_batch(manifest, spec)
    no_val_note = _check_validation_images(run_dir, inputs_info, options)
    job = _Job(
        run_dir.name,
        run_dir,
        manifest,
        spec,
        options,
        key,
        hashes,
        bundle_dir.with_name(f".{bundle_dir.name}.staging"),
        timer,
        inputs,
    )
    models = load_run_models(run_dir, merge=options.merge, manifest=manifest)
    timer.lap("load_and_merge")
    verification, job.ref_logits, job.peaks = _merge_gate(job.name, models, inputs)
    verification["inputs"] = {**inputs_info, "peak_activation": round(float(job.peaks.max()), 3)}
    timer.lap("merge_gate")
    shutil.rmtree(job.staging, ignore_errors=True)
    job.staging.mkdir(parents=True)
    try:
        written = _write_models(job, models)
        verification.update(written["verification"])
        timer.lap("write")
        bundle = _bundle_manifest(job, models, verification, written)
        write_json(job.staging / MANIFEST_NAME, bundle.to_dict())
    except BaseException:
        shutil.rmtree(job.staging, ignore_errors=True)
        raise
    notes = (
        ([no_val_note] if no_val_note else []) + written["notes"] + _swap_into_place(job.staging, bundle_dir, bundle)
    )
    return ExportResult(bundle_dir, bundle, notes=notes)


def _write_models(job: _Job, models: RunModels) -> dict:
    """Every model file of the bundle into the staging folder, each conversion gated as it is made,
    then stamped. Returns the gates (``verification``), each precision's extra manifest entries
    (``extras``), the engine entry, the ONNX opset and notes for the user."""
    o, staging, x = job.options, job.staging, job.inputs
    fp32_path = staging / MODEL_FILES["fp32"]
    features = onnx_export.has_pooled_features(models.deployed)
    exported = (
        onnx_export.WithFeatures(models.deployed, torch.from_numpy(x[:2]))
        if features  # checks its head on 2
        else models.deployed
    )
    onnx = onnx_export.export_onnx(
        exported,
        fp32_path,
        job.spec.size,
        o.opset,
        o.exporter,
        inputs=x,
        reference=job.ref_logits,
        what=f"{job.name} fp32 ONNX vs adapter model",
    )
    verification, extras, engine, notes = {"onnx_fp32": onnx.verification}, {}, None, []
    if onnx.features_gate is not None:
        verification["onnx_features"] = onnx.features_gate
    job.timer.lap("onnx_fp32")
    ood = (
        id_stats.write_id_stats(job.name, job.manifest, job.spec, fp32_path, staging, o.ood_images)
        if features
        else None
    )
    job.timer.lap("id_stats")
    if o.fp16:
        gates, extras["fp16"] = fp16.export_fp16(
            job.name, fp32_path, staging / MODEL_FILES["fp16"], x, onnx.logits, job.peaks
        )
        verification.update(gates)
        job.timer.lap("fp16")
    if o.int8:
        verification["int8"], extras["int8"] = int8.export_int8(
            job.name,
            job.manifest,
            job.spec,
            fp32_path,
            staging / MODEL_FILES["int8"],
            x,
            onnx.logits,
            o.calib_images,
            o.int8_eval_images,
            o.int8_min_top1,
            o.int8_max_accuracy_drop,
        )
        notes += verification["int8"]["relaxed"]  # a relaxed default is said, not silent
        job.timer.lap("int8")
    if o.engine:
        gate, engine, note = tensorrt.export_engine(
            job.name, staging / MODEL_FILES["fp16"], staging, job.spec.size, x, onnx.logits, o.max_batch
        )
        verification.update({"engine": gate} if gate is not None else {})
        notes += [note] if note else []
        job.timer.lap("engine")
    written = {
        "verification": verification,
        "extras": extras,
        "engine": engine,
        "opset": onnx.opset,
        "notes": notes,
        "ood": ood,
        "features": features,
    }
    written["content"] = content = _content(job, models, written)
    for precision in [p for p in MODEL_FILES if (staging / MODEL_FILES[p]).is_file()]:
        _stamp(staging / MODEL_FILES[precision], job.manifest, content, precision, job.key)
    return written


def _content(job: _Job, models: RunModels, written: dict) -> dict:
    """What the bundle's content hash covers (core/bundles.CONTENT_FIELDS), in JSON form, known
    before the model files are final so that each of them can carry it."""
    run = job.manifest
    model = {
        "name": run.model.name,
        "num_classes": len(run.classes),
        "method": run.method,
        "merged": models.merged,
        "parameters": sum(p.numel() for p in models.deployed.parameters()),
        "opset": written["opset"],
        "exporter": job.options.exporter,
        "input": onnx_export.INPUT_NAME,
        "output": onnx_export.OUTPUT_NAME,
        "dynamic_axes": ["batch"],
        **({"features_output": onnx_export.FEATURES_NAME} if written["features"] else {}),
    }
    return json.loads(
        canonical_json(
            {
                "source": run.source,
                "classes": list(run.classes),
                "preprocess": run.preprocess.to_dict(),
                "model": model,
                "ood": written["ood"],
            }
        )
    )


def _bundle_manifest(job: _Job, models: RunModels, verification: dict, written: dict) -> BundleManifest:
    """labels.json, then the manifest (every file hashed once, the footprint, the run it came from),
    read back through :meth:`BundleManifest.from_dict` (what is written is what the runtime accepts)
    and sealed. Raises ExportError when its content differs from what the model files carry."""
    manifest, options, staging = job.manifest, job.options, job.staging
    content = written["content"]
    write_json(staging / LABELS_NAME, content["classes"])
    files = {
        p.name: {"sha256": sha256_file(p), "bytes": p.stat().st_size}  # every file, hashed once
        for p in sorted(staging.iterdir())
        if p.is_file()
    }
    models_entry = {
        p: {"file": f, **files[f], **written["extras"].get(p, {})} for p, f in MODEL_FILES.items() if f in files
    }
    engine = written["engine"]
    if engine and engine.get("status") == "built":
        engine.update(files[engine["file"]])
    method = manifest.method
    adapter_bytes = method_spec(method).artifact_bytes(job.run_dir)
    footprint = {
        "trained_artifact": method,
        "artifact_bytes": adapter_bytes,
        "merged_model_bytes": models_entry["fp32"]["bytes"],
        "artifact_vs_merged_model": round(adapter_bytes / models_entry["fp32"]["bytes"], 6),
        **{f"{p}_model_bytes": models_entry[p]["bytes"] for p in ("fp16", "int8") if p in models_entry},
    }
    draft = {
        "format": BUNDLE_FORMAT,
        "format_version": BUNDLE_FORMAT_VERSION,
        "created": utc_now(),
        "export_key": job.key,
        "content_sha256": canonical_sha256(content),
        **content,
        "models": models_entry,
        "engine": engine,
        "verification": verification,
        "footprint": footprint,
        "base_weights": manifest.base_weights,
        "adapter": _adapter_entry(manifest),
        "training": {
            "run_dir": str(job.run_dir.resolve()),
            "best": {k: manifest.best.get(k) for k in ("epoch", "accuracy", "f1_weighted", "mcc")},
            **job.hashes,
        },
        "options": asdict(options),
        "versions": library_versions(),
        "files": files,
        "timings_s": job.timer.seconds,
    }
    bundle = BundleManifest.from_dict(json.loads(json.dumps(draft)), staging, check_seal=False).sealed()
    if bundle.content_sha256 != canonical_sha256(content):  # the files carry ``content``: they must agree
        raise ExportError(
            f"{job.name}: the manifest's content ({bundle.content_sha256[:12]}) differs from the one "
            f"stamped in the model files ({canonical_sha256(content)[:12]}); nothing was written"
        )
    return bundle


def _swap_into_place(staging: Path, bundle_dir: Path, bundle: BundleManifest) -> list[str]:
    """Replace the bundle with the staged one in two renames (a crash between them is repaired by
    the next export, :func:`_restore_interrupted`). Returns notes (stale engines removed)."""
    notes = []
    old = bundle_dir.with_name(f".{bundle_dir.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if bundle_dir.exists():
        dropped = sorted(p.name for p in bundle_dir.glob("model.*.engine") if p.name not in bundle.files)
        if dropped:  # built on a target from the previous fp16 ONNX: stale now
            notes.append(
                f"removed {', '.join(dropped)} built from the previous export; rebuild with {tensorrt.BUILD_SCRIPT}"
            )
        bundle_dir.rename(old)
    staging.rename(bundle_dir)
    shutil.rmtree(old, ignore_errors=True)
    return notes


def export_runs(cfg: ExportConfig) -> dict[str, ExportResult]:
    """Export every requested source; returns {source: result}.

    A source that fails does not stop the others: their bundles are written, and then
    ExportFailed lists every failed source with its reason."""
    results: dict[str, ExportResult] = {}
    failures: dict[str, GiDeployError] = {}
    for run_dir in select_runs(cfg.runs_dir, cfg.sources):
        source = run_dir.name
        try:
            results[source] = export_source(run_dir, cfg.deploy_dir / source, cfg.options, cfg.force)
        except GiDeployError as e:
            failures[source] = e
    if failures:
        raise ExportFailed(results, failures)
    return results


def storage_summary(results: dict[str, ExportResult]) -> dict | None:
    """The storage argument over the adapted (merged) sources: one base plus an adapter each,
    against a full merged model per source. None with fewer than two adapted sources."""
    adapted = {n: r.manifest.footprint for n, r in results.items() if r.manifest.model.merged}
    if len(adapted) < 2:
        return None
    artifacts = sum(f["artifact_bytes"] for f in adapted.values())
    base = max(f["merged_model_bytes"] for f in adapted.values())  # a plain backbone costs what a merged one does
    return {
        "sources": list(adapted),
        "base_bytes": base,
        "adapter_bytes": artifacts,
        "merged_bytes": sum(f["merged_model_bytes"] for f in adapted.values()),
    }


def export_router(cfg: ExportConfig, results: dict[str, ExportResult]) -> RouterResult | None:
    """The source router after :func:`export_runs`: written with ``cfg.router``, or by default when
    two or more sources were exported; over ``cfg.router_sources``, else the exported sources
    (or every bundle in the deploy folder when fewer were exported). None when not asked for.
    Raises what :func:`gi_deploy.export.router.write_router` raises (GateFailed: nothing written)."""
    if cfg.router is False or (cfg.router is None and len(results) < 2):
        return None
    sources = cfg.router_sources or (list(results) if len(results) >= 2 else None)
    return write_router(cfg.deploy_dir, sources, cfg.router_min_accuracy, cfg.allow_small_val)
