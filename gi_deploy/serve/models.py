"""What each served model is: its tensors, its parameters (classes, preprocessing) and the callable
that turns a dynamic batch of requests into answers, with the runtime's own decoding (core/preprocess
via runtime/decode/cpu.decode_batch) and classification (the job pipeline's strategies). numpy only:
no PyTriton import here, so this runs and is tested in-process without a server (serve/server.py binds
it to Triton).

Per source, model ``<source>``: input ``image`` (BYTES (1,): the encoded file as the client has it,
JPEG, PNG, ...) or ``input`` (FP32 (3, H, W): the bundle's normalised input, for clients that resize
themselves); outputs ``probabilities`` (FP32 (C,), the bundle's class order), ``label`` (BYTES (1,)),
``confidence`` (FP32 (1,)). Model ``auto`` (a deploy folder with a router): input ``image``; outputs
``probabilities`` over every class of every routed model (``classes`` parameter; 0 for the classes the
routed model lacks, all 0 when refused), ``label`` ("" when refused), ``confidence``, ``source``,
``router_confidence``, ``id_score`` and ``id_threshold`` (-1: the model has no in-distribution
statistics), ``rejected`` (BOOL) and ``reason``.
"""

from __future__ import annotations

import base64
import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from gi_deploy.core.bundles import resolve_bundle_dirs
from gi_deploy.core.router import router_dir
from gi_deploy.errors import ConfigError, DataError
from gi_deploy.runtime.decode.cpu import decode_batch
from gi_deploy.runtime.infer import open_strategy
from gi_deploy.runtime.job import Answer, InferConfig

IMAGE, INPUT = "image", "input"
AUTO = "auto"
# An endoscopy frame is at most ~2 MP (1920x1072): 6.2 MB as raw RGB, less as PNG or JPEG. A body over
# this is no frame (or an attack): refused before Pillow sees it (serve --max-image-mb).
MAX_IMAGE_BYTES = 16 << 20
NO_SCORE = -1.0  # id_score / id_threshold of a model without in-distribution statistics


@dataclass(frozen=True)
class TensorDef:
    """One input or output: its name, numpy dtype (``np.object_`` for BYTES) and per-item shape
    (the batch dimension is Triton's)."""

    name: str
    dtype: type
    shape: tuple[int, ...]
    optional: bool = False


def _outputs(n_classes: int, routed: bool) -> tuple[TensorDef, ...]:
    out = (
        TensorDef("probabilities", np.float32, (n_classes,)),
        TensorDef("label", np.object_, (1,)),
        TensorDef("confidence", np.float32, (1,)),
    )
    if routed:
        out += (
            TensorDef("source", np.object_, (1,)),
            TensorDef("router_confidence", np.float32, (1,)),
            TensorDef("id_score", np.float32, (1,)),
            TensorDef("id_threshold", np.float32, (1,)),
            TensorDef("rejected", np.bool_, (1,)),
            TensorDef("reason", np.object_, (1,)),
        )
    return out


