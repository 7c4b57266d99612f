"""``gi-deploy infer``: batch-classify images with one source's bundle, several, or every one, or
let the router pick (``--source auto``, runtime/route.py), through the one job of runtime/job.py.

This module holds the one-model-per-source strategy, which strategy a run takes, and the local
decoders (worker processes, or nvJPEG on the GPU); runtime/ray_infer.py runs the same job on Ray.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np

from gi_deploy.core.bundles import resolve_bundle_dirs
from gi_deploy.core.metrics import softmax
from gi_deploy.errors import ConfigError, DependencyError
from gi_deploy.runtime.decode.cpu import decode_batch, decoded_batches, default_workers
from gi_deploy.runtime.inputs import collect_inputs
from gi_deploy.runtime.job import (
    DECODERS,
    Answer,
    InferConfig,
    InferResult,
    SourceRun,
    Strategy,
    answered,
    plan_job,
    run_job,
)
from gi_deploy.runtime.loader import bundle_identity, open_for

log = logging.getLogger(__name__)

__all__ = ["DECODERS", "InferConfig", "InferResult", "PerSource", "SourceRun", "infer_folder", "open_strategy"]


# A decode worker holds a process image (~150 MB with numpy and Pillow), its batches in flight and
# the pool's queue: budget 512 MB each, so --workers never asks for more memory than the machine has.
WORKER_BYTES = 512 << 20


def capped_workers(workers: int | None) -> int | None:
    """``workers``, or as many as the available memory allows (at least 1), with a warning saying so
    (None, the default decided once the models are loaded, is left to that choice)."""
    if workers is None:
        return None
    try:
        available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):  # not a POSIX system: no cap
        return workers
    cap = max(1, available // WORKER_BYTES, min(workers, os.cpu_count() or 1))
    if workers > cap:
        log.warning(
            "--workers %d: the %.1f GB of free memory allows %d decode workers (%d MB each); using %d",
            workers,
            available / 1e9,
            cap,
            WORKER_BYTES >> 20,
            cap,
        )
        return cap
    return workers


def specs_of(bundles: list) -> tuple:
    """The distinct preprocessing specs of the bundles, in order (each image is decoded once per spec)."""
    return tuple(dict.fromkeys(b.preprocess for b in bundles))


class PerSource(Strategy):
    """Every selected source's model on every image: one row per (image, source)."""

    def __init__(self, bundles: list):
        seen: dict[str, Path] = {}
        for b in bundles:  # rows are keyed by the manifest's source: two folders of one source would mix
            if b.source in seen:
                raise ConfigError(
                    f"{seen[b.source]} and {b.path} are both bundles of source {b.source!r} (a copied "
                    "or renamed folder?); select one of them with --source"
                )
            seen[b.source] = b.path
        self.bundles = {b.source: b for b in bundles}
        self.slots = tuple(self.bundles)
        self.specs = specs_of(bundles)
        self.spec_of = [self.specs.index(b.preprocess) for b in bundles]
        self.classes = list(dict.fromkeys(c for b in bundles for c in b.classes))
        self.columns = ()

    def classify(self, inputs: list[np.ndarray]) -> list[list[Answer]]:
        probs = [softmax(b.predict_logits(inputs[j])) for b, j in zip(self.bundles.values(), self.spec_of)]
        return [[Answer(s, p[i]) for s, p in zip(self.slots, probs)] for i in range(len(probs[0]))]

    def identities(self, precision: str) -> dict[str, dict]:
        return {s: bundle_identity(b, precision) for s, b in self.bundles.items()}


def open_strategy(cfg: InferConfig, load: bool = True) -> Strategy:
    """The strategy ``cfg.sources`` asks for: the router then the routed model (``["auto"]``), or one
    row per selected source. ``load=False`` reads the manifests (and the router) only: a driver that
    leaves the models to its workers. Raises BundleError/ConfigError as the bundles' loaders do."""
    from gi_deploy.runtime.route import Routed, is_auto  # route builds on this module's job

    if is_auto(cfg.sources):
        return Routed.open(cfg, load)
    dirs = resolve_bundle_dirs(cfg.deploy_dir, cfg.sources)
    return PerSource([open_for(cfg, d, load) for d in dirs])


