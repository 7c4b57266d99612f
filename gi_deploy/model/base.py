"""The timm backbone: built from hub weights, a local file or random init, its weights' provenance
and fingerprint (so export rebuilds exactly the same base), and small helpers on it."""

from __future__ import annotations

import difflib
import hashlib
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from gi_deploy.errors import ConfigError, WeightsError


@dataclass
class BaseWeights:
    """Where the backbone's weights came from, so export can rebuild exactly the same base.

    ``fingerprint`` hashes every backbone tensor (the classifier excluded, since it is replaced),
    and export refuses a rebuilt base whose fingerprint differs."""

    kind: str  # "hub" | "file" | "random"
    ref: str | None
    license: str
    fingerprint: str

    def to_dict(self) -> dict:
        return asdict(self)


def is_peft(model: nn.Module) -> bool:
    """Whether ``model`` is wrapped by peft (a PeftModel), without importing peft."""
    return hasattr(model, "peft_config")


def inner_model(model: nn.Module) -> nn.Module:
    """The timm model inside a peft wrapper (``model`` itself when it is not wrapped)."""
    return model.get_base_model() if is_peft(model) else model


def classifier_name(model: nn.Module) -> str:
    return model.pretrained_cfg.get("classifier", "head.fc")


def head_state(state: dict[str, torch.Tensor], head: str) -> dict[str, torch.Tensor]:
    """The classifier ``head``'s tensors out of a state dict."""
    return {k: v for k, v in state.items() if k.startswith(head + ".")}


def state_fingerprint(model: nn.Module, exclude_prefix: str | None = None) -> str:
    """SHA-256 over (name, dtype, shape, bytes) of every state tensor, sorted by name."""
    digest = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        if exclude_prefix and name.startswith(exclude_prefix + "."):
            continue
        t = t.detach().cpu().contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")  # 0-dim too
    return digest.hexdigest()


def _check_model_name(name: str) -> None:
    import timm

    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=5, cutoff=0.6)
        raise ConfigError(f"timm has no model {name!r}" + (f"; similar: {', '.join(close)}" if close else ""))


def load_weights_file(model: nn.Module, path: Path) -> None:
    """Load a local checkpoint (timm/torch ``.pth``/``.bin``/``.safetensors``, raw or under a
    ``state_dict``/``model`` key, in timm's key format or the upstream one timm knows how to remap)
    into every backbone tensor; the classifier is left as built.

    Raises WeightsError when the file cannot be read or does not cover the backbone exactly."""
    from timm.models import load_state_dict

    try:
        state = load_state_dict(str(path), weights_only=True)
    except (OSError, RuntimeError, ValueError, KeyError) as e:
        raise WeightsError(f"cannot read weights file {path}: {e}") from e
    # timm's own remapping of upstream checkpoints (e.g. the official ConvNeXt-V2 .pt files,
    # whose keys are `downsample_layers.*`, `pwconv1`, `grn.gamma`), as timm applies it to hub weights
    remap = getattr(sys.modules.get(type(model).__module__), "checkpoint_filter_fn", None)
    if remap is not None:
        try:
            state = remap(state, model)
        except (KeyError, RuntimeError, ValueError) as e:
            raise WeightsError(f"weights file {path} could not be mapped onto {type(model).__name__}: {e}") from e
    head = classifier_name(model)
    state = {k: v for k, v in state.items() if not k.startswith(head + ".")}
    own = {k: v for k, v in model.state_dict().items() if not k.startswith(head + ".")}
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    mismatched = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
    if missing or unexpected or mismatched:

        def show(keys: list[str]) -> str:
            return ", ".join(keys[:5]) + (f" (+{len(keys) - 5} more)" if len(keys) > 5 else "")

        details = [
            f"{label}: {show(keys)}"
            for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", mismatched))
            if keys
        ]
        raise WeightsError(
            f"weights file {path} does not match model "
            f"{model.pretrained_cfg.get('architecture', type(model).__name__)}: "
            + "; ".join(details)
            + ". Pass the --model the checkpoint was trained as."
        )
    model.load_state_dict(state, strict=False)


def create_base_model(
    name: str, num_classes: int, pretrained: bool = True, weights: Path | None = None
) -> tuple[nn.Module, BaseWeights]:
    """``timm.create_model(name, num_classes=...)`` with weights from a local file (``weights``),
    the Hugging Face hub (``pretrained``), or random init. Raises WeightsError with the fix
    (``--weights`` / ``--no-pretrained``) when the hub cannot be reached."""
    import timm
    from huggingface_hub.errors import HfHubHTTPError

    _check_model_name(name)
    if weights is not None:
        model = timm.create_model(name, pretrained=False, num_classes=num_classes)
        load_weights_file(model, Path(weights))
        kind, ref, license_ = "file", str(Path(weights).resolve()), "see the weights file's origin"
    elif pretrained:
        try:
            model = timm.create_model(name, pretrained=True, num_classes=num_classes)
        except (OSError, HfHubHTTPError) as e:
            raise WeightsError(
                f"could not download pretrained weights for {name!r} from the Hugging Face hub ({e}). "
                "Offline? Pass a local checkpoint with --weights PATH, or train from random init with "
                "--no-pretrained."
            ) from e
        cfg = model.pretrained_cfg
        kind, ref = "hub", cfg.get("hf_hub_id") or cfg.get("url") or name
        license_ = cfg.get("license", "unknown")
    else:
        model = timm.create_model(name, pretrained=False, num_classes=num_classes)
        kind, ref, license_ = "random", None, "none (random init)"
    fp = state_fingerprint(model, exclude_prefix=classifier_name(model))
    return model, BaseWeights(kind=kind, ref=ref, license=license_, fingerprint=fp)


def train_only_head(model: nn.Module) -> nn.Module:
    """Freeze every parameter but the classifier's (a linear probe; the starting point of the adapter methods)."""
    head = classifier_name(model)
    for name, p in model.named_parameters():
        p.requires_grad_(name.startswith(head + "."))
    return model


def train_mode(model: nn.Module) -> nn.Module:
    """``model.train()``, except that batch norms whose affine parameters are all frozen keep
    running in eval mode: their running statistics stay the pretrained ones (what Keras does for a
    frozen backbone, as in the CoLoRA paper). Otherwise a frozen ResNet/VGG-BN would drift its
    statistics every step, and an adapter-only artifact (which does not store them) would not
    reproduce the model that was validated."""
    model.train()
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and not any(p.requires_grad for p in m.parameters()):
            m.eval()
    return model


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, sum(p.numel() for p in model.parameters())
