"""The training run folder's format (``<runs>/<source>/``), readable without torch: file names,
the manifest's format version, reading it, and listing the runs under a folder.

Run folder::

    run.json                    resolved config, classes, preprocessing, splits, base weights,
                                library versions, per-epoch history, best validation and test metrics
    splits/{train,val,test}.csv every split, one row per image (path, class[, video])
    adapter/                    lora: peft ``save_pretrained`` output of the best epoch (plain peft loads it)
    colora.safetensors          colora: the best epoch's CoLoRA factors, accumulated merges (and head)
    head.safetensors            linear: the best epoch's classifier
    model.safetensors           full: the best epoch's whole model
    base_weights.safetensors    only for a random-init base, which nothing else could rebuild
    checkpoint.pt               the last complete epoch: trained tensors, optimizer, scheduler, grad
                                scaler, every RNG state, early-stopping state (for --resume)
    metrics.jsonl               one line per epoch
    curves.png                  loss and accuracy per epoch

Which of the weights files a run holds is its method's ``artifact`` (core/methods.py).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from gi_deploy._io import read_json, write_json
from gi_deploy.core.preprocess import PreprocessSpec
from gi_deploy.core.records import Fields, as_dict, read_preprocess
from gi_deploy.errors import BundleError

log = logging.getLogger(__name__)

RUN_MANIFEST = "run.json"
RUN_FORMAT = "gi-deploy-run"
RUN_FORMAT_VERSION = 1
ADAPTER_DIR = "adapter"  # lora: peft save_pretrained output
ADAPTER_WEIGHTS = "adapter_model.safetensors"  # the weights file peft writes inside ADAPTER_DIR
FULL_WEIGHTS = "model.safetensors"  # full: the whole model
HEAD_WEIGHTS = "head.safetensors"  # linear: the classifier only
COLORA_WEIGHTS = "colora.safetensors"  # colora / lora+colora: CoLoRA factors and merges (+ head for colora)
RANDOM_BASE_WEIGHTS = "base_weights.safetensors"
CHECKPOINT = "checkpoint.pt"  # last complete epoch: trained tensors, optimizer, scheduler, RNG, loop state
METRICS_JSONL = "metrics.jsonl"
CURVES_PNG = "curves.png"
SPLITS_DIR = "splits"
RUN_FILES = (
    RUN_MANIFEST,
    FULL_WEIGHTS,
    HEAD_WEIGHTS,
    COLORA_WEIGHTS,
    RANDOM_BASE_WEIGHTS,
    CHECKPOINT,
    METRICS_JSONL,
    CURVES_PNG,
)
RUN_DIRS = (ADAPTER_DIR, SPLITS_DIR)


RUN_STATUSES = ("training", "interrupted", "diverged", "done")
_FIX = "the run manifest was edited or damaged: restore it, or train the run again with --overwrite"


@dataclass
class RunModelInfo:
    """``model``: the timm network, its number of classes and its classifier's module name."""

    name: str
    num_classes: int
    classifier: str

    def to_dict(self) -> dict:
        return as_dict(self)


