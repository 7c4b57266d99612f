"""Adapter settings (torch-free dataclasses): what a training run records and export and the
torch backend rebuild the adapters from. Help text lives on the fields; ``train``'s options
(``--<kind>-<field>``) are generated from them, and ``ADAPTER_SETTINGS`` names each adapter kind's
class for the config and the CLI (the torch side of each kind: model/adapters.py ``ADAPTERS``)."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from gi_deploy.core.fields import helped
from gi_deploy.errors import ConfigError

COLORA_FORWARD = ("branch", "fused")
LORA_DROPOUT_POSITIONS = ("input", "rank")


@dataclass
class LoraSettings:
    """LoRA as the seed paper sets it: r=16, alpha=32, dropout 0.1 on the block MLP fc1/fc2,
    with the freshly initialised classifier ``head.fc`` trained in full."""

    r: int = helped(16, "LoRA rank.")
    alpha: int = helped(32, "LoRA alpha (scaling alpha / r).")
    dropout: float = helped(0.1, "LoRA dropout.")
    target_modules: tuple[str, ...] = helped(("fc1", "fc2"), "Module names LoRA adapts.", cli=False)
    modules_to_save: tuple[str, ...] = helped(("head.fc",), "Modules trained in full beside the adapters.", cli=False)
    # "input": peft's (and the paper's) dropout on the layer input, full width; "rank": the same rate
    # on the r-dimensional output of A, 6-190x fewer elements (a cheaper, different regulariser;
    # see benchmarks/train_throughput.py). Training-only: saved adapters and merges are identical.
    dropout_position: str = helped(
        "input", "input (peft, the paper) | rank (on A's output: cheaper, see docs/benchmarks.md)."
    )

    def __post_init__(self) -> None:
        self.target_modules, self.modules_to_save = tuple(self.target_modules), tuple(self.modules_to_save)
        if self.r < 1:
            raise ConfigError(f"lora r must be >= 1, got {self.r}")
        if self.alpha <= 0:
            raise ConfigError(f"lora alpha must be > 0, got {self.alpha}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"lora dropout must be in [0, 1), got {self.dropout}")
        if self.dropout_position not in LORA_DROPOUT_POSITIONS:
            raise ConfigError(f"lora dropout_position must be 'input' or 'rank', got {self.dropout_position!r}")
        if not self.target_modules:
            raise ConfigError("lora target_modules is empty; the paper targets ('fc1', 'fc2')")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["target_modules"], d["modules_to_save"] = list(self.target_modules), list(self.modules_to_save)
        return d


@dataclass
class ColoraSettings:
    """CoLoRA (seeds/002) as the paper runs it: every dense convolution of the backbone gets a
    pointwise-then-depthwise update, merged into the frozen kernel after every epoch.

    ``targets`` are fnmatch patterns on module names (``layer4.*``, ``stages.*.downsample.*``);
    empty = every dense convolution outside the classifier. ``min_kernel`` 3 skips 1x1
    convolutions, whose CoLoRA pointwise factor is as large as the kernel itself (no saving).
    ``merge_every`` N merges after every N-th epoch; 0 merges only at export."""

    merge_every: int = helped(1, "CoLoRA: merge into the kernels every N epochs; 0 = only at export.")
    targets: tuple[str, ...] = helped(
        (), "CoLoRA: module-name patterns, e.g. 'layer3.*,layer4.*' (none: every dense conv)."
    )
    min_kernel: int = helped(1, "CoLoRA: skip convolutions with a smaller kernel; 3 leaves 1x1 convs frozen.")
    # fused: one convolution with K0 + K_p*K_d; branch: K0*x + K_d*(K_p*x), the paper's Fig. 4 layer.
    # Identical outputs and gradients; fused measured 1.85-2.1x faster (two runs) with 0.73x the peak
    # memory of branch on ResNet50 (CPU; benchmarks/train_throughput.py), where most convolutions are
    # 1x1 and the branch doubles their cost.
    forward_mode: str = helped(
        "fused",
        "CoLoRA training forward: fused (one conv with K0 + dK) | branch (the "
        "paper's extra convs; slower, same maths).",
        flag="forward",
    )

    def __post_init__(self) -> None:
        self.targets = tuple(self.targets)
        if self.merge_every < 0:
            raise ConfigError(f"colora merge_every must be >= 0 (0 = only at export), got {self.merge_every}")
        if self.min_kernel < 1:
            raise ConfigError(f"colora min_kernel must be >= 1, got {self.min_kernel}")
        if self.forward_mode not in COLORA_FORWARD:
            raise ConfigError(f"colora forward_mode {self.forward_mode!r} unknown; use {' or '.join(COLORA_FORWARD)}")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["targets"] = list(self.targets)
        return d


# Each adapter kind's settings by the kind's name: TrainConfig's field and --config table of that
# name, and the --<name>-<field> options of `train`. The same names as model/adapters.py ADAPTERS.
ADAPTER_SETTINGS: dict[str, type] = {"lora": LoraSettings, "colora": ColoraSettings}
