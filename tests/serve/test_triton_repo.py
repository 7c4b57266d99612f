"""``gi-deploy export --triton-repo``: the model repository for a full Triton server. Every config.pbtxt
parses with Triton's own schema (tritonclient's model_config_pb2, protobuf text_format), and the
Python-backend models' code (serve/triton_backend.py) runs in-process, behind a stand-in for
``triton_python_backend_utils`` whose BLS requests run the repository's ONNX files on onnxruntime, with
the same answers as ``gi-deploy serve`` (serve/models.py)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("tritonclient") is None or importlib.util.find_spec("google.protobuf") is None,
    reason="needs tritonclient[grpc] (Triton's model_config schema): the serve extra",
)

TOL = 1e-5


@pytest.fixture(scope="module")
def repo(serve_deploy, tmp_path_factory):
    from gi_deploy.serve.triton_repo import TritonRepoConfig, write_triton_repo

    out = tmp_path_factory.mktemp("triton") / "models"
    result = write_triton_repo(TritonRepoConfig(deploy_dir=serve_deploy, out_dir=out, max_batch=16))
    return out, result


def _config(folder: Path):
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    return text_format.Parse((folder / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())


def test_every_config_parses_with_tritons_schema(repo, serve_deploy):
    """Each model folder's config.pbtxt is a valid ModelConfig: names, platforms, dims from the manifest,
    dynamic batching, instance groups; each ensemble's steps name models of the repository and map
    tensors those models have."""
    out, result = repo
    configs = {p.parent.name: _config(p.parent) for p in out.glob("*/config.pbtxt")}
    assert set(configs) == set(result.models) and "auto" in configs
    for source in ("capsule", "endoscope"):
        classes = json.loads((serve_deploy / source / "manifest.json").read_text())["classes"]
        onnx = configs[f"{source}_onnx"]
        assert onnx.platform == "onnxruntime_onnx" and onnx.max_batch_size == 16
        assert onnx.HasField("dynamic_batching") and onnx.instance_group[0].kind == onnx.instance_group[0].KIND_GPU
        assert [o.name for o in onnx.output][0] == "logits" and list(onnx.output[0].dims) == [len(classes)]
        ens = configs[source]
        assert ens.platform == "ensemble"
        assert json.loads(ens.parameters["classes"].string_value) == classes
        for step in ens.ensemble_scheduling.step:
            inner = configs[step.model_name]
            assert set(step.input_map) <= {t.name for t in inner.input}
            assert set(step.output_map) <= {t.name for t in inner.output}
        assert (out / f"{source}_onnx" / "1" / "model.onnx").is_file()
        for py in (f"{source}_preprocess", f"{source}_postprocess"):
            assert configs[py].backend == "python" and (out / py / "1" / "model.py").is_file()
    auto = configs["auto"]
    assert auto.backend == "python" and "rejected" in [o.name for o in auto.output]
    assert (out / "README.txt").read_text().count("tritonserver --model-repository") == 1


class _Tensor:
    def __init__(self, name: str, array: np.ndarray):
        self._name, self._array = name, array

    def name(self) -> str:
        return self._name

    def as_numpy(self) -> np.ndarray:
        return self._array


class _Error:
    def __init__(self, message: str):
        self._message = message

    def message(self) -> str:
        return self._message


class _Response:
    def __init__(self, output_tensors=(), error=None):
        self.output_tensors, self._error = list(output_tensors), error

    def has_error(self) -> bool:
        return self._error is not None

    def error(self):
        return self._error


class FakePbUtils:
    """The parts of triton_python_backend_utils the models use; BLS requests run ``<repo>/<model>/1/model.onnx``."""

    Tensor, TritonError, InferenceResponse = _Tensor, _Error, _Response

    def __init__(self, repo: Path):
        import onnxruntime as ort

        self.sessions = {
            p.parent.parent.name: ort.InferenceSession(str(p), providers=["CPUExecutionProvider"])
            for p in repo.glob("*_onnx/1/model.onnx")
        }
        pb = self

        class InferenceRequest:
            def __init__(self, model_name, requested_output_names, inputs):
                self.model_name, self.names, self.inputs = model_name, requested_output_names, inputs

            def exec(self):
                sess = pb.sessions[self.model_name]
                outs = sess.run(self.names, {t.name(): t.as_numpy() for t in self.inputs})
                return _Response([_Tensor(n, o) for n, o in zip(self.names, outs)])

        self.InferenceRequest = InferenceRequest

    @staticmethod
    def get_input_tensor_by_name(request, name):
        return next((t for t in request if t.name() == name), None)

    @staticmethod
    def get_output_tensor_by_name(response, name):
        return next((t for t in response.output_tensors if t.name() == name), None)


def _load(repo_dir: Path, model: str, cls, pb):
    from google.protobuf import json_format

    m = cls()
    m.initialize(
        {
            "model_config": json.dumps(
                json_format.MessageToDict(_config(repo_dir / model), preserving_proto_field_name=True)
            ),
            "model_repository": str(repo_dir / model),
            "model_version": "1",
            "pb_utils": pb,
        }
    )
    return m


def _request(images: list[bytes]) -> list:
    return [_Tensor("image", np.array([[b] for b in images], dtype=object))]


def _outputs(response) -> dict[str, np.ndarray]:
    assert not response.has_error(), response.error().message()
    return {t.name(): t.as_numpy() for t in response.output_tensors}


def test_ensemble_python_models_answer_as_serve(repo, serve_deploy, serve_images):
    """preprocess -> the repository's ONNX -> postprocess, as the ensemble chains them, gives `serve`'s
    answer (probabilities within 1e-5, same label) for each source, from the model.py files' own imports."""
    from gi_deploy.serve.models import open_served

    out, _ = repo
    pb = FakePbUtils(out)
    paths = serve_images["capsule"] + serve_images["endoscope"]
    data = [p.read_bytes() for p in paths]
    for source in ("capsule", "endoscope"):
        ns: dict = {}
        exec((out / f"{source}_preprocess" / "1" / "model.py").read_text(), ns)
        pre = _load(out, f"{source}_preprocess", ns["TritonPythonModel"], pb)
        exec((out / f"{source}_postprocess" / "1" / "model.py").read_text(), ns)
        post = _load(out, f"{source}_postprocess", ns["TritonPythonModel"], pb)
        x = _outputs(pre.execute([_request(data)])[0])["input"]
        logits = pb.sessions[f"{source}_onnx"].run(["logits"], {"input": x})[0]
        got = _outputs(post.execute([[_Tensor("logits", logits)]])[0])
        want = open_served(serve_deploy, source, threads=1)([{"image": np.array([[d] for d in data], dtype=object)}])[0]
        np.testing.assert_allclose(got["probabilities"], want["probabilities"], atol=TOL)
        assert list(got["label"][:, 0]) == list(want["label"][:, 0])


