"""Export stage: trained run -> verified deployment bundle ``deploy/<source>/``.

Bundle layout::

    model.onnx          merged fp32 classifier, dynamic batch axis
    model_fp16.onnx     with --fp16: fp16 weights, fp32 I/O and fp32 LayerNorm/GRN islands
    labels.json         class names in logit order
    manifest.json       preprocessing, classes, base weights and licence, adapter settings,
                        file hashes and every verification number

Everything is written to a staging folder and moved into place only after every check has
passed, so a failed export never leaves an unverified file (nor destroys the previous bundle).
"""

from __future__ import annotations

import copy
import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from gi_deploy._io import library_versions, sha256_file, utc_now, write_json
from gi_deploy.errors import BundleError, ConfigError, DataError, ExportFailed, GiDeployError, VerificationError
from gi_deploy.export import onnx_export
from gi_deploy.export.merge import merge_into_plain
from gi_deploy.runtime.bundle import BUNDLE_FORMAT, BUNDLE_FORMAT_VERSION, MANIFEST_NAME
from gi_deploy.runtime.preprocess import PreprocessSpec, load_input
from gi_deploy.training.config import COLORA_METHODS, LORA_METHODS
from gi_deploy.training.run import (ADAPTER_METHODS, RUN_MANIFEST, artifact_files, attach_trained, read_run_manifest,
                                    rebuild_base)

log = logging.getLogger(__name__)

VERIFY_SEED = 0
VERIFY_REAL_IMAGES = 4
# Synthetic verification inputs: unit-variance noise, and 4x noise for large activations
# (the fp16 overflow risk lives there).
VERIFY_NOISE_SCALES = (1.0, 1.0, 4.0, 4.0)


@dataclass
class ExportConfig:
    runs_dir: Path = Path("runs")
    deploy_dir: Path = Path("deploy")
    sources: list[str] = field(default_factory=list)  # empty: every trained run under runs_dir
    merge: bool = True
    fp16: bool = False
    opset: int = onnx_export.OPSET

    def __post_init__(self) -> None:
        self.runs_dir, self.deploy_dir = Path(self.runs_dir), Path(self.deploy_dir)
        if self.opset < 17:
            raise ConfigError(f"opset must be >= 17 (LayerNormalization as one node), got {self.opset}")
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


def verification_batch(manifest: dict, spec: PreprocessSpec) -> tuple[np.ndarray, dict]:
    """A fixed batch: up to 4 real validation images of the run (when still on disk) and
    seeded noise at two scales. Returns float32 (N, 3, H, W) and a description for the manifest."""
    splits = manifest["splits"]
    root = Path(splits["root"])
    real = []
    for rel, _ in splits["files"]["val"]:
        if len(real) == VERIFY_REAL_IMAGES:
            break
        try:
            real.append(load_input(root / rel, spec))
        except DataError:
            continue  # the data may have moved since training; noise still covers the check
    g = torch.Generator().manual_seed(VERIFY_SEED)
    h, w = spec.size
    noise = [(torch.randn(3, h, w, generator=g) * s).numpy() for s in VERIFY_NOISE_SCALES]
    batch = np.stack(real + noise).astype(np.float32)
    return batch, {"real_images": len(real), "noise_scales": list(VERIFY_NOISE_SCALES), "seed": VERIFY_SEED}


def _adapter_entry(manifest: dict) -> dict | None:
    """The adapter settings of the run (LoRA and/or CoLoRA, with CoLoRA's parameter counts)."""
    method = manifest["config"]["method"]
    entry = {}
    if method in LORA_METHODS:
        entry["lora"] = manifest["config"]["lora"]
    if method in COLORA_METHODS:
        entry["colora"] = {**manifest["config"]["colora"], **manifest.get("colora", {})}
    return entry or None


def _file_entry(path: Path, **extra) -> dict:
    return {"file": path.name, "sha256": sha256_file(path), "bytes": path.stat().st_size, **extra}


