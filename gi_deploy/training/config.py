"""The training stage's one config object. CLI, Python API and tests all build this."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

from gi_deploy.errors import ConfigError

METHODS = ("lora", "full")
DEVICES = ("auto", "cpu", "cuda")


@dataclass
class LoraSettings:
    """LoRA as the seed paper sets it: r=16, alpha=32, dropout 0.1 on the block MLP fc1/fc2,
    with the freshly initialised classifier ``head.fc`` trained in full."""

    r: int = 16
    alpha: int = 32
    dropout: float = 0.1
    target_modules: tuple[str, ...] = ("fc1", "fc2")
    modules_to_save: tuple[str, ...] = ("head.fc",)

    def __post_init__(self) -> None:
        if self.r < 1:
            raise ConfigError(f"lora r must be >= 1, got {self.r}")
        if self.alpha <= 0:
            raise ConfigError(f"lora alpha must be > 0, got {self.alpha}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"lora dropout must be in [0, 1), got {self.dropout}")
        if not self.target_modules:
            raise ConfigError("lora target_modules is empty; the paper targets ('fc1', 'fc2')")


@dataclass
class TrainConfig:
    """Everything that defines a training run; stored resolved in the run manifest."""

    source: str
    data_dir: Path
    method: str = "lora"
    model: str = "convnextv2_base"
    pretrained: bool = True
    weights: Path | None = None
    img_size: int = 224
    epochs: int = 30
    batch_size: int = 32
    lr: float = 1e-4
    weight_decay: float = 0.01
    patience: int = 5
    seed: int = 0
    out_dir: Path = Path("runs")
    device: str = "auto"
    num_workers: int = 0
    val_fraction: float = 0.1
    test_fraction: float = 0.1
    hflip: bool = True
    rotation_degrees: float = 10.0
    overwrite: bool = False  # replace a finished run in run_dir instead of refusing
    lora: LoraSettings = field(default_factory=LoraSettings)

    def __post_init__(self) -> None:
        self.data_dir = Path(self.data_dir)
        self.out_dir = Path(self.out_dir)
        self.weights = Path(self.weights) if self.weights is not None else None
        problems = []
        if not self.source or "/" in self.source or self.source.startswith("."):
            problems.append(f"source name {self.source!r} must be a plain folder name")
        if self.method not in METHODS:
            problems.append(f"method {self.method!r} unknown; use one of {', '.join(METHODS)}")
        if self.device not in DEVICES:
            problems.append(f"device {self.device!r} unknown; use one of {', '.join(DEVICES)}")
        for name in ("img_size", "epochs", "batch_size", "patience"):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.lr <= 0:
            problems.append(f"lr must be > 0, got {self.lr}")
        if self.num_workers < 0:
            problems.append(f"num_workers must be >= 0, got {self.num_workers}")
        if not (0 < self.val_fraction < 1 and 0 <= self.test_fraction < 1
                and self.val_fraction + self.test_fraction < 1):
            problems.append(f"val_fraction {self.val_fraction} and test_fraction {self.test_fraction} "
                            "must be fractions that leave images for training")
        if not self.data_dir.is_dir():
            problems.append(f"data_dir {self.data_dir} is not a folder")
        if self.weights is not None and not self.weights.is_file():
            problems.append(f"weights file {self.weights} does not exist")
        if problems:  # report every problem at once, before any heavy work
            raise ConfigError("invalid training config:\n  " + "\n  ".join(problems))

    @property
    def run_dir(self) -> Path:
        return self.out_dir / self.source

    def to_dict(self) -> dict:
        d = asdict(self)
        for key in ("data_dir", "out_dir", "weights"):
            d[key] = str(d[key]) if d[key] is not None else None
        d["lora"]["target_modules"] = list(self.lora.target_modules)
        d["lora"]["modules_to_save"] = list(self.lora.modules_to_save)
        return d
