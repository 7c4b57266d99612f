"""Training on several processes (torchrun / DistributedDataParallel, gloo on CPU).

The ranks are launched by torch's elastic launcher (``gi-deploy train --nproc-per-node N``), so each
test spawns real processes; on 2 cores one launch takes most of a minute, hence ``slow``.

Why a 2-process run can equal a plain 1-process one: each rank takes positions r, r + W, ... of the
very permutation the 1-process run's shuffling loader draws from the same seed, so with the global
batch B split into B/2 per rank, the union of the two ranks' step-k batches is the 1-process run's
step-k batch, and DDP's gradient average of the two per-rank mean losses is the gradient of the mean
over all B. What remains is the order of float additions (two half-batch sums then an all-reduce,
against one sum), hence a tolerance, not equality. Augmentation and dropout draw random numbers per
rank, so they are off for that comparison; the kill-and-resume test has every source of randomness on.
"""

from __future__ import annotations

import builtins
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import TINY_MODEL, TINY_PX, tiny_train_config
from safetensors.torch import load_file
from torch.utils.data import DataLoader

from gi_deploy.cli.train import _train_rank
from gi_deploy.core.runs import COLORA_WEIGHTS
from gi_deploy.errors import DistributedError
from gi_deploy.training.distributed import Dist, launch_local, train_sampler

# shuffling on, dropout and augmentation off: the 1- and 2-process runs then see the same numbers (see above)
SAME = dict(epochs=3, lr=3e-3, hflip=False, rotation_degrees=0.0, lora={"dropout": 0.0}, batch_size=8)
# every source of randomness on: shuffling, LoRA dropout, random flips and rotations (the CLI flags below say
# the same); a resumed run must continue each random stream where it stopped
RANDOM = dict(epochs=3, lr=3e-3, hflip=True, rotation_degrees=10.0, lora={"dropout": 0.1}, batch_size=8)
RANDOM_FLAGS = [
    "--epochs",
    "3",
    "--lr",
    "3e-3",
    "--hflip",
    "--rotation",
    "10",
    "--lora-dropout",
    "0.1",
    "--batch-size",
    "8",
]
# The float32 gradients differ in their last bits (two half-batch sums, then gloo's all-reduce, against
# one sum) and AdamW divides by sqrt(v): where an element's gradient is near zero that noise changes its
# step by a visible share of lr. Measured against the plain run after 9 steps at lr 3e-3: 1 of 295,684
# adapter elements off by more than 1e-5 (by 1.5e-4), the epoch losses equal to 6e-7. So: all but a few
# elements within ADAPTER_ATOL, none off by a whole step (lr). Another batch order moves nearly all of them.
ADAPTER_ATOL, ADAPTER_OUTLIERS, ADAPTER_MAX = 1e-5, 30, SAME["lr"]
TIMINGS = ("seconds", "img_per_s", "peak_mem_mib", "first_step_s", "steady_img_per_s")


def _adapter(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))


def _traced_rank(cfg_dict: dict, log_dir: str):
    """A rank that logs every file it opens for writing or renames into place under the run folder."""
    run_dir = str(Path(cfg_dict["out_dir"]).resolve())
    log = Path(log_dir) / f"rank{os.environ['RANK']}.log"
    real_open, real_replace = builtins.open, os.replace

    def note(path) -> None:
        if str(Path(path).resolve()).startswith(run_dir):
            with real_open(log, "a") as f:
                f.write(f"{path}\n")

    def traced_open(file, mode="r", *args, **kwargs):
        if isinstance(file, (str, os.PathLike)) and any(m in mode for m in "wax+"):
            note(file)
        return real_open(file, mode, *args, **kwargs)

    def traced_replace(src, dst, *args, **kwargs):
        note(dst)
        return real_replace(src, dst, *args, **kwargs)

    builtins.open, os.replace = traced_open, traced_replace
    return _train_rank(cfg_dict)


def _failing_rank(marker: str):
    if os.environ["RANK"] == "1":
        raise ValueError("disk full on rank 1")
    time.sleep(60)  # rank 0 would wait on its peer; the launcher must stop it
    Path(marker).write_text("rank 0 was waited for")


