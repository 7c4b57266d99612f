"""Decode + resize in worker processes, overlapped with the model, in bounded memory.

The main process runs the model; ``workers`` processes decode the next batches meanwhile. At most
``prefetch`` batches are in flight (decoding or decoded and waiting), so memory stays flat
whatever the number of images (100k frames hold no more pixels than ``prefetch`` batches).
Batches come back in input order. Every image is decoded once, then preprocessed once per
distinct :class:`PreprocessSpec` (several sources' bundles usually share one).

Processes, not threads: Pillow releases the GIL while decoding, but the Python around it and the
numpy normalisation do not, and the model's own threads would wait on it.
"""

from __future__ import annotations

import multiprocessing
import signal
import sys
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from gi_deploy.core.preprocess import PreprocessSpec, load_rgb, to_pixels
from gi_deploy.errors import DataError
from gi_deploy.runtime.backends.base import cpu_threads


@dataclass
class DecodedBatch:
    """``paths`` in input order; ``errors[i]`` the reason path i could not be read (None when
    it could); ``inputs[j]`` the readable ones' pixels under ``specs[j]``: uint8 (n_good, H, W, 3),
    resized but not normalised. Workers send a quarter of the bytes float32 would take; the
    backend normalises where its model runs (runtime/backends/base.py: on the GPU for torch and TensorRT)."""

    paths: list[Path]
    errors: list[str | None]
    inputs: list[np.ndarray]
    # GPU decoding (runtime/decode/gpu.py): makes the consumer's CUDA stream wait for this batch's
    # decode (queued on a side stream); called by decoded_batches just before the batch is handed over
    ready: Callable[[], None] | None = None

    @property
    def n_good(self) -> int:
        return sum(e is None for e in self.errors)


def _decode_once(path: Path, specs: tuple[PreprocessSpec, ...]) -> list[np.ndarray]:
    """One image's pixels under every spec, decoding the file once per decode policy (a full
    decode serves every "full" spec; a draft decode depends on the target size, so once per spec)."""
    full, out = None, []
    for spec in specs:
        if spec.decode == "full":
            full = full if full is not None else load_rgb(path)
            out.append(to_pixels(full, spec))
        else:
            out.append(to_pixels(load_rgb(path, spec), spec))
    return out


def decode_batch(paths: list[Path], specs: tuple[PreprocessSpec, ...]) -> DecodedBatch:
    """Decode and resize ``paths`` (in a worker process, or inline), or encoded images' bytes (what
    ``gi-deploy serve`` receives; core/preprocess.load_rgb). A file that cannot be read becomes an
    error entry naming it and the reason; the others are unaffected."""
    errors: list[str | None] = []
    arrays: list[list[np.ndarray]] = [[] for _ in specs]
    for path in paths:
        try:
            per_spec = _decode_once(path, specs)
        except DataError as e:
            errors.append(str(e))
            continue
        errors.append(None)
        for out, x in zip(arrays, per_spec):
            out.append(x)
    inputs = [np.stack(a) if a else np.zeros((0, *spec.size, 3), np.uint8) for a, spec in zip(arrays, specs)]
    return DecodedBatch(list(paths), errors, inputs)


# Decode workers at most: beyond this the pickling and the main process's collection of batches,
# not decoding, limit the pipeline.
MAX_WORKERS = 32


def default_workers(gpu: bool = False) -> int:
    """Decode processes for this machine. A CPU model needs the cores itself: one worker per core,
    at most 4 (decoding is ~1/20 of a CPU model's time per image). A GPU model leaves the cores to
    decoding: every core this process may use but one (the main process feeds the GPU)."""
    cores = cpu_threads()
    return max(1, min(MAX_WORKERS, cores - 1)) if gpu else min(4, cores)


def _submit(
    pool: ProcessPoolExecutor, chunk: list[Path], specs: tuple[PreprocessSpec, ...], reader: Callable = decode_batch
) -> Future:
    future = pool.submit(reader, chunk, specs)
    future.paths = chunk  # named in the error if the worker dies on it
    return future


def _worker_init() -> None:
    """In each decode worker: leave Ctrl-C to the parent (which shuts the pool down, instead of
    every worker printing its own traceback), and on Linux die with the parent, so a run killed
    with SIGKILL leaves no idle workers behind."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if sys.platform.startswith("linux"):
        import ctypes

        pr_set_pdeathsig = 1
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)


def decoded_batches(
    paths: list[Path],
    specs: tuple[PreprocessSpec, ...],
    batch_size: int,
    workers: int,
    prefetch: int | None = None,
    reader: Callable = decode_batch,
    finish: Callable | None = None,
) -> Iterator[DecodedBatch]:
    """Batches of ``batch_size`` paths, decoded, in order. ``workers=0`` (or a single batch)
    decodes inline; otherwise ``workers`` spawned processes keep up to ``prefetch`` (default
    2 x workers) batches ahead of the consumer. Closing the iterator (an error in the consumer,
    Ctrl-C) cancels what is queued. ``reader`` runs in the workers and ``finish`` on its result
    in this process (runtime/decode/gpu.py: bytes read there, decoded here on the GPU). A ``finish``
    runs one batch ahead: the next batch's GPU decode is queued before this one is handed over, so it
    runs while the model computes on this one (double buffering)."""
    if finish is not None:
        yield from _one_ahead(decoded_batches(paths, specs, batch_size, workers, prefetch, reader), finish)
        return
    chunks = [paths[i : i + batch_size] for i in range(0, len(paths), batch_size)]
    if workers == 0 or len(chunks) <= 1:
        for chunk in chunks:
            yield reader(chunk, specs)
        return
    depth = max(1, prefetch or 2 * workers)
    # spawn, not fork: the parent already runs onnxruntime's thread pool, and forking a threaded
    # process can deadlock the child
    ctx = multiprocessing.get_context("spawn")
    pool = ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=_worker_init)
    try:
        pending: deque[Future] = deque()
        todo = iter(chunks)
        for chunk in todo:
            pending.append(_submit(pool, chunk, specs, reader))
            if len(pending) >= depth:
                break
        while pending:
            future = pending.popleft()
            try:
                batch = future.result()
            except BrokenProcessPool as e:  # a worker died (out of memory, a crash in a native decoder)
                first, last = future.paths[0], future.paths[-1]
                raise DataError(
                    f"a decode worker died on the batch {first} ... {last} ({e}); rerun with --workers 0 "
                    "--resume to find the file that kills the decoder"
                ) from e
            nxt = next(todo, None)
            if nxt is not None:
                pending.append(_submit(pool, nxt, specs, reader))
            yield batch
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _one_ahead(raw: Iterator, finish: Callable) -> Iterator[DecodedBatch]:
    """``finish`` each of ``raw``'s batches one ahead of the consumer; each batch's ``ready`` is called
    as it is handed over (so the model's stream waits for that batch's decode only)."""
    held = None
    try:
        for batch in raw:
            done = finish(batch)
            if held is not None:
                yield _handed(held)
            held = done
        if held is not None:
            yield _handed(held)
    finally:
        raw.close()


def _handed(batch: DecodedBatch) -> DecodedBatch:
    if batch.ready is not None:
        batch.ready()
    return batch
