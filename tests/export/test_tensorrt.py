"""TensorRT: engine naming and stamps, the trtexec fallback where TensorRT or a GPU is missing,
and (where both exist) a real strongly typed build checked against the fp32 ONNX. No mock
stands in for TensorRT: the tests that need it skip with the reason."""

import subprocess

import pytest

from gi_deploy.errors import BundleError, ConfigError
from gi_deploy.export import tensorrt
from gi_deploy.export.options import ExportOptions
from gi_deploy.export.writer import export_source

HAVE_TRT, TRT_REASON = tensorrt.tensorrt_status()
needs_trt = pytest.mark.skipif(not HAVE_TRT, reason=TRT_REASON)


def test_engine_name_carries_compute_capability_and_version():
    target = tensorrt.EngineTarget("NVIDIA Jetson AGX Orin", "8.7", "10.3.0")
    assert target.engine_file == "model.sm87-trt10.3.0.engine"
    assert tensorrt.timing_cache_path(target).name == "timing.nvidia-jetson-agx-orin.sm87-trt10.3.0.cache"


def test_trtexec_command_is_the_builders_profile():
    cmd = tensorrt.trtexec_command("model.fp16.onnx", "input", (224, 224), 16, "e.engine", "c.cache")
    assert cmd == (
        "trtexec --onnx=model.fp16.onnx --minShapes=input:1x3x224x224 --optShapes=input:16x3x224x224 "
        "--maxShapes=input:16x3x224x224 --memPoolSize=workspace:4096 --timingCacheFile=c.cache "
        "--saveEngine=e.engine"
    )
    assert "--fp16" not in cmd and "--int8" not in cmd  # gone in TensorRT 11: precision comes from the ONNX


def test_engine_needs_the_fp16_onnx():
    with pytest.raises(ConfigError, match="fp16 ONNX"):
        ExportOptions(engine=True, fp16=False)


@pytest.mark.skipif(HAVE_TRT, reason="TensorRT and a GPU are here: the engine is built instead")
def test_without_tensorrt_export_writes_build_engine_sh(tiny_run, tmp_path):
    result = export_source(tiny_run, tmp_path / "capsule", engine=True, max_batch=4)
    engine = result.manifest.engine
    assert engine.status == "not built" and engine.reason == TRT_REASON
    assert len(result.notes) == 1 and "build_engine.sh" in result.notes[0]
    script = tmp_path / "capsule" / "build_engine.sh"
    text = script.read_text()
    assert "--minShapes=input:1x3x32x32 --optShapes=input:4x3x32x32 --maxShapes=input:4x3x32x32" in text
    assert "--onnx=model.fp16.onnx" in text and "--stronglyTyped" in text and "/usr/src/tensorrt/bin/trtexec" in text
    assert script.stat().st_mode & 0o111 and "build_engine.sh" in result.manifest.files
    subprocess.run(["bash", "-n", str(script)], check=True)  # valid bash
    assert "engine" not in result.manifest.verification  # nothing claimed that was not measured


@pytest.mark.tensorrt
@needs_trt
def test_engine_builds_strongly_typed_and_matches_fp32(tiny_run, tmp_path):
    result = export_source(tiny_run, tmp_path / "capsule", engine=True, max_batch=4)
    engine = result.manifest.engine.to_dict()
    target = tensorrt.current_target()
    assert engine["status"] == "built" and engine["file"] == target.engine_file
    assert engine["compute_capability"] == target.compute_capability and engine["strongly_typed"]
    gate = result.manifest.verification["engine"]
    assert gate["finite"] and gate["top1_agreement"] >= 0.995
    tensorrt.check_stamp(engine, tmp_path / "capsule" / engine["file"])
    with pytest.raises(BundleError, match="built for GPU compute capability 1.0.*Rebuild it here"):
        tensorrt.check_stamp({**engine, "compute_capability": "1.0"}, tmp_path / "capsule" / engine["file"])
