"""Inference backends: onnxruntime on its provider, the loud CUDA fallback, the merged torch model
checked against its run, TensorRT's missing-library error, auto's choice and bad options."""

import json
import shutil
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from conftest import edit_manifest

from gi_deploy.core.bundles import read_bundle_manifest
from gi_deploy.core.preprocess import list_images, load_input
from gi_deploy.errors import BundleError, ConfigError, DependencyError
from gi_deploy.export import tensorrt
from gi_deploy.runtime.backends import open_backend

HAVE_TRT, TRT_REASON = tensorrt.tensorrt_status()


@pytest.fixture(scope="module")
def bundle(tiny_deploy) -> tuple[Path, dict]:
    d = tiny_deploy / "capsule"
    return d, read_bundle_manifest(d)


@pytest.fixture(scope="module")
def batch(tiny_data, bundle) -> np.ndarray:
    spec = bundle[1].preprocess
    return np.stack([load_input(p, spec) for p in list_images(tiny_data / "test")])


def direct_onnxruntime(path: Path, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x})[0]


def test_onnxruntime_runs_on_the_cpu_provider_and_matches_a_plain_session(bundle, batch):
    d, manifest = bundle
    b = open_backend(d, manifest, "onnxruntime", "fp32", "cpu", threads=1)
    assert b.name == "onnxruntime" and b.precision == "fp32"
    assert "CPUExecutionProvider" in b.detail and "(1 threads)" in b.detail and b.notes == []
    assert b.model_bytes == (d / "model.onnx").stat().st_size
    logits = b.predict_logits(batch)
    assert logits.shape == (len(batch), len(manifest.classes)) and logits.dtype == np.float32
    np.testing.assert_allclose(logits, direct_onnxruntime(d / "model.onnx", batch), atol=1e-5, rtol=1e-5)
    b16 = open_backend(d, manifest, "onnxruntime", "fp16", "cpu")
    np.testing.assert_allclose(
        b16.predict_logits(batch), direct_onnxruntime(d / "model.fp16.onnx", batch), atol=1e-3, rtol=1e-3
    )


@pytest.mark.skipif("CUDAExecutionProvider" in ort.get_available_providers(), reason="a GPU provider is installed")
def test_cuda_requested_on_a_cpu_machine_runs_on_cpu_and_says_so(bundle, batch, caplog):
    from gi_deploy.runtime.loader import load_bundle

    d, manifest = bundle
    b = open_backend(d, manifest, "onnxruntime", "fp32", "cuda")
    assert "CPUExecutionProvider" in b.detail
    assert len(b.notes) == 1 and b.notes[0].startswith(
        "requested CUDA but onnxruntime is running model.onnx on the CPU"
    )
    assert "onnxruntime-gpu" in b.notes[0]
    np.testing.assert_allclose(b.predict_logits(batch), direct_onnxruntime(d / "model.onnx", batch), atol=1e-5)
    with caplog.at_level("WARNING"):  # the bundle loader logs it as a warning, not only in notes
        load_bundle(d, device="cuda")
    assert any("requested CUDA" in r.getMessage() and r.levelname == "WARNING" for r in caplog.records)


def copy_run_and_bundle(tiny_run: Path, tiny_deploy: Path, tmp_path: Path) -> tuple[Path, Path]:
    """A private copy of the training run and its bundle, the bundle pointing at the copy."""
    run, bundle_dir = tmp_path / "runs" / tiny_run.name, tmp_path / "deploy" / "capsule"
    shutil.copytree(tiny_run, run)
    shutil.copytree(tiny_deploy / "capsule", bundle_dir)
    edit_manifest(
        bundle_dir / "manifest.json", lambda m: m["training"].update(run_dir=str(run.resolve())), resealed=True
    )  # a relocation the exporter would have sealed
    return run, bundle_dir


def test_torch_backend_matches_the_fp32_onnx_and_refuses_a_changed_run(tiny_run, tiny_deploy, batch, tmp_path):
    run, d = copy_run_and_bundle(tiny_run, tiny_deploy, tmp_path)
    manifest = read_bundle_manifest(d)
    b = open_backend(d, manifest, "torch", "fp32", "cpu")
    assert b.name == "torch" and "eager on cpu" in b.detail and b.model_bytes > 0
    logits = b.predict_logits(batch)
    assert logits.dtype == np.float32
    np.testing.assert_allclose(logits, direct_onnxruntime(d / "model.onnx", batch), atol=1e-4, rtol=0)

    run_json = json.loads((run / "run.json").read_text())
    run_json["status"] = run_json["status"] + " "  # any change: retrained or resumed since the export
    (run / "run.json").write_text(json.dumps(run_json))
    with pytest.raises(BundleError, match="changed after this bundle was exported"):
        open_backend(d, manifest, "torch", "fp32", "cpu")
    assert json.loads((tiny_run / "run.json").read_text())["status"] != run_json["status"]  # fixture untouched


