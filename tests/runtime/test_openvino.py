"""The OpenVINO backend: it runs the bundle's ONNX and agrees with onnxruntime, its load-time gate
refuses a model whose answers differ from the fp32 ONNX, it refuses what it cannot run, and
``auto`` on the CPU picks between it and onnxruntime by a measurement it caches."""

from pathlib import Path

import numpy as np
import pytest

from gi_deploy.core.bundles import read_bundle_manifest
from gi_deploy.core.preprocess import list_images, load_input
from gi_deploy.errors import ConfigError, GateFailed
from gi_deploy.runtime.backends import open_backend, select
from gi_deploy.runtime.backends import openvino as ov_backend

pytest.importorskip("openvino", reason="the [openvino] extra is not installed")
HAS_BF16 = "BF16" in ov_backend.cpu_capabilities()


@pytest.fixture(scope="module")
def bundle(tiny_deploy) -> tuple[Path, dict]:
    d = tiny_deploy / "capsule"
    return d, read_bundle_manifest(d)


@pytest.fixture(scope="module")
def batch(tiny_data, bundle) -> np.ndarray:
    spec = bundle[1].preprocess
    return np.stack([load_input(p, spec) for p in list_images(tiny_data / "test")])


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))  # auto's measurements: never the user's


@pytest.mark.parametrize(
    "precision",
    ["fp32", pytest.param("bf16", marks=pytest.mark.skipif(not HAS_BF16, reason="this CPU has no native bf16"))],
)
def test_openvino_runs_the_bundle_and_agrees_with_onnxruntime(bundle, batch, precision):
    d, manifest = bundle
    b = open_backend(d, manifest, "openvino", precision, "cpu", threads=1)
    ref = open_backend(d, manifest, "onnxruntime", "fp32", "cpu", threads=1).predict_logits(batch)
    logits = b.predict_logits(batch)
    assert b.name == "openvino" and b.device == "cpu" and logits.shape == ref.shape
    assert f"CPU {precision} (model.onnx" in b.detail  # the precision it ran, read back from the compiled model
    assert (logits.argmax(1) == ref.argmax(1)).all()
    np.testing.assert_allclose(logits, ref, atol=1e-3 if precision == "fp32" else 0.1)
    assert b.gate["min_top1_agreement"] == 0.995 and b.gate["n"] == manifest.verification["inputs"]["n"]
    real = manifest.verification["inputs"]["real_images"]  # the batch export's gates ran on
    assert b.notes[0].startswith(f"openvino: gate passed, {precision} vs the fp32 ONNX on {real} validation + 8 stress")
    u8 = np.zeros((2, *manifest.preprocess.size, 3), np.uint8)
    assert b.predict_logits(u8).shape == (2, len(manifest.classes))  # the decoder's pixels, normalised here


def _planted_wrong_answers(monkeypatch):
    """OpenVINO's compiled model, wrapped so its logits come back in reversed class order."""
    real = ov_backend._compile

    class Request:
        def __init__(self, request):
            self.request = request

        def infer(self, inputs):
            out = self.request.infer(inputs)
            return {port: np.ascontiguousarray(out[port][:, ::-1]) for port in out}

    class Compiled:
        def __init__(self, compiled):
            self.compiled = compiled
            self.outputs = compiled.outputs

        def get_property(self, name):
            return self.compiled.get_property(name)

        def create_infer_request(self):
            return Request(self.compiled.create_infer_request())

    monkeypatch.setattr(ov_backend, "_compile", lambda *a: Compiled(real(*a)))


def test_the_gate_refuses_answers_that_disagree_with_the_fp32_onnx(bundle, monkeypatch):
    _planted_wrong_answers(monkeypatch)
    with pytest.raises(GateFailed, match="openvino.*top-1 agreement") as e:
        open_backend(*bundle, "openvino", "fp32", "cpu", threads=1)
    assert e.value.args and "use --backend onnxruntime" in str(e.value)


def test_auto_passes_over_an_openvino_that_fails_its_gate(bundle, monkeypatch):
    _planted_wrong_answers(monkeypatch)
    b = open_backend(*bundle, "auto", "fp32", "cpu", threads=1)
    assert b.name == "onnxruntime" and "OpenVINO:" in b.notes[0] and "top-1 agreement" in b.notes[0]


def test_auto_takes_the_engine_measured_faster_and_caches_the_answer(bundle, monkeypatch):
    monkeypatch.setattr(select, "measure_images_per_s", lambda b, x: {"openvino": 30.0, "onnxruntime": 18.0}[b.name])
    b = open_backend(*bundle, "auto", "fp32", "cpu", threads=1)
    assert b.name == "openvino" and "measured fastest on this CPU (onnxruntime 18.0 img/s, openvino 30.0" in b.notes[0]
    monkeypatch.setattr(select, "measure_images_per_s", lambda b, x: pytest.fail("measured again despite the cache"))
    again = open_backend(*bundle, "auto", "fp32", "cpu", threads=1)
    assert again.name == "openvino" and "cached in" in again.notes[0]


def test_auto_with_onnxruntime_cached_faster_never_compiles_openvino(bundle, monkeypatch):
    monkeypatch.setattr(select, "measure_images_per_s", lambda b, x: {"openvino": 9.0, "onnxruntime": 18.0}[b.name])
    assert open_backend(*bundle, "auto", "fp32", "cpu", threads=1).name == "onnxruntime"
    monkeypatch.setattr(select, "open_openvino", lambda *a, **k: pytest.fail("compiled OpenVINO despite the cache"))
    b = open_backend(*bundle, "auto", "fp32", "cpu", threads=1)
    assert b.name == "onnxruntime" and "measured faster than OpenVINO" in b.notes[0]


def test_auto_without_openvino_says_so(bundle, monkeypatch):
    monkeypatch.setattr(select, "openvino_installed", lambda: False)
    b = open_backend(*bundle, "auto", "fp32", "cpu", threads=1)
    assert b.name == "onnxruntime" and "OpenVINO is not installed" in b.notes[0]


@pytest.mark.parametrize(
    "precision, device, message",
    [
        ("fp16", "cpu", "fp16 is the GPU's"),
        ("fp32", "cuda", "runs on the CPU here"),
    ],
)
def test_what_openvino_cannot_run_is_a_config_error(bundle, precision, device, message):
    with pytest.raises(ConfigError, match=message):
        open_backend(*bundle, "openvino", precision, device)


def test_bf16_on_a_cpu_without_it_is_refused(bundle, monkeypatch):
    monkeypatch.setattr(ov_backend, "cpu_capabilities", lambda: ["FP32", "INT8"])
    with pytest.raises(ConfigError, match="no native bf16.*FP32, INT8"):
        open_backend(*bundle, "openvino", "bf16", "cpu")