class ServedModel:
    """One Triton model instance: ``model(requests)`` takes the dynamic batcher's requests (each a
    mapping of input name -> array with a leading batch dimension) and returns one dict of outputs per
    request, in order. Every readable image of the execution goes through one model call.

    A request that cannot be answered (no input, both inputs, an empty batch, an image over
    ``max_image_bytes``, bytes Pillow cannot decode) raises DataError naming the request and the reason;
    PyTriton 0.7 turns an exception into an error response for every request of that execution (its
    callables cannot fail one request alone), and the server keeps serving."""

    def __init__(self, name: str, strategy, max_image_bytes: int = MAX_IMAGE_BYTES):
        self.name, self.strategy, self.max_image_bytes = name, strategy, max_image_bytes
        self.routed = tuple(strategy.slots) == (AUTO,)
        if not self.routed and len(strategy.slots) != 1:
            raise ConfigError(f"a served model answers for one source or for auto, got {strategy.slots}")
        self.classes = list(strategy.classes)
        if self.routed:
            self.inputs = (TensorDef(IMAGE, np.object_, (1,)),)
        else:
            b = strategy.bundles[strategy.slots[0]]
            h, w = b.preprocess.size
            self.inputs = (
                TensorDef(IMAGE, np.object_, (1,), optional=True),
                TensorDef(INPUT, np.float32, (3, h, w), optional=True),
            )
        self.outputs = _outputs(len(self.classes), self.routed)

    @property
    def parameters(self) -> dict[str, str]:
        """What a client needs to read the answers, as Triton model-config parameters (strings): the
        class order, each model's preprocessing (for ``input``), the bundles' export keys."""
        bundles = self.strategy.bundles
        return {
            "classes": json.dumps(self.classes),
            "preprocess": json.dumps({s: b.preprocess.to_dict() for s, b in bundles.items()}),
            # which export answers (never the server's paths: the config endpoint is open to every client)
            "bundles": json.dumps({s: {"export_key": b.manifest.export_key} for s, b in bundles.items()}),
            "backends": json.dumps({s: v[0] for s, v in self.strategy.backends().items()}),
        }

    def __call__(self, requests) -> list[dict[str, np.ndarray]]:
        images, floats, kinds = [], [], []
        for i, request in enumerate(requests):
            kind, items = self._read(i, request)
            kinds.append((kind, len(items)))
            (images if kind == IMAGE else floats).extend(items)
        answers_img = self._classify_images(images) if images else []
        answers_flt = self._classify_floats(np.stack(floats)) if floats else []
        out, a, b = [], 0, 0
        for kind, n in kinds:
            if kind == IMAGE:
                out.append(self._tensors(answers_img[a : a + n]))
                a += n
            else:
                out.append(self._tensors(answers_flt[b : b + n]))
                b += n
        return out

    def _read(self, i: int, request) -> tuple[str, list]:
        """One request -> (which input, its items): encoded images as bytes, or float32 (3, H, W) arrays."""
        names = set(request.keys())
        has_image, has_input = IMAGE in names, INPUT in names
        if has_image == has_input:
            raise DataError(
                f"request {i} to model {self.name}: send exactly one of the inputs "
                f"{', '.join(t.name for t in self.inputs)} (got {', '.join(sorted(names)) or 'none'})"
            )
        x = request[IMAGE if has_image else INPUT]
        if len(x) == 0:
            raise DataError(f"request {i} to model {self.name}: the batch is empty (0 images)")
        if has_input:
            return INPUT, list(np.asarray(x, dtype=np.float32))
        try:
            return IMAGE, image_items(x, self.max_image_bytes)
        except DataError as e:
            raise DataError(f"request {i} to model {self.name}: {e}") from None

    def _classify_images(self, images: list[bytes]) -> list[Answer]:
        batch = decode_batch(images, self.strategy.specs)
        bad = [f"image {k}: {e}" for k, e in enumerate(batch.errors) if e]
        if bad:
            raise DataError(
                f"model {self.name}: {len(bad)} of the {len(images)} images of this batch cannot be "
                f"decoded: {'; '.join(bad)}"
            )
        return [row[0] for row in self.strategy.classify(batch.inputs)]

    def _classify_floats(self, x: np.ndarray) -> list[Answer]:
        if not np.isfinite(x).all():
            raise DataError(f"model {self.name}: the input tensor holds NaN or infinite values")
        return [row[0] for row in self.strategy.classify([x])]

    def _tensors(self, answers: list[Answer]) -> dict[str, np.ndarray]:
        return answer_tensors(
            answers, self.classes, {s: b.classes for s, b in self.strategy.bundles.items()}, self.routed
        )


_B64 = re.compile(rb"[A-Za-z0-9+/]+={0,2}")


