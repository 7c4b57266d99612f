"""CoLoRA in the training loop: frozen batch norms keep their statistics, and a killed run resumes
to the uninterrupted result (merges included)."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from conftest import tiny_train_config

from gi_deploy.core.runs import read_run_manifest
from gi_deploy.errors import TrainingInterrupted
from gi_deploy.model.run import load_run_model, rebuild_base
from gi_deploy.model.settings import ColoraSettings
from gi_deploy.training.trainer import train


def test_colora_training_keeps_frozen_batchnorm_statistics(tiny_data, tmp_path):
    """A frozen ResNet's batch norms stay in eval mode: their running statistics are the base's,
    so the adapter-only artifact reproduces the validated model."""
    cfg = tiny_train_config(tiny_data, tmp_path / "runs", method="colora", model="resnet18", epochs=2)
    result = train(cfg)
    run = json.loads((result.run_dir / "run.json").read_text())
    assert run["colora"]["merges"] == 2 and run["colora"]["layers"] == 20
    assert [r["colora_merged"] for r in run["history"]] == [True, True]
    assert run["params"]["trainable"] == run["colora"]["backprop_params"] + 512 * 4 + 4
    trained, base = load_run_model(result.run_dir), rebuild_base(read_run_manifest(result.run_dir), result.run_dir)
    stats = {k: v for k, v in base.state_dict().items() if "running_" in k}
    trained_inner = {k.replace(".base.", "."): v for k, v in trained.state_dict().items()}
    assert stats and all(torch.equal(trained_inner[k], v) for k, v in stats.items())


def test_killed_colora_run_resumes_to_the_uninterrupted_result(tiny_data, tmp_path):
    from safetensors.torch import load_file

    recipe = dict(method="colora", epochs=3, lr=3e-3, colora=ColoraSettings(merge_every=1))
    whole = train(tiny_train_config(tiny_data, tmp_path / "whole", **recipe))
    cfg = tiny_train_config(tiny_data, tmp_path / "killed", **recipe)

    def stop(event, d):
        if event == "batch" and d["epoch"] == 3 and d["step"] == 2:
            raise KeyboardInterrupt
    with pytest.raises(TrainingInterrupted):
        train(cfg, report=stop)
    resumed = train(dataclasses.replace(cfg, resume=True))
    a, b = (load_file(str(r.run_dir / "colora.safetensors")) for r in (whole, resumed))
    assert a.keys() == b.keys() and any("merged_weight" in k for k in a)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert resumed.test == whole.test
