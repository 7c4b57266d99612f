"""End to end through the Typer app, as a user types it."""

import json
from pathlib import Path

from typer.testing import CliRunner

from gi_deploy.cli import app

runner = CliRunner()


def invoke(*args: str):
    result = runner.invoke(app, [str(a) for a in args])
    return result


def test_train_export_infer_end_to_end(tiny_data, tmp_path):
    runs, deploy = tmp_path / "runs", tmp_path / "deploy"
    r = invoke(
        "train",
        "capsule",
        "--data-dir",
        tiny_data,
        "--model",
        "convnextv2_atto",
        "--no-pretrained",
        "--img-size",
        32,
        "--epochs",
        2,
        "--batch-size",
        8,
        "--lr",
        1e-3,
        "--out",
        runs,
        "--device",
        "cpu",
    )
    assert r.exit_code == 0, r.output
    assert "trainable params: 295,684 / 3,684,368" in r.output
    assert (runs / "capsule" / "adapter" / "adapter_model.safetensors").is_file()
    assert not (runs / "capsule" / "model.safetensors").exists()  # adapter only
    run = json.loads((runs / "capsule" / "run.json").read_text())
    assert run["status"] == "done" and len(run["history"]) == 2 and run["config"]["lora"]["r"] == 16
    assert set(run["splits"]["files"]) == {"train", "val", "test"} and run["versions"]["torch"]

    r = invoke("export", "--merge", "--fp16", "--runs", runs, "--out", deploy)
    assert r.exit_code == 0, r.output
    assert "capsule:" in r.output and "merge max|Δlogit|" in r.output and "true fp16: top-1 100%" in r.output
    assert "footprint: lora artifact 1.2 MB vs merged model 13.5 MB" in r.output
    assert {p.name for p in (deploy / "capsule").iterdir()} == {
        "model.onnx",
        "model.fp16.onnx",
        "labels.json",
        "manifest.json",
        "id_stats.npz",
    }
    r = invoke("export", "--runs", runs, "--out", deploy)  # nothing changed: nothing redone
    assert r.exit_code == 0 and "capsule: unchanged since" in r.output and "--force to re-export" in r.output
    r = invoke("export", "--list", "--out", deploy)
    assert r.exit_code == 0 and "model.fp16.onnx" in r.output and "fp16_emulated" in r.output, r.output
    assert "lora (run)" in r.output and "1.2 MB" in r.output and "footprint" in r.output

    out_csv = tmp_path / "pred.csv"
    r = invoke("infer", tiny_data / "test", "--deploy", deploy, "--out", out_csv)
    assert r.exit_code == 0, r.output
    assert "12 rows, 0 unreadable" in r.output and "MCC" in r.output
    metrics = json.loads(out_csv.with_suffix(".metrics.json").read_text())
    assert metrics["n"] == 12 and 0 <= metrics["accuracy"] <= 1


def test_offline_pretrained_is_one_clear_error(tiny_data, tmp_path, monkeypatch):
    import huggingface_hub.constants as hub_constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True, raising=False)
    r = invoke(
        "train", "capsule", "--data-dir", tiny_data, "--model", "convnextv2_atto", "--pretrained", "--out", tmp_path
    )
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


def test_config_file_flags_override_and_resume_of_a_finished_run(tiny_data, tmp_path):
    runs = tmp_path / "runs"
    (tmp_path / "recipe.toml").write_text(
        f'model = "convnextv2_atto"\npretrained = false\nimg_size = 32\nepochs = 3\nbatch_size = 8\n'
        f'lr = 1e-3\ndevice = "cpu"\nout_dir = "{runs}"\ndata_dir = "{tiny_data}"\n[lora]\nr = 4\n'
    )
    r = invoke("train", "capsule", "--config", tmp_path / "recipe.toml", "--epochs", 1, "--lora-alpha", 8)
    assert r.exit_code == 0, r.output
    assert "resolved config:" in r.output and "epochs: 1" in r.output
    run = json.loads((runs / "capsule" / "run.json").read_text())
    assert run["config"]["epochs"] == 1 and run["config"]["lora"] == {**run["config"]["lora"], "r": 4, "alpha": 8}
    assert "licence none (random init)" in r.output
    r = invoke("train", "capsule", "--resume", "--out", runs)  # settings come back from run.json
    assert r.exit_code == 1 and "already finished; pass --overwrite" in r.output