def _merge_watching_rank(cfg_dict: dict, out_dir: str):
    """A rank that saves, after each training epoch, the CoLoRA tensors its model validates with
    (at the first outermost eval-mode forward after training, i.e. after that epoch's merge) to
    ``<out_dir>/rank<R>_<n>.pt``: the weights each rank really holds, whatever code merged them."""
    from torch.nn.modules.module import register_module_forward_hook, register_module_forward_pre_hook

    from gi_deploy.model.colora import colora_layers

    state = {"depth": 0, "after_training": False, "n": 0}

    def pre(module, args) -> None:
        state["depth"] += 1
        if state["depth"] > 1:
            return
        if module.training:
            state["after_training"] = True
        elif state["after_training"]:
            state["after_training"], state["n"] = False, state["n"] + 1
            tensors = {
                f"{name}.{key}": getattr(layer, key).detach().clone()
                for name, layer in colora_layers(module).items()
                for key in ("merged_weight", "spatial")
            }
            torch.save(tensors, Path(out_dir) / f"rank{os.environ['RANK']}_{state['n']}.pt")

    def post(module, args, output) -> None:
        state["depth"] -= 1

    register_module_forward_pre_hook(pre)
    register_module_forward_hook(post)
    return _train_rank(cfg_dict)


def test_the_ranks_batches_together_are_the_one_process_batches():
    """Each rank's loader (its RankShare of the training set, per-rank batch B/2) against a plain
    shuffling loader (batch B) from the same seed, over three epochs: step k's two half-batches are
    the 1-process batch k, and every epoch is a new permutation."""
    data = list(range(24))
    plain = DataLoader(data, batch_size=8, shuffle=True, generator=torch.Generator().manual_seed(7))
    ranks = []
    for r in (0, 1):
        g = torch.Generator().manual_seed(7)
        ranks.append(DataLoader(data, batch_size=4, sampler=train_sampler(data, Dist(r, 2, r, True), g), generator=g))
    epochs = []
    for _ in range(3):
        one, (zero_, one_) = [b.tolist() for b in plain], [[b.tolist() for b in loader] for loader in ranks]
        assert [sorted(a + b) for a, b in zip(zero_, one_)] == [sorted(b) for b in one]
        assert not set(sum(zero_, [])) & set(sum(one_, []))  # no image on both ranks
        epochs.append(sum(one, []))
    assert epochs[0] != sorted(epochs[0]) and epochs[0] != epochs[1] != epochs[2]


@pytest.mark.slow
@pytest.mark.timeout(1200)  # a 2-process launch and a plain run: up to 8 minutes on 2 heavily shared cores
def test_two_processes_train_what_one_process_trains(tiny_data, tmp_path):
    cfg = tiny_train_config(tiny_data, tmp_path / "ddp", **SAME)
    (tmp_path / "logs").mkdir()
    result = launch_local(_traced_rank, (cfg.to_dict(), str(tmp_path / "logs")), 2)[0]
    logs = tmp_path / "logs"
    manifest = json.loads((result.run_dir / "run.json").read_text())
    assert manifest["status"] == "done" and manifest["runtime"]["processes"] == 2
    assert manifest["runtime"]["global_batch"] == 8 and manifest["runtime"]["batch_per_process"] == 4
    assert [r["epoch"] for r in manifest["history"]] == [1, 2, 3]
    # rank 0 alone wrote the run folder
    assert (logs / "rank0.log").read_text().count("run.json") >= 4
    assert not (logs / "rank1.log").exists()

    from gi_deploy.training.trainer import train  # here: every spawned rank imports this module

    one = train(tiny_train_config(tiny_data, tmp_path / "plain", **SAME))  # a plain run: no torchrun, no DDP
    assert json.loads((one.run_dir / "run.json").read_text())["runtime"]["processes"] == 1
    a, b = _adapter(result.run_dir), _adapter(one.run_dir)
    assert a.keys() == b.keys()
    diff = torch.cat([(a[k] - b[k]).abs().flatten() for k in a])
    off = int((diff > ADAPTER_ATOL).sum())
    assert off <= ADAPTER_OUTLIERS and diff.max() < ADAPTER_MAX, f"{off} of {diff.numel()} off, max {diff.max()}"
    # all-reduced metrics: the 2-process losses are those of the whole global batch
    for r2, r1 in zip(result.history, one.history, strict=True):
        assert r2["train_loss"] == pytest.approx(r1["train_loss"], abs=1e-5)
        assert r2["train_accuracy"] == r1["train_accuracy"] and r2["val_accuracy"] == r1["val_accuracy"]
    assert result.test["accuracy"] == one.test["accuracy"]
    assert result.test["confusion_matrix"] == one.test["confusion_matrix"]  # every test image counted once


