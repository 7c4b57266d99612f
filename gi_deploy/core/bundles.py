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

import json
import re
from dataclasses import dataclass, field, replace
from pathlib import Path

from gi_deploy._io import read_json, sha256_file
from gi_deploy.core.methods import method_spec
from gi_deploy.core.preprocess import PreprocessSpec
from gi_deploy.core.records import (
    Fields,
    FileEntry,
    as_dict,
    canonical_json,
    canonical_sha256,
    read_preprocess,
    seal_of,
)
from gi_deploy.core.records import check_seal as check_seal_of
from gi_deploy.core.runs import RUN_MANIFEST, read_run_manifest
from gi_deploy.errors import BundleError, ConfigError, DataError

BUNDLE_FORMAT = "gi-deploy-bundle"
# 2: model.fp16.onnx, int8, engine, files/footprint/export_key; 3: features output, ood; 4: typed and
# sealed (core/records.py): the content hash covers the model interface and the OOD threshold, the
# seal every field, and the threshold is read from the hashed id_stats.npz
BUNDLE_FORMAT_VERSION = 4
# Versions this gi-deploy reads: older manifests are unsealed (any field could have been edited
# unseen), so they are refused with the re-export command (the demo re-exports anyway).
READABLE_FORMAT_VERSIONS = (4,)
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
    return sorted(
        p.parent.name for p in deploy_dir.glob(f"*/{MANIFEST_NAME}") if not p.parent.name.startswith((".", "_"))
    )  # .<name>.staging / .old of an export in progress


def interrupted_hint(deploy_dir: Path) -> str:
    """Where an export was killed between its two renames, the previous bundle sits in
    ``.<source>.old`` and no bundle is listed: a sentence saying so (empty when none is)."""
    if not Path(deploy_dir).is_dir():
        return ""
    old = sorted(
        p.parent.name[1 : -len(".old")]
        for p in Path(deploy_dir).glob(f".*.old/{MANIFEST_NAME}")
        if not (Path(deploy_dir) / p.parent.name[1 : -len(".old")]).exists()
    )
    if not old:
        return ""
    return (
        f" (an interrupted export left the bundle of {', '.join(old)} in "
        f"{', '.join(str(Path(deploy_dir) / f'.{s}.old') for s in old)}: the next `gi-deploy export` restores it, "
        "or rename it back by hand)"
    )


def resolve_bundle_dir(deploy_dir: Path, source: str | None) -> Path:
    """The bundle folder for ``source``; with no source, the only bundle there is."""
    available = list_bundles(deploy_dir)
    if source is None:
        if len(available) == 1:
            return deploy_dir / available[0]
        if not available:
            raise BundleError(
                f"no bundles under {deploy_dir}; run `gi-deploy export` first" + interrupted_hint(deploy_dir)
            )
        raise ConfigError(
            f"{len(available)} bundles under {deploy_dir} ({', '.join(available)}); choose one with --source"
        )
    if source not in available:
        raise BundleError(
            f"no bundle for source {source!r} under {deploy_dir}; "
            f"available: {', '.join(available) or 'none'}" + interrupted_hint(deploy_dir)
        )
    return deploy_dir / source


def resolve_bundle_dirs(deploy_dir: Path, sources: list[str] | None) -> list[Path]:
    """Bundle folders for ``sources`` (names, or ``["all"]`` for every bundle there); with none,
    the only bundle there is. Duplicates are dropped, the order kept."""
    if not sources:
        return [resolve_bundle_dir(deploy_dir, None)]
    if "all" in sources:
        available = list_bundles(deploy_dir)
        if not available:
            raise BundleError(
                f"no bundles under {deploy_dir}; run `gi-deploy export` first" + interrupted_hint(deploy_dir)
            )
        return [deploy_dir / s for s in available]
    return [resolve_bundle_dir(deploy_dir, s) for s in dict.fromkeys(sources)]


_FIX = "the manifest was edited or damaged: re-export the bundle with `gi-deploy export --force`"
_NAME = re.compile(r"[^/\\\x00]+")
# What the content hash covers: everything that decides how an image becomes a row (which classes,
# in which order, from which input and model outputs, refused above which in-distribution score).
# Known before the model files are final, so it is stamped in every ONNX file's metadata too; the
# manifest's seal (core/records.py) covers it and everything else, file hashes included.
CONTENT_FIELDS = ("source", "classes", "preprocess", "model", "ood")