def test_sources_lists_the_built_in_layouts():
    r = invoke("sources")
    assert r.exit_code == 0
    assert "kvasir:" in r.output and "labelled_images/<class>/<videoID>_<frame>.jpg" in r.output
    assert "gastrovision:" in r.output and "Dyed-lifted-polyps" in r.output and "ImageFolder" in r.output


def test_compare_grid_writes_one_table_and_reuses_finished_cells(tiny_data, tmp_path):
    import csv

    from gi_deploy.export.writer import export_source

    args = (
        "compare",
        "capsule",
        "--data-dir",
        tiny_data,
        "--methods",
        "lora,full,linear",
        "--label-fractions",
        "0.5,1.0",
        "--model",
        "convnextv2_atto",
        "--no-pretrained",
        "--img-size",
        32,
        "--epochs",
        1,
        "--batch-size",
        8,
        "--lr",
        1e-3,
        "--device",
        "cpu",
        "--out",
        tmp_path / "runs",
    )
    r = invoke(*args)
    assert r.exit_code == 0, r.output
    grid = tmp_path / "runs" / "capsule-compare"
    rows = list(csv.DictReader(open(grid / "compare.csv")))
    assert [(row["method"], float(row["label_fraction"])) for row in rows] == [
        (m, f) for m in ("lora", "full", "linear") for f in (0.5, 1.0)
    ]
    by = {(row["method"], float(row["label_fraction"])): row for row in rows}
    assert by["lora", 0.5]["train_images"] == "12" and by["lora", 1.0]["train_images"] == "24"
    trainable = {m: int(by[m, 1.0]["trainable_params"]) for m in ("linear", "lora", "full")}
    size = {m: int(by[m, 1.0]["artifact_bytes"]) for m in ("linear", "lora", "full")}
    assert trainable["linear"] < trainable["lora"] < trainable["full"] and size["linear"] < size["lora"] < size["full"]
    assert all(row["eval_split"] == "test" and 0 <= float(row["accuracy"]) <= 1 for row in rows)
    assert "| linear | 50% | 12 |" in (grid / "compare.md").read_text()

    r = invoke(*args)  # everything finished: nothing is retrained
    assert r.exit_code == 0 and r.output.count("finished earlier, reused") == 6

    bundle = export_source(grid / "linear-1" / "capsule", tmp_path / "deploy" / "capsule", fp16=False).manifest
    assert bundle.model.method == "linear" and bundle.verification["onnx_fp32"]["max_abs_logit_diff"] < 1e-4