def export_source(run_dir: Path, bundle_dir: Path, merge: bool = True, fp16: bool = False,
                  opset: int = onnx_export.OPSET) -> dict:
    """Export one run to ``bundle_dir``; returns the bundle manifest. Raises VerificationError
    (and writes nothing) when merge, ONNX or fp16 outputs leave their tolerances."""
    run_dir, bundle_dir = Path(run_dir), Path(bundle_dir)
    manifest = read_run_manifest(run_dir)
    method = manifest["config"]["method"]
    spec = PreprocessSpec.from_dict(manifest["preprocess"])
    plain = rebuild_base(manifest, run_dir).eval()
    verification: dict = {}
    inputs, inputs_info = verification_batch(manifest, spec)
    x = torch.from_numpy(inputs)
    reference = attach_trained(copy.deepcopy(plain), manifest, run_dir).eval()  # plain stays the bare base
    with torch.no_grad():
        ref_logits = reference(x).numpy()
    merged = method in ADAPTER_METHODS and merge
    if merged:
        deployed = merge_into_plain(plain, reference)
        with torch.no_grad():
            merged_logits = deployed(x).numpy()
        verification["merge"] = onnx_export.compare_logits(ref_logits, merged_logits)
        verification["merge"]["tolerance"] = onnx_export.MERGE_ATOL
        if verification["merge"]["max_abs_logit_diff"] > onnx_export.MERGE_ATOL:
            raise VerificationError(f"{run_dir.name}: merged model differs from the adapter model by "
                                    f"{verification['merge']['max_abs_logit_diff']:.3g} > {onnx_export.MERGE_ATOL:g}")
    else:
        deployed = reference
    params = sum(p.numel() for p in deployed.parameters())
    staging = bundle_dir.with_name(f".{bundle_dir.name}.staging")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        models = {}
        fp32_path = staging / "model.onnx"
        onnx_export.export_onnx(deployed, fp32_path, spec.size, opset)
        verification["onnx_fp32"] = onnx_export.verify_onnx(
            fp32_path, ref_logits, inputs, f"{run_dir.name} fp32 ONNX", atol=onnx_export.FP32_ATOL)
        models["fp32"] = _file_entry(fp32_path)
        if fp16:
            fp16_path = staging / "model_fp16.onnx"
            conversion = onnx_export.convert_fp16(fp32_path, fp16_path)
            verification["onnx_fp16"] = onnx_export.verify_onnx(
                fp16_path, ref_logits, inputs, f"{run_dir.name} fp16 ONNX",
                min_top1=onnx_export.FP16_MIN_TOP1_AGREEMENT)
            models["fp16"] = _file_entry(fp16_path, **conversion)
        verification["inputs"] = inputs_info
        classes = manifest["classes"]
        write_json(staging / "labels.json", classes)
        bundle = {
            "format": BUNDLE_FORMAT, "format_version": BUNDLE_FORMAT_VERSION, "created": utc_now(),
            "source": manifest["source"], "classes": classes, "preprocess": manifest["preprocess"],
            "model": {"name": manifest["model"]["name"], "num_classes": len(classes), "method": method,
                      "merged": merged, "parameters": params, "opset": opset,
                      "exporter": "torch.onnx (TorchScript)", "input": onnx_export.INPUT_NAME,
                      "output": onnx_export.OUTPUT_NAME, "dynamic_axes": ["batch"]},
            "models": models, "verification": verification,
            "base_weights": manifest["base_weights"],
            "adapter": _adapter_entry(manifest),
            "training": {"run_dir": str(run_dir.resolve()), "best": {k: manifest["best"].get(k) for k in
                         ("epoch", "accuracy", "f1_weighted", "mcc")},
                         "run_manifest_sha256": sha256_file(run_dir / RUN_MANIFEST),
                         "artifact_sha256": {p.name: sha256_file(p) for p in artifact_files(run_dir, method)}},
            "versions": library_versions(),
        }
        write_json(staging / MANIFEST_NAME, bundle)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    old = bundle_dir.with_name(f".{bundle_dir.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if bundle_dir.exists():
        bundle_dir.rename(old)
    staging.rename(bundle_dir)
    shutil.rmtree(old, ignore_errors=True)
    return bundle


def export_runs(cfg: ExportConfig) -> dict[str, dict]:
    """Export every requested source; returns {source: bundle manifest}.

    A source that fails does not stop the others: their bundles are written, and then
    ExportFailed lists every failed source with its reason."""
    bundles: dict[str, dict] = {}
    failures: dict[str, GiDeployError] = {}
    for source in cfg.resolve_sources():
        try:
            bundles[source] = export_source(cfg.runs_dir / source, cfg.deploy_dir / source, cfg.merge, cfg.fp16,
                                            cfg.opset)
        except GiDeployError as e:
            failures[source] = e
    if failures:
        raise ExportFailed(bundles, failures)
    return bundles
