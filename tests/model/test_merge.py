import copy

import pytest
import torch
from torch import nn

from gi_deploy.errors import ConfigError, VerificationError
from gi_deploy.model.adapters import merge_into_plain
from gi_deploy.model.base import create_base_model
from gi_deploy.model.lora import apply_lora
from gi_deploy.model.merge import LoraFactors, lora_delta, merge_lora_state_dict
from gi_deploy.model.settings import LoraSettings


def test_linear_delta_by_hand():
    A = torch.tensor([[1.0, 0.0, 2.0]])  # r=1, in=3
    B = torch.tensor([[1.0], [-1.0]])  # out=2, r=1
    expected = 2.0 * torch.tensor([[1.0, 0.0, 2.0], [-1.0, 0.0, -2.0]])
    assert torch.equal(lora_delta(LoraFactors(A, B, scaling=2.0)), expected)


def test_conv_delta_by_hand_and_equals_the_composed_convolution():
    A = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]], [[[0.0, 1.0], [0.0, 1.0]]]])  # r=2, in=1, 2x2
    B = torch.tensor([[1.0, 10.0]]).reshape(1, 2, 1, 1)  # out=1, r=2, 1x1
    delta = lora_delta(LoraFactors(A, B, scaling=0.5))
    assert torch.equal(delta, 0.5 * torch.tensor([[[[1.0, 12.0], [3.0, 14.0]]]]))
    x = torch.randn(1, 1, 5, 5)
    composed = 0.5 * nn.functional.conv2d(nn.functional.conv2d(x, A), B)
    torch.testing.assert_close(nn.functional.conv2d(x, delta), composed)


def test_merge_state_dict_is_pure_and_replaces_head():
    base = {"fc.weight": torch.zeros(2, 3), "fc.bias": torch.ones(2), "head.weight": torch.zeros(1, 2)}
    frozen = copy.deepcopy(base)
    f = LoraFactors(torch.ones(1, 3), torch.ones(2, 1), scaling=3.0)
    merged = merge_lora_state_dict(base, {"fc": f}, {"head.weight": torch.full((1, 2), 7.0)})
    assert torch.equal(merged["fc.weight"], torch.full((2, 3), 3.0))
    assert torch.equal(merged["head.weight"], torch.full((1, 2), 7.0))
    assert all(torch.equal(base[k], frozen[k]) for k in base)  # input untouched


def test_merge_refuses_non_finite_and_mismatched_shapes():
    base = {"fc.weight": torch.zeros(2, 3)}
    bad = LoraFactors(torch.full((1, 3), float("inf")), torch.ones(2, 1), 1.0)
    with pytest.raises(VerificationError, match="'fc' produced non-finite"):
        merge_lora_state_dict(base, {"fc": bad})
    with pytest.raises(ConfigError, match="shape"):
        merge_lora_state_dict(base, {"fc": LoraFactors(torch.ones(1, 4), torch.ones(2, 1), 1.0)})


def _peft_with_nonzero_b(name: str, seed: int = 0):
    """A peft model whose LoRA B is non-zero (peft initialises B = 0, which would make any merge
    look right) and whose head differs from the plain model's."""
    torch.manual_seed(seed)
    plain, _ = create_base_model(name, num_classes=4, pretrained=False)
    plain.eval()
    peft_model = apply_lora(copy.deepcopy(plain), LoraSettings()).eval()
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
            if "modules_to_save" in n:
                p.add_(0.1)
    return plain, peft_model


@pytest.mark.parametrize("name", ["convnextv2_atto", "convnextv2_tiny"])
def test_merged_plain_model_equals_unmerged_adapter_model(name):
    plain, peft_model = _peft_with_nonzero_b(name)
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        ref = peft_model(x)
        base_out = plain(x)
        merged = merge_into_plain(plain, peft_model)
        out = merged(x)
    assert (ref - base_out).abs().max() > 1e-2  # the adapter really changes the output
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=0)
    assert type(merged) is type(plain)  # plain timm architecture: the backbone's exact cost
    assert sum(p.numel() for p in merged.parameters()) == sum(p.numel() for p in plain.parameters())
    assert not any("lora" in k for k in merged.state_dict())


def test_our_merge_matches_peft_merge_and_unload():
    plain, peft_model = _peft_with_nonzero_b("convnextv2_atto", seed=1)
    ours = merge_into_plain(plain, peft_model).state_dict()
    theirs = copy.deepcopy(peft_model).merge_and_unload().state_dict()
    assert ours.keys() == theirs.keys()
    for k in ours:
        torch.testing.assert_close(ours[k], theirs[k], atol=1e-6, rtol=0)
