"""CoLoRA: merge maths (by hand and against the layer's forward), merge-and-reset, which
convolutions it adapts (depthwise skipped), adapter save/load, training with merges, resume."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import TINY_MODEL
from torch import nn
from torch.nn import functional as F

from gi_deploy.errors import BundleError, ConfigError
from gi_deploy.model.adapters import apply_method, merge_into_plain
from gi_deploy.model.base import create_base_model
from gi_deploy.model.colora import (
    CoLoRAConv2d,
    apply_colora,
    colora_layers,
    colora_summary,
    load_colora,
    merge_all,
    save_colora,
)
from gi_deploy.model.merge import colora_delta
from gi_deploy.model.settings import ColoraSettings, LoraSettings

# fp32: the branch form sums K0*x and K_d*(K_p*x) as two convolutions, the merged form runs one
# convolution with K0 + dK; the same products accumulate in another order, ~1e-6 on O(1) outputs.
FP32_ATOL = 1e-5


def _perturb(model: nn.Module, scale: float = 0.1, seed: int = 0) -> None:
    """Non-zero K_d and db (CoLoRA starts them at zero, where any merge would look right)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in colora_layers(model).values():
            layer.spatial.copy_(torch.randn(layer.spatial.shape, generator=g) * scale)
            if layer.bias_delta is not None:
                layer.bias_delta.copy_(torch.randn(layer.bias_delta.shape, generator=g) * scale)


def test_delta_by_hand_2_in_3_out_3x3():
    kp = torch.tensor([[1.0, 2.0], [0.0, -1.0], [3.0, 0.5]]).reshape(3, 2, 1, 1)
    kd = torch.tensor(
        [
            [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]],
            [[2.0, 2.0, 2.0], [2.0, 2.0, 2.0], [2.0, 2.0, 2.0]],
            [[0.0, 1.0, 0.0], [1.0, -4.0, 1.0], [0.0, 1.0, 0.0]],
        ]
    ).reshape(3, 1, 3, 3)
    eye, ones, lap = kd[0, 0], kd[1, 0], kd[2, 0]
    expected = torch.stack(
        [
            torch.stack([1.0 * eye, 2.0 * eye]),  # filter 0: channel weights (1, 2) times the diagonal
            torch.stack([0.0 * ones, -1.0 * ones]),  # filter 1: (0, -1) times a constant 2
            torch.stack([3.0 * lap, 0.5 * lap]),  # filter 2: (3, 0.5) times a Laplacian
        ]
    )
    assert torch.equal(expected[2, 0], torch.tensor([[0.0, 3.0, 0.0], [3.0, -12.0, 3.0], [0.0, 3.0, 0.0]]))
    delta = colora_delta(kp, kd)
    assert delta.shape == (3, 2, 3, 3) and torch.equal(delta, expected)
    x = torch.randn(1, 2, 6, 6)  # and it is the kernel of pointwise-then-depthwise
    composed = F.conv2d(F.conv2d(x, kp), kd, padding=1, groups=3)
    torch.testing.assert_close(F.conv2d(x, delta, padding=1), composed, atol=FP32_ATOL, rtol=0)


def test_delta_refuses_wrong_shapes():
    with pytest.raises(ConfigError, match="pointwise kernel must be"):
        colora_delta(torch.ones(3, 2, 3, 3), torch.ones(3, 1, 3, 3))
    with pytest.raises(ConfigError, match="spatial kernel must be"):
        colora_delta(torch.ones(3, 2, 1, 1), torch.ones(4, 1, 3, 3))


@pytest.mark.parametrize("forward_mode", ["branch", "fused"])
@pytest.mark.parametrize(
    "k,stride,padding,dilation,cin,cout,bias",
    [
        (3, 1, 1, 1, 2, 3, True),
        (3, 2, 1, 1, 5, 7, False),
        (4, 4, 0, 1, 3, 8, True),  # ConvNeXt stem
        (2, 2, 0, 1, 6, 4, True),
        (3, 1, 2, 2, 4, 4, True),
        (7, 2, 3, 1, 3, 5, False),  # ResNet stem
        (1, 2, 0, 1, 8, 6, False),
        (5, 1, "same", 1, 3, 2, True),
    ],
)
def test_merged_conv_equals_the_colora_forward(forward_mode, k, stride, padding, dilation, cin, cout, bias):
    torch.manual_seed(0)
    conv = nn.Conv2d(cin, cout, k, stride=stride, padding=padding, dilation=dilation, bias=bias)
    layer = CoLoRAConv2d(copy.deepcopy(conv), forward_mode)
    _perturb(layer, scale=0.5)
    x = torch.randn(2, cin, 13, 13)
    dw, db = layer.delta()
    with torch.no_grad():
        out = layer(x)
        merged = F.conv2d(x, conv.weight + dw, conv.bias + db if bias else None, stride, padding, dilation)
        plain = conv(x)
    assert out.shape == plain.shape
    assert (out - plain).abs().max() > 0.1  # the update really changes the output
    torch.testing.assert_close(out, merged, atol=FP32_ATOL, rtol=0)