def bundle_file(bundle_dir: Path, name, field: str = "file") -> Path:
    """``bundle_dir / name`` for a file the manifest names: a plain file name inside the bundle
    folder, not a path that leaves it (absolute, ``..``, a sub-folder) and not a symlink. A bundle
    is self-contained; anything else is refused with BundleError."""
    if (
        not isinstance(name, str)
        or not name
        or name in (".", "..")
        or "/" in name
        or "\\" in name
        or "\x00" in name
        or Path(name).is_absolute()
    ):
        shown = repr(name) if len(repr(name)) <= 80 else repr(name)[:77] + "..."
        raise BundleError(
            f"{bundle_dir / MANIFEST_NAME}: field {field} = {shown} must be a plain file name inside "
            "the bundle folder (a bundle is self-contained: no absolute paths, no '..', no sub-folders); " + _FIX
        )
    path = bundle_dir / name
    if path.is_symlink():
        raise BundleError(
            f"{path} is a symlink (to {path.readlink()}); a bundle is self-contained and its files are "
            "refused as links: copy the real file in, or re-export"
        )
    return path


@dataclass(frozen=True)
class ModelFile:
    """``models.<precision>``: the ONNX file, its sha256 and size, and its conversion's settings (``extra``)."""

    file: str
    sha256: str
    bytes: int
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return as_dict(self)

    @classmethod
    def read(cls, f: Fields, bundle_dir: Path) -> ModelFile:
        name = f.raw("file")
        bundle_file(bundle_dir, name, f.name("file"))
        return cls(name, f.sha256("sha256"), f.integer("bytes", 0), f.rest("file", "sha256", "bytes"))


@dataclass(frozen=True)
class ModelInfo:
    """``model``: the network and its ONNX interface."""

    name: str
    num_classes: int
    method: str
    merged: bool
    parameters: int
    opset: int
    exporter: str
    input: str
    output: str
    dynamic_axes: tuple[str, ...]
    features_output: str | None = None  # format 3+: pooled features beside the logits (--source auto)
    _omit_none = ("features_output",)

    def to_dict(self) -> dict:
        return as_dict(self)

    @classmethod
    def read(cls, f: Fields, n_classes: int) -> ModelInfo:
        n = f.integer("num_classes", 1)
        if n != n_classes:
            raise f.bad(f.name("num_classes"), n, f"does not match the {n_classes} classes listed")
        return cls(
            f.text("name"),
            n,
            f.text("method"),
            f.flag("merged"),
            f.integer("parameters", 0),
            f.integer("opset", 1),
            f.text("exporter"),
            f.text("input"),
            f.text("output"),
            f.str_list("dynamic_axes", nonempty=False),
            f.text("features_output", None),
        )


@dataclass(frozen=True)
class OodEntry:
    """``ood``: the in-distribution statistics (core/ood.py). ``status`` "fitted": ``file`` holds them
    and ``threshold`` is the refusal score (the same number is inside the sealed ``file``, and the
    two must agree); "missing": the run's images were gone at export (``reason``)."""

    status: str
    file: str | None = None
    threshold: float | None = None
    reason: str | None = None
    extra: dict = field(default_factory=dict)  # the calibration numbers (tpr, shrinkage, accepted shares)
    _omit_none = ("file", "threshold", "reason")

    def to_dict(self) -> dict:
        return as_dict(self)

    @classmethod
    def read(cls, f: Fields, bundle_dir: Path) -> OodEntry:
        status = f.text("status", choices=("fitted", "missing"))
        if status == "missing":
            return cls(status, reason=f.text("reason", ""), extra=f.rest("status", "reason"))
        name = f.raw("file")
        bundle_file(bundle_dir, name, f.name("file"))
        return cls(status, name, f.number("threshold", 0.0, lo_open=True), None, f.rest("status", "file", "threshold"))


