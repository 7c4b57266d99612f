"""The training stage's one config object. CLI, Python API and tests all build this.

Values come from three layers, later ones winning: the defaults here (the seed paper's recipe,
section 4.2), a ``--config`` file (YAML or TOML, keys = field names, ``[lora]`` as a table),
and flags given on the command line."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import tomllib

from gi_deploy.core.choices import DEVICES
from gi_deploy.core.fields import helped
from gi_deploy.core.methods import METHODS
from gi_deploy.core.preprocess import DECODE_MODES
from gi_deploy.core.runs import RUN_MANIFEST, stored_config
from gi_deploy.errors import ConfigError
from gi_deploy.model.settings import ADAPTER_SETTINGS, ColoraSettings, LoraSettings

SCHEDULERS = ("none", "cosine", "plateau")
BALANCE = ("none", "weighted-loss", "sampler")
AMP = ("auto", "off", "bf16", "fp16")
RESIZE = ("direct", "crop")
SPLIT_MODES = ("seeded", "official-0", "official-1")  # official-N: kvasir's official folds
# what may change when a run is resumed: where and how fast it runs, and how long it may go on
RESUME_MAY_CHANGE = frozenset({"resume", "overwrite", "device", "num_workers", "compile", "epochs"})


@dataclass
class TrainConfig:
    """Everything that defines a training run; stored resolved in the run manifest."""

    source: str = helped(
        help="kvasir, gastrovision (built-in layouts, see `gi-deploy sources`) or any name for "
        "an ImageFolder tree; the run goes to OUT/SOURCE."
    )
    data_dir: Path = helped(help="The dataset folder (layout: `gi-deploy sources`).")
    method: str = helped("lora", "; ".join(f"{m.name}: {m.help}" for m in METHODS.values()) + ".")
    model: str = helped("convnextv2_base", "timm model name.")
    pretrained: bool = helped(True, "ImageNet weights from the Hugging Face hub.")
    weights: Path | None = helped(None, "Local base checkpoint (.pth/.safetensors); overrides --pretrained.")
    img_size: int = helped(224, "Input height and width in pixels.")
    epochs: int = helped(30, "Maximum epochs.")
    batch_size: int = helped(32, "Images per training step.")
    lr: float = helped(1e-4, "AdamW learning rate.")
    weight_decay: float = helped(0.01, "AdamW weight decay.")
    patience: int = helped(5, "Early stopping: epochs without a val accuracy gain.")
    seed: int = helped(0, "Seed of the split, the label fraction, initialisation and augmentation.")
    out_dir: Path = helped(Path("runs"), "Runs folder.")
    device: str = helped("auto", "auto | cpu | cuda.")
    num_workers: int | None = helped(None, "DataLoader workers (none: 0 on CPU, up to 8 on CUDA).")
    val_fraction: float = helped(0.1, "Share of each class held out for validation.")
    test_fraction: float = helped(0.1, "Share of each class held out for testing.")
    split: str = helped(
        "seeded", "seeded | official-0 | official-1 (kvasir's official folds: train on one, test on the other)."
    )
    label_fraction: float = helped(1.0, "Train on this share of each class's labels (seeded).")
    resize: str = helped("direct", "direct (squash to img_size, the paper) | crop (shorter side + centre crop).")
    decode: str = helped(
        "draft",
        "draft (JPEGs at least twice the input size decoded at 1/2-1/8 scale by libjpeg "
        "first: faster, the same at inference) | full.",
    )
    crop_pct: float = helped(0.875, "With resize crop: crop size / resize size.")
    hflip: bool = helped(True, "Random horizontal flip.")
    vflip: bool = helped(False, "Random vertical flip.")
    rotation_degrees: float = helped(10.0, "Random rotation range in degrees.")
    color_jitter: float = helped(0.0, "Brightness/contrast/saturation jitter.")
    scheduler: str = helped("none", "none (the paper) | cosine | plateau (on val accuracy).")
    balance: str = helped(
        "none", "Class imbalance: none | weighted-loss (inverse class frequency) | sampler (balanced batches)."
    )
    amp: str = helped("auto", "auto (bf16, or fp16 + scaler, on CUDA; off on CPU) | off | bf16 | fp16.")
    channels_last: bool | None = helped(None, "Channels-last memory format (none: on CUDA only).")
    compile: bool = helped(False, "torch.compile the model.")
    overwrite: bool = helped(False, "Replace an existing run of this source.")
    resume: bool = helped(False, "Continue an interrupted run from its last checkpoint.")
    # one field per adapter kind, named as in ADAPTER_SETTINGS (a table of that name in --config)
    lora: LoraSettings = helped(default_factory=LoraSettings, help="LoRA settings (a [lora] table in --config).")
    colora: ColoraSettings = helped(
        default_factory=ColoraSettings, help="CoLoRA settings (a [colora] table in --config)."
    )

    def __post_init__(self) -> None:
        self.data_dir = Path(self.data_dir)
        self.out_dir = Path(self.out_dir)
        self.weights = Path(self.weights) if self.weights is not None else None
        for kind, cls in ADAPTER_SETTINGS.items():
            if isinstance(getattr(self, kind), dict):
                setattr(self, kind, _settings_from_dict(cls, getattr(self, kind), kind))
        problems = []
        for name, allowed in (
            ("scheduler", SCHEDULERS),
            ("balance", BALANCE),
            ("amp", AMP),
            ("resize", RESIZE),
            ("split", SPLIT_MODES),
            ("decode", DECODE_MODES),
        ):
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
        if not (
            0 < self.val_fraction < 1 and 0 <= self.test_fraction < 1 and self.val_fraction + self.test_fraction < 1
        ):
            problems.append(
                f"val_fraction {self.val_fraction} and test_fraction {self.test_fraction} "
                "must be fractions that leave images for training"
            )
        if not self.data_dir.is_dir():
            problems.append(f"data_dir {self.data_dir} is not a folder")
        if self.weights is not None and not self.weights.is_file():
            problems.append(f"weights file {self.weights} does not exist")
        if problems:  # report every problem at once, before any heavy work
            raise ConfigError("invalid training config:\n  " + "\n  ".join(problems))

    @property
    def run_dir(self) -> Path:
        return self.out_dir / self.source

    def adapter_settings(self) -> dict:
        """Each adapter kind's settings object by the kind's name (what ``apply_method`` takes)."""
        return {kind: getattr(self, kind) for kind in ADAPTER_SETTINGS}

    def to_dict(self) -> dict:
        d = asdict(self)
        for key in ("data_dir", "out_dir", "weights"):
            d[key] = str(d[key]) if d[key] is not None else None
        d.update({kind: settings.to_dict() for kind, settings in self.adapter_settings().items()})
        return d

    @classmethod
    def from_layers(cls, *layers: dict) -> TrainConfig:
        """Build from dicts of field values, later layers overriding earlier ones (defaults <
        config file < flags). Adapter tables (``lora``, ``colora``) merge key by key. Unknown keys are an error."""
        merged: dict = {}
        for layer in layers:
            unknown = sorted(set(layer) - set(FIELDS))
            if unknown:
                raise ConfigError(f"unknown config key(s) {', '.join(unknown)}; valid keys: {', '.join(FIELDS)}")
            for key, value in layer.items():
                if key in ADAPTER_SETTINGS and value is not None:
                    table = value if isinstance(value, dict) else asdict(value)
                    merged[key] = {**merged.get(key, {}), **table}
                else:
                    merged[key] = value
        missing = [k for k in ("source", "data_dir") if merged.get(k) is None]
        if missing:
            raise ConfigError(f"{' and '.join(missing)} not set: give them as arguments/flags or in --config")
        return cls(**merged)


FIELDS = tuple(f.name for f in dataclasses.fields(TrainConfig))
assert set(ADAPTER_SETTINGS) <= set(FIELDS), "every adapter kind needs its settings field on TrainConfig"


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
    return cls(**d)  # lists from JSON/TOML: each settings class makes its tuples in __post_init__


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


def layered_config(flags: dict, config_file: Path | None = None, resume: bool = False) -> TrainConfig:
    """The config of ``gi-deploy train`` and ``compare``: layers, later winning, of the stored
    config of the run being resumed (with ``resume``), a ``--config`` file, then the flags actually
    given (None = not given). Adapter flags (``lora``, ``colora``) are tables merged key by key."""
    layers = []
    file_layer = load_config_file(config_file) if config_file is not None else {}
    if resume:
        out_dir = flags.get("out_dir") or Path(file_layer.get("out_dir", field_default("out_dir")))
        run_dir = Path(out_dir) / flags["source"]
        if (run_dir / RUN_MANIFEST).is_file():
            layers.append(stored_config(run_dir))
    if config_file is not None:
        layers.append(file_layer)
    layers.append({k: v for k, v in flags.items() if v is not None and v != {}})
    return TrainConfig.from_layers(*layers)
