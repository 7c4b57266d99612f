"""The method registry: one :class:`MethodSpec` per training method, the one place that says what a
method trains, which adapters it carries, what its run keeps and whether export merges it.

The CLI's ``--method`` choices, the training config, the trainer, the run reader, export and
explain all ask this registry instead of branching on method names. The torch side of each
adapter kind (how to apply, save, load and merge it) lives in ``gi_deploy.model`` under the same
name (``gi_deploy.model.adapters.ADAPTERS``), the way peft keeps one ``LoraVariant`` per variant.

Adding a method that combines existing adapter kinds is one entry in ``METHODS``; a new adapter
kind is one module in ``gi_deploy/model/`` registering itself in ``ADAPTERS``, plus its entry here.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from pathlib import Path

from gi_deploy._io import sha256_file
from gi_deploy.core.runs import (
    ADAPTER_DIR,
    ADAPTER_WEIGHTS,
    COLORA_WEIGHTS,
    FULL_WEIGHTS,
    HEAD_WEIGHTS,
)
from gi_deploy.errors import BundleError, ConfigError


@dataclass(frozen=True)
class MethodSpec:
    """What one training method is.

    ``adapters``: adapter kinds applied to the base, in order (``"lora"``: peft LoRA on the block
    MLP; ``"colora"``: CoLoRA on dense convolutions); an adapter method keeps only them (and the
    head) and export merges them into the plain backbone. ``trains_backbone``: every weight trains
    (full fine-tuning). ``artifact``: the run-folder entries that hold what training changed.
    ``head_in``: which of them holds the trained classifier."""

    name: str
    help: str
    adapters: tuple[str, ...]
    trains_backbone: bool
    artifact: tuple[str, ...]
    head_in: str

    def __post_init__(self) -> None:
        if self.head_in not in self.artifact:
            raise ConfigError(f"method {self.name}: head_in {self.head_in!r} is not one of its artifact entries")
        if self.trains_backbone and self.adapters:
            raise ConfigError(f"method {self.name}: a method trains adapters or the whole backbone, not both")

    @property
    def merges(self) -> bool:
        """Export folds the adapters into the backbone (W + ΔW), so the deployed model is the plain one."""
        return bool(self.adapters)

    def carries(self, adapter: str) -> bool:
        return adapter in self.adapters

    def artifact_files(self, run_dir: Path) -> list[Path]:
        """The weights files of a run's artifact (hashed into bundle manifests)."""
        return [
            Path(run_dir) / name / ADAPTER_WEIGHTS if name == ADAPTER_DIR else Path(run_dir) / name
            for name in self.artifact
        ]

    def artifact_sha256(self, run_dir: Path) -> dict[str, str]:
        """sha256 of the files a run's training wrote (the artifact's weights, peft's adapter config),
        keyed by the path inside the run folder: recorded in run.json when the best epoch is saved,
        checked at export and by ``--backend torch``. (The base, random-init or not, is checked by
        its own fingerprint.)"""
        run_dir = Path(run_dir)
        files = self.artifact_files(run_dir)
        if ADAPTER_DIR in self.artifact:
            files.append(run_dir / ADAPTER_DIR / "adapter_config.json")
        return {p.relative_to(run_dir).as_posix(): sha256_file(p) for p in files if p.is_file()}

    def check_artifact(self, run_dir: Path, recorded: dict[str, str] | None, when: str) -> None:
        """Raise BundleError naming the file when a trained file differs from the sha256 ``recorded``
        (at ``when``): the model would not be the one whose metrics the run reports."""
        if not recorded:
            return
        now = self.artifact_sha256(run_dir)
        for name, digest in recorded.items():
            if name in now and now[name] != digest:  # a missing file is reported by what loads it
                raise BundleError(
                    f"{Path(run_dir) / name} changed since {when} (its sha256 differs from the one "
                    "recorded): it is not the model whose metrics the run reports. Restore it, or "
                    "retrain with --overwrite"
                )

    def artifact_bytes(self, run_dir: Path) -> int:
        """Size on disk of what a run of this method adds to the base model."""
        total = 0
        for name in self.artifact:
            path = Path(run_dir) / name
            total += (
                sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else path.stat().st_size
            )
        return total


METHODS: dict[str, MethodSpec] = {
    m.name: m
    for m in (
        MethodSpec(
            "lora",
            "adapters on the block MLP fc1/fc2 + new head (the seed paper)",
            ("lora",),
            False,
            (ADAPTER_DIR,),
            ADAPTER_DIR,
        ),
        MethodSpec("full", "every weight", (), True, (FULL_WEIGHTS,), FULL_WEIGHTS),
        MethodSpec("linear", "the classifier head only (a linear probe)", (), False, (HEAD_WEIGHTS,), HEAD_WEIGHTS),
        MethodSpec(
            "colora",
            "convolution-kernel adapters + head (seeds/002)",
            ("colora",),
            False,
            (COLORA_WEIGHTS,),
            COLORA_WEIGHTS,
        ),
        MethodSpec(
            "lora+colora",
            "both adapter kinds + head",
            ("lora", "colora"),
            False,
            (ADAPTER_DIR, COLORA_WEIGHTS),
            ADAPTER_DIR,
        ),
    )
}
METHOD_NAMES = tuple(METHODS)

# The CLI's choices, built from the registry (a new MethodSpec appears in --method by itself).
Method = Enum("Method", {name.replace("+", "_"): name for name in METHODS}, type=str)


def method_spec(name: str) -> MethodSpec:
    """The registered method ``name``; ConfigError naming the choices otherwise."""
    try:
        return METHODS[name]
    except KeyError:
        raise ConfigError(f"method {name!r} unknown; use one of {', '.join(METHODS)}") from None
