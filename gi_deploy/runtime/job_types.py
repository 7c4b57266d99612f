"""What the one job (runtime/job.py) is made of, shared by every mode: its config
(:class:`InferConfig`), a strategy's answers (:class:`Answer`, :class:`Answered`) and the contract
of a strategy (:class:`Strategy`: one model per source, or the router then the routed model), the
CSV's columns and what a run returns (:class:`InferResult`). Torch-free."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from gi_deploy.core.fields import helped
from gi_deploy.core.preprocess import PreprocessSpec
from gi_deploy.errors import ConfigError
from gi_deploy.runtime.evaluate import PROB_PREFIX

BASE_COLUMNS = ("path", "source", "true_label", "predicted", "confidence")
DECODERS = ("auto", "cpu", "gpu")


@dataclass
class InferConfig:
    inputs: str | Path = helped(
        help="A folder (searched recursively), an image, a glob ('scans/**/*.jpg') or a .txt/.csv list of paths."
    )
    deploy_dir: Path = helped(Path("deploy"), "Bundles folder.")
    sources: list[str] | None = helped(
        None,
        "Bundle(s) to run, repeatable, or 'all'; each image gets one row per "
        "source (none: the only bundle). 'auto': the router picks each "
        "image's source, and refuses what no model was trained for.",
    )
    out_csv: Path = helped(Path("predictions.csv"), "Predictions CSV.")
    batch_size: int = helped(32, "Images per model call.")
    backend: str = helped(
        "auto",
        "auto: the fastest available (a TensorRT engine, onnxruntime on a GPU provider, torch "
        "on CUDA; on a CPU onnxruntime or OpenVINO, whichever measured faster here); "
        "onnxruntime | openvino | tensorrt; torch: the merged model rebuilt from its "
        "training run.",
    )
    precision: str = helped(
        "fp32",
        "fp32 | fp16 | int8 (the bundle's model files) | bf16 (OpenVINO on a CPU with native bf16, or torch on CUDA).",
    )
    device: str = helped("auto", "auto: TensorRT -> CUDA -> CPU, whichever is installed.")
    workers: int | None = helped(
        None,
        "Decoding processes (0: decode in the main process; none: one per core up to 4 "
        "for a CPU model, every core but one for a GPU model).",
    )
    compile: bool | None = helped(None, "torch.compile the torch backend (none: on CUDA).")
    decode: str = helped(
        "auto",
        "auto (gpu when every model runs on a GPU that can decode JPEGs and the GPU decoder "
        "measured faster than this machine's CPU workers, else cpu) | cpu (Pillow in the "
        "worker processes) | gpu (nvJPEG, batched; other files fall back to the CPU decoder "
        "one by one).",
    )
    threads: int | None = helped(None, "The model's CPU threads (none: every core this process may use).")
    labels: Path | None = helped(None, "CSV of (path, label): the true class of each image.")
    top_k: int = helped(3, "Classes and probabilities per row.")
    resume: bool = helped(False, "Keep the rows already in --out (a killed run's) and classify only the rest.")
    strict: bool = helped(False, "Stop at the first unreadable file instead of writing an error row for it.")
    n_wrong: int = helped(20, "Most confidently wrong images listed in the metrics.")
    explain_wrong: int = helped(
        0,
        "Write Grad-CAM heatmaps of the N most confidently wrong images (needs the "
        "training extra and the bundle's run).",
    )
    parquet_dir: Path | None = helped(
        None,
        "Also write the predictions as predictions.parquet in this folder, "
        "replaced at the end of the run (nothing else in the folder is "
        "touched).",
    )
    score: bool = True  # False: no labels read, checked or scored (evaluate --cross maps them itself)

    def __post_init__(self) -> None:
        self.deploy_dir, self.out_csv = Path(self.deploy_dir), Path(self.out_csv)
        self.parquet_dir = None if self.parquet_dir is None else Path(self.parquet_dir)
        if isinstance(self.sources, str):
            self.sources = [self.sources]
        if self.batch_size < 1 or self.top_k < 1:
            raise ConfigError(f"batch_size and top_k must be >= 1, got {self.batch_size} and {self.top_k}")
        if self.decode not in DECODERS:
            raise ConfigError(f"decode {self.decode!r} unknown; use one of {', '.join(DECODERS)}")
        if self.workers is not None and self.workers < 0:
            raise ConfigError(f"workers must be >= 0 (0 decodes in the main process), got {self.workers}")
        if self.threads is not None and self.threads < 1:
            raise ConfigError(
                f"threads must be >= 1 (or left out: every core this process may use), got {self.threads}"
            )
        if self.explain_wrong < 0:
            raise ConfigError(f"explain_wrong is a number of images (0: none), got {self.explain_wrong}")


@dataclass
class Answer:
    """One row's worth of a model's answer for one image."""

    source: str  # the model that answered (for --source auto: the routed source)
    probs: np.ndarray | None  # (C,) probabilities in that source's class order; None when refused
    extra: dict[str, str] = field(default_factory=dict)  # the strategy's own columns, by name
    rejected: bool = False
    reason: str = ""


class Strategy:
    """How a batch of decoded images becomes answers. ``slots``: the rows each image gets (each
    source's name, or ``("auto",)`` when the router picks one); ``specs``: the preprocessing every
    image is decoded under; ``classes``: every model's classes, first-appearance order (the
    ``prob:`` columns); ``columns``: the strategy's own CSV columns (after ``error``); ``bundles``:
    by source, loaded models (or, on a Ray driver, their manifests only)."""

    slots: tuple[str, ...]
    specs: tuple[PreprocessSpec, ...]
    classes: list[str]
    columns: tuple[str, ...] = ()
    bundles: dict

    def classify(self, inputs: list[np.ndarray]) -> list[list[Answer]]:
        """``inputs[j]``: the readable images' uint8 pixels (N, H, W, 3) under ``specs[j]``. Returns,
        per image, one Answer per slot, in slot order."""
        raise NotImplementedError

    def slot_of(self, source_column: str) -> str:
        """The slot a CSV row belongs to, from its ``source`` column (resume keys rows by it)."""
        return source_column

    def identities(self, precision: str) -> dict[str, dict]:
        """Per source (and per extra part, such as the router), what makes its rows one model's:
        written to the CSV's sidecar before the first row, compared on ``--resume``."""
        raise NotImplementedError

    def backends(self) -> dict[str, tuple[str, list[str]]]:
        """Per source: what its model runs on, and the notes the user must hear."""
        return {s: (b.provider, list(b.backend.notes)) for s, b in self.bundles.items()}

    def classes_of(self, source: str) -> list[str]:
        return list(self.bundles[source].classes)


