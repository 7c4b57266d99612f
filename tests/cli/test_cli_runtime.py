"""The runtime commands through the Typer app: infer over several sources and --strict, evaluate
(re-scoring and --cross) and benchmark."""

import csv
import json
import shutil

import pytest
from typer.testing import CliRunner

from gi_deploy.cli import app
from gi_deploy.runtime.infer import InferConfig, infer_folder

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture
def wide(monkeypatch):
    """Rich reads COLUMNS when it prints: wide enough that no table cell wraps."""
    monkeypatch.setenv("COLUMNS", "400")


def test_infer_source_all_prints_one_line_per_source(two_source_deploy, tiny_data, tmp_path, wide):
    out = tmp_path / "pred.csv"
    r = invoke(
        "infer", tiny_data / "test", "--deploy", two_source_deploy, "--source", "all", "--out", out, "--workers", 0
    )
    assert r.exit_code == 0, r.output
    lines = r.output.splitlines()
    for s in ("capsule", "endoscope"):
        mine = [line for line in lines if line.startswith(f"{s}: 12 rows, 0 unreadable, 0 unlabelled; on ")]
        # auto's engine on a CPU is measured per model (onnxruntime or OpenVINO): either is named
        assert len(mine) == 1 and ("CPUExecutionProvider" in mine[0] or "OpenVINO" in mine[0]), r.output
        assert out.with_name(f"pred.{s}.metrics.json").is_file()
    assert "12 images -> " in r.output and "2 source(s)" in r.output
    with open(out, newline="") as f:
        assert len(list(csv.DictReader(f))) == 24


def test_infer_strict_exits_1_naming_the_file(tiny_deploy, tiny_data, tmp_path):
    folder = tmp_path / "imgs"
    shutil.copytree(tiny_data / "test", folder)
    (folder / "polyp" / "broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    r = invoke("infer", folder, "--deploy", tiny_deploy, "--out", tmp_path / "p.csv", "--strict", "--workers", 0)
    assert r.exit_code == 1
    assert "cannot read image" in r.output and "broken.jpg" in r.output and "--resume" in r.output
    assert "Traceback" not in r.output


def test_evaluate_rescores_a_predictions_csv(tiny_deploy, tiny_data, tmp_path, wide):
    pred = tmp_path / "pred.csv"
    infer_folder(InferConfig(inputs=tiny_data / "test", deploy_dir=tiny_deploy, out_csv=pred, workers=0))
    for p in tmp_path.glob("pred.*"):  # keep only the CSV: evaluate must write the rest itself
        if p != pred:
            p.unlink()
    r = invoke("evaluate", pred)
    assert r.exit_code == 0, r.output
    assert "capsule: 12 rows, 0 unreadable, 0 unlabelled" in r.output
    assert "scored from" in r.output and "MCC" in r.output and "F1 macro" in r.output  # the metrics table
    metrics = json.loads((tmp_path / "pred.metrics.json").read_text())
    with open(pred, newline="") as f:
        rows = list(csv.DictReader(f))
    assert metrics["n"] == 12
    assert metrics["accuracy"] == pytest.approx(sum(r["predicted"] == r["true_label"] for r in rows) / 12)
    assert f"{100 * metrics['accuracy']:.2f}" in r.output
    for suffix in (".confusion.png", ".roc.png", ".confusion.csv", ".wrong.csv"):
        written = tmp_path / f"pred{suffix}"
        assert written.is_file() and written.stat().st_size > 0 and str(written) in r.output
    r = invoke("evaluate", pred, "--out", tmp_path / "report")  # --out: the files go there instead
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "report" / "pred.metrics.json").read_text())["accuracy"] == metrics["accuracy"]
    assert (tmp_path / "report" / "pred.roc.png").is_file()


def test_evaluate_without_a_csv_or_cross_exits_2(tmp_path):
    r = invoke("evaluate")
    assert r.exit_code == 2 and "give a predictions CSV, or --cross" in r.output
    r = invoke("evaluate", tmp_path / "p.csv", "--class-map", tmp_path / "m.json")  # a --cross option alone
    assert r.exit_code == 2 and "belong to --cross" in r.output