@dataclass(frozen=True)
class EngineEntry:
    """``engine``: a TensorRT engine built at export (``file``), or why not and the script that builds it."""

    status: str
    file: str | None = None
    script: str | None = None
    reason: str | None = None
    extra: dict = field(default_factory=dict)
    _omit_none = ("file", "script", "reason")

    def to_dict(self) -> dict:
        return as_dict(self)

    @classmethod
    def read(cls, f: Fields, bundle_dir: Path) -> EngineEntry:
        names = {}
        for key in ("file", "script"):
            if f.raw(key, None) is not None:
                names[key] = f.raw(key)
                bundle_file(bundle_dir, names[key], f.name(key))
        return cls(
            f.text("status", choices=("built", "not built")),
            names.get("file"),
            names.get("script"),
            f.text("reason", None),
            f.rest("status", "file", "script", "reason"),
        )


@dataclass(frozen=True)
class TrainingRef:
    """``training``: the run the bundle came from, and the sha256 of its manifest and trained files."""

    run_dir: str
    run_manifest_sha256: str
    artifact_sha256: dict
    best: dict

    def to_dict(self) -> dict:
        return as_dict(self)

    @classmethod
    def read(cls, f: Fields) -> TrainingRef:
        art = f.sub("artifact_sha256")
        return cls(
            f.text("run_dir"), f.sha256("run_manifest_sha256"), {k: art.sha256(k) for k in art.data}, f.obj("best")
        )


@dataclass(frozen=True)
class BundleManifest:
    """A bundle's ``manifest.json``, typed and sealed. Build it with :meth:`from_dict` (every field
    checked, the seal verified: BundleError naming the field) or at export with :meth:`sealed`;
    write it with :meth:`to_dict`."""

    created: str
    export_key: str
    content_sha256: str
    source: str
    classes: tuple[str, ...]
    preprocess: PreprocessSpec
    model: ModelInfo
    ood: OodEntry | None
    models: dict[str, ModelFile]
    engine: EngineEntry | None
    verification: dict
    footprint: dict
    base_weights: dict
    adapter: dict | None
    training: TrainingRef
    options: dict
    versions: dict
    files: dict[str, FileEntry]
    timings_s: dict = field(default_factory=dict)
    seal: dict = field(default_factory=dict)
    format: str = BUNDLE_FORMAT
    format_version: int = BUNDLE_FORMAT_VERSION

    def content(self) -> dict:
        """What the content hash covers (``CONTENT_FIELDS``), in JSON form."""
        d = self.to_dict()
        return {k: d[k] for k in CONTENT_FIELDS}

    def to_dict(self) -> dict:
        d = as_dict(self)
        return {"format": d.pop("format"), "format_version": d.pop("format_version"), **d}

    def sealed(self) -> BundleManifest:
        """This manifest with its content hash and seal computed (at export, once every field is set)."""
        m = replace(self, content_sha256=canonical_sha256(self.content()), seal={})
        d = m.to_dict()
        d.pop("seal")
        return replace(m, seal=seal_of(d))

    @classmethod
    def from_dict(cls, d, bundle_dir: Path, check_seal: bool = True) -> BundleManifest:
        """Every field's type and range, the cross-field facts (classes vs num_classes, each model
        file listed in ``files`` with the same sha256, the statistics' file listed), then the seal.
        Raises BundleError naming the field, its value and the fix."""
        where = Path(bundle_dir) / MANIFEST_NAME
        f = Fields(d, where, _FIX)
        if d.get("format") != BUNDLE_FORMAT or d.get("format_version") not in READABLE_FORMAT_VERSIONS:
            raise BundleError(
                f"{where} is a {d.get('format')} v{d.get('format_version')} manifest; this gi-deploy "
                f"reads {BUNDLE_FORMAT} v{BUNDLE_FORMAT_VERSION} (sealed): re-export the bundle with "
                "`gi-deploy export --force`"
            )
        source = f.text("source", pattern=_NAME, what="a non-empty name (a string without '/')")
        classes = f.str_list("classes", unique=True)
        files = {}
        for name in f.obj("files"):
            bundle_file(bundle_dir, name, "files")
            files[name] = FileEntry.read(f.sub("files").sub(name))
        models = {}
        entries = f.sub("models")
        if not entries.data:
            raise f.bad("models", entries.data, "must name at least one model file")
        for precision in entries.data:
            if precision not in MODEL_FILES:
                raise f.bad("models", precision, f"is not a precision ({', '.join(MODEL_FILES)})")
            models[precision] = m = ModelFile.read(entries.sub(precision), bundle_dir)
            if m.file not in files or files[m.file].sha256 != m.sha256:
                raise f.bad(f"models.{precision}.sha256", m.sha256, f"is not the sha256 files lists for {m.file}")
        ood = OodEntry.read(f.sub("ood"), bundle_dir) if f.raw("ood", None) is not None else None
        if ood is not None and ood.file is not None and ood.file not in files:
            raise f.bad("ood.file", ood.file, "is not one of the bundle's files")
        engine = EngineEntry.read(f.sub("engine"), bundle_dir) if f.raw("engine", None) is not None else None
        if engine is not None and engine.status == "built" and engine.file not in files:
            raise f.bad("engine.file", engine.file, "is not one of the bundle's files")
        adapter = f.obj("adapter", None)
        m = cls(
            created=f.text("created"),
            export_key=f.sha256("export_key"),
            content_sha256=f.sha256("content_sha256"),
            source=source,
            classes=classes,
            preprocess=read_preprocess(f),
            model=ModelInfo.read(f.sub("model"), len(classes)),
            ood=ood,
            models=models,
            engine=engine,
            verification=f.obj("verification"),
            footprint=f.obj("footprint"),
            base_weights=f.obj("base_weights"),
            adapter=adapter,
            training=TrainingRef.read(f.sub("training")),
            options=f.obj("options"),
            versions=f.obj("versions"),
            files=files,
            timings_s=f.obj("timings_s", {}),
            seal=f.obj("seal", {}),
            format_version=d["format_version"],
        )
        if check_seal:
            check_seal_of(d, where, _FIX)
            if canonical_sha256(m.content()) != m.content_sha256:
                raise f.bad("content_sha256", m.content_sha256, f"is not the hash of {', '.join(CONTENT_FIELDS)}")
        return m