def test_colora_train_export_infer_through_the_cli(tiny_data, tmp_path):
    runs, deploy = tmp_path / "runs", tmp_path / "deploy"
    config = tmp_path / "colora.toml"
    config.write_text('method = "lora+colora"\n[colora]\nmerge_every = 2\nforward_mode = "branch"\n')
    r = invoke(
        "train",
        "capsule",
        "--data-dir",
        tiny_data,
        "--config",
        config,
        "--model",
        "convnextv2_atto",
        "--no-pretrained",
        "--img-size",
        32,
        "--epochs",
        2,
        "--batch-size",
        8,
        "--lr",
        1e-3,
        "--out",
        runs,
        "--device",
        "cpu",
        "--colora-targets",
        "stem.*,stages.*.downsample.*",
    )
    assert r.exit_code == 0, r.output
    assert "CoLoRA: 4 convolutions, 70,800 parameters trained by backpropagation" in r.output
    assert "12 depthwise/grouped convolutions stay frozen" in r.output
    run = json.loads((runs / "capsule" / "run.json").read_text())
    assert run["config"]["colora"] == {
        "merge_every": 2,
        "targets": ["stem.*", "stages.*.downsample.*"],
        "min_kernel": 1,
        "forward_mode": "branch",
    }
    assert [h["colora_merged"] for h in run["history"]] == [False, True]
    assert (runs / "capsule" / "colora.safetensors").is_file() and (runs / "capsule" / "adapter").is_dir()

    r = invoke("export", "--runs", runs, "--out", deploy)
    assert r.exit_code == 0, r.output
    r = invoke("infer", tiny_data / "test", "--deploy", deploy, "--out", tmp_path / "pred.csv")
    assert r.exit_code == 0 and "12 rows, 0 unreadable" in r.output, r.output

    r = invoke(
        "train",
        "capsule",
        "--data-dir",
        tiny_data,
        "--method",
        "colora",
        "--model",
        "convnextv2_atto",
        "--no-pretrained",
        "--out",
        tmp_path / "bad",
        "--colora-targets",
        "stages.*.conv_dw",
    )
    assert r.exit_code == 1 and "only grouped/depthwise" in r.output and "Traceback" not in r.output


def test_a_failing_gate_exits_nonzero_naming_gate_number_and_threshold(tiny_run, tmp_path, monkeypatch):
    from gi_deploy.model import lora

    real = lora.lora_delta
    monkeypatch.setattr(lora, "lora_delta", lambda f: 2 * real(f))  # a planted merge bug
    r = invoke("export", "--runs", tiny_run.parent, "--out", tmp_path / "deploy")
    assert r.exit_code == 1
    assert "gate merge failed for capsule" in r.output and "must be at most 0.0001; nothing written" in r.output
    assert not (tmp_path / "deploy" / "capsule").exists()


def test_infer_explain_wrong_writes_heatmaps_of_the_most_confidently_wrong(tiny_deploy, tiny_data, tmp_path):
    import csv

    out_csv = tmp_path / "pred.csv"
    r = invoke("infer", tiny_data / "test", "--deploy", tiny_deploy, "--out", out_csv, "--explain-wrong", 2)
    assert r.exit_code == 0, r.output
    rows = [row for row in csv.DictReader(open(out_csv)) if row["true_label"] != row["predicted"]]
    assert rows, "the tiny model is expected to get some test images wrong"
    pngs = sorted(p.name for p in (tmp_path / "pred_wrong").glob("*.png"))
    assert len(pngs) == min(2, len(rows)) + 1 and "contact_sheet.png" in pngs
    top = max(rows, key=lambda row: float(row["confidence"]))
    assert pngs[0].startswith("001_" + Path(top["path"]).stem) and f"true-{top['true_label']}" in pngs[0]
    assert "most confidently wrong image(s)" in r.output


def test_infer_takes_a_glob_and_a_labels_csv(tiny_deploy, tiny_data, tmp_path):
    labels = tmp_path / "labels.csv"
    images = sorted((tiny_data / "test").rglob("*.jpg"))
    labels.write_text(
        "path,label\n" + "".join(f"{p.relative_to(tiny_data / 'test').as_posix()},{p.parent.name}\n" for p in images)
    )
    r = invoke(
        "infer",
        f"{tiny_data / 'test'}/*/*.jpg",
        "--labels",
        labels,
        "--deploy",
        tiny_deploy,
        "--out",
        tmp_path / "p.csv",
    )
    assert r.exit_code == 0, r.output
    assert "12 rows, 0 unreadable" in r.output and "MCC" in r.output
    r = invoke("infer", tmp_path / "nothing-here", "--deploy", tiny_deploy, "--out", tmp_path / "q.csv")
    assert r.exit_code == 1 and "nothing to classify at" in r.output