@pytest.mark.slow
@pytest.mark.timeout(1800)  # three 2-process launches
def test_killed_two_process_run_resumes_to_the_uninterrupted_result(tiny_data, tmp_path):
    """With shuffling, dropout and augmentation on, a 2-process run killed in its second epoch and
    resumed ends bit for bit where the uninterrupted run ends: each rank's RNG streams (its loader's
    generator, torch's, numpy's, Python's) continue from the checkpoint."""
    whole = launch_local(_train_rank, (tiny_train_config(tiny_data, tmp_path / "whole", **RANDOM).to_dict(),), 2)[0]
    cfg = tiny_train_config(tiny_data, tmp_path / "runs", **RANDOM)
    cmd = [
        sys.executable,
        "-m",
        "gi_deploy",
        "train",
        "capsule",
        "--data-dir",
        str(tiny_data),
        "--model",
        TINY_MODEL,
        "--no-pretrained",
        "--img-size",
        str(TINY_PX),
        *RANDOM_FLAGS,
        "--device",
        "cpu",
        "--out",
        str(tmp_path / "runs"),
        "--nproc-per-node",
        "2",
    ]
    proc = subprocess.Popen(
        cmd,
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[2])},
    )
    metrics = cfg.run_dir / "metrics.jsonl"
    deadline = time.time() + 240
    while not (metrics.is_file() and metrics.read_text().count("\n") >= 1):
        assert proc.poll() is None and time.time() < deadline, "the 2-process run ended before its first epoch"
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # launcher and both ranks, in the middle of epoch 2
    proc.wait()
    manifest = json.loads((cfg.run_dir / "run.json").read_text())
    assert manifest["status"] == "training" and len(manifest["history"]) < 3
    same = lambda run_dir: {
        k: v
        for k, v in json.loads((run_dir / "run.json").read_text())["config"].items()  # noqa: E731
        if k != "out_dir"
    }
    assert same(cfg.run_dir) == same(whole.run_dir)  # the command line above trains what RANDOM says

    resumed = launch_local(
        _train_rank, (tiny_train_config(tiny_data, tmp_path / "runs", resume=True, **RANDOM).to_dict(),), 2
    )[0]
    strip = lambda h: [{k: v for k, v in r.items() if k not in TIMINGS} for r in h]  # noqa: E731
    assert strip(resumed.history) == strip(whole.history)
    a, b = _adapter(whole.run_dir), _adapter(resumed.run_dir)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ckpt = torch.load(resumed.run_dir / "checkpoint.pt", weights_only=False)
    assert len(ckpt["rng_ranks"]) == 2  # each rank resumes its own random stream


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_lora_plus_colora_under_ddp_merges_identically_on_every_rank(tiny_data, tmp_path):
    """peft's LoRA and CoLoRA together under DDP: no unused-parameter error (every adapter tensor
    is used in every forward), and each epoch's merge changes the frozen kernels (K0 += K_p K_d,
    K_d reset to zero) to the same tensors on both ranks, which rank 0 saves."""
    cfg = tiny_train_config(tiny_data, tmp_path, method="lora+colora", epochs=2)
    (tmp_path / "weights").mkdir()
    results = launch_local(_merge_watching_rank, (cfg.to_dict(), str(tmp_path / "weights")), 2)
    held = {r: [torch.load(tmp_path / "weights" / f"rank{r}_{n}.pt") for n in (1, 2)] for r in (0, 1)}
    for zero, one in zip(held[0], held[1]):  # after each epoch's merge
        assert zero and zero.keys() == one.keys()
        for k in zero:
            assert torch.equal(zero[k], one[k]), f"{k} differs between the ranks"
    first, second = held[0]
    merged = [k for k in first if k.endswith(".merged_weight")]
    assert merged and all(first[k].abs().max() > 0 for k in merged)  # epoch 1's merge moved K_p K_d into K0
    assert all(not torch.equal(first[k], second[k]) for k in merged)  # and epoch 2's merge moved it again
    assert all(not t.any() for h in (first, second) for k, t in h.items() if k.endswith(".spatial"))  # K_d reset

    result = results[0]
    assert all(r["colora_merged"] for r in result.history)
    manifest = json.loads((result.run_dir / "run.json").read_text())
    assert manifest["status"] == "done" and manifest["colora"]["merges"] == 2
    saved = load_file(str(result.run_dir / COLORA_WEIGHTS))  # the best epoch's weights, as rank 0 validated them
    best = {k.removeprefix("base_model.model."): t for k, t in held[0][manifest["best"]["epoch"] - 1].items()}
    assert {k for k in saved if k.endswith(".merged_weight")} == {k for k in best if k.endswith(".merged_weight")}
    assert all(torch.equal(saved[k], best[k]) for k in best if k.endswith(".merged_weight"))


def test_a_dying_rank_brings_the_job_down_naming_its_rank_and_cause(tmp_path):
    with pytest.raises(DistributedError, match=r"rank 1 of 2 died \(exit code 1\).*disk full on rank 1.*--resume"):
        launch_local(_failing_rank, (str(tmp_path / "waited"),), 2)
    assert not (tmp_path / "waited").exists()  # rank 0 was stopped, not waited for (whatever the machine's load)
