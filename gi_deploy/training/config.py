"""The training stage's one config object. CLI, Python API and tests all build this.

Values come from three layers, later ones winning: the defaults here (the seed paper's recipe,
section 4.2), a ``--config`` file (YAML or TOML, keys = field names, ``[lora]`` as a table),
and flags given on the command line."""

from __future__ import annotations

import dataclasses
import json
import tomllib
from dataclasses import asdict, dataclass, field
from pathlib import Path

from gi_deploy.errors import ConfigError

METHODS = ("lora", "full", "linear", "colora", "lora+colora")
LORA_METHODS = ("lora", "lora+colora")  # methods whose run holds a peft LoRA adapter
COLORA_METHODS = ("colora", "lora+colora")  # methods whose run holds CoLoRA layers
COLORA_FORWARD = ("branch", "fused")
DEVICES = ("auto", "cpu", "cuda")
SCHEDULERS = ("none", "cosine", "plateau")
BALANCE = ("none", "weighted-loss", "sampler")
AMP = ("auto", "off", "bf16", "fp16")
RESIZE = ("direct", "crop")
SPLIT_MODES = ("seeded", "official-0", "official-1")  # official-N: kvasir's official folds
# what may change when a run is resumed: where and how fast it runs, and how long it may go on
RESUME_MAY_CHANGE = frozenset({"resume", "overwrite", "device", "num_workers", "compile", "epochs"})


