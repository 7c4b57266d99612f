"""``gi-deploy benchmark``: every way this machine can run a bundle, side by side in one run.

Rows: PyTorch eager (the merged model rebuilt from the bundle's training run), onnxruntime fp32,
fp16 and int8 (the bundle's files), OpenVINO fp32, bf16 and int8 (where the [openvino] extra is
installed; each gated against the fp32 ONNX as it loads), and the TensorRT engine when there is one
for this GPU; a row that cannot run here says why. Columns, all measured on the same images and batch size:

* end to end: images/s of the runtime's pipeline (decode + resize + normalise in worker
  processes, overlapped with the model), timed from the first decoded batch on, so the workers'
  start-up is not counted (it is paid once per run, not per image);
* model only: images/s on already decoded batches;
* latency p50 / p95 at batch 1 (model only, one image at a time);
* ratios of both throughputs against PyTorch eager, and the model file's size.

Machines are noisy: read ratios measured in one run, not absolute numbers across runs.
"""

from __future__ import annotations

import platform
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from gi_deploy.core.bundles import read_bundle_manifest, resolve_bundle_dir
from gi_deploy.core.fields import helped
from gi_deploy.core.preprocess import PreprocessSpec, list_images
from gi_deploy.errors import ConfigError, DataError, GiDeployError
from gi_deploy.runtime.backends import open_backend
from gi_deploy.runtime.backends.base import Backend, cpu_threads
from gi_deploy.runtime.decode.cpu import decode_batch, decoded_batches, default_workers
from gi_deploy.runtime.infer import choose_decoder

# (row name, backend, precision, torch.compile); the first row is the baseline every ratio is against
CANDIDATES = (
    ("PyTorch eager", "torch", "fp32", False),
    ("onnxruntime fp32", "onnxruntime", "fp32", None),
    ("onnxruntime fp16", "onnxruntime", "fp16", None),
    ("onnxruntime int8", "onnxruntime", "int8", None),
    ("OpenVINO fp32", "openvino", "fp32", None),
    ("OpenVINO bf16", "openvino", "bf16", None),
    ("OpenVINO int8", "openvino", "int8", None),
    ("TensorRT fp16", "tensorrt", "fp16", None),
)
OPENVINO_ROWS = ("OpenVINO fp32", "OpenVINO bf16", "OpenVINO int8")
INT8_ROWS = ("onnxruntime int8", "OpenVINO int8")
GPU_CANDIDATES = (
    ("PyTorch eager fp16", "torch", "fp16", False),
    ("PyTorch compiled fp16", "torch", "fp16", True),
    ("auto fp16", "auto", "fp16", None),
)


@dataclass
class BenchmarkConfig:
    deploy_dir: Path = helped(Path("deploy"), "Bundles folder.")
    source: str | None = helped(None, "Bundle to measure (none: the only one).")
    images: Path | None = helped(None, "Folder of images (none: synthetic 720x576 JPEG frames).")
    n_images: int = helped(256, "Images per throughput run (the folder is cycled).")
    batch_size: int = helped(32, "Images per model call.")
    latency_runs: int = helped(50, "Batch-1 calls timed for p50/p95.")
    workers: int | None = helped(
        None, "Decoding processes (none: one per core up to 4 for a CPU model, every core but one for a GPU model)."
    )
    threads: int | None = helped(None, "The model's CPU threads (none: every core).")
    device: str = helped("auto", "auto | cpu | cuda.")
    rows: list[str] = helped(default_factory=list, help="Measure only these rows (by name; none: every row).")
    decode: str = helped(
        "cpu",
        "The end-to-end column's decoder: cpu (Pillow in worker processes) | gpu (nvJPEG, "
        "for models on the GPU) | auto (as infer chooses).",
    )

    def __post_init__(self) -> None:
        self.deploy_dir = Path(self.deploy_dir)
        if self.batch_size < 1 or (self.workers or 0) < 0 or (self.threads is not None and self.threads < 1):
            raise ConfigError(
                f"batch_size must be >= 1, workers >= 0 and threads >= 1; got {self.batch_size}, "
                f"{self.workers} and {self.threads}"
            )
        if self.n_images < 2 * self.batch_size:
            raise ConfigError(
                f"--n-images {self.n_images} must be at least twice --batch-size {self.batch_size}: "
                "the first batch warms up and is not timed"
            )
        if self.latency_runs < 5:
            raise ConfigError(f"latency runs must be >= 5 for a p95, got {self.latency_runs}")


