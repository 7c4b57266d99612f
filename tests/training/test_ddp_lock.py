"""``train --nproc-per-node N`` and the run-folder lock; what the user sees when a rank dies.

The launcher takes the same lock a plain ``train`` takes (training/checkpoint.py ``lock_run_dir``,
on the folder's real path) and holds it while all its ranks run, so a plain training and a DDP
resume of one folder never run together, whichever started first and whichever name (a symlinked
alias) each was given. A rank that dies is one line; torch's launcher log goes to ``--verbose``.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import tiny_train_config
from typer.testing import CliRunner

from gi_deploy.cli import app
from gi_deploy.errors import ConfigError, DistributedError, TrainingInterrupted
from gi_deploy.training.checkpoint import lock_run_dir

runner = CliRunner()


def _invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def _snapshot(folder: Path) -> dict[str, tuple[str, int]]:
    """Every file under ``folder``: (sha256, mtime in ns)."""
    return {
        p.relative_to(folder).as_posix(): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def resumable_run(tiny_data, tmp_path_factory) -> tuple[Path, Path]:
    """An interrupted 2-epoch run (epoch 1 checkpointed: ``--resume`` would continue it) at
    ``<tmp>/runs/capsule``, and ``<tmp>/alias/capsule``, a symlink to that folder."""
    from gi_deploy.training.trainer import train

    root = tmp_path_factory.mktemp("locked")

    def stop_in_epoch_2(event: str, d: dict) -> None:
        if event == "batch" and d["epoch"] == 2:
            raise KeyboardInterrupt

    with pytest.raises(TrainingInterrupted):
        train(tiny_train_config(tiny_data, root / "runs", epochs=2), report=stop_in_epoch_2)
    (root / "alias").mkdir()
    (root / "alias" / "capsule").symlink_to(root / "runs" / "capsule", target_is_directory=True)
    return root / "runs" / "capsule", root / "alias" / "capsule"


@pytest.mark.parametrize("held_via, launched_via", [("alias", "real"), ("real", "alias")])
def test_a_ddp_resume_is_refused_while_a_plain_training_holds_the_run(resumable_run, tiny_data, held_via, launched_via):
    real, alias = resumable_run
    paths = {"real": real, "alias": alias}
    before = _snapshot(real)
    with lock_run_dir(paths[held_via]):  # what a plain `train` of that name holds while it trains
        t0 = time.time()
        r = _invoke(
            "train",
            "capsule",
            "--data-dir",
            tiny_data,
            "--out",
            paths[launched_via].parent,
            "--resume",
            "--nproc-per-node",
            2,
        )
    assert r.exit_code == 1, r.output
    assert "is being written by another gi-deploy process (pid" in r.output, r.output
    assert "wait for that training to finish" in r.output
    assert time.time() - t0 < 20  # refused by the launcher: no rank was started
    assert _snapshot(real) == before  # no file in the run folder changed


def test_the_launcher_holds_the_run_lock_while_its_ranks_run(resumable_run, tiny_data, monkeypatch):
    """While ``--nproc-per-node`` ranks run, a plain training of the folder (by either name) is
    refused; the lock is released when the launch ends, even when a rank died."""
    from gi_deploy.training import distributed

    real, alias = resumable_run
    seen = {}

    def launch(entrypoint, args, nproc):  # stands in for torch's launcher: the ranks run inside this call
        for name, path in (("real", real), ("alias", alias)):
            try:
                with lock_run_dir(path):
                    seen[name] = "free"
            except ConfigError as e:
                seen[name] = str(e)
        raise DistributedError("rank 1 of 2 died (exit code 1): stopped by the test")

    monkeypatch.setattr(distributed, "launch_local", launch)
    r = _invoke("train", "capsule", "--data-dir", tiny_data, "--out", real.parent, "--resume", "--nproc-per-node", 2)
    assert r.exit_code == 1 and "stopped by the test" in r.output, r.output
    assert set(seen) == {"real", "alias"}
    assert all(f"being written by another gi-deploy process (pid {os.getpid()})" in v for v in seen.values()), seen
    with lock_run_dir(alias):  # released once the launch ended
        pass


def _dying_rank():
    if os.environ["RANK"] == "1":
        raise ValueError("disk full on rank 1")
    time.sleep(30)  # rank 0 would wait on its peer; the launcher stops it


_LAUNCH = """
import logging
from gi_deploy.errors import DistributedError
from gi_deploy.training.distributed import launch_local
from test_ddp_lock import _dying_rank
if {verbose}:
    logging.basicConfig()
    logging.getLogger("gi_deploy").setLevel(logging.DEBUG)  # what --verbose sets (cli/_display.py setup_logging)
try:
    launch_local(_dying_rank, (), 2)
except DistributedError as e:
    print(e)
"""


@pytest.mark.slow
@pytest.mark.parametrize("verbose", [False, True])
def test_a_dying_rank_is_one_line_and_torchs_log_is_for_verbose(verbose):
    tests = Path(__file__).parents[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tests.parent), str(tests), str(tests / "training")])}
    r = subprocess.run(
        [sys.executable, "-c", _LAUNCH.format(verbose=verbose)], capture_output=True, text=True, env=env, timeout=600
    )  # a hang fails; a loaded 2-core machine takes minutes to spawn
    assert r.returncode == 0, r.stderr
    message = r.stdout.strip()
    assert message.count("\n") == 0 and message.startswith(
        "rank 1 of 2 died (exit code 1): ValueError: disk full on rank 1; the other ranks were stopped"
    ), message
    assert "Traceback" not in message
    if verbose:  # torch's own account, traceback and all, is there for whoever asks for it
        assert "torch/distributed/elastic" in r.stderr and "Traceback" in r.stderr, r.stderr
    else:
        assert r.stderr.strip() == "", r.stderr
