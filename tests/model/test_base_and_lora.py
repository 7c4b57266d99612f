import pytest
import torch
from torch import nn

from gi_deploy.errors import ConfigError, WeightsError
from gi_deploy.model.base import count_parameters, create_base_model, state_fingerprint
from gi_deploy.model.lora import apply_lora
from gi_deploy.model.settings import LoraSettings
from gi_deploy.training.config import TrainConfig


@pytest.mark.parametrize("name,layer_type", [("convnextv2_atto", nn.Conv2d), ("convnextv2_tiny", nn.Linear)])
def test_lora_targets_fc1_fc2_and_trains_the_new_head(name, layer_type):
    """atto builds its MLP from 1x1 convs, tiny and larger from Linear: both must be adapted."""
    model, _ = create_base_model(name, num_classes=5, pretrained=False)
    n_blocks = sum(1 for n, _ in model.named_modules() if n.endswith(".mlp"))
    peft_model = apply_lora(model, LoraSettings())
    lora_layers = {n for n, m in peft_model.named_modules() if hasattr(m, "lora_A") and m.lora_A}
    assert len(lora_layers) == 2 * n_blocks
    assert all(n.endswith(("mlp.fc1", "mlp.fc2")) for n in lora_layers)
    fc1 = next(m for n, m in peft_model.named_modules() if n.endswith("mlp.fc1") and hasattr(m, "base_layer"))
    assert isinstance(fc1.base_layer, layer_type)
    assert fc1.lora_A["default"].weight.shape[0] == 16 and fc1.scaling["default"] == 2.0  # alpha 32 / r 16
    trainable = {n for n, p in peft_model.named_parameters() if p.requires_grad}
    assert any("head.fc" in n and n.endswith("weight") for n in trainable)  # the new head trains
    assert all("lora_" in n or "head.fc" in n for n in trainable)  # and nothing else but adapters


def test_paper_trainable_parameter_count_for_convnextv2_base():
    """2,887,680 LoRA parameters (the paper's count) plus the 11-class head."""
    model, _ = create_base_model("convnextv2_base", num_classes=11, pretrained=False)
    trainable, total = count_parameters(apply_lora(model, LoraSettings()))
    assert trainable == 2_887_680 + 1024 * 11 + 11
    assert total > 88_000_000


def test_unknown_target_and_grouped_conv_fail_fast():
    model, _ = create_base_model("convnextv2_atto", num_classes=3, pretrained=False)
    with pytest.raises(ConfigError, match="target 'qkv' matched no module; module names are: .*fc1"):
        apply_lora(model, LoraSettings(target_modules=("qkv",)))
    with pytest.raises(ConfigError, match="grouped convolutions"):
        apply_lora(model, LoraSettings(target_modules=("conv_dw",)))


def test_offline_pretrained_names_both_fixes(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as hub_constants

    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True, raising=False)
    with pytest.raises(WeightsError) as e:
        create_base_model("convnextv2_atto", num_classes=3, pretrained=True)
    assert "--weights" in str(e.value) and "--no-pretrained" in str(e.value)


def test_weights_file_loads_backbone_and_replaces_head(tmp_path):
    from safetensors.torch import save_file

    src, _ = create_base_model("convnextv2_atto", num_classes=7, pretrained=False)
    path = tmp_path / "base.safetensors"
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(path))
    model, info = create_base_model("convnextv2_atto", num_classes=3, pretrained=True, weights=path)
    assert info.kind == "file" and model.head.fc.out_features == 3
    assert torch.equal(model.stem[0].weight, src.stem[0].weight)
    assert info.fingerprint == state_fingerprint(src, exclude_prefix="head.fc")


def test_weights_file_for_another_model_is_refused(tmp_path):
    from safetensors.torch import save_file

    other, _ = create_base_model("convnextv2_femto", num_classes=3, pretrained=False)
    path = tmp_path / "femto.safetensors"
    save_file({k: v.contiguous() for k, v in other.state_dict().items()}, str(path))
    with pytest.raises(WeightsError, match="does not match model .*wrong shape.*--model"):
        create_base_model("convnextv2_atto", num_classes=3, weights=path)


