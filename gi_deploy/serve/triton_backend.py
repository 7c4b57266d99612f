"""The Python-backend models of the Triton model repository (serve/triton_repo.py writes it): each
repository ``model.py`` is one import of a class here, so a full Triton server runs the runtime's own
decoding and routing (core/preprocess, runtime/decode, core/router, runtime/route), not a copy. The
Triton container's Python needs gi-deploy installed (the torch-free core: numpy, Pillow; no onnxruntime).

- ``Preprocess``: ``image`` (BYTES (1,), the encoded file) -> ``input`` (FP32 (3, H, W)), the bundle's
  preprocessing from the ``preprocess`` parameter.
- ``Postprocess``: ``logits`` (FP32 (C,)) -> ``probabilities``, ``label``, ``confidence`` (serve/models.py).
- ``Auto`` (BLS, since an ensemble cannot branch): ``image`` -> ``infer --source auto``'s strategy
  (runtime/route.Routed: the router, the routed model, the in-distribution check) whose models are BLS
  requests to each source's ``<source>_onnx`` for logits and pooled features; ``auto``'s outputs of
  serve/models.py.

Every request is answered on its own: a bad one gets an error response, its batch-mates their answers.
``triton_python_backend_utils`` exists only inside Triton's Python stub; it is imported in
``initialize`` (a test passes a stand-in as ``args["pb_utils"]``).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from gi_deploy.core.bundles import read_bundle_manifest
from gi_deploy.core.metrics import softmax
from gi_deploy.core.ood import load_id_stats
from gi_deploy.core.preprocess import PreprocessSpec, normalize_pixels
from gi_deploy.core.router import load_router
from gi_deploy.errors import GiDeployError
from gi_deploy.runtime.decode.cpu import decode_batch
from gi_deploy.runtime.route import Routed
from gi_deploy.serve.models import MAX_IMAGE_BYTES, Answer, answer_tensors, image_items

DEPLOY_COPY = "deploy"  # auto's version folder holds the router and each source's manifest and statistics


class _Base:
    """The Python-backend protocol: ``initialize(args)``, ``execute(requests)`` -> one response each."""

    def initialize(self, args: dict) -> None:
        if "pb_utils" in args:
            self.pb = args["pb_utils"]
        else:
            import triton_python_backend_utils as pb_utils  # only inside Triton's Python stub

            self.pb = pb_utils
        self.config = json.loads(args["model_config"])
        self.params = {k: v["string_value"] for k, v in self.config.get("parameters", {}).items()}
        self.version_dir = Path(args["model_repository"]) / str(args["model_version"])
        self.max_bytes = int(self.params.get("max_image_bytes", MAX_IMAGE_BYTES))

    def execute(self, requests: list) -> list:
        responses = []
        for request in requests:
            try:
                outputs = self.answer(request)
            except (GiDeployError, ValueError) as e:  # this request's fault: an error response for it alone
                responses.append(self.pb.InferenceResponse(output_tensors=[], error=self.pb.TritonError(str(e))))
                continue
            responses.append(
                self.pb.InferenceResponse(output_tensors=[self.pb.Tensor(k, v) for k, v in outputs.items()])
            )
        return responses

    def answer(self, request) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def finalize(self) -> None:
        pass

    def _images(self, request, specs: tuple[PreprocessSpec, ...]) -> list[np.ndarray]:
        """The request's ``image`` tensor decoded under ``specs``: uint8 (N, H, W, 3) per spec.
        Raises DataError naming the image and the reason."""
        from gi_deploy.errors import DataError

        x = self.pb.get_input_tensor_by_name(request, "image").as_numpy()
        if len(x) == 0:
            raise DataError("the batch is empty (0 images)")
        items = image_items(x, self.max_bytes)
        batch = decode_batch(items, specs)
        bad = [f"image {k}: {e}" for k, e in enumerate(batch.errors) if e]
        if bad:
            raise DataError("; ".join(bad))
        return batch.inputs


class Preprocess(_Base):
    """Encoded image bytes -> the bundle's float32 (N, 3, H, W) input."""

    def initialize(self, args: dict) -> None:
        super().initialize(args)
        self.spec = PreprocessSpec.from_dict(json.loads(self.params["preprocess"]))

    def answer(self, request) -> dict[str, np.ndarray]:
        return {"input": normalize_pixels(self._images(request, (self.spec,))[0], self.spec)}


class Postprocess(_Base):
    """Logits (N, C) -> probabilities, label and confidence, in the bundle's class order."""

    def initialize(self, args: dict) -> None:
        super().initialize(args)
        self.source = self.params["source"]
        self.classes = json.loads(self.params["classes"])

    def answer(self, request) -> dict[str, np.ndarray]:
        p = softmax(self.pb.get_input_tensor_by_name(request, "logits").as_numpy().astype(np.float32))
        return answer_tensors(
            [Answer(self.source, row) for row in p], self.classes, {self.source: self.classes}, routed=False
        )


class _BlsModel:
    """A routed source's model as runtime/route.Routed calls it, run by Triton (BLS) in ``<source>_onnx``:
    the decoder's uint8 pixels -> (logits, pooled features)."""

    def __init__(self, pb, name: str, spec: PreprocessSpec, classes: list[str], has_features: bool):
        self.pb, self.name, self.preprocess, self.classes, self.has_features = pb, name, spec, classes, has_features

    def predict_logits_and_features(self, pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        from gi_deploy.errors import BundleError

        wanted = ["logits", "features"] if self.has_features else ["logits"]
        req = self.pb.InferenceRequest(
            model_name=self.name,
            requested_output_names=wanted,
            inputs=[self.pb.Tensor("input", normalize_pixels(pixels, self.preprocess))],
        )
        res = req.exec()
        if res.has_error():
            raise BundleError(f"{self.name}: {res.error().message()}")
        out = [self.pb.get_output_tensor_by_name(res, n).as_numpy() for n in wanted]
        return out[0], (out[1] if self.has_features else None)


class Auto(_Base):
    """The router, then the routed source's ONNX model (a BLS request), then the in-distribution check:
    ``auto``'s outputs (serve/models.py), answers equal to ``gi-deploy infer --source auto``."""

    def initialize(self, args: dict) -> None:
        super().initialize(args)
        deploy = self.version_dir / DEPLOY_COPY
        self.router = load_router(deploy)
        self.models, self.stats = {}, {}
        for s in self.router.sources:
            manifest = read_bundle_manifest(deploy / s)  # sealed: classes, preprocessing, the OOD threshold
            self.stats[s] = load_id_stats(deploy / s, manifest)
            self.models[s] = _BlsModel(
                self.pb, f"{s}_onnx", manifest.preprocess, list(manifest.classes), self.stats[s] is not None
            )
        self.routed = Routed(self.router, self.models, self.stats, [])  # infer --source auto's own strategy
        self.classes = self.routed.classes

    def answer(self, request) -> dict[str, np.ndarray]:
        answers = [row[0] for row in self.routed.classify(self._images(request, self.routed.specs))]
        return answer_tensors(answers, self.classes, {s: m.classes for s, m in self.models.items()}, routed=True)