@dataclass
class RunRecord:
    """A training run's ``run.json``, typed: built once by the trainer, updated through its
    attributes as epochs end (``best``, ``history``, ``status``), written with :meth:`save`, read
    back with :meth:`from_dict` (every field's type and range checked; BundleError naming it)."""

    created: str
    source: str
    config: dict  # the resolved TrainConfig (training/config.py owns its fields)
    device: str
    classes: tuple[str, ...]
    preprocess: PreprocessSpec
    base_weights: dict  # model/base.py BaseWeights.to_dict(): kind, ref, fingerprint, licence
    model: RunModelInfo
    params: dict  # trainable, total, deployed
    artifact: tuple[str, ...]
    splits: dict  # training/data.py DatasetSplits.to_dict()
    versions: dict
    history: list = field(default_factory=list)  # one record per epoch
    best: dict | None = None  # the best validation epoch's metrics and its artifact's sha256
    test: dict | None = None
    status: str = "training"
    runtime: dict = field(default_factory=dict)
    resumed: list | None = None
    colora: dict | None = None
    seconds: float | None = None
    extra: dict = field(default_factory=dict)  # fields this version does not type, kept as they are
    format: str = RUN_FORMAT
    format_version: int = RUN_FORMAT_VERSION
    _omit_none = ("resumed", "colora", "seconds")

    @property
    def method(self) -> str:
        return self.config["method"]

    @property
    def best_artifact_sha256(self) -> dict | None:
        """The sha256 of the best epoch's trained files (None for a run trained before they were recorded)."""
        return (self.best or {}).get("artifact_sha256")

    def adapter_summary(self, kind: str) -> dict | None:
        """What an adapter kind's ``summary`` hook recorded under its name (CoLoRA's is typed; a kind
        this version does not type keeps its entry in ``extra``)."""
        return self.colora if kind == "colora" else self.extra.get(kind)

    def set_adapter_summary(self, kind: str, summary: dict) -> None:
        if kind == "colora":
            self.colora = summary
        else:
            self.extra[kind] = summary

    def to_dict(self) -> dict:
        d = as_dict(self)
        return {"format": d.pop("format"), "format_version": d.pop("format_version"), **d}

    def save(self, run_dir: Path) -> None:
        write_json(Path(run_dir) / RUN_MANIFEST, self.to_dict())

    @classmethod
    def from_dict(cls, d, run_dir: Path) -> RunRecord:
        where = Path(run_dir) / RUN_MANIFEST
        f = Fields(d, where, _FIX)
        if d.get("format") != RUN_FORMAT or d.get("format_version") != RUN_FORMAT_VERSION:
            raise BundleError(f"{where} is not a gi-deploy run manifest v{RUN_FORMAT_VERSION}")
        classes = f.str_list("classes", unique=True)
        model = f.sub("model")
        n = model.integer("num_classes", 1)
        if n != len(classes):
            raise f.bad("model.num_classes", n, f"does not match the {len(classes)} classes listed")
        config = f.obj("config")
        f.sub("config").text("method")
        for key in ("best", "test"):
            f.obj(key, None)
        known = (
            "format",
            "format_version",
            "created",
            "source",
            "config",
            "device",
            "classes",
            "preprocess",
            "base_weights",
            "model",
            "params",
            "artifact",
            "splits",
            "versions",
            "history",
            "best",
            "test",
            "status",
            "runtime",
            "resumed",
            "colora",
            "seconds",
        )
        history = f.raw("history")
        if not isinstance(history, list) or not all(isinstance(h, dict) for h in history):
            raise f.bad("history", history, "must be a list of per-epoch records")
        resumed = f.raw("resumed", None)
        if resumed is not None and not isinstance(resumed, list):
            raise f.bad("resumed", resumed, "must be a list")
        return cls(
            created=f.text("created"),
            source=f.text("source"),
            config=config,
            device=f.text("device"),
            classes=classes,
            preprocess=read_preprocess(f),
            base_weights=f.obj("base_weights"),
            model=RunModelInfo(model.text("name"), n, model.text("classifier")),
            params=f.obj("params"),
            artifact=f.str_list("artifact"),
            splits=f.obj("splits"),
            versions=f.obj("versions"),
            history=history,
            best=d.get("best"),
            test=d.get("test"),
            status=f.text("status", choices=RUN_STATUSES),
            runtime=f.obj("runtime", {}),
            resumed=resumed,
            colora=f.obj("colora", None),
            seconds=f.number("seconds", 0.0, default=None),
            extra=f.rest(*known),
        )


def read_run_manifest(run_dir: Path, finished: bool = True) -> RunRecord:
    """The run's ``run.json`` as a :class:`RunRecord`; raises BundleError when missing, of another
    format or with a malformed field, and (with ``finished``) when no epoch has been saved yet."""
    record = RunRecord.from_dict(read_json(Path(run_dir) / RUN_MANIFEST, "run manifest"), run_dir)
    if finished and record.best is None:
        raise BundleError(f"run {run_dir} has no saved checkpoint yet (status: {record.status}); train it first")
    return record


def stored_config(run_dir: Path) -> dict:
    """The resolved training config a run recorded (for ``--resume``)."""
    return dict(read_run_manifest(run_dir, finished=False).config)


def list_runs(runs_dir: Path) -> list[str]:
    """Names of the sources with a run manifest under ``runs_dir`` (finished or not), sorted."""
    return sorted(p.parent.name for p in Path(runs_dir).glob(f"*/{RUN_MANIFEST}"))


def select_runs(runs_dir: Path, sources: list[str] | None = None, finished_only: bool = False) -> list[Path]:
    """The run folders a command works on: ``sources`` by name (each must have a run), or with
    none every run under ``runs_dir`` (with ``finished_only``, those with a saved epoch; the
    others are logged as skipped). Raises BundleError naming what is missing and what is there."""
    runs_dir = Path(runs_dir)
    trained = list_runs(runs_dir)
    if sources:
        missing = [s for s in sources if s not in trained]
        if missing:
            raise BundleError(
                f"no trained run for {', '.join(missing)} under {runs_dir}; trained: {', '.join(trained) or 'none'}"
            )
        return [runs_dir / s for s in sources]
    if not trained:
        raise BundleError(f"no trained runs under {runs_dir}; run `gi-deploy train` first")
    if not finished_only:
        return [runs_dir / s for s in trained]
    finished = [s for s in trained if read_run_manifest(runs_dir / s, finished=False).best]
    for s in sorted(set(trained) - set(finished)):
        log.warning("skipping %s: its run has no finished epoch yet", s)
    if not finished:
        raise BundleError(f"no finished training run under {runs_dir}; train a source first")
    return [runs_dir / s for s in finished]