def image_items(x: np.ndarray, max_bytes: int) -> list[bytes]:
    """A BYTES ``image`` tensor (N, 1) -> N encoded images. An element that is base64 text is decoded
    first (a JSON body carries text, so curl sends base64; no JPEG, PNG, BMP, TIFF or WebP file is base64
    text: their signatures hold other bytes). Raises DataError for an image over ``max_bytes``."""
    items = []
    for j, v in enumerate(np.asarray(x, dtype=object).reshape(len(x), -1)[:, 0]):
        data = v if isinstance(v, bytes) else str(v).encode() if isinstance(v, str) else bytes(v)
        if len(data) > max_bytes:
            raise DataError(
                f"image {j} is {len(data) / 1e6:.1f} MB, over the {max_bytes / 1e6:.0f} MB limit (an "
                "endoscopy frame is a few MB at most; gi-deploy serve --max-image-mb raises it)"
            )
        if _B64.fullmatch(data) and len(data) % 4 == 0:
            data = base64.b64decode(data)
        items.append(data)
    return items


def answer_tensors(
    answers: list[Answer], classes: list[str], classes_of: dict[str, list[str]], routed: bool
) -> dict[str, np.ndarray]:
    """One request's answers -> its output tensors (module docstring), each with a leading batch
    dimension: ``classes`` is the model's output class order, ``classes_of`` each source's."""
    n, c = len(answers), len(classes)
    probs = np.zeros((n, c), np.float32)
    label = np.full((n, 1), b"", dtype=object)
    conf = np.zeros((n, 1), np.float32)
    for k, a in enumerate(answers):
        if a.probs is None:  # refused: no diagnosis
            continue
        own = classes_of[a.source]
        probs[k, [classes.index(cl) for cl in own]] = a.probs
        top = int(np.argmax(a.probs))
        label[k, 0], conf[k, 0] = own[top].encode(), a.probs[top]
    out = {"probabilities": probs, "label": label, "confidence": conf}
    if routed:

        def column(key: str, dtype) -> np.ndarray:
            if dtype is np.float32:  # "" (no statistics) -> NO_SCORE
                vals = [float(a.extra[key]) if a.extra.get(key) else NO_SCORE for a in answers]
            else:
                vals = [getattr(a, key).encode() if dtype is object else getattr(a, key) for a in answers]
            return np.array(vals, dtype=dtype).reshape(n, 1)

        out.update(
            source=column("source", object),
            router_confidence=column("router_confidence", np.float32),
            id_score=column("id_score", np.float32),
            id_threshold=column("id_threshold", np.float32),
            rejected=column("rejected", np.bool_),
            reason=column("reason", object),
        )
    return out


def model_names(deploy_dir: Path, sources: list[str] | None) -> list[str]:
    """The Triton models ``serve`` offers for ``sources``: None or ["all"] is every bundle of
    ``deploy_dir``, plus ``auto`` when it has a router; else the names given (``auto`` among them).
    Raises BundleError when the folder has no bundle (the command that makes them in the message)."""
    if sources and "all" not in sources:
        return list(dict.fromkeys(sources))
    names = [d.name for d in resolve_bundle_dirs(Path(deploy_dir), ["all"])]
    if (router_dir(deploy_dir) / "manifest.json").is_file():
        names.append(AUTO)
    return names


def open_served(
    deploy_dir: Path,
    name: str,
    backend: str = "auto",
    precision: str = "fp32",
    device: str = "cpu",
    threads: int | None = None,
    max_batch: int = 32,
    max_image_bytes: int = MAX_IMAGE_BYTES,
) -> ServedModel:
    """Load model ``name`` (a source, or ``auto``) of ``deploy_dir`` for serving: the same strategy
    ``gi-deploy infer --source name`` runs. Raises BundleError / ConfigError as infer does."""
    cfg = InferConfig(
        inputs="",
        deploy_dir=Path(deploy_dir),
        sources=[name],
        backend=backend,
        precision=precision,
        device=device,
        threads=threads,
        batch_size=max_batch,
    )
    return ServedModel(name, open_strategy(cfg), max_image_bytes)