def choose_decoder(decode: str, bundles: list, specs: tuple) -> tuple[str, Callable, Callable | None]:
    """(what ran, the workers' function, the main process's finishing step) for ``decode``. The GPU
    decoder feeds GPU models only (its batches stay on the device). ``auto`` takes it when every
    selected model runs on a GPU that nvJPEG can use and it measured faster than this machine's CPU
    decode workers (runtime/decode/measure.py, cached per machine). Raises ConfigError
    / DependencyError when ``gpu`` is asked for where it cannot run."""
    backends = [getattr(b, "backend", b) for b in bundles]  # bundles, or (in the benchmark) bare backends
    on_gpu = all(b.device == "cuda" and b.run_pixels is not None for b in backends)
    if decode == "cpu" or (decode == "auto" and not on_gpu):
        return "cpu (Pillow" + (", draft" if any(s.decode == "draft" for s in specs) else "") + ")", decode_batch, None
    if not on_gpu:
        raise ConfigError(
            "--decode gpu feeds models that run on the GPU (torch or TensorRT on CUDA); "
            f"{', '.join(b.name + ' on ' + b.detail for b in backends)}: use --decode cpu"
        )
    from gi_deploy.runtime.decode import gpu as gpu_decode  # lazy: the GPU decoder needs torch and torchvision

    ok, why = gpu_decode.nvjpeg_status()
    if not ok:
        if decode == "auto":
            return f"cpu (Pillow; no GPU decoding: {why})", decode_batch, None
        raise DependencyError(f"--decode gpu: {why}; use --decode cpu")
    if decode == "auto":
        from gi_deploy.runtime.decode.measure import gpu_decoding_faster  # lazy: measures with torch

        faster, rates = gpu_decoding_faster(specs)
        if not faster:
            return f"cpu (Pillow; {rates})", decode_batch, None
        why = f"{why}; {rates}"
    return f"gpu ({why})", gpu_decode.read_batch, gpu_decode.GpuDecoder(specs)


def infer_folder(cfg: InferConfig, progress: Callable[[int, int], None] | None = None) -> InferResult:
    """Classify every image of ``cfg.inputs`` (a folder, an image, a glob or a list file) with the
    strategy ``cfg.sources`` asks for (runtime/job.py: one row per image and source, or per image
    routed), decoded once in worker processes while the model runs, written as it goes and scored
    when labels are known. ``cfg.resume`` keeps a killed run's rows. ``progress(done, total)``
    after every batch. Raises DataError with ``cfg.strict`` at the first unreadable file (rows
    before it kept); ConfigError for an output that would touch an input."""
    light = open_strategy(cfg, load=False)  # cheap checks first (bundles, inputs, outputs), then load the models
    job = plan_job(cfg, collect_inputs(cfg.inputs, cfg.labels), light)
    cfg.workers = capped_workers(cfg.workers)
    strategy = job.strategy = open_strategy(cfg)  # then load the models
    models = list(strategy.bundles.values())
    workers = cfg.workers if cfg.workers is not None else default_workers(gpu=any(b.device == "cuda" for b in models))
    decoder, reader, finish = choose_decoder(cfg.decode, models, strategy.specs)
    result = run_job(
        cfg,
        job,
        lambda todo: answered(
            strategy, decoded_batches(todo, strategy.specs, cfg.batch_size, workers, reader=reader, finish=finish)
        ),
        progress,
        extra={"decode_workers": workers, "routing": "auto"}
        if strategy.slots == ("auto",)
        else {"decode_workers": workers},
    )
    decoder += f" ({finish.n_gpu} on the GPU, {finish.n_cpu} on the CPU)" if hasattr(finish, "n_gpu") else ""
    result.decoder, result.workers = decoder, workers
    return result