def test_config_reports_every_problem_at_once(tmp_path):
    with pytest.raises(ConfigError) as e:
        TrainConfig(
            source="k", data_dir=tmp_path / "missing", method="prompt", epochs=0, lr=-1.0, weights=tmp_path / "none.pth"
        )
    msg = str(e.value)
    for part in ("method 'prompt'", "epochs must be >= 1", "lr must be > 0", "is not a folder", "none.pth"):
        assert part in msg


def test_unknown_model_suggests_close_names():
    with pytest.raises(ConfigError, match="timm has no model 'convnextv2_bse'; similar: .*convnextv2_base"):
        create_base_model("convnextv2_bse", num_classes=3, pretrained=False)


def _to_upstream_convnext_keys(state: dict) -> dict:
    """timm ConvNeXt-V2 keys -> the official repository's (facebookresearch/ConvNeXt-V2) format."""
    import re

    out = {}
    for k, v in state.items():
        k = k.replace("stem.", "downsample_layers.0.")
        k = re.sub(r"stages\.(\d+)\.downsample\.(\d+)", r"downsample_layers.\1.\2", k)
        k = re.sub(r"stages\.(\d+)\.blocks\.(\d+)", r"stages.\1.\2", k)
        k = k.replace("conv_dw", "dwconv").replace("mlp.fc", "pwconv")
        if "mlp.grn" in k:
            k = k.replace("mlp.grn.bias", "grn.beta").replace("mlp.grn.weight", "grn.gamma")
            v = v.reshape(1, 1, 1, -1)
        if "pwconv" in k and v.ndim == 4:  # upstream uses Linear layers for the 1x1 MLP
            v = v.flatten(1)
        k = k.replace("head.norm", "norm").replace("head.fc", "head")
        out[k] = v
    return {"model": out}


def test_official_upstream_checkpoint_format_loads(tmp_path):
    src, _ = create_base_model("convnextv2_atto", num_classes=1000, pretrained=False)
    path = tmp_path / "convnextv2_atto_1k_224_ema.pt"
    torch.save(_to_upstream_convnext_keys(src.state_dict()), path)
    model, info = create_base_model("convnextv2_atto", num_classes=4, weights=path)
    assert info.fingerprint == state_fingerprint(src, exclude_prefix="head.fc")
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model.forward_features(x), src.eval().forward_features(x))


def test_rank_dropout_moves_the_noise_without_changing_weights_or_eval():
    """dropout_position="rank": same parameters and eval output; in training, A sees the layer's
    input unchanged (no full-width dropout copy) and the model is still stochastic."""
    import copy

    import timm

    torch.manual_seed(0)
    base = timm.create_model("convnextv2_atto", pretrained=False, num_classes=3)
    a = apply_lora(copy.deepcopy(base), LoraSettings())
    b = apply_lora(copy.deepcopy(base), LoraSettings(dropout_position="rank"))
    for n, p in a.named_parameters():
        if "lora_B" in n:  # peft starts B at zero: make the adapters matter
            torch.nn.init.normal_(p, std=0.1)
    b.load_state_dict(a.state_dict())
    assert a.state_dict().keys() == b.state_dict().keys()
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(a.eval()(x), b.eval()(x))

    def inputs_seen(model):
        layer = model.get_submodule("base_model.model.stages.0.blocks.0.mlp.fc1")
        seen = {}

        def keep(key):
            def hook(module, inputs, output):  # returns None: observes without replacing the output
                seen.setdefault(key, inputs[0])

            return hook

        hooks = [layer.register_forward_hook(keep("layer")), layer.lora_A["default"].register_forward_hook(keep("A"))]
        model.train()(x)
        for h in hooks:
            h.remove()
        return seen

    seen_a, seen_b = inputs_seen(a), inputs_seen(b)
    assert not torch.equal(seen_a["A"], seen_a["layer"])  # peft: A sees a dropped-out copy
    assert torch.equal(seen_b["A"], seen_b["layer"])  # rank: A sees the input itself
    assert not torch.equal(b(x), b(x))  # the dropout still acts in training
