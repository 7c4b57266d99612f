"""The run folder a training writes (its layout is in core/runs.py): creating it, the per-epoch
checkpoint and what ``--resume`` reads back, the metrics log and the curves."""

from __future__ import annotations

import json
import os
import random
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from gi_deploy._io import exclusive_lock
from gi_deploy.core.runs import (
    CHECKPOINT,
    METRICS_JSONL,
    RUN_DIRS,
    RUN_FILES,
    RUN_MANIFEST,
    RunRecord,
    read_run_manifest,
)
from gi_deploy.errors import BundleError, ConfigError
from gi_deploy.training.config import RESUME_MAY_CHANGE, TrainConfig, field_default


@dataclass
class LoopState:
    """Where the epoch loop stands; checkpointed with the weights so a resumed run continues it."""

    epoch: int = 0  # last complete epoch
    best_acc: float = -1.0
    best_epoch: int = 0
    stale: int = 0
    merges: int = 0  # CoLoRA merges done


def rng_state(loader_gen: torch.Generator) -> dict:
    """Every RNG state as tensors and plain numbers only, so the checkpoint loads with
    ``torch.load(weights_only=True)`` (no pickled Python objects: a checkpoint cannot run code)."""
    version, words, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": {"version": version, "words": torch.tensor(words, dtype=torch.int64), "gauss": gauss},
        "numpy": {
            "kind": kind,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "torch": torch.get_rng_state(),
        "loader": loader_gen.get_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict, loader_gen: torch.Generator) -> None:
    py, npy = state["python"], state["numpy"]
    random.setstate((py["version"], tuple(int(w) for w in py["words"].tolist()), py["gauss"]))
    np.random.set_state(
        (npy["kind"], npy["keys"].numpy().astype(np.uint32), npy["pos"], npy["has_gauss"], npy["cached_gaussian"])
    )
    torch.set_rng_state(state["torch"])
    loader_gen.set_state(state["loader"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def trained_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """What training changes: trainable parameters plus every buffer (norm statistics update in
    train mode even in frozen layers)."""
    state = {n: p.detach().cpu().clone() for n, p in model.named_parameters() if p.requires_grad}
    state.update({n: b.detach().cpu().clone() for n, b in model.named_buffers()})
    return state


def check_run_dir(cfg: TrainConfig) -> None:
    if (cfg.run_dir / RUN_MANIFEST).exists() and not (cfg.overwrite or cfg.resume):
        raise ConfigError(
            f"{cfg.run_dir} already holds a run; pass --resume to continue it, --overwrite to "
            "replace it, or choose another --out or source name"
        )


def lock_run_dir(run_dir: Path):
    """The lock every writer of a run folder holds while it trains: a plain ``train``, rank 0 under
    torchrun, and the launcher of ``--nproc-per-node N`` on behalf of all its ranks (they never ask
    for it themselves). Taken on the folder's real path, so a symlinked alias of the folder (or of
    the runs folder above it) is the same lock. A context manager; raises ConfigError naming the
    holder's pid when another process holds it (see ``_io.exclusive_lock``)."""
    return exclusive_lock(Path(os.path.realpath(run_dir)), "wait for that training to finish, or choose another --out")


def prepare_run_dir(cfg: TrainConfig) -> Path:
    """Create the run folder. With ``cfg.overwrite``, a previous run there is removed whole, so no
    stale adapter or base of it can mix with the new one; called only once the new base is built."""
    run_dir = cfg.run_dir
    check_run_dir(cfg)
    for name in RUN_FILES:
        (run_dir / name).unlink(missing_ok=True)
    for name in RUN_DIRS:
        shutil.rmtree(run_dir / name, ignore_errors=True)
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir


def load_for_resume(cfg: TrainConfig) -> tuple[RunRecord, dict]:
    """The run's manifest and last checkpoint; refuses when there is nothing to resume or the
    config differs in anything but ``RESUME_MAY_CHANGE``."""
    run_dir = cfg.run_dir
    if not (run_dir / RUN_MANIFEST).is_file():
        raise ConfigError(f"nothing to resume in {run_dir}: no {RUN_MANIFEST}; drop --resume to start a run")
    manifest = read_run_manifest(run_dir, finished=False)
    if manifest.status == "done":
        raise ConfigError(f"run {run_dir} already finished; pass --overwrite to train it again")
    if not (run_dir / CHECKPOINT).is_file():
        raise ConfigError(
            f"run {run_dir} stopped before its first epoch finished ({CHECKPOINT} missing); "
            "start it again with --overwrite"
        )
    old, new = manifest.config, cfg.to_dict()
    # a key the run did not record was added to gi-deploy after it started: it ran with the default
    changed = sorted(k for k in new if k not in RESUME_MAY_CHANGE and old.get(k, field_default(k)) != new[k])
    if changed:
        raise ConfigError(
            f"--resume with a different config: {', '.join(f'{k} {old.get(k)!r} -> {new[k]!r}' for k in changed)}; "
            "resume with the original settings, or start again with --overwrite"
        )
    return manifest, load_checkpoint(run_dir / CHECKPOINT)


def load_checkpoint(path: Path) -> dict:
    """A checkpoint read with ``torch.load(weights_only=True)``: tensors and plain containers and
    numbers only. A file holding any other pickled object (which could run code when unpickled, e.g.
    through ``__reduce__``) is refused with BundleError before anything from it runs."""
    import pickle

    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, AttributeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise BundleError(
            f"{path} is refused: it is not a plain gi-deploy checkpoint (tensors and numbers only); "
            f"loading it could run code it carries ({first}). Nothing from it was run; start the "
            "run again with --overwrite (or use a checkpoint written by this version)"
        ) from e
    if not isinstance(checkpoint, dict) or not {"trained", "optimizer", "loop", "rng"} <= set(checkpoint):
        held = sorted(checkpoint)[:6] if isinstance(checkpoint, dict) else type(checkpoint).__name__
        raise BundleError(f"{path} is not a gi-deploy checkpoint (keys {held}); start the run again with --overwrite")
    return checkpoint


def write_metrics_jsonl(run_dir: Path, history: list[dict]) -> None:
    tmp = run_dir / (METRICS_JSONL + ".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in history), encoding="utf-8")
    tmp.replace(run_dir / METRICS_JSONL)


def save_checkpoint(
    run_dir: Path,
    model: nn.Module,
    optimizer,
    scheduler,
    scaler,
    state: LoopState,
    loader_gen: torch.Generator,
    extra: dict | None = None,
) -> None:
    """``extra``: more entries (under torchrun, ``rng_ranks``: every rank's RNG state)."""
    tmp = run_dir / (CHECKPOINT + ".tmp")
    torch.save(
        {
            "trained": trained_state(model),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict() if scheduler is not None else None,
            "scaler": scaler.state_dict(),
            "loop": vars(state).copy(),
            "rng": rng_state(loader_gen),
            **(extra or {}),
        },
        tmp,
    )
    tmp.replace(run_dir / CHECKPOINT)  # atomic: an interrupt never leaves half a checkpoint


def plot_curves(history: list[dict], path: Path, title: str) -> None:
    """Training loss and train/val accuracy per epoch, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [r["epoch"] for r in history]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    ax_loss.plot(epochs, [r["train_loss"] for r in history], marker="o")
    ax_loss.set(xlabel="epoch", ylabel="training loss", title="loss")
    ax_acc.plot(epochs, [100 * r["train_accuracy"] for r in history], marker="o", label="train")
    ax_acc.plot(epochs, [100 * r["val_accuracy"] for r in history], marker="o", label="val")
    best = [r for r in history if r["best"]]
    if best:
        ax_acc.axvline(best[-1]["epoch"], color="grey", linestyle="--", label=f"best (epoch {best[-1]['epoch']})")
    ax_acc.set(xlabel="epoch", ylabel="accuracy (%)", title="accuracy")
    ax_acc.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
