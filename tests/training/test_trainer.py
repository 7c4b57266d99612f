import json

import pytest

from conftest import tiny_train_config
from gi_deploy.errors import ConfigError
from gi_deploy.training.trainer import train


def test_finished_run_is_not_overwritten_without_asking(tiny_run):
    manifest = (tiny_run / "run.json").read_bytes()
    cfg = tiny_train_config(json.loads(manifest)["config"]["data_dir"], tiny_run.parent)
    with pytest.raises(ConfigError, match="already holds a run; pass --resume to continue it, --overwrite"):
        train(cfg)
    assert (tiny_run / "run.json").read_bytes() == manifest


def test_run_manifest_records_what_export_needs(tiny_run):
    m = json.loads((tiny_run / "run.json").read_text())
    assert m["status"] == "done" and m["best"]["epoch"] == 1 and "accuracy" in m["test"]
    assert m["base_weights"]["kind"] == "random" and (tiny_run / m["base_weights"]["ref"]).is_file()
    assert m["preprocess"]["size"] == [32, 32] and len(m["preprocess"]["mean"]) == 3
    assert m["params"]["trainable"] < m["params"]["total"]
    assert {"torch", "timm", "peft"} <= set(m["versions"])
