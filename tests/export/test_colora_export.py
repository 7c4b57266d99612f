"""A CoLoRA-trained model exports as the plain backbone: merged exactly, no adapter op left."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import onnx
import pytest
import torch
from conftest import tiny_train_config
from safetensors import safe_open
from safetensors.torch import save_file

from gi_deploy._io import sha256_file
from gi_deploy.core.runs import read_run_manifest
from gi_deploy.export import onnx_export, verify
from gi_deploy.export.writer import export_source
from gi_deploy.model.run import load_run_model, rebuild_base
from gi_deploy.runtime.loader import load_bundle
from gi_deploy.training.trainer import train


def _make_live_factors_nonzero(path) -> None:
    """After a merge epoch the live K_d and db are zero; give them values so that the export's
    merge check covers the accumulated merges *and* the live factors (and could fail)."""
    with safe_open(str(path), framework="pt") as f:
        meta, state = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    g = torch.Generator().manual_seed(0)
    for k, v in state.items():
        if k.endswith((".spatial", ".bias_delta")):
            state[k] = torch.randn(v.shape, generator=g) * 0.05
    save_file(state, str(path), metadata=meta)
    run_json = path.parent / "run.json"  # an edit the test means: recorded, as training would have
    run = json.loads(run_json.read_text())
    run["best"]["artifact_sha256"][path.name] = sha256_file(path)
    run_json.write_text(json.dumps(run))


def _op_counts(path) -> Counter:
    """Compute nodes by op type. Identity nodes are left out: the TorchScript exporter
    deduplicates initializers with equal values (a random base's zero/one GRN and norm
    parameters) into Identity aliases, so their number follows the weights' values, not the graph."""
    return Counter(n.op_type for n in onnx.load(str(path)).graph.node if n.op_type != "Identity")


@pytest.mark.parametrize("method,model", [("colora", "resnet18"), ("lora+colora", "convnextv2_atto")])
def test_colora_run_exports_as_the_plain_backbone(tiny_data, tmp_path, method, model):
    result = train(tiny_train_config(tiny_data, tmp_path / "runs", method=method, model=model, epochs=2))
    run_dir = result.run_dir
    manifest = read_run_manifest(run_dir)
    assert manifest.colora["merges"] == 2 and manifest.best["colora_merges"] >= 1
    _make_live_factors_nonzero(run_dir / "colora.safetensors")

    bundle = export_source(run_dir, tmp_path / "deploy" / "capsule").manifest
    v = bundle.verification
    assert v["merge"]["max_abs_logit_diff"] <= verify.MERGE_ATOL
    assert v["onnx_fp32"]["max_abs_logit_diff"] <= verify.FP32_ATOL == 1e-4
    assert bundle.model.merged and bundle.adapter["colora"]["merges"] == 2
    assert set(bundle.training.artifact_sha256) == (
        {"colora.safetensors"} | ({"adapter_model.safetensors"} if method == "lora+colora" else set())
    )

    plain = rebuild_base(manifest, run_dir).eval()
    onnx_export.export_onnx(plain, tmp_path / "plain.onnx", (32, 32))
    exported = tmp_path / "deploy" / "capsule" / "model.onnx"
    assert _op_counts(exported) == _op_counts(tmp_path / "plain.onnx")  # no adapter op left
    assert bundle.model.parameters == sum(p.numel() for p in plain.parameters())

    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref, base_out = load_run_model(run_dir)(x).numpy(), plain(x).numpy()
    out = load_bundle(tmp_path / "deploy" / "capsule").predict_logits(x.numpy())
    assert np.abs(ref - base_out).max() > 1e-3  # the adapters change the model
    np.testing.assert_allclose(out, ref, atol=1e-4, rtol=0)
