"""Decode + resize + normalise in worker processes, overlapped with the model, in bounded memory.

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
from collections.abc import Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from gi_deploy.core.preprocess import PreprocessSpec, load_rgb, to_input
from gi_deploy.errors import DataError
from gi_deploy.runtime.base import cpu_threads


@dataclass
class DecodedBatch:
    """``paths`` in input order; ``errors[i]`` the reason path i could not be read (None when
    it could); ``inputs[j]`` float32 (n_good, 3, H, W) of the readable ones under ``specs[j]``."""

    paths: list[Path]
    errors: list[str | None]
    inputs: list[np.ndarray]

    @property
    def n_good(self) -> int:
        return sum(e is None for e in self.errors)


def decode_batch(paths: list[Path], specs: tuple[PreprocessSpec, ...]) -> DecodedBatch:
    """Decode and preprocess ``paths`` (in a worker process, or inline). A file that cannot be
    read becomes an error entry naming it and the reason; the others are unaffected."""
    errors: list[str | None] = []
    arrays: list[list[np.ndarray]] = [[] for _ in specs]
    for path in paths:
        try:
            rgb = load_rgb(path)
            per_spec = [to_input(rgb, spec) for spec in specs]
        except DataError as e:
            errors.append(str(e))
            continue
        errors.append(None)
        for out, x in zip(arrays, per_spec):
            out.append(x)
    inputs = [np.stack(a) if a else np.zeros((0, 3, *spec.size), np.float32) for a, spec in zip(arrays, specs)]
    return DecodedBatch(list(paths), errors, inputs)


def default_workers() -> int:
    """Decode processes for this machine: one per core, at most 4 (the model needs the rest)."""
    return min(4, cpu_threads())


def _submit(pool: ProcessPoolExecutor, chunk: list[Path], specs: tuple[PreprocessSpec, ...]) -> Future:
    future = pool.submit(decode_batch, chunk, specs)
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


def decoded_batches(paths: list[Path], specs: tuple[PreprocessSpec, ...], batch_size: int, workers: int,
                    prefetch: int | None = None) -> Iterator[DecodedBatch]:
    """Batches of ``batch_size`` paths, decoded, in order. ``workers=0`` (or a single batch)
    decodes inline; otherwise ``workers`` spawned processes keep up to ``prefetch`` (default
    2 x workers) batches ahead of the consumer. Closing the iterator (an error in the consumer,
    Ctrl-C) cancels what is queued."""
    chunks = [paths[i:i + batch_size] for i in range(0, len(paths), batch_size)]
    if workers == 0 or len(chunks) <= 1:
        for chunk in chunks:
            yield decode_batch(chunk, specs)
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
            pending.append(_submit(pool, chunk, specs))
            if len(pending) >= depth:
                break
        while pending:
            future = pending.popleft()
            try:
                batch = future.result()
            except BrokenProcessPool as e:  # a worker died (out of memory, a crash in a native decoder)
                first, last = future.paths[0], future.paths[-1]
                raise DataError(f"a decode worker died on the batch {first} ... {last} ({e}); rerun with --workers 0 "
                                "--resume to find the file that kills the decoder") from e
            nxt = next(todo, None)
            if nxt is not None:
                pending.append(_submit(pool, nxt, specs))
            yield batch
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
