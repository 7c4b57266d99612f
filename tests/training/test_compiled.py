"""``train --compile``: the compiled model (kernels cached on disk) and fused AdamW train to the same
numbers as eager on a tiny model, and the run records how it was trained."""

import json

import pytest
from conftest import tiny_train_config

from gi_deploy.model.settings import LoraSettings
from gi_deploy.training.trainer import train


@pytest.mark.slow  # two tiny trainings, one compiled by inductor (C++): minutes on 2 shared cores
def test_compiled_training_matches_eager_and_caches_its_kernels(tiny_data, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "compile-cache"))
    # dropout off: inductor draws its masks with its own RNG, so with dropout the two runs would differ by
    # their masks, not by their maths (a 0.6% loss difference measured here with dropout 0.1)
    still = LoraSettings(dropout=0.0)
    eager = train(tiny_train_config(tiny_data, tmp_path / "eager", lora=still))
    fast = train(tiny_train_config(tiny_data, tmp_path / "compiled", compile=True, lora=still))
    runtime = json.loads((fast.run_dir / "run.json").read_text())["runtime"]
    assert runtime["compile"] is True and runtime["fused_adamw"] is True
    assert runtime["compile_cache"] == str(tmp_path / "compile-cache")
    assert any((tmp_path / "compile-cache").rglob("*.py")), "inductor wrote no kernels into the cache"
    e, c = (json.loads((r.run_dir / "run.json").read_text())["history"][0] for r in (eager, fast))
    assert c["train_loss"] == pytest.approx(e["train_loss"], rel=1e-3)  # same maths, other kernels
    assert c["val_accuracy"] == e["val_accuracy"]