def _short(v) -> str:
    text = json.dumps(v)
    return text if len(text) <= 80 else text[:77] + "..."


def check_model_metadata(
    bundle_dir: Path, manifest: BundleManifest, model_path: Path, metadata: dict[str, str], n_outputs: int | None
) -> None:
    """The model file's own record (its ``gi_deploy.`` metadata_props stamped at export) and its
    output width against the manifest: the content (classes, preprocessing, source, model
    interface, in-distribution threshold) must be the one the file was exported with, or every
    prediction could be silently relabelled. Raises BundleError naming the field that differs."""
    if n_outputs is not None and n_outputs != len(manifest.classes):
        raise BundleError(
            f"{model_path} outputs {n_outputs} scores but {bundle_dir / MANIFEST_NAME} lists "
            f"{len(manifest.classes)} classes; re-export the bundle with `gi-deploy export --force`"
        )
    meta = {k.removeprefix("gi_deploy."): v for k, v in metadata.items() if k.startswith("gi_deploy.")}
    if "content" not in meta or "content_sha256" not in meta:
        raise BundleError(
            f"{model_path} carries no gi-deploy content record (not written by `gi-deploy export` "
            f"v{BUNDLE_FORMAT_VERSION}, or replaced); re-export the bundle"
        )
    stamped, content = _json_or_none(meta["content"]) or {}, manifest.content()
    for key in CONTENT_FIELDS:
        if canonical_json(stamped.get(key)) != canonical_json(content[key]):
            raise BundleError(
                f"{bundle_dir / MANIFEST_NAME} says {key} {_short(content[key])} but {model_path.name} "
                f"was exported with {_short(stamped.get(key))}: the manifest was edited after export; "
                "re-export the bundle with `gi-deploy export --force`"
            )
    if meta["content_sha256"] != manifest.content_sha256:
        raise BundleError(
            f"{model_path.name}'s content hash differs from {bundle_dir / MANIFEST_NAME}'s "
            "content_sha256; re-export the bundle with `gi-deploy export --force`"
        )


def _json_or_none(text: str | None):
    try:
        return None if text is None else json.loads(text)
    except json.JSONDecodeError:
        return None


