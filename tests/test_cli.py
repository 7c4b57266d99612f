"""End to end through the Typer app, as a user types it."""

import json

from typer.testing import CliRunner

from gi_deploy.cli import app

runner = CliRunner()


def invoke(*args: str):
    result = runner.invoke(app, [str(a) for a in args])
    return result


def test_train_export_infer_end_to_end(tiny_data, tmp_path):
    runs, deploy = tmp_path / "runs", tmp_path / "deploy"
    r = invoke("train", "capsule", "--data-dir", tiny_data, "--model", "convnextv2_atto", "--no-pretrained",
               "--img-size", 32, "--epochs", 2, "--batch-size", 8, "--lr", 1e-3, "--out", runs, "--device", "cpu")
    assert r.exit_code == 0, r.output
    assert "trainable params: 295,684 / 3,684,368" in r.output
    assert (runs / "capsule" / "adapter" / "adapter_model.safetensors").is_file()
    assert not (runs / "capsule" / "model.safetensors").exists()  # adapter only
    run = json.loads((runs / "capsule" / "run.json").read_text())
    assert run["status"] == "done" and len(run["history"]) == 2 and run["config"]["lora"]["r"] == 16
    assert set(run["splits"]["files"]) == {"train", "val", "test"} and run["versions"]["torch"]

    r = invoke("export", "--merge", "--fp16", "--runs", runs, "--out", deploy)
    assert r.exit_code == 0, r.output
    assert "capsule:" in r.output and "merge max|Δlogit|" in r.output
    assert {p.name for p in (deploy / "capsule").iterdir()} == {"model.onnx", "model_fp16.onnx", "labels.json",
                                                               "manifest.json"}

    out_csv = tmp_path / "pred.csv"
    r = invoke("infer", tiny_data / "test", "--deploy", deploy, "--out", out_csv)
    assert r.exit_code == 0, r.output
    assert "12 images, 0 unreadable" in r.output and "MCC" in r.output
    metrics = json.loads(out_csv.with_suffix(".metrics.json").read_text())
    assert metrics["n"] == 12 and 0 <= metrics["accuracy"] <= 1


def test_offline_pretrained_is_one_clear_error(tiny_data, tmp_path, monkeypatch):
    import huggingface_hub.constants as hub_constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True, raising=False)
    r = invoke("train", "capsule", "--data-dir", tiny_data, "--model", "convnextv2_atto", "--pretrained",
               "--out", tmp_path)
    assert r.exit_code == 1
    assert "--weights" in r.output and "--no-pretrained" in r.output and "Traceback" not in r.output


def test_bad_input_fails_with_one_line_not_a_traceback(tmp_path):
    r = invoke("train", "k", "--data-dir", tmp_path / "nowhere", "--no-pretrained")
    assert r.exit_code == 1 and "is not a folder" in r.output and "Traceback" not in r.output
    r = invoke("export", "--runs", tmp_path)
    assert r.exit_code == 1 and "no trained runs" in r.output
    r = invoke("infer", tmp_path, "--deploy", tmp_path / "deploy")
    assert r.exit_code == 1 and "no bundles" in r.output


def test_training_commands_on_a_runtime_only_install_name_the_extra(monkeypatch, tmp_path):
    import sys

    monkeypatch.setitem(sys.modules, "peft", None)  # what a torch-free install looks like to import
    for args in (("train", "k", "--data-dir", tmp_path), ("export",), ("demo", "--out", tmp_path)):
        r = invoke(*args)
        assert r.exit_code == 1, args
        assert "pip install 'gi-deploy[train]'" in r.output and "peft" in r.output
