"""Hardening (issue 15): hostile or tampered artifacts are refused, every gate can fail, no input
or result is overwritten or mixed; each planted from the command line, as a user would meet it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import permissions_enforced, reseal, tiny_train_config
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
        tmp_path / "runs",
        "--device",
        "cpu",
        "--resume",
    )
    assert r.exit_code == 1, r.output
    assert "checkpoint.pt is refused" in r.output and "could run code" in r.output and "Traceback" not in r.output
    assert not marker.exists()  # nothing from it ran


# --- bundles: self-contained, every field checked, classes bound to the model ------------------------------------


@pytest.fixture
def bundle(tiny_deploy, tmp_path) -> Path:
    """A private copy of the tiny bundle, free to tamper with: ``<tmp>/deploy/capsule``."""
    dst = tmp_path / "deploy" / "capsule"
    shutil.copytree(tiny_deploy / "capsule", dst)
    return dst


def _edit(bundle: Path, _resealed: bool = False, **changes) -> dict:
    """Edit the bundle's manifest (``a__b=v`` sets m["a"]["b"]; None drops a top-level field); with
    ``_resealed`` the content hash and seal are recomputed, as a forger would."""
    m = json.loads((bundle / "manifest.json").read_text())
    for key, value in changes.items():
        target, *path = key.split("__")
        holder = m.get(target)
        for part in path[:-1]:
            holder = holder[part]
        if path:
            holder[path[-1]] = value
        elif value is None:
            m.pop(target)
        else:
            m[target] = value
    if _resealed:
        reseal(m)
    (bundle / "manifest.json").write_text(json.dumps(m))
    return m


def _infer(bundle: Path, tiny_data, tmp_path, *extra):
    return invoke(
        "infer", tiny_data / "test", "--deploy", bundle.parent, "--out", tmp_path / "p.csv", "--workers", 0, *extra
    )


@pytest.mark.parametrize("where", ["../outside.onnx", "ABSOLUTE", "sub/model.onnx", "symlink"])
def test_bundle_model_file_leaving_the_bundle_is_refused(bundle, tiny_data, tmp_path, where):
    outside = tmp_path / "outside.onnx"
    shutil.copy(bundle / "model.onnx", outside)
    if where == "symlink":
        (bundle / "model.onnx").unlink()
        (bundle / "model.onnx").symlink_to(outside)
        name = "model.onnx"
    else:
        name = str(outside) if where == "ABSOLUTE" else where
        m = json.loads((bundle / "manifest.json").read_text())
        m["models"]["fp32"]["file"] = name
        (bundle / "manifest.json").write_text(json.dumps(m))
    r = _infer(bundle, tiny_data, tmp_path)
    assert r.exit_code == 1, r.output
    assert (
        ("is a symlink" in r.output)
        if where == "symlink"
        else ("models.fp32.file" in r.output and "self-contained" in r.output)
    )
    assert "Traceback" not in r.output and not (tmp_path / "p.csv").exists()


def test_manifest_preprocess_size_out_of_range_is_refused_before_anything_runs(bundle, tiny_data, tmp_path):
    _edit(bundle, preprocess__size=[100000, 100000])
    r = _infer(bundle, tiny_data, tmp_path)
    assert r.exit_code == 1 and "field preprocess.size = [100000, 100000]" in r.output and "1..4096" in r.output
    r = invoke("export", "--list", "--out", bundle.parent)  # listed as refused, not a traceback
    assert r.exit_code == 0 and "refused" in r.output and "preprocess.size" in r.output, r.output


@pytest.mark.parametrize(
    "change, message",
    [
        ({"classes": "abc"}, "field classes = 'abc' must be a non-empty list"),
        ({"classes": ["a", "a", "b", "c"]}, "appear more than once"),
        ({"classes": [f"c{i}" for i in range(10000)]}, "does not match the 10000 classes"),
        ({"source": 7}, "field source = 7 must be a non-empty name"),
        ({"models": None}, "has no 'models' field"),
        ({"ood__threshold": "abc"}, "field ood.threshold = 'abc' must be a finite number"),  # issue 21 break 13
        ({"ood__file": "../x"}, "field ood.file = '../x' must be a plain file name"),  # issue 21 break 13
        ({"content_sha256": None}, "has no 'content_sha256' field"),
        ({"preprocess__mean": "grey"}, "field preprocess.mean = 'grey' must be 3 finite numbers"),
        ({"model__num_classes": 3}, "field model.num_classes = 3 does not match the 4 classes"),
    ],
)
def test_malformed_manifest_is_one_line_naming_the_field(bundle, tiny_data, tmp_path, change, message):
    _edit(bundle, **change)
    r = _infer(bundle, tiny_data, tmp_path)
    assert r.exit_code == 1, r.output
    assert message in r.output and "re-export" in r.output and "Traceback" not in r.output


def test_reordered_classes_are_refused_at_load_and_re_exported(tiny_run, bundle, tiny_data, tmp_path):
    m = json.loads((bundle / "manifest.json").read_text())
    swapped = [m["classes"][1], m["classes"][0], *m["classes"][2:]]
    _edit(bundle, classes=swapped)  # the manifest alone: the seal names the field
    r = _infer(bundle, tiny_data, tmp_path)
    assert r.exit_code == 1 and "field classes = " in r.output and "differs from what was sealed" in r.output
    _edit(bundle, _resealed=True)  # resealed by hand: labels.json still disagrees
    r = _infer(bundle, tiny_data, tmp_path)
    assert r.exit_code == 1 and "labels.json lists" in r.output and "mislabelled" in r.output
    (bundle / "labels.json").write_text(json.dumps(swapped))  # and labels.json: the ONNX file's own record disagrees
    r = _infer(bundle, tiny_data, tmp_path)
    assert r.exit_code == 1 and "was exported with" in r.output and "says classes" in r.output, r.output
    assert not (tmp_path / "p.csv").exists()
    # export never calls the tampered bundle "unchanged": it re-exports it
    r = invoke("export", "--runs", tiny_run.parent, "--out", bundle.parent, "--no-fp16")
    assert r.exit_code == 0, r.output
    assert "unchanged since" not in r.output
    assert json.loads((bundle / "labels.json").read_text()) == m["classes"]


# --- trained artifacts: hashed at training, checked at export and by --backend torch ------------------------------


@pytest.fixture
def run_copy(tiny_run, tmp_path) -> Path:
    """A private copy of the tiny run, free to tamper with: ``<tmp>/runs/capsule``."""
    dst = tmp_path / "runs" / "capsule"
    shutil.copytree(tiny_run, dst)
    return dst


def _tamper(path: Path) -> None:
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(path))
    name = sorted(tensors)[0]
    tensors[name] = tensors[name] + 1.0
    save_file(tensors, str(path))


def test_tampered_adapter_is_refused_at_export(run_copy, tmp_path):
    run = json.loads((run_copy / "run.json").read_text())
    assert set(run["best"]["artifact_sha256"]) >= {"adapter/adapter_model.safetensors", "adapter/adapter_config.json"}
    _tamper(run_copy / "adapter" / "adapter_model.safetensors")
    r = invoke("export", "--runs", run_copy.parent, "--out", tmp_path / "deploy", "--no-fp16")
    assert r.exit_code == 1, r.output
    assert "adapter_model.safetensors changed since training" in r.output and "Traceback" not in r.output
    assert not (tmp_path / "deploy" / "capsule").exists()


def test_backend_torch_refuses_an_adapter_changed_after_export(run_copy, tiny_data, tmp_path):
    r = invoke("export", "--runs", run_copy.parent, "--out", tmp_path / "deploy", "--no-fp16")
    assert r.exit_code == 0, r.output
    _tamper(run_copy / "adapter" / "adapter_model.safetensors")
    r = invoke(
        "infer",
        tiny_data / "test",
        "--deploy",
        tmp_path / "deploy",
        "--out",
        tmp_path / "p.csv",
        "--backend",
        "torch",
        "--workers",
        0,
    )
    assert r.exit_code == 1, r.output
    assert "adapter_model.safetensors changed after this bundle was exported" in r.output
    assert not (tmp_path / "p.csv").exists()


# --- every gate able to fail ------------------------------------------------------------------------------------


def test_int8_thresholds_given_are_never_relaxed_and_defaults_say_so(tiny_run, tmp_path, monkeypatch):
    from gi_deploy.export import int8 as int8_mod

    r = invoke(
        "export", "--runs", tiny_run.parent, "--out", tmp_path / "ok", "--no-fp16", "--int8", "--calib-images", 8
    )
    assert r.exit_code == 0, r.output
    assert "default least agreement 98% relaxed to 87.5%" in r.output  # 8 validation images: said, not silent
    real = int8_mod.quantize_int8  # a calibration that wrecks the model: blank images
    monkeypatch.setattr(
        int8_mod, "quantize_int8", lambda src, dst, calib, name: real(src, dst, np.zeros_like(calib[:1]), name)
    )
    r = invoke(
        "export",
        "--runs",
        tiny_run.parent,
        "--out",
        tmp_path / "bad",
        "--no-fp16",
        "--int8",
        "--calib-images",
        8,
        "--int8-min-agreement",
        1.0,
        "--int8-max-drop",
        0.0,
    )
    assert r.exit_code == 1, r.output
    assert "gate int8 failed" in r.output and "must be at least 1 " in r.output  # 1.0 as given, not 1 - 1/n
    assert "verification batch" in r.output  # the batch's own agreement is gated
    assert not (tmp_path / "bad" / "capsule").exists()


@pytest.mark.slow
def test_colora_merge_gate_catches_a_wrong_delta(tiny_data, tmp_path, monkeypatch):
    """The merge gate holds the merged model to CoLoRA's branch form K0*x + K_d*(K_p*x), not to the
    fused K0 + dK the merge itself computes: a wrong delta fails it (it read 0.0 before)."""
    from gi_deploy.model import colora

    runs = tmp_path / "runs"
    train(tiny_train_config(tiny_data, runs, method="colora"))
    real = colora.colora_delta
    monkeypatch.setattr(colora, "colora_delta", lambda pointwise, spatial: real(pointwise, spatial) + 0.01)
    r = invoke("export", "--runs", runs, "--out", tmp_path / "deploy", "--no-fp16")
    assert r.exit_code == 1, r.output
    assert "gate merge failed" in r.output and "max |Δlogit|" in r.output
    assert not (tmp_path / "deploy" / "capsule").exists()
    monkeypatch.setattr(colora, "colora_delta", real)
    r = invoke("export", "--runs", runs, "--out", tmp_path / "deploy", "--no-fp16")
    assert r.exit_code == 0 and "merge max|Δlogit|" in r.output, r.output


def test_export_without_validation_images_is_refused_unless_allowed(run_copy, tmp_path):
    run = json.loads((run_copy / "run.json").read_text())
    run["splits"]["root"] = str(tmp_path / "moved")  # the data moved since training
    (run_copy / "run.json").write_text(json.dumps(run))
    r = invoke("export", "--runs", run_copy.parent, "--out", tmp_path / "deploy", "--no-fp16")
    assert r.exit_code == 1, r.output
    assert "none of the 8 validation images" in r.output and "--allow-no-val" in r.output
    assert not (tmp_path / "deploy" / "capsule").exists()
    r = invoke("export", "--runs", run_copy.parent, "--out", tmp_path / "deploy", "--no-fp16", "--allow-no-val")
    assert r.exit_code == 0, r.output
    assert "WARNING: none of the 8 validation images" in r.output and "stress images alone" in r.output
    m = json.loads((tmp_path / "deploy" / "capsule" / "manifest.json").read_text())
    assert m["verification"]["inputs"]["no_validation_images"] is True and m["options"]["allow_no_val"] is True


# --- no input or result overwritten or mixed ----------------------------------------------------------------------


def test_resume_across_a_re_exported_bundle_is_refused_naming_both(bundle, tiny_data, tmp_path):
    out = tmp_path / "p.csv"
    r = _infer(bundle, tiny_data, tmp_path)
    assert r.exit_code == 0, r.output
    lines = out.read_text().splitlines(keepends=True)
    out.write_text("".join(lines[:5]))  # killed after 4 rows
    m = _edit(bundle, export_key="f" * 64, _resealed=True)  # re-exported (same classes): another model
    r = _infer(bundle, tiny_data, tmp_path, "--resume")
    assert r.exit_code == 1, r.output
    assert "one CSV would mix two models" in r.output and "export ffffffffffff" in r.output
    assert out.read_text() == "".join(lines[:5])  # nothing added to the mixed file
    assert json.loads((tmp_path / "p.csv.bundles.json").read_text())["capsule"]["export_key"] != m["export_key"]


def test_a_second_infer_on_one_out_is_refused_naming_the_holder(tiny_deploy, tiny_data, tmp_path):
    import os

    from gi_deploy._io import exclusive_lock

    out = tmp_path / "p.csv"
    with exclusive_lock(out, "choose another --out"):  # another infer writing it
        r = invoke("infer", tiny_data / "test", "--deploy", tiny_deploy, "--out", out, "--workers", 0)
    assert r.exit_code == 1, r.output
    assert f"being written by another gi-deploy process (pid {os.getpid()})" in r.output and not out.exists()
    r = invoke("infer", tiny_data / "test", "--deploy", tiny_deploy, "--out", out, "--workers", 0)
    assert r.exit_code == 0, r.output  # the lock went with its holder
    assert not (tmp_path / ".p.csv.lock").exists()


def test_evaluate_refuses_duplicate_and_ragged_rows(tiny_deploy, tiny_data, tmp_path):
    out = tmp_path / "p.csv"
    assert invoke("infer", tiny_data / "test", "--deploy", tiny_deploy, "--out", out, "--workers", 0).exit_code == 0
    lines = out.read_text().splitlines(keepends=True)
    out.write_text("".join(lines) + lines[1])
    r = invoke("evaluate", out)
    assert r.exit_code == 1 and "line 14 repeats" in r.output and "first on line 2" in r.output, r.output
    out.write_text("".join(lines) + lines[1][:20] + "\n")
    r = invoke("evaluate", out)
    assert r.exit_code == 1 and "line 14 has" in r.output and "damaged" in r.output, r.output


@pytest.mark.parametrize("where", ["image", "inside", "folder", "labels"])
def test_out_that_would_destroy_or_pollute_an_input_is_refused(tiny_deploy, tiny_data, tmp_path, where):
    folder = tmp_path / "scans"
    shutil.copytree(tiny_data / "test", folder)
    image = sorted(folder.rglob("*.jpg"))[0]
    labels = tmp_path / "labels.csv"
    labels_text = f"path,label\n{image.relative_to(tmp_path).as_posix()},{image.parent.name}\n"
    labels.write_text(labels_text)
    out = {"image": image, "inside": folder / "p.csv", "folder": tmp_path, "labels": labels}[where]
    before = image.read_bytes()
    r = invoke(
        "infer",
        folder,
        "--deploy",
        tiny_deploy,
        "--out",
        out,
        "--workers",
        0,
        *(["--labels", labels] if where == "labels" else []),
    )
    assert r.exit_code == 1, r.output
    assert {
        "image": "is one of the inputs",
        "inside": "lies inside the input folder",
        "folder": "is a folder",
        "labels": "is one of the inputs",
    }[where] in r.output
    assert image.read_bytes() == before and labels.read_text() == labels_text


@pytest.mark.parametrize("err, text", [(28, "No space left on device"), (13, "Permission denied")])
def test_infer_write_errors_are_one_line_with_the_resume_hint(tiny_deploy, tiny_data, tmp_path, monkeypatch, err, text):
    import builtins
    import os

    from gi_deploy.runtime import job as infer_mod

    out = tmp_path / "p.csv"

    class Full:
        """A file that takes the header, then fails as a full disk (or a folder made read-only) would."""

        def __init__(self, *a, **k):
            self.f, self.n = builtins.open(*a, **k), 0

        def write(self, s):
            self.n += 1
            if self.n > 1:
                raise OSError(err, os.strerror(err))
            return self.f.write(s)

        def __getattr__(self, name):
            return getattr(self.f, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

    monkeypatch.setattr(infer_mod, "open", Full, raising=False)
    r = invoke("infer", tiny_data / "test", "--deploy", tiny_deploy, "--out", out, "--workers", 0)
    assert r.exit_code == 1, r.output
    assert f"cannot write {out}: {text}" in r.output and "--resume" in r.output and "Traceback" not in r.output
    assert out.read_text().startswith("path,source,")  # what was written is kept


# --- nothing silently skipped, nothing hangs ---------------------------------------------------------------------


def _rows(csv_path: Path) -> dict[str, dict]:
    import csv

    with open(csv_path, newline="", encoding="utf-8") as f:
        return {row["path"]: row for row in csv.DictReader(f)}


def test_fifos_get_an_error_row_instead_of_hanging(tiny_deploy, tiny_data, tmp_path):
    import os

    folder = tmp_path / "scans"
    shutil.copytree(tiny_data / "test" / "polyp", folder)
    os.mkfifo(folder / "pipe.jpg")  # a FIFO named .jpg: listed, refused, never opened
    os.mkfifo(tmp_path / "other_fifo")
    (folder / "link.jpg").symlink_to(tmp_path / "other_fifo")  # a link to a FIFO
    out = tmp_path / "p.csv"
    r = invoke("infer", folder, "--deploy", tiny_deploy, "--out", out, "--workers", 0)
    assert r.exit_code == 0, r.output
    rows = _rows(out)
    assert "it is a FIFO (named pipe), not a regular file" in rows["pipe.jpg"]["error"]
    assert "it is a FIFO" in rows["link.jpg"]["error"] and rows["link.jpg"]["predicted"] == ""
    (tmp_path / "list.txt").write_text(f"{folder / 'pipe.jpg'}\n")  # in a list file too
    r = invoke("infer", tmp_path / "list.txt", "--deploy", tiny_deploy, "--out", tmp_path / "q.csv", "--workers", 0)
    assert r.exit_code == 0 and "FIFO" in next(iter(_rows(tmp_path / "q.csv").values()))["error"]


def test_an_unreadable_subfolder_gets_an_error_row(tiny_deploy, tiny_data, tmp_path):
    folder = tmp_path / "scans"
    shutil.copytree(tiny_data / "test", folder)
    (folder / "ulcer").chmod(0)
    try:
        with permissions_enforced():  # as root too (CI): root would list it through its permission bypass
            r = invoke("infer", folder, "--deploy", tiny_deploy, "--out", tmp_path / "p.csv", "--workers", 0)
    finally:
        (folder / "ulcer").chmod(0o755)
    assert r.exit_code == 0 and "could not be listed" in _rows(tmp_path / "p.csv")["ulcer"]["error"]


def test_labels_twice_ragged_utf16_and_unmatched_are_said(tiny_deploy, tiny_data, tmp_path, caplog):
    test = tiny_data / "test"
    image = sorted((test / "polyp").glob("*.jpg"))[0]
    labels = tmp_path / "labels.csv"

    def run(text: str, encoding: str = "utf-8"):
        labels.write_bytes(text.encode(encoding))
        return invoke(
            "infer", test, "--deploy", tiny_deploy, "--out", tmp_path / "p.csv", "--workers", 0, "--labels", labels
        )

    r = run(f"path,label\n{image},polyp\n{image},ulcer\n")
    assert r.exit_code == 1 and "line 3 labels" in r.output and "an earlier row labels it 'polyp'" in r.output
    r = run(f"path,label\n{image},polyp,extra\n")
    assert r.exit_code == 1 and "line 2 has more or fewer cells" in r.output and "quoted" in r.output
    r = run(f"path,label\n{tmp_path / 'gone.jpg'},polyp\n")
    assert r.exit_code == 1 and "none of its 1 paths is an image" in r.output
    r = run(f"path,label\n{image},polyp\n{tmp_path / 'gone.jpg'},ulcer\n", "utf-16")  # UTF-16 with its BOM: read
    assert r.exit_code == 0, r.output
    assert "1 label(s) match no image classified" in caplog.text  # a warning on stderr (pytest captures the log)


def test_a_bundle_left_in_old_by_a_killed_export_is_named(bundle, tiny_data, tmp_path):
    bundle.rename(bundle.with_name(".capsule.old"))  # killed between the two renames
    r = _infer(bundle, tiny_data, tmp_path)
    assert r.exit_code == 1 and "no bundles under" in r.output, r.output
    assert ".capsule.old" in r.output and "the next `gi-deploy export` restores it" in r.output
    r = invoke("export", "--list", "--out", bundle.parent)
    assert r.exit_code == 1 and ".capsule.old" in r.output and "restores it" in r.output


def test_a_second_export_of_one_bundle_is_refused_naming_the_holder(tiny_run, tmp_path):
    from gi_deploy._io import exclusive_lock

    with exclusive_lock(tmp_path / "deploy" / "capsule", "x"):
        r = invoke("export", "--runs", tiny_run.parent, "--out", tmp_path / "deploy", "--no-fp16")
    assert r.exit_code == 1 and "being written by another gi-deploy process (pid" in r.output, r.output


# --- clear messages instead of tracebacks -------------------------------------------------------------------------


def test_bad_numbers_and_a_non_checkpoint_weights_file_are_one_line(tiny_deploy, tiny_data, tmp_path, caplog):
    args = ("infer", tiny_data / "test", "--deploy", tiny_deploy, "--out", tmp_path / "p.csv")
    r = invoke(*args, "--threads", 0)
    assert r.exit_code == 1 and "threads must be >= 1" in r.output and "Traceback" not in r.output
    r = invoke(*args, "--explain-wrong", -1)
    assert r.exit_code == 1 and "explain_wrong is a number of images" in r.output
    r = invoke(*args, "--workers", 1_000_000, "--batch-size", 64)
    assert r.exit_code == 0, r.output
    assert "--workers 1000000: the" in caplog.text and "GB of free memory allows" in caplog.text  # capped, said
    weights = tmp_path / "w.bin"
    weights.write_bytes(b"not a checkpoint")
    r = invoke(
        "train",
        "capsule",
        "--data-dir",
        tiny_data,
        "--model",
        "convnextv2_atto",
        "--weights",
        weights,
        "--img-size",
        32,
        "--epochs",
        1,
        "--out",
        tmp_path / "runs",
        "--device",
        "cpu",
    )
    assert r.exit_code == 1 and f"cannot read weights file {weights}" in r.output and "Traceback" not in r.output


def test_resume_after_a_kill_inside_a_quoted_path(tiny_deploy, tiny_data, tmp_path):
    folder = tmp_path / "scans"
    shutil.copytree(tiny_data / "test" / "polyp", folder)
    first = min(folder.glob("*.jpg"))
    first.rename(folder / "a\nnewline, comma.jpg")  # written quoted, over two lines
    out = tmp_path / "p.csv"
    r = invoke("infer", folder, "--deploy", tiny_deploy, "--out", out, "--workers", 0)
    assert r.exit_code == 0, r.output
    whole = out.read_bytes()
    cut = whole.index(b'"a\nnewline') + 3
    out.write_bytes(whole[:cut])  # killed inside the quoted path, just after its newline
    r = invoke("infer", folder, "--deploy", tiny_deploy, "--out", out, "--workers", 0, "--resume")
    assert r.exit_code == 0, r.output
    rows = _rows(out)
    assert len(rows) == 3 and "a\nnewline, comma.jpg" in rows and out.read_bytes().count(b"newline") == 1


def test_fewer_classes_than_model_outputs_is_refused(bundle, tiny_data, tmp_path):
    m = json.loads((bundle / "manifest.json").read_text())
    three = m["classes"][:3]
    _edit(bundle, classes=three, model__num_classes=3, _resealed=True)
    (bundle / "labels.json").write_text(json.dumps(three))
    r = _infer(bundle, tiny_data, tmp_path)
    assert r.exit_code == 1 and "model.onnx outputs 4 scores but" in r.output and "lists 3 classes" in r.output


def test_a_second_training_of_one_run_is_refused(tiny_data, tmp_path):
    from gi_deploy._io import exclusive_lock

    with exclusive_lock(tmp_path / "runs" / "capsule", "x"):
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
            1,
            "--out",
            tmp_path / "runs",
            "--device",
            "cpu",
        )
    assert r.exit_code == 1 and "being written by another gi-deploy process (pid" in r.output, r.output
    assert not (tmp_path / "runs" / "capsule" / "run.json").exists()