def read_bundle_manifest(bundle_dir: Path) -> BundleManifest:
    """The bundle's manifest (:meth:`BundleManifest.from_dict`: every field checked, the seal
    verified) with ``labels.json`` the same as its classes. BundleError naming the field when
    missing, malformed, out of range, leaving the bundle, edited since export, or of another format."""
    bundle_dir = Path(bundle_dir)
    manifest_path = bundle_dir / MANIFEST_NAME
    if manifest_path.is_symlink():
        raise BundleError(
            f"{manifest_path} is a symlink; a bundle is self-contained: copy the real file in, or re-export"
        )
    manifest = BundleManifest.from_dict(read_json(manifest_path, "bundle manifest"), bundle_dir)
    labels_path = bundle_file(bundle_dir, LABELS_NAME, LABELS_NAME)
    labels = read_json(labels_path, "bundle labels")
    if labels != list(manifest.classes):
        raise BundleError(
            f"{labels_path} lists {_short(labels)} but {manifest_path} lists classes "
            f"{_short(list(manifest.classes))}: one of them was edited after export and the predictions "
            "would be mislabelled; re-export the bundle with `gi-deploy export --force`"
        )
    return manifest


def training_run_of(manifest: BundleManifest) -> Path:
    """The training run a bundle was exported from, checked to be unchanged since (its run
    manifest's hash): what --backend torch and --explain-wrong rebuild the model from."""
    training = manifest.training
    run_dir = Path(training.run_dir)
    run_manifest = run_dir / RUN_MANIFEST
    if not run_manifest.is_file():
        raise DataError(
            f"the training run this bundle came from, {run_dir}, is gone; use the ONNX backends, or "
            "run on the machine that trained it"
        )
    if sha256_file(run_manifest) != training.run_manifest_sha256:
        raise BundleError(
            f"the run {run_dir} changed after this bundle was exported (retrained or resumed): it "
            "is another model now. Re-export the bundle"
        )
    spec = method_spec(manifest.model.method)
    for path in spec.artifact_files(run_dir):
        recorded = training.artifact_sha256.get(path.name)
        if recorded is None or not path.is_file() or sha256_file(path) != recorded:
            raise BundleError(
                f"{path} changed after this bundle was exported (its sha256 is not the one the bundle "
                "records): the torch model would not be the exported one. Restore it, or retrain and "
                "re-export"
            )
    spec.check_artifact(run_dir, read_run_manifest(run_dir).best_artifact_sha256, "training")
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
        return (
            f"int8 top-1 {g['top1_agreement']:.1%} on {g['n']} val images, accuracy {g['accuracy_fp32']:.1%} -> "
            f"{g['accuracy_int8']:.1%}"
        )
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
    a missing, foreign, damaged or edited manifest (:func:`read_bundle_manifest`)."""
    m = read_bundle_manifest(bundle_dir)
    v = m.verification
    files = {name: e.bytes for name, e in m.files.items()}
    gates_of = {
        MODEL_FILES["fp32"]: ("onnx_fp32", "onnx_features"),
        MODEL_FILES["fp16"]: ("onnx_fp16", "fp16_emulated"),
        MODEL_FILES["int8"]: ("int8",),
    }
    engine = m.engine or EngineEntry("not built")
    if engine.status == "built":
        gates_of[engine.file] = ("engine",)
    rows = []
    order = [*MODEL_FILES.values(), engine.file, engine.script]
    for name, size in sorted(files.items(), key=lambda kv: order.index(kv[0]) if kv[0] in order else len(order)):
        gates = [g for g in gates_of.get(name, ()) if g in v]
        if name == engine.script:
            rows.append((name, size, "engine", f"not built ({engine.reason or ''})"))
        elif not gates:
            rows.append((name, size, "", ""))
        for i, gate in enumerate(gates):
            rows.append((name if i == 0 else "", size if i == 0 else None, gate, gate_text(gate, v[gate])))
    fp = m.footprint
    if "merge" in v:
        rows.append(
            (
                f"{fp.get('trained_artifact', 'adapter')} (run)",
                fp.get("artifact_bytes"),
                "merge",
                gate_text("merge", v["merge"]),
            )
        )
    if fp:
        rows.append(("", None, "footprint", f"{fp['artifact_vs_merged_model']:.1%} of {MODEL_FILES['fp32']}"))
    return {"source": m.source, "model": m.model.name, "method": m.model.method, "created": m.created, "rows": rows}