@dataclass
class BenchRow:
    name: str
    status: str  # "ok", or why the row could not run here
    detail: str = ""
    end_to_end: float | None = None  # images/s
    model_only: float | None = None  # images/s
    p50_ms: float | None = None
    p95_ms: float | None = None
    model_bytes: int | None = None
    e2e_vs_eager: float | None = None
    model_vs_eager: float | None = None
    thumb_ms: float | None = None  # router row: the decoder's extra 32x32 thumbnail, ms per image


@dataclass
class BenchmarkResult:
    source: str
    model: str
    input_size: tuple[int, int]
    n_images: int
    batch_size: int
    workers: int | str  # "auto": one per core up to 4 for a CPU row, every core but one for a GPU row
    machine: str
    rows: list[BenchRow]

    def row(self, name: str) -> BenchRow:
        return next(r for r in self.rows if r.name == name)


def synthetic_frames(folder: Path, n: int = 32, size: tuple[int, int] = (720, 576), seed: int = 0) -> list[Path]:
    """``n`` JPEG frames of an endoscope's typical size: smooth colour fields with noise, so the
    decoder does the work a real frame costs (a flat image would decode unrealistically fast)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    w, h = size
    for i in range(n):
        coarse = rng.integers(0, 255, (h // 48 + 1, w // 48 + 1, 3), dtype=np.uint8)
        base = np.asarray(Image.fromarray(coarse).resize((w, h), Image.Resampling.BICUBIC), np.int16)
        img = np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)
        paths.append(folder / f"frame_{i:04d}.jpg")
        Image.fromarray(img).save(paths[-1], quality=90)
    return paths


def _model_only(b: Backend, x: np.ndarray, batch: int) -> float:
    b.predict_logits(x[:batch])  # warm-up: first-run allocations and kernel selection
    t = time.perf_counter()
    for i in range(0, len(x), batch):
        b.predict_logits(x[i : i + batch])
    return len(x) / (time.perf_counter() - t)


def _latency(b: Backend, x: np.ndarray, runs: int) -> tuple[float, float]:
    b.predict_logits(x[:1])
    times = []
    for i in range(runs):
        t = time.perf_counter()
        b.predict_logits(x[i % len(x) : i % len(x) + 1])
        times.append(time.perf_counter() - t)
    p50, p95 = np.percentile(np.asarray(times) * 1000, [50, 95])
    return float(p50), float(p95)


def _end_to_end(
    b: Backend, paths: list[Path], spec: PreprocessSpec, batch: int, workers: int | None, decode: str = "cpu"
) -> float:
    """The runtime's pipeline (runtime/decode/cpu.py) feeding this backend, timed from the first
    batch's arrival: images after it / seconds after it. ``decode`` as infer's (runtime/infer.py)."""
    t0, n = None, 0
    workers = workers if workers is not None else default_workers(gpu=b.device == "cuda")
    _, reader, finish = choose_decoder(decode, [b], (spec,))
    for decoded in decoded_batches(paths, (spec,), batch, workers, reader=reader, finish=finish):
        b.predict_logits(decoded.inputs[0])
        if t0 is None:
            t0 = time.perf_counter()
        else:
            n += len(decoded.paths)
    return n / (time.perf_counter() - t0)


def _candidates(device: str) -> tuple:
    try:
        import torch  # noqa: F401  (only to ask whether a GPU row makes sense)

        gpu = device != "cpu" and torch.cuda.is_available()
    except ImportError:
        gpu = False
    return CANDIDATES + (GPU_CANDIDATES if gpu else ())


def run_benchmark(cfg: BenchmarkConfig, say=lambda _msg: None) -> BenchmarkResult:
    """Measure every candidate backend on one bundle (see the module docstring). Raises
    BundleError/ConfigError for a bad bundle or options, DataError for an empty image folder;
    a backend that cannot run here becomes a row saying why, never an error."""
    bundle_dir = resolve_bundle_dir(cfg.deploy_dir, cfg.source)
    manifest = read_bundle_manifest(bundle_dir)
    spec = manifest.preprocess
    with tempfile.TemporaryDirectory(prefix="gi-deploy-bench-") as tmp:
        if cfg.images is None:
            found = synthetic_frames(Path(tmp))
        else:
            found = list_images(Path(cfg.images))
            if not found:
                raise DataError(f"no images in {cfg.images}")
        found = found[: cfg.n_images]  # a big folder: only the images measured are decoded (and held in memory)
        paths = [found[i % len(found)] for i in range(cfg.n_images)]
        decoded = decode_batch(found, (spec,))
        if decoded.n_good == 0:
            raise DataError(f"none of the {len(found)} images in {cfg.images} could be read: {decoded.errors[0]}")
        x = decoded.inputs[0][np.arange(cfg.n_images) % decoded.n_good]  # the same images, pre-decoded
        rows = []
        for name, backend, precision, compile in _candidates(cfg.device):
            if cfg.rows and name not in cfg.rows:
                continue
            say(f"{name}...")
            try:
                b = open_backend(
                    bundle_dir,
                    manifest,
                    backend,
                    precision,
                    cfg.device,
                    cfg.threads,
                    compile=compile,
                    batch_size=cfg.batch_size,
                )
            except (GiDeployError, ImportError) as e:  # not on this machine or not in this bundle: say why
                rows.append(BenchRow(name, f"skipped: {e}"))
                continue
            model = _model_only(b, x, cfg.batch_size)
            p50, p95 = _latency(b, x, cfg.latency_runs)
            try:
                e2e = _end_to_end(b, paths, spec, cfg.batch_size, cfg.workers, cfg.decode)
            except GiDeployError as e:  # e.g. --decode gpu for a row that runs on the CPU
                rows.append(BenchRow(name, f"skipped: {e}"))
                continue
            rows.append(BenchRow(name, "ok", "; ".join([b.detail, *b.notes]), e2e, model, p50, p95, b.model_bytes))
            del b
        rows += _router_rows(cfg, found, paths)
    eager = next((r for r in rows if r.status == "ok"), None)  # the first row that ran: CPU eager, or the
    # first GPU row when --rows leaves it out
    if eager is not None:
        for r in rows:
            if r.status == "ok":
                r.e2e_vs_eager, r.model_vs_eager = r.end_to_end / eager.end_to_end, r.model_only / eager.model_only
    return BenchmarkResult(
        manifest.source,
        manifest.model.name,
        spec.size,
        cfg.n_images,
        cfg.batch_size,
        cfg.workers if cfg.workers is not None else "auto",
        f"{platform.processor() or platform.machine()}, {cpu_threads()} cores",
        rows,
    )


ROUTER_ROW = "router (--source auto)"


def _router_rows(cfg: BenchmarkConfig, found: list[Path], paths: list[Path]) -> list[BenchRow]:
    """The source router's row when the deploy folder has one: its features and classifier on
    ready thumbnails (model only, latency), the pipeline feeding it (end to end), and the cost of
    the extra thumbnail the decoder makes per image (``thumb_ms``: resize of the decoded frame)."""
    from gi_deploy.core.preprocess import load_rgb, to_input
    from gi_deploy.core.router import ROUTER_SPEC, load_router, router_dir, router_features

    if not router_dir(cfg.deploy_dir).is_dir():
        return []
    try:
        router = load_router(cfg.deploy_dir)
    except GiDeployError as e:
        return [BenchRow(ROUTER_ROW, f"skipped: {e}")]
    b = Backend(
        "router",
        "fp32",
        f"numpy {np.__version__}, {len(router.sources)} sources",
        lambda t: router.probabilities_of_features(router_features(t)),
        model_bytes=router.path.joinpath("router.npz").stat().st_size,
        spec=ROUTER_SPEC,
    )
    rgb = [load_rgb(p) for p in found[:32]]
    t = time.perf_counter()
    thumbs = np.stack([to_input(img, ROUTER_SPEC) for img in rgb])
    thumb_ms = (time.perf_counter() - t) * 1000 / len(rgb)
    x = thumbs[np.arange(cfg.n_images) % len(thumbs)]
    model = _model_only(b, x, cfg.batch_size)
    p50, p95 = _latency(b, x, cfg.latency_runs)
    e2e = _end_to_end(b, paths, ROUTER_SPEC, cfg.batch_size, cfg.workers)
    return [BenchRow(ROUTER_ROW, "ok", b.detail, e2e, model, p50, p95, b.model_bytes, thumb_ms=thumb_ms)]


ROUTER_MAX_COST = 0.15  # the goal: routing costs at most 15% of one source model's inference


def router_cost(result: BenchmarkResult, base: str = "onnxruntime fp32") -> float | None:
    """The router's cost per image (thumbnail + features + classifier) over one model's
    model-only cost per image on ``base``; None when either row is missing."""
    rows = {r.name: r for r in result.rows if r.status == "ok"}
    router, ort = rows.get(ROUTER_ROW), rows.get(base)
    if router is None or ort is None:
        return None
    return (1.0 / router.model_only + router.thumb_ms / 1000) / (1.0 / ort.model_only)


def goals(result: BenchmarkResult, base: str = "onnxruntime fp32") -> list[tuple[str, float | None, float]]:
    """The issue's CPU goals as (what, measured ratio or None when a row is missing, target)."""
    rows = {r.name: r for r in result.rows if r.status == "ok"}
    ort, eager = rows.get(base), rows.get(CANDIDATES[0][0])
    # the CPU engine goals take the best row of each kind: the engine (and precision) auto would pick
    int8 = max((rows[n] for n in INT8_ROWS if n in rows), key=lambda r: r.model_only, default=None)
    ov = max((rows[n] for n in OPENVINO_ROWS if n in rows), key=lambda r: r.end_to_end, default=None)
    eager16, compiled16, auto = (rows.get(n) for n in ("PyTorch eager fp16", "PyTorch compiled fp16", "auto fp16"))
    fastest = max((r for r in rows.values() if r.name != "auto fp16"), key=lambda r: r.model_only, default=None)
    gpu = (
        []
        if compiled16 is None and eager16 is None
        else [
            (
                "GPU: end-to-end vs model-only, compiled torch fp16",
                compiled16.end_to_end / compiled16.model_only if compiled16 else None,
                0.8,
            ),
            (
                "GPU: compiled vs eager torch fp16 model-only",
                compiled16.model_only / eager16.model_only if compiled16 and eager16 else None,
                1.8,
            ),
            (
                "GPU: auto's model-only vs the fastest row's",
                auto.model_only / fastest.model_only if auto and fastest else None,
                0.9,
            ),
        ]
    )
    return gpu + [
        (
            "end-to-end infer vs PyTorch eager end-to-end",
            ort.end_to_end / eager.end_to_end if ort and eager else None,
            1.5,
        ),
        ("end-to-end infer vs onnxruntime model-only", ort.end_to_end / ort.model_only if ort else None, 0.9),
        ("best int8 vs fp32 model-only", int8.model_only / ort.model_only if int8 and ort else None, 2.0),
        (
            "best OpenVINO end-to-end vs onnxruntime fp32 end-to-end",
            ov.end_to_end / ort.end_to_end if ov and ort else None,
            1.7,
        ),
    ]