@pytest.mark.skipif(HAVE_TRT, reason="TensorRT and a GPU are here")
def test_tensorrt_without_tensorrt_says_why(bundle):
    d, manifest = bundle
    with pytest.raises(DependencyError) as e:
        open_backend(d, manifest, "tensorrt", "fp16", "auto")
    assert TRT_REASON in str(e.value) and "--backend onnxruntime" in str(e.value)
    with pytest.raises(ConfigError, match="fp16"):  # engines are fp16: fp32 is refused before looking for one
        open_backend(d, manifest, "tensorrt", "fp32", "auto")


@pytest.mark.tensorrt
@pytest.mark.skipif(not HAVE_TRT, reason=TRT_REASON)
def test_tensorrt_engine_matches_the_fp32_onnx(tiny_run, batch, tmp_path):
    from gi_deploy.export.writer import export_source

    d = tmp_path / "capsule"
    export_source(tiny_run, d, engine=True, max_batch=4)
    manifest = read_bundle_manifest(d)
    b = open_backend(d, manifest, "tensorrt", "fp16", "cuda")
    assert b.name == "tensorrt" and b.notes == []
    logits = np.concatenate([b.predict_logits(batch[i : i + 4]) for i in range(0, len(batch), 4)])
    reference = direct_onnxruntime(d / "model.onnx", batch)
    assert (logits.argmax(1) == reference.argmax(1)).mean() >= 0.9
    auto = open_backend(d, manifest, "auto", "fp16", "auto")
    assert auto.name == "tensorrt" and auto.notes[0].startswith("auto:")


def test_auto_picks_onnxruntime_here(bundle, tmp_path):
    d, manifest = bundle
    b = open_backend(d, manifest, "auto", "fp32", "auto")
    assert b.name == "onnxruntime" and b.notes[0].startswith("auto: onnxruntime")
    # fp16 would take a TensorRT engine; the tiny bundle has none, so auto says so without importing TensorRT
    b16 = open_backend(d, manifest, "auto", "fp16", "auto")
    assert b16.name == "onnxruntime" and b16.notes[0].startswith("auto:")
    assert "(no TensorRT engine in the bundle" in b16.notes[0]
    if not HAVE_TRT:  # with an engine file present, the reason is that TensorRT itself is missing
        copy = tmp_path / "capsule"
        shutil.copytree(d, copy)
        (copy / "model.sm90-trt10.0.engine").write_bytes(b"built on some other machine")
        b16 = open_backend(copy, manifest, "auto", "fp16", "auto")
        assert f"(no TensorRT: --backend tensorrt: {TRT_REASON}" in b16.notes[0]


def test_unknown_names_and_impossible_combinations_are_config_errors(bundle):
    d, manifest = bundle
    with pytest.raises(ConfigError, match="backend 'tflite' unknown"):
        open_backend(d, manifest, "tflite")
    with pytest.raises(ConfigError, match="precision 'fp8' unknown"):
        open_backend(d, manifest, "onnxruntime", "fp8")
    with pytest.raises(ConfigError, match="no bf16 model.*bf16 is the torch backend's"):
        open_backend(d, manifest, "onnxruntime", "bf16")
    with pytest.raises(ConfigError, match="device 'tpu' unknown"):
        open_backend(d, manifest, "onnxruntime", "fp32", "tpu")
    with pytest.raises(ConfigError, match="int8"):
        open_backend(d, manifest, "torch", "int8", "cpu")
    with pytest.raises(ConfigError, match="no int8 model.*export with --int8"):  # the tiny bundle has none
        open_backend(d, manifest, "onnxruntime", "int8", "cpu")
    with pytest.raises(ConfigError, match="tensorrt runs on a CUDA GPU, not with --device cpu"):
        open_backend(d, manifest, "tensorrt", "fp16", "cpu")  # refused, whether or not TensorRT is here


def test_no_onnxruntime_names_both_installs(bundle, monkeypatch):
    """onnxruntime comes from the cpu or the gpu extra, not the core install: without either, one
    line says which two commands exist."""
    import importlib.util

    from gi_deploy.errors import DependencyError

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "onnxruntime" else real(name, *a))
    d, manifest = bundle
    with pytest.raises(DependencyError, match=r"gi-deploy\[cpu\].*gi-deploy\[gpu\].*never both"):
        open_backend(d, manifest, "onnxruntime")


def test_two_onnxruntime_builds_side_by_side_are_reported(bundle, monkeypatch):
    from gi_deploy.runtime.backends import onnxruntime as backends

    monkeypatch.setattr(backends, "onnxruntime_builds", lambda: ["onnxruntime", "onnxruntime-gpu"])
    d, manifest = bundle
    b = open_backend(d, manifest, "onnxruntime", device="cpu")
    assert any("onnxruntime and onnxruntime-gpu are installed side by side" in n for n in b.notes)
