"""Export stage: trained run -> verified deployment bundle ``deploy/<source>/``.

Bundle layout::

    model.onnx                    merged fp32 classifier, dynamic batch axis
    model.fp16.onnx               fp16 with fp32 input/output and fp32 LayerNorm/GRN islands (default on)
    model.int8.onnx               with --int8: QDQ INT8, calibrated on the source's training images
    model.sm<CC>-trt<V>.engine    with --engine on a TensorRT + CUDA machine (else build_engine.sh)
    labels.json                   class names in logit order
    manifest.json                 source, classes, preprocessing, base weights and licence, adapter
                                  settings, training metrics, footprint, sha256 of every file,
                                  library versions and every verification gate's numbers

Each ONNX file also carries the essentials in its ``metadata_props``. Everything is written to a
staging folder and moved into place only after every gate has passed, so a failed export never
leaves an unverified file (nor destroys the previous bundle). Re-exporting an unchanged run with
the same options is a no-op unless ``force``.
"""

from __future__ import annotations

import copy
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
from gi_deploy._io import library_versions, read_json, sha256_file, utc_now, write_json
from gi_deploy.errors import BundleError, ConfigError, ExportError, ExportFailed, GateFailed, GiDeployError
from gi_deploy.export import fp16 as fp16_mod
from gi_deploy.export import int8 as int8_mod
from gi_deploy.export import onnx_export, tensorrt, verify
from gi_deploy.export.merge import merge_into_plain
from gi_deploy.runtime.bundle import BUNDLE_FORMAT, BUNDLE_FORMAT_VERSION, MANIFEST_NAME, MODEL_FILES
from gi_deploy.runtime.preprocess import PreprocessSpec
from gi_deploy.training.config import COLORA_METHODS, LORA_METHODS
from gi_deploy.training.run import (ADAPTER_METHODS, RUN_MANIFEST, artifact_bytes, artifact_files, attach_trained,
                                    read_run_manifest, rebuild_base)

log = logging.getLogger(__name__)

# The fp16 gate also runs in true fp16 arithmetic (fp16.run_fp16_emulated) on the inputs that
# drive the largest activations: seconds per image for convnextv2_base, so a few.
FP16_EMULATED_IMAGES = 3