@dataclass
class Answered:
    """One batch back from the classifier: ``items`` in input order, ``errors[i]`` why item i could
    not be read (None when it could), ``answers`` per readable item, one Answer per slot."""

    items: list
    errors: list[str | None]
    answers: list[list[Answer]]

    @property
    def n_good(self) -> int:
        return sum(e is None for e in self.errors)


def answered(strategy: Strategy, batches: Iterable) -> Iterator[Answered]:
    """Decoded batches (``paths``, ``errors``, ``inputs`` as runtime/decode/cpu.py's DecodedBatch)
    answered by ``strategy`` in this process."""
    for b in batches:
        yield Answered(list(b.paths), list(b.errors), strategy.classify(b.inputs) if b.n_good else [])


@dataclass
class SourceRun:
    """One source's share of a run: what its model ran on and how its rows scored."""

    source: str
    backend: str  # what the model really ran on ("onnxruntime 1.22 CPUExecutionProvider (2 threads)")
    notes: list[str]
    n_rows: int
    n_errors: int
    n_unlabelled: int
    metrics: dict | None
    files: dict[str, Path]  # metrics.json and the report files, when labelled
    n_rejected: int = 0  # rows refused as out of distribution (--source auto)

    @property
    def metrics_path(self) -> Path | None:
        return self.files.get("metrics")


@dataclass
class InferResult:
    csv_path: Path
    root: Path  # CSV paths are relative to this folder
    n_images: int  # images in the input
    n_errors: int  # of them unreadable (error rows)
    n_resumed: int  # rows that were already in the CSV (--resume)
    n_classified: int  # images this run decoded and classified (unreadable ones not counted)
    seconds: float  # this run's classification wall time, decode workers' start-up included
    sources: dict[str, SourceRun]
    decoder: str = ""  # which decoder ran, and how many images each decoded
    workers: int = 0
    n_duplicates: int = 0  # inputs listed more than once (classified once)
    parquet: Path | None = None

    @property
    def images_per_second(self) -> float:
        return self.n_classified / self.seconds if self.seconds > 0 else 0.0

    @property
    def n_rejected(self) -> int:
        return sum(r.n_rejected for r in self.sources.values())


def csv_columns(
    top_k: int, classes: list[str], extra: tuple[str, ...] = (), item: tuple[str, ...] = ()
) -> tuple[str, ...]:
    """The predictions CSV header: path, source, label, prediction, confidence, top-k, error, the
    input's own columns (``item``: a video frame's index and time), the strategy's (``extra``),
    then one probability column per class of every selected model."""
    top = tuple(f"top{i}_{what}" for i in range(1, top_k + 1) for what in ("class", "prob"))
    return (*BASE_COLUMNS, *top, "error", *item, *extra, *(PROB_PREFIX + c for c in classes))


def true_label(rel: Path, classes: list[str]) -> str | None:
    """The class named by the first folder of ``rel`` (relative to the scored folder), if any."""
    return rel.parts[0] if len(rel.parts) > 1 and rel.parts[0] in classes else None
