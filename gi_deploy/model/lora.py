"""LoRA through peft: apply it to a timm model (checking the targets first), the optional
rank-position dropout, save and load the adapter, and read its factors for the merge."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from torch import nn

from gi_deploy.core.runs import ADAPTER_DIR
from gi_deploy.errors import BundleError, ConfigError
from gi_deploy.model.base import is_peft
from gi_deploy.model.merge import LoraFactors, lora_delta
from gi_deploy.model.settings import LoraSettings


def apply_lora(model: nn.Module, lora: LoraSettings, head: str | None = None) -> nn.Module:
    """Wrap ``model`` with peft LoRA; check first that every target matches a mergeable module.
    The classifier trains in full through ``lora.modules_to_save``."""
    from peft import LoraConfig, get_peft_model

    names = [n for n, _ in model.named_modules()]
    for target in lora.target_modules:
        hits = [n for n in names if n == target or n.endswith("." + target)]
        if not hits:
            leaves = sorted({n.rsplit(".", 1)[-1] for n in names if n})
            raise ConfigError(f"LoRA target {target!r} matched no module; module names are: {', '.join(leaves)}")
        grouped = [
            n for n in hits if isinstance(model.get_submodule(n), nn.Conv2d) and model.get_submodule(n).groups > 1
        ]
        if grouped:  # peft cannot merge LoRA into grouped (depthwise) convolutions
            raise ConfigError(
                f"LoRA target {target!r} matches grouped convolutions ({grouped[0]}, ...) "
                "which cannot be merged; target the block MLP fc1/fc2"
            )
    config = LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=list(lora.target_modules),
        modules_to_save=list(lora.modules_to_save),
    )
    peft_model = get_peft_model(model, config)
    if lora.dropout_position == "rank" and lora.dropout > 0:
        move_lora_dropout_to_rank(peft_model, lora.dropout)
    return peft_model


class _RankDropout:
    """Forward hook on a LoRA ``A``: dropout on its r-dimensional output (active in train mode only)."""

    def __init__(self, p: float):
        self.p = p

    def __call__(self, module: nn.Module, inputs, output: torch.Tensor) -> torch.Tensor:
        return nn.functional.dropout(output, self.p, module.training)


def move_lora_dropout_to_rank(model: nn.Module, p: float) -> int:
    """Replace peft's input dropout (a full-width copy and mask of every adapted layer's input) by
    dropout on ``A``'s rank-r output. Returns the number of layers changed. Weights, saved adapters
    and merges are unaffected; only the training-time noise moves."""
    changed = 0
    for module in model.modules():
        dropouts = getattr(module, "lora_dropout", None)
        if not isinstance(dropouts, nn.ModuleDict):
            continue
        for name in list(dropouts):
            dropouts[name] = nn.Identity()
            module.lora_A[name].register_forward_hook(_RankDropout(p))
            changed += 1
    return changed


def save_lora(model: nn.Module, run_dir: Path, settings: LoraSettings, head: str, with_head: bool, merges: int) -> None:
    """peft's ``save_pretrained`` into ``run_dir/adapter``, atomically (the head travels in it as a
    module to save)."""
    run_dir = Path(run_dir)
    tmp = run_dir / (ADAPTER_DIR + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(str(tmp))
    shutil.rmtree(run_dir / ADAPTER_DIR, ignore_errors=True)
    tmp.rename(run_dir / ADAPTER_DIR)


def load_lora(model: nn.Module, run_dir: Path, settings: LoraSettings, head: str, with_head: bool) -> nn.Module:
    """``model`` wrapped by the run's saved peft adapter (un-merged)."""
    from peft import PeftModel

    adapter = Path(run_dir) / ADAPTER_DIR
    if not (adapter / "adapter_config.json").is_file():
        raise BundleError(f"adapter missing in {adapter}; the run did not finish an epoch")
    return PeftModel.from_pretrained(model, str(adapter))


def peft_lora_parts(
    peft_model: nn.Module,
    adapter: str = "default",
) -> tuple[dict[str, LoraFactors], dict[str, torch.Tensor]]:
    """Read LoRA factors and fully trained modules (``modules_to_save``) out of a peft model,
    keyed by the plain model's module / state-dict names."""
    from peft.tuners.lora import LoraLayer
    from peft.utils.other import ModulesToSaveWrapper

    config = peft_model.peft_config[adapter]
    if getattr(config, "use_dora", False):
        raise ConfigError("DoRA adapters are not supported by the LoRA merge; retrain without use_dora")
    inner = peft_model.get_base_model()
    factors: dict[str, LoraFactors] = {}
    replaced: dict[str, torch.Tensor] = {}
    for name, module in inner.named_modules():
        if isinstance(module, LoraLayer) and adapter in module.lora_A:
            factors[name] = LoraFactors(
                A=module.lora_A[adapter].weight.detach(),
                B=module.lora_B[adapter].weight.detach(),
                scaling=float(module.scaling[adapter]),
            )
        elif isinstance(module, ModulesToSaveWrapper):
            trained = module.modules_to_save[adapter]
            replaced.update({f"{name}.{k}": v for k, v in trained.state_dict().items()})
    if not factors:
        raise ConfigError(f"peft model has no LoRA layers for adapter {adapter!r}")
    return factors, replaced


def lora_deltas(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(``<module>.weight`` -> s * B A, the modules trained in full) of a peft model; empty without peft."""
    if not is_peft(model):
        return {}, {}
    factors, replaced = peft_lora_parts(model)
    return {f"{module}.weight": lora_delta(f) for module, f in factors.items()}, replaced
