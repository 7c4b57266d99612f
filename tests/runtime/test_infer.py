import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from sklearn import metrics as skm

from gi_deploy.core.metrics import softmax
from gi_deploy.core.preprocess import load_input
from gi_deploy.errors import BundleError, ConfigError
from gi_deploy.runtime.infer import InferConfig, infer_folder
from gi_deploy.runtime.loader import load_bundle


def read_rows(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_csv_rows_and_metrics_match_direct_onnxruntime(tiny_data, tiny_deploy, tmp_path):
    out = tmp_path / "pred.csv"
    result = infer_folder(InferConfig(inputs=tiny_data / "test", deploy_dir=tiny_deploy, out_csv=out, batch_size=5))
    rows = read_rows(out)
    images = sorted((tiny_data / "test").rglob("*.jpg"))
    assert [r["path"] for r in rows] == [p.relative_to(tiny_data / "test").as_posix() for p in images]
    bundle = load_bundle(tiny_deploy / "capsule")
    probs = softmax(bundle.predict_logits(np.stack([load_input(p, bundle.preprocess) for p in images])))
    assert [r["predicted"] for r in rows] == [bundle.classes[k] for k in probs.argmax(1)]
    np.testing.assert_allclose([float(r["confidence"]) for r in rows], probs.max(1), atol=1e-5)
    assert [r["true_label"] for r in rows] == [p.parent.name for p in images]
    # the metrics JSON agrees with scikit-learn computed from the CSV itself
    saved = json.loads(out.with_suffix(".metrics.json").read_text())
    y_true, y_pred = [r["true_label"] for r in rows], [r["predicted"] for r in rows]
    assert saved["accuracy"] == pytest.approx(skm.accuracy_score(y_true, y_pred))
    assert saved["mcc"] == pytest.approx(skm.matthews_corrcoef(y_true, y_pred))
    assert saved["f1_weighted"] == pytest.approx(skm.f1_score(y_true, y_pred, average="weighted", zero_division=0))
    assert result.n_images == len(images) and result.n_errors == 0
    assert result.sources["capsule"].metrics["accuracy"] == saved["accuracy"]


def test_unreadable_files_get_error_rows_and_the_run_goes_on(tiny_data, tiny_deploy, tmp_path):
    folder = tmp_path / "imgs"
    shutil.copytree(tiny_data / "test", folder)
    (folder / "ulcer" / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    (folder / "normal" / "empty.png").write_bytes(b"")
    result = infer_folder(InferConfig(inputs=folder, deploy_dir=tiny_deploy, out_csv=tmp_path / "p.csv"))
    rows = {r["path"]: r for r in read_rows(tmp_path / "p.csv")}
    assert result.n_errors == 2
    for bad in ("ulcer/broken.jpg", "normal/empty.png"):
        assert rows[bad]["predicted"] == "" and "cannot read image" in rows[bad]["error"] and bad in rows[bad]["error"]
    good = [r for r in rows.values() if not r["error"]]
    assert len(good) == result.n_images - 2 and result.sources["capsule"].metrics["n"] == len(good)


def test_no_metrics_when_subfolders_are_not_classes(tiny_data, tiny_deploy, tmp_path):
    folder = tmp_path / "unlabelled" / "batch_01"
    folder.mkdir(parents=True)
    for p in list((tiny_data / "test").rglob("*.jpg"))[:3]:
        shutil.copy(p, folder / p.name)
    result = infer_folder(InferConfig(inputs=folder.parent, deploy_dir=tiny_deploy, out_csv=tmp_path / "p.csv"))
    assert (
        result.sources["capsule"].metrics is None
        and result.sources["capsule"].metrics_path is None
        and result.sources["capsule"].n_unlabelled == 3
    )
    assert not (tmp_path / "p.metrics.json").exists()


def test_fp16_bundle_runs_and_agrees_with_fp32(tiny_data, tiny_deploy, tmp_path):
    r32 = infer_folder(InferConfig(inputs=tiny_data / "test", deploy_dir=tiny_deploy, out_csv=tmp_path / "a.csv"))
    r16 = infer_folder(
        InferConfig(inputs=tiny_data / "test", deploy_dir=tiny_deploy, out_csv=tmp_path / "b.csv", precision="fp16")
    )
    p32 = [r["predicted"] for r in read_rows(r32.csv_path)]
    p16 = [r["predicted"] for r in read_rows(r16.csv_path)]
    assert np.mean([a == b for a, b in zip(p32, p16)]) >= 0.9


def test_bundle_errors_name_the_problem(tiny_deploy, tmp_path):
    with pytest.raises(BundleError, match="no bundle for source 'kvasir'.*available: capsule"):
        infer_folder(InferConfig(inputs=tmp_path, deploy_dir=tiny_deploy, sources=["kvasir"]))
    altered = tmp_path / "deploy" / "capsule"
    shutil.copytree(tiny_deploy / "capsule", altered)
    with open(altered / "model.onnx", "ab") as f:
        f.write(b"\0")
    with pytest.raises(BundleError, match="does not match the sha256"):
        load_bundle(altered)
    with pytest.raises(ConfigError, match="nothing to classify at .*nope: no such file or folder"):
        infer_folder(InferConfig(inputs=tmp_path / "nope", deploy_dir=tiny_deploy))


def test_infer_path_never_imports_torch(tiny_data, tiny_deploy, tmp_path):
    code = (
        "import sys\n"
        "from typer.testing import CliRunner\n"
        "from gi_deploy.cli import app\n"
        f"r = CliRunner().invoke(app, ['infer', {str(tiny_data / 'test')!r}, '--deploy', {str(tiny_deploy)!r},"
        f" '--out', {str(tmp_path / 'p.csv')!r}])\n"
        "assert r.exit_code == 0, r.output\n"
        "bad = sorted(m for m in ('torch', 'timm', 'peft', 'sklearn') if m in sys.modules)\n"
        "assert not bad, bad\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "p.csv").exists()
