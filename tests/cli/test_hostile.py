"""Hardening (issue 15): hostile or tampered artifacts are refused, every gate can fail, no input
or result is overwritten or mixed; each planted from the command line, as a user would meet it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import tiny_train_config
from typer.testing import CliRunner

from gi_deploy.cli import app
from gi_deploy.errors import TrainingInterrupted
from gi_deploy.training.trainer import train

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def _interrupt_at(epoch: int, step: int):
    def report(event: str, d: dict) -> None:
        if event == "batch" and d["epoch"] == epoch and d["step"] == step:
            raise KeyboardInterrupt
    return report


class _Evil:
    """Unpickling this creates ``marker``: what a hostile checkpoint's ``__reduce__`` would do."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_resume_refuses_a_checkpoint_that_would_run_code(tiny_data, tmp_path):
    cfg = tiny_train_config(tiny_data, tmp_path / "runs", epochs=2)
    with pytest.raises(TrainingInterrupted):
        train(cfg, report=_interrupt_at(epoch=2, step=1))
    ckpt = cfg.run_dir / "checkpoint.pt"
    good = torch.load(ckpt, weights_only=True)  # what this version writes loads without unpickling objects
    assert set(good) >= {"trained", "optimizer", "loop", "rng"}
    marker = tmp_path / "pwned"
    good["loop"] = _Evil(marker)
    torch.save(good, ckpt)
    r = invoke("train", "capsule", "--data-dir", tiny_data, "--model", "convnextv2_atto", "--no-pretrained",
               "--img-size", 32, "--epochs", 2, "--batch-size", 8, "--lr", 1e-3, "--out", tmp_path / "runs",
               "--device", "cpu", "--resume")
    assert r.exit_code == 1, r.output
    assert "checkpoint.pt is refused" in r.output and "could run code" in r.output and "Traceback" not in r.output
    assert not marker.exists()  # nothing from it ran