@dataclass
class LoraSettings:
    """LoRA as the seed paper sets it: r=16, alpha=32, dropout 0.1 on the block MLP fc1/fc2,
    with the freshly initialised classifier ``head.fc`` trained in full."""

    r: int = 16
    alpha: int = 32
    dropout: float = 0.1
    target_modules: tuple[str, ...] = ("fc1", "fc2")
    modules_to_save: tuple[str, ...] = ("head.fc",)
    # "input": peft's (and the paper's) dropout on the layer input, full width; "rank": the same rate
    # on the r-dimensional output of A, 6-190x fewer elements (a cheaper, different regulariser;
    # see benchmarks/train_throughput.py). Training-only: saved adapters and merges are identical.
    dropout_position: str = "input"

    def __post_init__(self) -> None:
        if self.r < 1:
            raise ConfigError(f"lora r must be >= 1, got {self.r}")
        if self.alpha <= 0:
            raise ConfigError(f"lora alpha must be > 0, got {self.alpha}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"lora dropout must be in [0, 1), got {self.dropout}")
        if self.dropout_position not in ("input", "rank"):
            raise ConfigError(f"lora dropout_position must be 'input' or 'rank', got {self.dropout_position!r}")
        if not self.target_modules:
            raise ConfigError("lora target_modules is empty; the paper targets ('fc1', 'fc2')")


@dataclass
class ColoraSettings:
    """CoLoRA (seeds/002) as the paper runs it: every dense convolution of the backbone gets a
    pointwise-then-depthwise update, merged into the frozen kernel after every epoch.

    ``targets`` are fnmatch patterns on module names (``layer4.*``, ``stages.*.downsample.*``);
    empty = every dense convolution outside the classifier. ``min_kernel`` 3 skips 1x1
    convolutions, whose CoLoRA pointwise factor is as large as the kernel itself (no saving).
    ``merge_every`` N merges after every N-th epoch; 0 merges only at export."""

    merge_every: int = 1
    targets: tuple[str, ...] = ()
    min_kernel: int = 1
    # fused: one convolution with K0 + K_p*K_d; branch: K0*x + K_d*(K_p*x), the paper's Fig. 4 layer.
    # Identical outputs and gradients; fused measured 1.85-2.1x faster (two runs) with 0.73x the peak
    # memory of branch on ResNet50 (CPU; benchmarks/train_throughput.py), where most convolutions are
    # 1x1 and the branch doubles their cost.
    forward_mode: str = "fused"

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


@dataclass
class TrainConfig:
    """Everything that defines a training run; stored resolved in the run manifest."""

    source: str
    data_dir: Path
    method: str = "lora"  # lora | full | linear (head only) | colora | lora+colora
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
    num_workers: int | None = None  # None: 0 on CPU, min(8, cores) on CUDA
    val_fraction: float = 0.1
    test_fraction: float = 0.1
    split: str = "seeded"  # kvasir: official-0 / official-1 train on that official fold, test on the other
    label_fraction: float = 1.0  # keep this share of each class's training images (seeded)
    resize: str = "direct"  # direct: squash to img_size (the paper); crop: shorter side, centre crop
    crop_pct: float = 0.875  # with resize=crop: crop img_size out of img_size / crop_pct
    hflip: bool = True
    vflip: bool = False
    rotation_degrees: float = 10.0
    color_jitter: float = 0.0
    scheduler: str = "none"  # none (the paper) | cosine | plateau (on val accuracy)
    balance: str = "none"  # none | weighted-loss (inverse class frequency) | sampler (balanced batches)
    amp: str = "auto"  # auto: bf16 on CUDA where supported, else fp16 with a grad scaler; off on CPU
    channels_last: bool | None = None  # None: on CUDA only
    compile: bool = False  # torch.compile the model
    overwrite: bool = False  # replace a finished run in run_dir instead of refusing
    resume: bool = False  # continue an interrupted run from its last checkpoint
    lora: LoraSettings = field(default_factory=LoraSettings)
    colora: ColoraSettings = field(default_factory=ColoraSettings)

    def __post_init__(self) -> None:
        self.data_dir = Path(self.data_dir)
        self.out_dir = Path(self.out_dir)
        self.weights = Path(self.weights) if self.weights is not None else None
        if isinstance(self.lora, dict):
            self.lora = _settings_from_dict(LoraSettings, self.lora, "lora")
        if isinstance(self.colora, dict):
            self.colora = _settings_from_dict(ColoraSettings, self.colora, "colora")
        problems = []
        for name, allowed in (("scheduler", SCHEDULERS), ("balance", BALANCE), ("amp", AMP), ("resize", RESIZE),
                              ("split", SPLIT_MODES)):
            if getattr(self, name) not in allowed:
                problems.append(f"{name} {getattr(self, name)!r} unknown; use one of {', '.join(allowed)}")
        if not 0.0 < self.label_fraction <= 1.0:
            problems.append(f"label_fraction must be in (0, 1], got {self.label_fraction}")
        if not 0.0 < self.crop_pct <= 1.0:
            problems.append(f"crop_pct must be in (0, 1], got {self.crop_pct}")
        if self.color_jitter < 0 or self.rotation_degrees < 0:
            problems.append("color_jitter and rotation_degrees must be >= 0")
        if self.overwrite and self.resume:
            problems.append("--overwrite and --resume contradict each other: choose one")
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
        if self.num_workers is not None and self.num_workers < 0:
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
        d["colora"] = self.colora.to_dict()
        return d

    @classmethod
    def from_layers(cls, *layers: dict) -> TrainConfig:
        """Build from dicts of field values, later layers overriding earlier ones (defaults <
        config file < flags). ``lora`` and ``colora`` tables merge key by key. Unknown keys are an error."""
        merged: dict = {}
        for layer in layers:
            unknown = sorted(set(layer) - set(FIELDS))
            if unknown:
                raise ConfigError(f"unknown config key(s) {', '.join(unknown)}; valid keys: {', '.join(FIELDS)}")
            for key, value in layer.items():
                if key in ("lora", "colora") and value is not None:
                    table = value if isinstance(value, dict) else asdict(value)
                    merged[key] = {**merged.get(key, {}), **table}
                else:
                    merged[key] = value
        missing = [k for k in ("source", "data_dir") if merged.get(k) is None]
        if missing:
            raise ConfigError(f"{' and '.join(missing)} not set: give them as arguments/flags or in --config")
        return cls(**merged)


FIELDS = tuple(f.name for f in dataclasses.fields(TrainConfig))


def field_default(name: str):
    """The default of a TrainConfig field as ``to_dict`` stores it: what a run recorded before
    that field existed was trained with."""
    f = next(f for f in dataclasses.fields(TrainConfig) if f.name == name)
    value = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
    # tuples become lists, as in the JSON manifest
    return json.loads(json.dumps(asdict(value))) if dataclasses.is_dataclass(value) else value


def _settings_from_dict(cls, d: dict, table: str):
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - known)
    if unknown:
        raise ConfigError(f"unknown {table} key(s) {', '.join(unknown)}; valid: {', '.join(sorted(known))}")
    d = dict(d)
    for key in ("target_modules", "modules_to_save", "targets"):
        if key in d:
            d[key] = tuple(d[key])
    return cls(**d)


def load_config_file(path: Path) -> dict:
    """Field values from a YAML (``.yaml``/``.yml``) or TOML (``.toml``) file. Keys use the field
    names (``lr``, ``batch_size``, ...; dashes are accepted for underscores)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    text = path.read_text(encoding="utf-8")
    suffix = path.suffix.lower()
    if suffix == ".toml":
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"config file {path} is not valid TOML: {e}") from e
    elif suffix in (".yaml", ".yml"):
        import yaml

        try:
            data = yaml.safe_load(text) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {path} is not valid YAML: {e}") from e
    else:
        raise ConfigError(f"config file {path}: use a .yaml, .yml or .toml file")
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of keys to values, got {type(data).__name__}")

    def norm(d: dict) -> dict:
        return {str(k).replace("-", "_"): (norm(v) if isinstance(v, dict) else v) for k, v in d.items()}
    return norm(data)
