"""fp32 islands: a naive all-fp16 conversion of ConvNeXtV2 breaks on large activations, ours does
not; the true-fp16 evaluator is exact where there is nothing to round."""

import numpy as np
import onnx
import pytest
import timm
import torch

from gi_deploy.export import fp16, onnx_export, verify
from gi_deploy.export.activations import logits_and_peaks

PX = 64


@pytest.fixture(scope="module")
def hot_model(tmp_path_factory):
    """convnextv2_atto whose stage-0 MLPs produce large activations, as trained ConvNeXts do
    (GRN input peaks ~60 here; timm starts GRN at zero, so it is given weights too)."""
    torch.manual_seed(0)
    model = timm.create_model("convnextv2_atto", num_classes=5, pretrained=False).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "grn" in name:
                p.normal_(0, 0.5)
        for block in model.stages[0].blocks:
            block.mlp.fc1.weight.mul_(100)
    path = tmp_path_factory.mktemp("fp16") / "model.onnx"
    onnx_export.export_onnx(model, path, (PX, PX))
    x = torch.randn(4, 3, PX, PX, generator=torch.Generator().manual_seed(1)).numpy()
    return model, path, x


def test_naive_fp16_breaks_on_large_activations_and_islands_do_not(hot_model, tmp_path):
    model, path, x = hot_model
    assert logits_and_peaks(model, x)[1].max() > 40  # sum of 16x16 squares > 65,504 in GRN
    fp32_logits, _ = onnx_export.run_onnx(path, x)
    naive, ours = tmp_path / "naive.onnx", tmp_path / "ours.onnx"
    fp16.convert_fp16(path, naive, islands=False)
    info = fp16.convert_fp16(path, ours)
    assert info["grn_fp32_nodes"] == 4 * 12  # ReduceL2, ReduceMean, + eps, Div in each of atto's 12 GRNs

    broken = verify.compare_logits(fp32_logits, fp16.run_fp16_emulated(naive, x, onnx_export.INPUT_NAME))
    assert not broken["finite"] or broken["top1_agreement"] < 0.5
    with pytest.raises(Exception, match="gate fp16_emulated failed"):
        verify.check("fp16_emulated", "naive", broken, min_top1=verify.FP16_MIN_TOP1)

    kept = verify.compare_logits(fp32_logits, fp16.run_fp16_emulated(ours, x, onnx_export.INPUT_NAME))
    assert kept["finite"] and kept["top1_agreement"] == 1.0 and kept["max_abs_prob_diff"] < 0.05
    verify.check("fp16_emulated", "ours", kept, min_top1=verify.FP16_MIN_TOP1)


def test_islands_stay_fp32_and_the_rest_is_fp16(hot_model, tmp_path):
    _, path, _ = hot_model
    dst = tmp_path / "ours.onnx"
    fp16.convert_fp16(path, dst)
    model = onnx.shape_inference.infer_shapes(onnx.load(str(dst)))
    types = {v.name: v.type.tensor_type.elem_type for v in list(model.graph.value_info) + list(model.graph.output)}
    island = set(fp16.grn_island_nodes(onnx.load(str(path)).graph))
    for node in model.graph.node:
        if node.op_type == "LayerNormalization" or node.name in island:
            assert types[node.output[0]] == onnx.TensorProto.FLOAT, node.name
    gelu_divs = [n for n in model.graph.node if n.op_type == "Div" and n.name not in island]
    assert gelu_divs and all(types[n.output[0]] == onnx.TensorProto.FLOAT16 for n in gelu_divs)
    assert model.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT  # fp32 I/O
    casts = [(n.input[0], n.attribute[0].i) for n in model.graph.node if n.op_type == "Cast"]
    assert len(casts) == len(set(casts))  # no duplicate casts of one tensor


def test_emulator_is_exact_on_an_fp32_graph(hot_model):
    """The evaluator's overrides (Conv, MatMul, Gemm, Erf) are the real maths: on the fp32 graph
    it reproduces onnxruntime."""
    _, path, x = hot_model
    ort_logits, _ = onnx_export.run_onnx(path, x[:2])
    emulated = fp16.run_fp16_emulated(path, x[:2], onnx_export.INPUT_NAME)
    np.testing.assert_allclose(emulated, ort_logits, rtol=1e-4, atol=1e-3)