def test_evaluate_cross_prints_the_matrix(two_source_deploy, tiny_data, tmp_path, wide):
    out = tmp_path / "cross"
    r = invoke(
        "evaluate",
        "--cross",
        "--deploy",
        two_source_deploy,
        "--test",
        f"capsule={tiny_data / 'test'}",
        "--test",
        f"endoscope={tiny_data / 'test'}",
        "--out",
        out,
    )
    assert r.exit_code == 0, r.output
    assert "capsule test" in r.output and "endoscope test" in r.output
    cells = {(c["model"], c["test"]): c for c in json.loads((out / "cross.json").read_text())["cells"]}
    lines = r.output.splitlines()
    for m in ("capsule", "endoscope"):
        row = next(line for line in lines if line.strip("│ ").startswith(m + " "))
        shown = [f"{100 * cells[(m, t)]['accuracy']:.2f} (n=12)" for t in ("capsule", "endoscope")]
        assert row.index(shown[0]) < row.rindex(shown[1]), row  # both cells, in column order
    assert f"matrices -> {out / 'cross_accuracy.csv'}, {out / 'cross_accuracy_all_images.csv'}" in r.output
    assert "The same over every test image" in r.output  # the strict matrix is printed too
    r = invoke("evaluate", "--cross", "--deploy", two_source_deploy, "--test", "capsule", "--out", out)
    assert r.exit_code == 1 and "expected SOURCE=FOLDER" in r.output


def test_benchmark_table_rows_goals_and_json(tiny_deploy, tmp_path, wide):
    from gi_deploy.export.tensorrt import tensorrt_status

    have_trt, why = tensorrt_status()
    out = tmp_path / "bench.json"
    r = invoke("benchmark", "--deploy", tiny_deploy, "--n-images", 8, "--batch-size", 4, "--json", out)
    assert r.exit_code == 0, r.output
    rows = {line.strip("│ ").split("│")[0].strip(): line for line in r.output.splitlines() if line.startswith("│")}
    for name in ("PyTorch eager", "onnxruntime fp32", "onnxruntime fp16"):
        assert name in rows and "skipped" not in rows[name] and "x" in rows[name], r.output
    assert "onnxruntime int8" not in rows and "TensorRT fp16" not in rows  # not run here: listed below the table
    said = {line.split(":")[0]: line for line in r.output.splitlines() if ": skipped:" in line}
    assert "skipped: bundle" in said["onnxruntime int8"] and "has no int8 model" in said["onnxruntime int8"]
    if not have_trt:
        assert f"skipped: --backend tensorrt: {why}" in said["TensorRT fp16"]
    assert "onnxruntime fp32: onnxruntime" in r.output and "CPUExecutionProvider" in r.output  # what each ran on
    goals = [line for line in r.output.splitlines() if line.startswith("goal ")]
    assert len(goals) == 4 and goals[2].startswith("goal best int8 vs fp32 model-only >= 2.0x: n/a (not measured)")
    assert goals[3].startswith("goal best OpenVINO end-to-end vs onnxruntime fp32 end-to-end >= 1.7x: ")
    assert all(g.endswith(("(met)", "(NOT met)", "(not measured)")) for g in goals)
    saved = json.loads(out.read_text())
    by_name = {row["name"]: row for row in saved["rows"]}
    assert by_name["onnxruntime fp32"]["status"] == "ok" and by_name["onnxruntime fp32"]["model_only"] > 0
    assert by_name["PyTorch eager"]["e2e_vs_eager"] == pytest.approx(1.0)
    assert (
        by_name["onnxruntime int8"]["status"].startswith("skipped:")
        and by_name["onnxruntime int8"]["end_to_end"] is None
    )
    assert saved["n_images"] == 8 and saved["batch_size"] == 4 and saved["source"] == "capsule"
    assert f"-> {out}" in r.output