def test_branch_and_fused_forwards_give_the_same_gradients():
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 6, 3, stride=2, padding=1)
    layers = [CoLoRAConv2d(copy.deepcopy(conv), mode) for mode in ("branch", "fused")]
    layers[1].load_state_dict(layers[0].state_dict())
    x = torch.randn(2, 4, 9, 9)
    for layer in layers:
        _perturb(layer, scale=0.3)
        (layer(x) ** 2).sum().backward()
    for name in ("pointwise", "spatial", "bias_delta"):
        a, b = (getattr(layer, name).grad for layer in layers)
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)  # fp32 sums in another order
    assert layers[0].base.weight.grad is None and layers[1].base.weight.grad is None  # K0 frozen


def test_layer_starts_as_the_frozen_conv_with_glorot_pointwise():
    conv = nn.Conv2d(16, 32, 3, padding=1)
    layer = CoLoRAConv2d(conv)
    x = torch.randn(1, 16, 8, 8)
    with torch.no_grad():
        assert torch.equal(layer(x), conv(x))  # K_d = 0, db = 0: exactly the pretrained layer
    assert not conv.weight.requires_grad and layer.spatial.abs().max() == 0 and layer.bias_delta.abs().max() == 0
    bound = (6 / (16 + 32)) ** 0.5  # Glorot/Xavier-uniform
    assert layer.pointwise.abs().max() <= bound and layer.pointwise.std() > bound / 4
    with pytest.raises(ConfigError, match="dense nn.Conv2d"):
        CoLoRAConv2d(nn.Conv2d(8, 8, 3, groups=8))


def test_merge_and_reset_keeps_the_output_and_clears_the_optimizer_state():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 3, stride=2))
    apply_colora(model, ColoraSettings(), head="")
    _perturb(model)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    x = torch.randn(2, 3, 9, 9)
    model(x).sum().backward()
    opt.step()
    with torch.no_grad():
        before = model(x)
    layers = colora_layers(model)
    pointwise = {n: layer.pointwise.detach().clone() for n, layer in layers.items()}
    assert merge_all(model, opt) == 2 and not opt.state  # moments of the reset factors dropped
    with torch.no_grad():
        after = model(x)
    torch.testing.assert_close(after, before, atol=FP32_ATOL, rtol=0)
    for name, layer in layers.items():
        assert layer.spatial.abs().max() == 0 and layer.bias_delta.abs().max() == 0
        assert layer.merged_weight.abs().max() > 0 and not torch.equal(layer.pointwise, pointwise[name])
    # a second epoch's update adds to the first: the total spans two separable kernels (eq. 12)
    _perturb(model, seed=1)
    expected = {n: layer.merged_weight + colora_delta(layer.pointwise, layer.spatial) for n, layer in layers.items()}
    merge_all(model)
    for name, layer in layers.items():
        torch.testing.assert_close(layer.merged_weight, expected[name], atol=0, rtol=0)


def test_convnext_dense_convs_are_adapted_and_depthwise_ones_skipped():
    model, _ = create_base_model(TINY_MODEL, num_classes=4, pretrained=False)
    report = apply_colora(model, ColoraSettings(), head="head.fc")
    dense = {"stem.0", "stages.1.downsample.1", "stages.2.downsample.1", "stages.3.downsample.1"}
    mlp = [n for n in report.layers if n.endswith((".mlp.fc1", ".mlp.fc2"))]  # atto's MLP runs as 1x1 convs
    assert set(report.layers) == dense | set(mlp) and len(mlp) == 2 * 12
    assert report.skipped_grouped and all("conv_dw" in n for n in report.skipped_grouped)
    for name in report.skipped_grouped:  # depthwise kernels stay plain, frozen convolutions
        assert type(model.get_submodule(name)) is nn.Conv2d
    with pytest.raises(ConfigError, match="only grouped/depthwise"):
        apply_colora(
            create_base_model(TINY_MODEL, 4, pretrained=False)[0],
            ColoraSettings(targets=("stages.*.conv_dw",)),
            head="head.fc",
        )
    with pytest.raises(ConfigError, match="matched no convolution; convolutions are: stem.0"):
        apply_colora(
            create_base_model(TINY_MODEL, 4, pretrained=False)[0], ColoraSettings(targets=("layer4.*",)), head="head.fc"
        )


