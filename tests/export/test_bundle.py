import json
import shutil

import numpy as np
import onnx
import pytest
import torch

from gi_deploy._io import sha256_file
from gi_deploy.errors import BundleError, ExportFailed, VerificationError
from gi_deploy.export import onnx_export
from gi_deploy.export.bundle import ExportConfig, export_runs, export_source
from gi_deploy.runtime.bundle import load_bundle
from gi_deploy.training.run import RANDOM_BASE_WEIGHTS, load_run_model


def test_adapter_under_test_has_nonzero_b(tiny_run):
    """peft starts LoRA B at zero; a merge check on such an adapter could not fail."""
    from safetensors.torch import load_file

    state = load_file(str(tiny_run / "adapter" / "adapter_model.safetensors"))
    b = [v for k, v in state.items() if "lora_B" in k]
    assert b and all(v.abs().max() > 0 for v in b)


def test_bundle_is_verified_and_self_describing(tiny_run, tiny_deploy):
    bundle = tiny_deploy / "capsule"
    m = json.loads((bundle / "manifest.json").read_text())
    run = json.loads((tiny_run / "run.json").read_text())
    v = m["verification"]
    assert v["merge"]["max_abs_logit_diff"] <= onnx_export.MERGE_ATOL
    assert v["onnx_fp32"]["max_abs_logit_diff"] <= onnx_export.FP32_ATOL == 1e-4
    assert v["onnx_fp32"]["batch_sizes"][0] == 1 and v["onnx_fp32"]["batch_sizes"][1] > 2  # dynamic batch axis
    assert v["onnx_fp16"]["finite"] and v["onnx_fp16"]["top1_agreement"] >= onnx_export.FP16_MIN_TOP1_AGREEMENT
    assert v["inputs"]["real_images"] > 0
    assert json.loads((bundle / "labels.json").read_text()) == m["classes"] == run["classes"]
    for entry in m["models"].values():
        assert sha256_file(bundle / entry["file"]) == entry["sha256"]
    assert m["preprocess"] == run["preprocess"] and m["base_weights"]["license"]
    assert m["adapter"]["lora"]["r"] == 16 and m["adapter"]["lora"]["alpha"] == 32 and m["model"]["merged"] is True
    assert not list(tiny_deploy.glob(".*"))  # no staging left behind


def test_merged_onnx_has_plain_backbone_cost_and_matches_torch(tiny_run, tiny_deploy):
    graph = onnx.load(str(tiny_deploy / "capsule" / "model.onnx")).graph
    assert not any("lora" in t.name for t in graph.initializer)
    n_weights = sum(int(np.prod(t.dims)) for t in graph.initializer)
    m = json.loads((tiny_deploy / "capsule" / "manifest.json").read_text())
    assert n_weights <= m["model"]["parameters"] + 64  # + a few exporter constants
    # and onnxruntime on a fresh batch of 5 agrees with the un-merged peft model
    x = torch.randn(5, 3, 32, 32, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        ref = load_run_model(tiny_run)(x).numpy()
    out = load_bundle(tiny_deploy / "capsule").predict_logits(x.numpy())
    np.testing.assert_allclose(out, ref, atol=1e-4, rtol=0)


def test_failed_verification_writes_nothing_and_keeps_the_old_bundle(tiny_run, tiny_deploy, tmp_path, monkeypatch):
    target = tmp_path / "capsule"
    shutil.copytree(tiny_deploy / "capsule", target)
    before = {p.name: p.read_bytes() for p in target.iterdir()}
    monkeypatch.setattr(onnx_export, "FP32_ATOL", 0.0)  # nothing can pass a zero tolerance
    with pytest.raises(VerificationError, match="exceeds 0; file not written"):
        export_source(tiny_run, target)
    assert {p.name: p.read_bytes() for p in target.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["capsule"]


def test_unmerged_export_is_verified_too(tiny_run, tmp_path):
    m = export_source(tiny_run, tmp_path / "capsule", merge=False)
    assert m["model"]["merged"] is False and "merge" not in m["verification"]
    assert m["verification"]["onnx_fp32"]["max_abs_logit_diff"] <= 1e-4


def test_changed_base_weights_are_detected(tiny_run, tmp_path):
    from safetensors.torch import load_file, save_file

    run = tmp_path / "runs" / "capsule"
    shutil.copytree(tiny_run, run)
    state = load_file(str(run / RANDOM_BASE_WEIGHTS))
    state["stem.0.weight"] += 0.01
    save_file(state, str(run / RANDOM_BASE_WEIGHTS))
    with pytest.raises(ExportFailed, match="differs from the one it was trained on"):
        export_runs(ExportConfig(runs_dir=tmp_path / "runs", deploy_dir=tmp_path / "deploy"))
    assert not (tmp_path / "deploy" / "capsule").exists()


def test_unknown_source_lists_trained_ones(tiny_run, tmp_path):
    with pytest.raises(BundleError, match="no trained run for kvasir .*trained: capsule"):
        ExportConfig(runs_dir=tiny_run.parent, sources=["kvasir"]).resolve_sources()


def test_one_failing_source_does_not_stop_the_others(tiny_run, tmp_path):
    runs = tmp_path / "runs"
    shutil.copytree(tiny_run, runs / "capsule")
    shutil.copytree(tiny_run, runs / "broken")
    (runs / "broken" / RANDOM_BASE_WEIGHTS).unlink()
    with pytest.raises(ExportFailed, match=r"broken: .*base weights this run was trained from are gone") as e:
        export_runs(ExportConfig(runs_dir=runs, deploy_dir=tmp_path / "deploy"))
    assert set(e.value.exported) == {"capsule"} and set(e.value.failures) == {"broken"}
    assert (tmp_path / "deploy" / "capsule" / "model.onnx").is_file()
    assert not (tmp_path / "deploy" / "broken").exists()


def test_an_operator_onnx_cannot_express_is_a_typed_error(tmp_path):
    """timm's VGG head below 224 px pools 2x2 up to 7x7: ONNX has no such adaptive pooling."""
    from gi_deploy.errors import ExportError

    class UpPool(torch.nn.Module):
        def forward(self, x):
            return torch.nn.functional.adaptive_avg_pool2d(x, 7).flatten(1)

    with pytest.raises(ExportError, match="adaptive_avg_pool2d.*--img-size"):
        onnx_export.export_onnx(UpPool(), tmp_path / "m.onnx", (2, 2))
    assert not (tmp_path / "m.onnx").exists()
