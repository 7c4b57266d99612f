"""A video's frames as the job's decoded batches: the frames still to classify decoded in order
(triage/video.py), each preprocessed under every spec with the same function files go through
(core/preprocess.py ``to_pixels``), in a background thread a few batches ahead of the model, so
memory stays flat whatever the length of the study."""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from gi_deploy.core.preprocess import PreprocessSpec, to_pixels
from gi_deploy.runtime.decode.cpu import DecodedBatch
from gi_deploy.triage.inputs import StudyInputs

PREFETCH = 3  # batches decoded ahead: enough to hide decoding behind the model, few enough to stay small


def _batches(
    inputs: StudyInputs, todo: list[Path], specs: tuple[PreprocessSpec, ...], batch_size: int
) -> Iterator[DecodedBatch]:
    from gi_deploy.triage.video import decode_frames  # PyAV: the video extra

    pos = inputs._pos
    wanted = np.array([inputs.frames[pos[p]] for p in todo], np.int64)
    by_frame = {int(f): p for f, p in zip(wanted, todo)}
    items, errors, arrays = [], [], [[] for _ in specs]
    for number, image, error in decode_frames(inputs.video, wanted):
        items.append(by_frame[number])
        errors.append(error)
        if image is not None:
            for out, spec in zip(arrays, specs):
                out.append(to_pixels(image, spec))
        if len(items) == batch_size:
            yield _batch(items, errors, arrays, specs)
            items, errors, arrays = [], [], [[] for _ in specs]
    if items:
        yield _batch(items, errors, arrays, specs)


def _batch(items, errors, arrays, specs) -> DecodedBatch:
    inputs = [np.stack(a) if a else np.zeros((0, *spec.size, 3), np.uint8) for a, spec in zip(arrays, specs)]
    return DecodedBatch(list(items), list(errors), inputs)


def video_batches(
    inputs: StudyInputs, todo: list[Path], specs: tuple[PreprocessSpec, ...], batch_size: int, prefetch: int = PREFETCH
) -> Iterator[DecodedBatch]:
    """DecodedBatch-es of ``todo`` (items of ``inputs``, in order), decoded in a thread at most
    ``prefetch`` batches ahead (FFmpeg and Pillow's resize release the GIL). An error in the
    thread is raised here; closing the iterator stops the thread."""
    q: queue.Queue = queue.Queue(maxsize=max(1, prefetch))
    stop = threading.Event()
    done = object()

    def work() -> None:
        try:
            for b in _batches(inputs, todo, specs, batch_size):
                while not stop.is_set():
                    try:
                        q.put(b, timeout=0.2)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            q.put(done)
        except BaseException as e:  # noqa: BLE001 (handed to the consumer thread, which raises it)
            q.put(e)

    thread = threading.Thread(target=work, name="triage-video-decode", daemon=True)
    thread.start()
    try:
        while True:
            b = q.get()
            if b is done:
                return
            if isinstance(b, BaseException):
                raise b
            yield b
    finally:
        stop.set()
        while thread.is_alive():  # unblock a put waiting on a full queue
            try:
                q.get_nowait()
            except queue.Empty:
                pass
            thread.join(timeout=0.1)