def test_conv_subclasses_are_skipped_not_merged_wrongly():
    """timm's Conv2dSame pads inside its forward: a plain merged kernel would not be exact."""
    from timm.layers import Conv2dSame

    model = nn.Sequential(Conv2dSame(3, 4, 3, stride=2), nn.Conv2d(4, 4, 3, padding=1))
    report = apply_colora(model, ColoraSettings(), head="")
    assert report.layers == ["1"] and report.skipped_unsupported == ["0"] and type(model[0]) is Conv2dSame
    with pytest.raises(ConfigError, match="no dense convolution.*skipped Conv2d subclasses: 0"):
        apply_colora(nn.Sequential(Conv2dSame(3, 4, 3)), ColoraSettings(targets=("0",)), head="")
    with pytest.raises(ConfigError, match="no dense convolution"):  # min_kernel leaves nothing
        apply_colora(nn.Sequential(nn.Conv2d(3, 4, 1)), ColoraSettings(min_kernel=3), head="")


@pytest.mark.parametrize(
    "name,settings,layers,backprop,merged_into",
    [
        # the paper's backbones; counts as in its Table 4 footnotes (trained by backpropagation / merged into)
        ("vgg16", ColoraSettings(), 13, 1_676_736, 14_714_688),
        ("resnet50", ColoraSettings(), 53, 13_445_760, 23_454_912),
        ("resnet50", ColoraSettings(min_kernel=3), 17, 1_294_784, 11_326_656),
    ],
)
def test_paper_backbones_counts(name, settings, layers, backprop, merged_into):
    model, _ = create_base_model(name, num_classes=4, pretrained=False)
    model = apply_method(model, "colora", colora=settings)
    s = colora_summary(model)
    assert (s["layers"], s["backprop_params"], s["merged_into_params"]) == (layers, backprop, merged_into)
    head = sum(p.numel() for n, p in model.named_parameters() if n.startswith(model.pretrained_cfg["classifier"]))
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == backprop + head
    if name == "vgg16":  # timm's fc6/fc7 (pre_logits) are the classifier stage, never adapted
        assert not any(n.startswith("pre_logits") for n in colora_layers(model))


def test_lora_plus_colora_splits_layers_and_merges_into_the_plain_model():
    torch.manual_seed(0)
    plain, _ = create_base_model(TINY_MODEL, num_classes=4, pretrained=False)
    plain.eval()
    model = apply_method(copy.deepcopy(plain), "lora+colora", lora=LoraSettings(), colora=ColoraSettings()).eval()
    inner = model.get_base_model()
    assert set(colora_layers(inner)) == {
        "stem.0",
        "stages.1.downsample.1",
        "stages.2.downsample.1",
        "stages.3.downsample.1",
    }  # fc1/fc2 (1x1 convs in atto) stay LoRA's
    _perturb(inner)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref, base_out = model(x), plain(x)
        merged = merge_into_plain(plain, model)
        out = merged(x)
    assert (ref - base_out).abs().max() > 1e-2
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=0)
    assert type(merged) is type(plain) and merged.state_dict().keys() == plain.state_dict().keys()
    from peft.utils import get_peft_model_state_dict

    assert not any("pointwise" in k or "spatial" in k for k in get_peft_model_state_dict(model))


def test_adapter_file_round_trip_and_refuses_another_model(tmp_path):
    torch.manual_seed(0)
    base, _ = create_base_model(TINY_MODEL, num_classes=4, pretrained=False)
    model = apply_method(copy.deepcopy(base), "colora", colora=ColoraSettings())
    _perturb(model)
    merge_all(model)
    _perturb(model, seed=1)  # accumulated merge and live factors both non-zero
    head = {k: v for k, v in model.state_dict().items() if k.startswith("head.fc.")}
    save_colora(model, tmp_path / "colora.safetensors", ColoraSettings(), merges=1, extra=head)
    loaded = copy.deepcopy(base)
    load_colora(loaded, tmp_path / "colora.safetensors", ColoraSettings(), "head.fc", head_in_file=True)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(x), model.eval()(x), atol=0, rtol=0)
    with pytest.raises(BundleError, match="does not fit the model"):
        load_colora(
            copy.deepcopy(base),
            tmp_path / "colora.safetensors",
            ColoraSettings(min_kernel=3),
            "head.fc",
            head_in_file=True,
        )
    # merge-at-export adapters (no merge yet) leave the zero merge buffers out
    save_colora(model, tmp_path / "live.safetensors", ColoraSettings(), merges=0, extra=head)
    assert (tmp_path / "live.safetensors").stat().st_size < (tmp_path / "colora.safetensors").stat().st_size
