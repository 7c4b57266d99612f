"""Training on several processes (torchrun / DistributedDataParallel, gloo on CPU).

The ranks are launched by torch's elastic launcher (``gi-deploy train --nproc-per-node N``), so each
test spawns real processes; on 2 cores one launch takes most of a minute, hence ``slow``.

Why a 2-process run can equal a 1-process one: the seeded DistributedSampler deals each epoch's
permutation out round-robin, so with the global batch B split into B/2 per rank, the union of the
two ranks' step-k batches is the 1-process run's step-k batch, and DDP's gradient average of the
two per-rank mean losses is the gradient of the mean over all B. What remains is the order of float
additions (two half-batch sums then an all-reduce, against one sum), hence a tolerance, not
equality. Augmentation and dropout draw random numbers per rank, so they are off for this comparison.
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

from gi_deploy.cli.train import _train_rank
from gi_deploy.errors import DistributedError
from gi_deploy.training.distributed import launch_local

# dropout and augmentation off: the 1- and 2-process runs then see the same numbers (see above)
RECIPE = dict(epochs=3, lr=3e-3, hflip=False, rotation_degrees=0.0, lora={"dropout": 0.0}, batch_size=8)
# The float32 gradients differ in their last bits (two half-batch sums, then gloo's all-reduce, against
# one sum) and AdamW divides by sqrt(v): where an element's gradient is near zero that noise changes its
# step by a visible share of lr. Measured after 9 steps at lr 3e-3: max 1.3e-5 (2 of 295,684 elements
# above 1e-5, the losses equal to 2e-7). The bound is 1/30 of one step's lr.
ADAPTER_ATOL = 1e-4


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


def _failing_rank():
    if os.environ["RANK"] == "1":
        raise ValueError("disk full on rank 1")
    time.sleep(30)  # rank 0 would wait on its peer; the launcher must stop it


@pytest.fixture(scope="module")
def two_process_run(tiny_data, tmp_path_factory):
    root = tmp_path_factory.mktemp("ddp2")
    cfg = tiny_train_config(tiny_data, root / "runs", **RECIPE)
    (root / "logs").mkdir()
    results = launch_local(_traced_rank, (cfg.to_dict(), str(root / "logs")), 2)
    return results[0], root / "logs"


@pytest.mark.slow
def test_two_processes_train_what_one_process_trains(two_process_run, tiny_data, tmp_path):
    result, logs = two_process_run
    manifest = json.loads((result.run_dir / "run.json").read_text())
    assert manifest["status"] == "done" and manifest["runtime"]["processes"] == 2
    assert manifest["runtime"]["global_batch"] == 8 and manifest["runtime"]["batch_per_process"] == 4
    assert [r["epoch"] for r in manifest["history"]] == [1, 2, 3]
    # rank 0 alone wrote the run folder
    assert (logs / "rank0.log").read_text().count("run.json") >= 4
    assert not (logs / "rank1.log").exists()

    one = launch_local(_train_rank, (tiny_train_config(tiny_data, tmp_path, **RECIPE).to_dict(),), 1)[0]
    a, b = _adapter(result.run_dir), _adapter(one.run_dir)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=ADAPTER_ATOL, msg=k)
    # all-reduced metrics: the 2-process losses are those of the whole global batch
    for r2, r1 in zip(result.history, one.history):
        assert r2["train_loss"] == pytest.approx(r1["train_loss"], abs=1e-6)
        assert r2["train_accuracy"] == r1["train_accuracy"] and r2["val_accuracy"] == r1["val_accuracy"]
    assert result.test["accuracy"] == one.test["accuracy"]
    assert result.test["confusion_matrix"] == one.test["confusion_matrix"]  # every test image counted once


@pytest.mark.slow
def test_killed_two_process_run_resumes_to_the_uninterrupted_result(two_process_run, tiny_data, tmp_path):
    whole, _ = two_process_run
    cfg = tiny_train_config(tiny_data, tmp_path / "runs", **RECIPE)
    cmd = [sys.executable, "-m", "gi_deploy", "train", "capsule", "--data-dir", str(tiny_data), "--model", TINY_MODEL,
           "--no-pretrained", "--img-size", str(TINY_PX), "--epochs", "3", "--batch-size", "8", "--lr", "3e-3",
           "--no-hflip", "--rotation", "0", "--lora-dropout", "0", "--device", "cpu",
           "--out", str(tmp_path / "runs"), "--nproc-per-node", "2"]
    proc = subprocess.Popen(cmd, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[2])})
    metrics = cfg.run_dir / "metrics.jsonl"
    deadline = time.time() + 240
    while not (metrics.is_file() and metrics.read_text().count("\n") >= 1):
        assert proc.poll() is None and time.time() < deadline, "the 2-process run ended before its first epoch"
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # launcher and both ranks, in the middle of epoch 2
    proc.wait()
    manifest = json.loads((cfg.run_dir / "run.json").read_text())
    assert manifest["status"] == "training" and len(manifest["history"]) < 3

    resumed = launch_local(_train_rank, (tiny_train_config(tiny_data, tmp_path / "runs", resume=True, **RECIPE)
                                         .to_dict(),), 2)[0]
    timings = ("seconds", "img_per_s", "peak_mem_mib", "first_step_s", "steady_img_per_s")
    strip = lambda h: [{k: v for k, v in r.items() if k not in timings} for r in h]  # noqa: E731
    assert strip(resumed.history) == strip(whole.history)
    a, b = _adapter(whole.run_dir), _adapter(resumed.run_dir)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ckpt = torch.load(resumed.run_dir / "checkpoint.pt", weights_only=False)
    assert len(ckpt["rng_ranks"]) == 2  # each rank resumes its own random stream


@pytest.mark.slow
def test_lora_plus_colora_under_ddp_merges_identically_on_every_rank(tiny_data, tmp_path):
    """peft's LoRA and CoLoRA together under DDP: no unused-parameter error (every adapter tensor
    is used in every forward), and after each epoch's merge the ranks' merged weights hash equal
    (a mismatch raises on every rank; the hash is recorded)."""
    cfg = tiny_train_config(tiny_data, tmp_path, method="lora+colora", epochs=2)
    results = launch_local(_train_rank, (cfg.to_dict(),), 2)
    result = results[0]
    hashes = [r["colora_merge_hash"] for r in result.history]
    assert all(r["colora_merged"] for r in result.history) and len(set(hashes)) == 2 and all(hashes)
    assert [r["colora_merge_hash"] for r in results[1].history] == hashes  # rank 1 merged to the same weights
    manifest = json.loads((result.run_dir / "run.json").read_text())
    assert manifest["status"] == "done" and manifest["colora"]["merges"] == 2


def test_a_dying_rank_brings_the_job_down_naming_its_rank_and_cause():
    t0 = time.time()
    with pytest.raises(DistributedError, match=r"rank 1 of 2 died \(exit code 1\).*disk full on rank 1.*--resume"):
        launch_local(_failing_rank, (), 2)
    assert time.time() - t0 < 25  # rank 0 was stopped, not waited for
