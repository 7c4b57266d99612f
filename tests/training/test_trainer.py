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


@pytest.mark.parametrize(
    "options",
    [
        dict(channels_last=True, amp="bf16", balance="sampler", scheduler="plateau"),
        dict(balance="weighted-loss", resize="crop", crop_pct=0.8, method="full"),
    ],
)
def test_gpu_path_options_also_run_on_cpu(tiny_data, tmp_path, options):
    """channels-last, bf16 autocast, balanced sampling, weighted loss, schedulers: the CUDA-minded
    options are all exercised here on CPU, end to end, with the run recording what it used."""
    result = train(tiny_train_config(tiny_data, tmp_path / "runs", **options))  # bf16 on CPU is slow: 1 epoch
    m = json.loads((result.run_dir / "run.json").read_text())
    assert m["status"] == "done" and len(m["history"]) == 1
    assert m["runtime"]["channels_last"] == options.get("channels_last", False)
    assert m["runtime"]["amp"] == ("bfloat16" if options.get("amp") == "bf16" else "off")
    assert m["preprocess"]["resize"] == options.get("resize", "direct")
    assert all(r["peak_mem_mib"] is not None and r["img_per_s"] > 0 for r in m["history"])


@pytest.mark.slow
def test_torch_compile_trains_on_cpu(tiny_data, tmp_path):
    result = train(tiny_train_config(tiny_data, tmp_path / "runs", compile=True))
    assert json.loads((result.run_dir / "run.json").read_text())["runtime"]["compile"] is True


def test_linear_probe_trains_the_head_only(tiny_data, tmp_path):
    from safetensors.torch import load_file

    result = train(tiny_train_config(tiny_data, tmp_path / "runs", method="linear"))
    head = load_file(str(result.run_dir / "head.safetensors"))
    assert set(head) == {"head.fc.weight", "head.fc.bias"}
    assert result.trainable_params == sum(t.numel() for t in head.values())
    assert not (result.run_dir / "adapter").exists() and not (result.run_dir / "model.safetensors").exists()