@dataclass
class ExportOptions:
    """What to produce and check; every field is part of the bundle's export key."""

    merge: bool = True
    fp16: bool = True
    int8: bool = False
    calib_images: int = 200
    int8_eval_images: int = 500  # validation images scored by fp32 and int8 (the accuracy gate)
    int8_min_top1: float = verify.INT8_MIN_TOP1
    int8_max_accuracy_drop: float = verify.INT8_MAX_ACCURACY_DROP
    engine: bool = False
    max_batch: int = 32
    opset: int = onnx_export.OPSET
    exporter: str = onnx_export.DEFAULT_EXPORTER

    def __post_init__(self) -> None:
        if self.opset < 17:
            raise ConfigError(f"opset must be >= 17 (LayerNormalization as one node), got {self.opset}")
        if self.exporter not in onnx_export.EXPORTERS:
            raise ConfigError(f"exporter {self.exporter!r} unknown; use one of {', '.join(onnx_export.EXPORTERS)}")
        for name in ("calib_images", "int8_eval_images", "max_batch"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0.0 <= self.int8_min_top1 <= 1.0 or not 0.0 <= self.int8_max_accuracy_drop <= 1.0:
            raise ConfigError("int8_min_top1 and int8_max_accuracy_drop are fractions in [0, 1], got "
                              f"{self.int8_min_top1} and {self.int8_max_accuracy_drop}")
        if self.engine and not self.fp16:
            raise ConfigError("--engine builds from the fp16 ONNX: drop --no-fp16")


@dataclass
class ExportConfig:
    runs_dir: Path = Path("runs")
    deploy_dir: Path = Path("deploy")
    sources: list[str] = field(default_factory=list)  # empty: every trained run under runs_dir
    options: ExportOptions = field(default_factory=ExportOptions)
    force: bool = False

    def __post_init__(self) -> None:
        self.runs_dir, self.deploy_dir = Path(self.runs_dir), Path(self.deploy_dir)
        if not self.runs_dir.is_dir():
            raise ConfigError(f"runs folder {self.runs_dir} does not exist; train a source first")

    def resolve_sources(self) -> list[str]:
        trained = sorted(p.parent.name for p in self.runs_dir.glob(f"*/{RUN_MANIFEST}"))
        if not self.sources:
            if not trained:
                raise BundleError(f"no trained runs under {self.runs_dir}; run `gi-deploy train` first")
            return trained
        missing = [s for s in self.sources if s not in trained]
        if missing:
            raise BundleError(f"no trained run for {', '.join(missing)} under {self.runs_dir}; "
                              f"trained: {', '.join(trained) or 'none'}")
        return list(self.sources)


@dataclass
class ExportResult:
    bundle_dir: Path
    manifest: dict
    skipped: bool = False  # the bundle was already up to date
    notes: list[str] = field(default_factory=list)


def _adapter_entry(manifest: dict) -> dict | None:
    """The adapter settings of the run (LoRA and/or CoLoRA, with CoLoRA's parameter counts)."""
    method = manifest["config"]["method"]
    entry = {}
    if method in LORA_METHODS:
        entry["lora"] = manifest["config"]["lora"]
    if method in COLORA_METHODS:
        entry["colora"] = {**manifest["config"]["colora"], **manifest.get("colora", {})}
    return entry or None


def run_hashes(run_dir: Path, manifest: dict) -> dict:
    """sha256 of the run's manifest and of its trained files (the bundle's ``training`` record)."""
    files = artifact_files(run_dir, manifest["config"]["method"])
    missing = [p for p in files if not p.is_file()]
    if missing:
        raise BundleError(f"trained weights missing: {missing[0]}; the run did not finish an epoch (train or "
                          "--resume it)")
    return {"run_manifest_sha256": sha256_file(run_dir / RUN_MANIFEST),
            "artifact_sha256": {p.name: sha256_file(p) for p in files}}


def export_key(hashes: dict, options: ExportOptions) -> str:
    """What a bundle was made from and how: the run's manifest and trained files (``run_hashes``),
    the export options, this gi-deploy version and, with --engine, the TensorRT/GPU found."""
    payload = {
        "run_manifest": hashes["run_manifest_sha256"],
        "artifacts": hashes["artifact_sha256"],
        "options": asdict(options), "gi_deploy": gi_deploy.__version__, "format_version": BUNDLE_FORMAT_VERSION,
        "engine_target": tensorrt.tensorrt_status()[1] if options.engine else None,
        "int8_reduce_range": not int8_mod.cpu_has_vnni() if options.int8 else None,  # chosen for this CPU
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def current_bundle(bundle_dir: Path, key: str) -> dict | None:
    """The manifest of the bundle in ``bundle_dir`` when it was made with ``key`` and every file
    it lists is still there, unchanged; None when it must be (re-)exported."""
    path = bundle_dir / MANIFEST_NAME
    if not path.is_file():
        return None
    try:
        manifest = read_json(path, "bundle manifest")
    except BundleError:
        return None
    if manifest.get("export_key") != key:
        return None
    for name, entry in manifest.get("files", {}).items():
        f = bundle_dir / name
        if not f.is_file() or f.stat().st_size != entry["bytes"] or sha256_file(f) != entry["sha256"]:
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


def _gate_providers_fp16() -> list[str]:
    """onnxruntime's CUDA provider runs fp16 kernels in fp16; its CPU provider casts most fp16 ops
    back to fp32 (so the CPU run alone cannot show an fp16 overflow; fp16_emulated does)."""
    import onnxruntime as ort

    return (["CUDAExecutionProvider", "CPUExecutionProvider"] if "CUDAExecutionProvider" in ort.get_available_providers()
            else ["CPUExecutionProvider"])


def _export_fp16(name: str, fp32_path: Path, dst: Path, inputs: np.ndarray, fp32_logits: np.ndarray,
                 peaks: np.ndarray) -> tuple[dict, dict]:
    """model.fp16.onnx and its two gates: onnxruntime on the whole batch, true-fp16 arithmetic on
    the inputs with the largest activations."""
    conversion = fp16_mod.convert_fp16(fp32_path, dst)
    logits, provider = onnx_export.run_onnx(dst, inputs, _gate_providers_fp16())
    ort_result = verify.check("onnx_fp16", f"{name} fp16 ONNX vs fp32", {
        **verify.compare_logits(fp32_logits, logits, verify.FP16_TIE_MARGIN), "provider": provider},
        min_top1=verify.FP16_MIN_TOP1)
    idx = np.argsort(-peaks, kind="stable")[:FP16_EMULATED_IMAGES]
    emulated = fp16_mod.run_fp16_emulated(dst, inputs[idx], onnx_export.INPUT_NAME)
    emu_result = verify.check("fp16_emulated", f"{name} fp16 ONNX in true fp16 arithmetic vs fp32", {
        **verify.compare_logits(fp32_logits[idx], emulated, verify.FP16_TIE_MARGIN), "inputs": idx.tolist(),
        "peak_activations": [round(float(p), 3) for p in peaks[idx]]}, min_top1=verify.FP16_MIN_TOP1,
        hint="fp16 arithmetic overflows here as it would on a GPU; onnxruntime's CPU provider hides it by computing "
             "in fp32")
    return {"onnx_fp16": ort_result, "fp16_emulated": emu_result}, conversion


def _export_int8(name: str, manifest: dict, spec: PreprocessSpec, fp32_path: Path, dst: Path, inputs: np.ndarray,
                 fp32_logits: np.ndarray, options: ExportOptions) -> tuple[dict, dict]:
    """model.int8.onnx, calibrated on the training split, gated on the validation split."""
    classes = manifest["classes"]
    calib = int8_mod.load_images([p for p, _ in verify.split_images(manifest, "train", options.calib_images)],
                                 spec, "training")
    settings = int8_mod.quantize_int8(fp32_path, dst, calib, onnx_export.INPUT_NAME)
    logits, provider = onnx_export.run_onnx(dst, inputs)
    val = verify.split_images(manifest, "val", options.int8_eval_images)
    x_val = int8_mod.load_images([p for p, _ in val], spec, "validation")
    y_val = np.array([classes.index(label) for _, label in val])
    val_fp32, _ = onnx_export.run_onnx(fp32_path, x_val)
    val_int8, _ = onnx_export.run_onnx(dst, x_val)
    acc32, acc8 = float((val_fp32.argmax(1) == y_val).mean()), float((val_int8.argmax(1) == y_val).mean())
    what = f"{name} INT8 ONNX vs fp32"
    batch = verify.check("int8", f"{what} (verification batch)", verify.compare_logits(fp32_logits, logits))
    result = verify.check("int8", f"{what} on {len(val)} validation images", verify.compare_logits(val_fp32, val_int8),
                          min_top1=verify.int8_min_agreement(options.int8_min_top1, len(val)),
                          hint="calibrate on more images: --calib-images")
    drop = acc32 - acc8
    allowed = verify.int8_allowed_drop(options.int8_max_accuracy_drop, len(val))
    result.update(accuracy_fp32=acc32, accuracy_int8=acc8, accuracy_drop=drop, max_accuracy_drop=allowed,
                  provider=provider, verification_batch=batch)
    if drop > allowed + 1e-12:
        raise GateFailed("int8", f"{what} on {len(val)} validation images", "accuracy drop", drop, allowed,
                         "at most", f"fp32 {acc32:.2%} -> int8 {acc8:.2%}; calibrate on more images: --calib-images")
    return result, settings


def _export_engine(name: str, fp16_path: Path, staging: Path, spec: PreprocessSpec, inputs: np.ndarray,
                   fp32_logits: np.ndarray, max_batch: int) -> tuple[dict | None, dict, str | None]:
    """The TensorRT engine and its parity gate, or build_engine.sh when TensorRT or a GPU is
    missing. Returns (verification or None, the manifest entry, a note for the user or None)."""
    ok, why = tensorrt.tensorrt_status()
    if not ok:
        script, command = tensorrt.write_build_script(staging, fp16_path.name, onnx_export.INPUT_NAME, spec.size,
                                                      max_batch)
        return None, {"status": "not built", "reason": why, "script": script.name, "command": command}, (
            f"no TensorRT engine here ({why}): wrote {script.name}, the trtexec command that builds it on the target")
    path, stamp = tensorrt.build_engine(fp16_path, staging, onnx_export.INPUT_NAME, spec.size, max_batch)
    logits = tensorrt.run_engine(path, inputs, max_batch)
    result = verify.check("engine", f"{name} TensorRT engine vs fp32 ONNX",
                          verify.compare_logits(fp32_logits, logits, verify.FP16_TIE_MARGIN),
                          min_top1=verify.FP16_MIN_TOP1)
    return result, {"status": "built", "file": path.name, **stamp}, None  # hashed with the other files


def _stamp(path: Path, manifest: dict, precision: str, merged: bool, key: str) -> None:
    """The essentials, in the ONNX file's own metadata_props."""
    onnx_export.set_metadata(path, {
        "format": f"{BUNDLE_FORMAT}/{BUNDLE_FORMAT_VERSION}", "source": manifest["source"],
        "classes": manifest["classes"], "preprocess": manifest["preprocess"], "model": manifest["model"]["name"],
        "method": manifest["config"]["method"], "merged": merged, "precision": precision,
        "base_weights_license": manifest["base_weights"].get("license", "unknown"),
        "gi_deploy_version": gi_deploy.__version__, "export_key": key,
        "input": onnx_export.INPUT_NAME, "output": onnx_export.OUTPUT_NAME,
    })


def export_source(run_dir: Path, bundle_dir: Path, options: ExportOptions | None = None, force: bool = False,
                  **overrides) -> ExportResult:
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
    _restore_interrupted(bundle_dir)
    if not force and (existing := current_bundle(bundle_dir, key)) is not None:
        return ExportResult(bundle_dir, existing, skipped=True)
    timer = _Timer()
    try:
        return _export(run_dir, bundle_dir, manifest, options, key, hashes, timer)
    except GiDeployError:
        raise
    except Exception as e:  # a library failure: typed, with the step it happened in; the cause is chained
        raise ExportError(f"{run_dir.name}: export failed after step {timer.last or 'start'!r} with "
                          f"{type(e).__name__}: {e}. Nothing was written; rerun with -v for details") from e


def _restore_interrupted(bundle_dir: Path) -> None:
    """A crash between the two renames of a previous export leaves ``.<name>.old`` and no bundle:
    put the old bundle back before starting."""
    old = bundle_dir.with_name(f".{bundle_dir.name}.old")
    if old.is_dir() and not bundle_dir.exists():
        old.rename(bundle_dir)


def _export(run_dir: Path, bundle_dir: Path, manifest: dict, options: ExportOptions, key: str, hashes: dict,
            timer: _Timer) -> ExportResult:
    name = run_dir.name
    method = manifest["config"]["method"]
    spec = PreprocessSpec.from_dict(manifest["preprocess"])
    plain = rebuild_base(manifest, run_dir).eval()
    reference = attach_trained(copy.deepcopy(plain), manifest, run_dir).eval()  # plain stays the bare base
    inputs, inputs_info = verify.verification_batch(manifest, spec)
    merged = method in ADAPTER_METHODS and options.merge
    if merged:
        with torch.no_grad():
            ref_logits = reference(torch.from_numpy(inputs)).numpy()
        timer.lap("load_and_reference")
        deployed = merge_into_plain(plain, reference)
        merged_logits, peaks = verify.logits_and_peaks(deployed, inputs)
        verification: dict = {"merge": verify.check("merge", f"{name} merged model vs adapter model",
                                                     verify.compare_logits(ref_logits, merged_logits),
                                                     atol=verify.MERGE_ATOL)}
        timer.lap("merge")
    else:
        deployed = reference
        ref_logits, peaks = verify.logits_and_peaks(deployed, inputs)
        verification = {}
        timer.lap("load_and_reference")
    verification["inputs"] = {**inputs_info, "peak_activation": round(float(peaks.max()), 3)}
    params = sum(p.numel() for p in deployed.parameters())
    del plain, reference
    staging = bundle_dir.with_name(f".{bundle_dir.name}.staging")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    notes: list[str] = []
    try:
        fp32_path = staging / MODEL_FILES["fp32"]
        opset = onnx_export.export_onnx(deployed, fp32_path, spec.size, options.opset, options.exporter)
        timer.lap("onnx_export")
        fp32_logits, provider = onnx_export.run_onnx(fp32_path, inputs)
        verification["onnx_fp32"] = verify.check(
            "onnx_fp32", f"{name} fp32 ONNX vs adapter model",
            {**verify.compare_logits(ref_logits, fp32_logits), "provider": provider,
             "batch_sizes": [1] + [min(onnx_export.RUN_CHUNK, len(inputs) - i)
                                   for i in range(1, len(inputs), onnx_export.RUN_CHUNK)]},
            atol=verify.FP32_ATOL, min_top1=verify.FP32_MIN_TOP1)
        timer.lap("onnx_fp32_gate")
        extras: dict[str, dict] = {}
        if options.fp16:
            gates, extras["fp16"] = _export_fp16(name, fp32_path, staging / MODEL_FILES["fp16"], inputs, fp32_logits,
                                                 peaks)
            verification.update(gates)
            timer.lap("fp16")
        if options.int8:
            verification["int8"], extras["int8"] = _export_int8(name, manifest, spec, fp32_path,
                                                                staging / MODEL_FILES["int8"], inputs, fp32_logits,
                                                                options)
            timer.lap("int8")
        engine = None
        if options.engine:
            gate, engine, note = _export_engine(name, staging / MODEL_FILES["fp16"], staging, spec, inputs,
                                                fp32_logits, options.max_batch)
            if gate is not None:
                verification["engine"] = gate
            if note:
                notes.append(note)
            timer.lap("engine")
        precisions = [p for p in ("fp32", "fp16", "int8") if (staging / MODEL_FILES[p]).is_file()]
        for precision in precisions:
            _stamp(staging / MODEL_FILES[precision], manifest, precision, merged, key)
        classes = manifest["classes"]
        write_json(staging / "labels.json", classes)
        files = {p.name: {"sha256": sha256_file(p), "bytes": p.stat().st_size}  # every file, hashed once
                 for p in sorted(staging.iterdir()) if p.is_file()}
        models = {p: {"file": MODEL_FILES[p], **files[MODEL_FILES[p]], **extras.get(p, {})} for p in precisions}
        if engine and engine.get("status") == "built":
            engine.update(files[engine["file"]])
        adapter_bytes = artifact_bytes(run_dir, method)
        footprint = {
            "trained_artifact": method, "artifact_bytes": adapter_bytes, "merged_model_bytes": models["fp32"]["bytes"],
            "artifact_vs_merged_model": round(adapter_bytes / models["fp32"]["bytes"], 6),
            **{f"{p}_model_bytes": models[p]["bytes"] for p in ("fp16", "int8") if p in models},
        }
        bundle = {
            "format": BUNDLE_FORMAT, "format_version": BUNDLE_FORMAT_VERSION, "created": utc_now(),
            "export_key": key, "source": manifest["source"], "classes": classes, "preprocess": manifest["preprocess"],
            "model": {"name": manifest["model"]["name"], "num_classes": len(classes), "method": method,
                      "merged": merged, "parameters": params, "opset": opset, "exporter": options.exporter,
                      "input": onnx_export.INPUT_NAME, "output": onnx_export.OUTPUT_NAME, "dynamic_axes": ["batch"]},
            "models": models, "engine": engine, "verification": verification, "footprint": footprint,
            "base_weights": manifest["base_weights"],
            "adapter": _adapter_entry(manifest),
            "training": {"run_dir": str(run_dir.resolve()), "best": {k: manifest["best"].get(k) for k in
                         ("epoch", "accuracy", "f1_weighted", "mcc")}, **hashes},
            "options": asdict(options),
            "versions": library_versions(),
        }
        bundle["files"] = files
        timer.lap("write")
        bundle["timings_s"] = timer.seconds
        write_json(staging / MANIFEST_NAME, bundle)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    old = bundle_dir.with_name(f".{bundle_dir.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if bundle_dir.exists():
        dropped = sorted(p.name for p in bundle_dir.glob("model.*.engine") if p.name not in bundle["files"])
        if dropped:  # built on a target from the previous fp16 ONNX: stale now
            notes.append(f"removed {', '.join(dropped)} built from the previous export; rebuild with "
                         f"{tensorrt.BUILD_SCRIPT}")
        bundle_dir.rename(old)
    staging.rename(bundle_dir)
    shutil.rmtree(old, ignore_errors=True)
    return ExportResult(bundle_dir, bundle, notes=notes)


def export_runs(cfg: ExportConfig) -> dict[str, ExportResult]:
    """Export every requested source; returns {source: result}.

    A source that fails does not stop the others: their bundles are written, and then
    ExportFailed lists every failed source with its reason."""
    results: dict[str, ExportResult] = {}
    failures: dict[str, GiDeployError] = {}
    for source in cfg.resolve_sources():
        try:
            results[source] = export_source(cfg.runs_dir / source, cfg.deploy_dir / source, cfg.options, cfg.force)
        except GiDeployError as e:
            failures[source] = e
    if failures:
        raise ExportFailed(results, failures)
    return results
