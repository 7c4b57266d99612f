"""Nothing lost: a killed run resumes to exactly the uninterrupted result; a NaN loss stops the run
with the last good checkpoint kept; config layering for --config and --resume."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import tiny_train_config
from safetensors.torch import load_file

from gi_deploy.errors import ConfigError, TrainingDiverged, TrainingInterrupted
from gi_deploy.training.trainer import train

RECIPE = dict(epochs=3, lr=3e-4, scheduler="cosine", color_jitter=0.2, vflip=True, patience=5)


def _interrupt_at(epoch: int, step: int):
    def report(event: str, d: dict) -> None:
        if event == "batch" and d["epoch"] == epoch and d["step"] == step:
            raise KeyboardInterrupt

    return report


_ISOLATED = "GI_DEPLOY_TEST_ISOLATED"  # set in the fresh interpreter that runs a forking case


def _adapter(run_dir):
    return load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))


@pytest.mark.parametrize("workers", [0, pytest.param(2, marks=pytest.mark.slow)])
def test_killed_run_resumes_to_the_uninterrupted_result(tiny_data, tmp_path, workers):
    """Augmentation (flips, rotation, colour jitter) and shuffling on; with loader workers too (the
    CUDA default), whose random streams must also start again where the checkpoint says."""
    if workers and not os.environ.get(_ISOLATED):
        # Loader workers fork this process: run the case in a fresh interpreter, not in a test process that
        # has loaded Ray, OpenVINO, PyAV and inductor's pools (a fork of that once crashed the whole suite)
        case = f"{__file__}::test_killed_run_resumes_to_the_uninterrupted_result[{workers}]"
        r = subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", case],
            env={**os.environ, _ISOLATED: "1"},
            capture_output=True,
            text=True,
            timeout=1500,
        )
        assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
        return
    whole = train(tiny_train_config(tiny_data, tmp_path / "whole", num_workers=workers, **RECIPE))

    cfg = tiny_train_config(tiny_data, tmp_path / "killed", num_workers=workers, **RECIPE)
    with pytest.raises(TrainingInterrupted, match="epochs 1-2 are checkpointed.*--resume"):
        train(cfg, report=_interrupt_at(epoch=3, step=2))  # mid-epoch: epoch 3 is lost and redone
    manifest = json.loads((cfg.run_dir / "run.json").read_text())
    assert manifest["status"] == "interrupted" and len(manifest["history"]) == 2
    with pytest.raises(ConfigError, match="already holds a run; pass --resume"):
        train(cfg)
    resumed = train(dataclasses.replace(cfg, resume=True))

    strip = lambda h: [
        {
            k: v
            for k, v in r.items()
            if k not in ("seconds", "img_per_s", "peak_mem_mib", "first_step_s", "steady_img_per_s")
        }
        for r in h
    ]
    assert strip(resumed.history) == strip(whole.history)
    assert resumed.test == whole.test and resumed.best_epoch == whole.best_epoch
    a, b = _adapter(whole.run_dir), _adapter(resumed.run_dir)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    final = json.loads((resumed.run_dir / "run.json").read_text())
    assert final["status"] == "done" and final["resumed"][0]["at_epoch"] == 2
    lines = (resumed.run_dir / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [1, 2, 3]
    assert (resumed.run_dir / "curves.png").read_bytes()[:4] == b"\x89PNG"


def test_resume_refuses_a_changed_recipe_and_a_finished_run(tiny_data, tmp_path):
    cfg = tiny_train_config(tiny_data, tmp_path / "runs", epochs=2)
    with pytest.raises(TrainingInterrupted):
        train(cfg, report=_interrupt_at(epoch=2, step=1))
    with pytest.raises(ConfigError, match=r"--resume with a different config: lr 0.001 -> 0.01"):
        train(dataclasses.replace(cfg, resume=True, lr=1e-2))
    train(dataclasses.replace(cfg, resume=True, epochs=2, num_workers=0))  # allowed to differ
    with pytest.raises(ConfigError, match="already finished; pass --overwrite"):
        train(dataclasses.replace(cfg, resume=True))


def test_nan_loss_stops_with_the_last_good_checkpoint(tiny_data, tmp_path, monkeypatch):
    from torch import nn

    import gi_deploy.training.trainer as trainer

    calls = {"n": 0}

    class PoisonedLoss(nn.CrossEntropyLoss):  # finite for epoch 1 (3 steps), NaN from epoch 2 on
        def forward(self, logits, target):
            calls["n"] += 1
            loss = super().forward(logits, target)
            return loss * float("nan") if calls["n"] > 3 else loss

    monkeypatch.setattr(trainer.nn, "CrossEntropyLoss", PoisonedLoss)
    cfg = tiny_train_config(tiny_data, tmp_path / "runs", epochs=3)
    with pytest.raises(TrainingDiverged, match="loss became nan at epoch 2, step 1/3; the last good checkpoint"):
        train(cfg)
    manifest = json.loads((cfg.run_dir / "run.json").read_text())
    assert manifest["status"] == "diverged" and [r["epoch"] for r in manifest["history"]] == [1]
    checkpoint = torch.load(cfg.run_dir / "checkpoint.pt", weights_only=True)
    assert checkpoint["loop"]["epoch"] == 1
    assert all(torch.isfinite(t).all() for t in checkpoint["trained"].values())


def test_config_file_layers_under_flags(tmp_path, tiny_data):
    from gi_deploy.training.config import TrainConfig, load_config_file

    (tmp_path / "c.yaml").write_text("lr: 3.0e-4\nbatch-size: 8\nscheduler: cosine\nlora:\n  r: 8\n")
    (tmp_path / "c.toml").write_text('lr = 3.0e-4\nbatch_size = 8\nscheduler = "cosine"\n[lora]\nr = 8\n')
    for name in ("c.yaml", "c.toml"):
        file = load_config_file(tmp_path / name)
        cfg = TrainConfig.from_layers(file, {"source": "s", "data_dir": tiny_data, "lr": 1e-3})
        assert (cfg.lr, cfg.batch_size, cfg.scheduler, cfg.lora.r, cfg.lora.alpha) == (1e-3, 8, "cosine", 8, 32)
    (tmp_path / "bad.yaml").write_text("learning_rate: 1\n")
    with pytest.raises(ConfigError, match="unknown config key.*learning_rate; valid keys: source"):
        TrainConfig.from_layers(load_config_file(tmp_path / "bad.yaml"), {"source": "s", "data_dir": tiny_data})
    (tmp_path / "broken.toml").write_text("lr = = 1\n")
    with pytest.raises(ConfigError, match="broken.toml is not valid TOML"):
        load_config_file(tmp_path / "broken.toml")


def test_stopped_compare_grid_resumes_the_stopped_cell_and_reuses_the_finished_one(tiny_data, tmp_path):
    from gi_deploy.training.compare import compare

    base = tiny_train_config(tiny_data, tmp_path / "runs", epochs=2)

    def stop_in_linear(event: str, d: dict) -> None:
        if event == "cell":
            stop_in_linear.cell = d["method"]
        if event == "batch" and stop_in_linear.cell == "linear" and d["epoch"] == 2:
            raise KeyboardInterrupt

    with pytest.raises(TrainingInterrupted):
        compare(base, ["lora", "linear"], [1.0], report=stop_in_linear)
    events = []
    result = compare(base, ["lora", "linear"], [1.0], report=lambda e, d: events.append((e, d)))
    assert [d["reused"] for e, d in events if e == "cell"] == [True, False]
    linear = json.loads((tmp_path / "runs" / "capsule-compare" / "linear-1" / "capsule" / "run.json").read_text())
    assert linear["status"] == "done" and linear["resumed"][0]["at_epoch"] == 1
    assert [r["method"] for r in result.rows] == ["lora", "linear"] and result.markdown_path.is_file()