def test_bls_auto_answers_as_serve_and_fails_only_the_bad_request(repo, serve_deploy, serve_images):
    """The BLS `auto` model routes, calls the routed source's ONNX model and refuses as `serve`'s auto
    does; in one execution, a request with a broken image gets an error and its batch-mates answers."""
    from gi_deploy.serve.models import open_served
    from gi_deploy.serve.triton_backend import Auto

    out, _ = repo
    auto = _load(out, "auto", Auto, FakePbUtils(out))
    data = [p.read_bytes() for p in serve_images["capsule"] + serve_images["endoscope"] + serve_images["ood"]]
    good, bad, good2 = auto.execute([_request(data), _request([b"not an image"]), _request(data[:1])])
    got = _outputs(good)
    want = open_served(serve_deploy, "auto", threads=1)([{"image": np.array([[d] for d in data], dtype=object)}])[0]
    for k in ("source", "rejected", "reason", "label"):
        assert list(got[k][:, 0]) == list(want[k][:, 0]), k
    np.testing.assert_allclose(got["probabilities"], want["probabilities"], atol=TOL)
    assert got["rejected"].any()
    assert bad.has_error() and "cannot read image" in bad.error().message()
    assert _outputs(good2)["source"][0, 0] == want["source"][0, 0]


def test_refuses_a_non_empty_folder_without_force(repo, serve_deploy):
    from gi_deploy.errors import ConfigError
    from gi_deploy.serve.triton_repo import TritonRepoConfig, write_triton_repo

    out, _ = repo
    with pytest.raises(ConfigError, match="--force"):
        write_triton_repo(TritonRepoConfig(deploy_dir=serve_deploy, out_dir=out))
