"""The one job pipeline (runtime/job.py) under the hostile review's breaks (issue 21): each test plants
what a user did and asserts the refusal (or the fix) and that no input or unrelated file changed."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest
from conftest import csv_rows, snapshot_files

from gi_deploy._io import exclusive_lock
from gi_deploy.errors import ConfigError
from gi_deploy.runtime.infer import InferConfig, infer_folder


def planted_ood(folder: Path, px: int = 32) -> Path:
    """Frames no source covers: blank, saturated and a checkerboard."""
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (px, px), (0, 0, 0)).save(folder / "black.png")
    Image.new("RGB", (px, px), (255, 255, 255)).save(folder / "white.png")
    board = (np.indices((px, px)).sum(axis=0) // 4 % 2 * 255).astype(np.uint8)
    Image.fromarray(np.stack([board] * 3, axis=-1)).save(folder / "checker.png")
    return folder


@pytest.fixture
def pngs(tiny_data, tmp_path) -> Path:
    """Ten PNG frames in ``<tmp>/cases_wrong/``: a folder whose name an --out of cases.csv derives."""
    from PIL import Image

    folder = tmp_path / "cases_wrong"
    folder.mkdir()
    for i, f in enumerate(sorted((tiny_data / "test").rglob("*.jpg"))[:10]):
        Image.open(f).save(folder / f"frame{i}.png")
    return folder


def test_break1_explain_wrong_folder_that_is_the_input_is_refused_before_anything(pngs, tiny_deploy, tmp_path):
    before = snapshot_files(pngs)
    cfg = InferConfig(inputs=pngs, deploy_dir=tiny_deploy, out_csv=tmp_path / "cases.csv", explain_wrong=2, workers=0)
    with pytest.raises(ConfigError, match="cases_wrong"):
        infer_folder(cfg)
    assert snapshot_files(pngs) == before and len(before) == 10
    assert not (tmp_path / "cases.csv").exists()


def test_explain_wrong_removes_only_the_files_it_recorded_writing(tmp_path):
    maps = pytest.importorskip("gi_deploy.explain.maps", reason="explain needs the training extra")
    folder = tmp_path / "p_wrong"
    folder.mkdir()
    (folder / "mine.png").write_bytes(b"a heatmap an earlier run wrote")
    (folder / "users.png").write_bytes(b"a picture the user keeps here")
    (folder / maps.WRITTEN_RECORD).write_text(json.dumps({"written": ["mine.png", "../escape.png"]}))
    (tmp_path / "escape.png").write_bytes(b"outside the folder")
    maps._remove_recorded(folder)
    assert not (folder / "mine.png").exists()
    assert (folder / "users.png").read_bytes() == b"a picture the user keeps here"
    assert (tmp_path / "escape.png").exists()


def test_break2_report_over_the_edited_input_list_is_refused(tiny_data, tiny_deploy, tmp_path):
    w = tmp_path / "w"
    w.mkdir()
    listed = w / "preds.wrong.csv"  # last run's list of wrong images, edited by the user, classified again
    with open(listed, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "true_label"])
        for p in sorted((tiny_data / "test").rglob("*.jpg"))[:3]:
            writer.writerow([str(p), p.parent.name])
    before = snapshot_files(w)
    with pytest.raises(ConfigError, match="preds.wrong.csv"):
        infer_folder(InferConfig(inputs=listed, deploy_dir=tiny_deploy, out_csv=w / "preds.csv", workers=0))
    assert snapshot_files(w) == before


def test_break3_the_lock_is_taken_on_the_real_path_so_an_alias_cannot_write_together(tiny_data, tiny_deploy, tmp_path):
    s = tmp_path / "s"
    s.mkdir()
    (s / "alias.csv").symlink_to(s / "p.csv")
    with exclusive_lock(s / "p.csv", "choose another --out"):  # a run writing s/p.csv holds it
        with pytest.raises(ConfigError, match="being written by another gi-deploy process"):
            infer_folder(
                InferConfig(inputs=tiny_data / "test", deploy_dir=tiny_deploy, out_csv=s / "alias.csv", workers=0)
            )
    assert not (s / "p.csv").exists()


@pytest.mark.parametrize("sidecar", ["missing", "{}"])
def test_break7_resume_without_a_sidecar_naming_the_models_is_refused(tiny_data, tiny_deploy, tmp_path, sidecar):
    out = tmp_path / "p.csv"
    infer_folder(InferConfig(inputs=tiny_data / "test", deploy_dir=tiny_deploy, out_csv=out, workers=0))
    side = out.with_name(out.name + ".bundles.json")
    lines = out.read_text().splitlines(keepends=True)
    out.write_text("".join(lines[:4]))  # a run cut after three rows
    if sidecar == "missing":
        side.unlink()
    else:
        side.write_text(sidecar)
    before = snapshot_files(tmp_path)
    with pytest.raises(ConfigError, match="mix"):
        infer_folder(
            InferConfig(inputs=tiny_data / "test", deploy_dir=tiny_deploy, out_csv=out, workers=0, resume=True)
        )
    assert snapshot_files(tmp_path) == before
    # the refused run gave its claim on the CSV back: the same process can write it again
    infer_folder(InferConfig(inputs=tiny_data / "test", deploy_dir=tiny_deploy, out_csv=out, workers=0))


def test_break7_auto_writes_the_sidecar_so_another_precision_cannot_resume_into_it(routed_deploy, tmp_path):
    deploy, data = routed_deploy
    out = tmp_path / "auto.csv"
    infer_folder(
        InferConfig(inputs=data / "capsule" / "test", deploy_dir=deploy, sources=["auto"], out_csv=out, workers=0)
    )
    side = json.loads(out.with_name(out.name + ".bundles.json").read_text())
    assert {"capsule", "endoscope", "_router"} <= side.keys()
    out.write_text("".join(out.read_text().splitlines(keepends=True)[:3]))
    before = snapshot_files(tmp_path)
    with pytest.raises(ConfigError, match="mix two models"):
        infer_folder(
            InferConfig(
                inputs=data / "capsule" / "test",
                deploy_dir=deploy,
                sources=["auto"],
                out_csv=out,
                workers=0,
                resume=True,
                precision="fp16",
            )
        )
    assert snapshot_files(tmp_path) == before


def test_break9_a_list_naming_one_image_twice_writes_it_once_and_resumes(tiny_data, tiny_deploy, tmp_path):
    img = sorted((tiny_data / "test").rglob("*.jpg"))[0]
    listed = tmp_path / "list.txt"
    listed.write_text(f"{img}\n{img}\n")
    out = tmp_path / "p.csv"
    r = infer_folder(InferConfig(inputs=listed, deploy_dir=tiny_deploy, out_csv=out, workers=0))
    assert len(csv_rows(out)) == 1 and r.n_duplicates == 1
    r = infer_folder(InferConfig(inputs=listed, deploy_dir=tiny_deploy, out_csv=out, workers=0, resume=True))
    assert len(csv_rows(out)) == 1 and r.n_resumed == 1


def test_break10_auto_with_an_unreadable_file_names_only_real_sources(routed_deploy, tmp_path):
    deploy, data = routed_deploy
    folder = tmp_path / "in"
    shutil.copytree(data / "capsule" / "test", folder)
    (folder / "broken.jpg").write_bytes(b"not an image")
    r = infer_folder(
        InferConfig(inputs=folder, deploy_dir=deploy, sources=["auto"], out_csv=tmp_path / "a.csv", workers=0)
    )
    assert set(r.sources) == {"capsule", "endoscope"}  # --explain-wrong opens each as a bundle
    assert r.n_errors == 1
    assert [row["source"] for row in csv_rows(tmp_path / "a.csv") if row["error"]] == ["auto"]


def test_unlabelled_auto_runs_count_their_refusals(routed_deploy, tmp_path):
    deploy, _ = routed_deploy
    folder = tmp_path / "unlabelled"
    planted_ood(folder)
    r = infer_folder(
        InferConfig(inputs=folder, deploy_dir=deploy, sources=["auto"], out_csv=tmp_path / "o.csv", workers=0)
    )
    refused = sum(row["rejected"] == "1" for row in csv_rows(tmp_path / "o.csv"))
    assert refused > 0 and r.n_rejected == refused


def test_break8_11_parquet_is_replaced_whole_typed_and_equal_to_the_csv(tiny_data, tiny_deploy, tmp_path):
    pq = pytest.importorskip("pyarrow.parquet", reason="pyarrow comes with the scale extra")
    folder = tmp_path / "in"
    shutil.copytree(tiny_data / "test", folder)
    (folder / "zz_last_broken.jpg").write_bytes(b"late error row")  # sorted last: an error row after many rows
    out, pdir = tmp_path / "p.csv", tmp_path / "pq"
    cfg = dict(inputs=folder, deploy_dir=tiny_deploy, out_csv=out, workers=0, parquet_dir=pdir)
    infer_folder(InferConfig(**cfg))
    out.write_text("".join(out.read_text().splitlines(keepends=True)[:5]))
    infer_folder(InferConfig(**cfg, resume=True))
    table = pq.read_table(pdir)
    rows = csv_rows(out)
    assert table.num_rows == len(rows) == len(list(folder.rglob("*.jpg")))  # replaced, never appended
    assert str(table.schema.field("confidence").type) == "double"
    assert table.column("error").to_pylist()[-1].startswith("cannot read image")


def test_break12_parquet_at_an_existing_file_is_refused_before_the_job(tiny_data, tiny_deploy, tmp_path):
    target = tmp_path / "pq"
    target.write_text("someone's file")
    with pytest.raises(ConfigError, match="not a folder"):
        infer_folder(
            InferConfig(
                inputs=tiny_data / "test",
                deploy_dir=tiny_deploy,
                out_csv=tmp_path / "p.csv",
                workers=0,
                parquet_dir=target,
            )
        )
    assert target.read_text() == "someone's file" and not (tmp_path / "p.csv").exists()


def test_break14_a_planted_temp_symlink_is_never_written_through(tiny_data, tiny_deploy, tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    out = tmp_path / "p.csv"
    infer_folder(InferConfig(inputs=tiny_data / "test", deploy_dir=tiny_deploy, out_csv=out, workers=0))
    out.write_text("".join(out.read_text().splitlines(keepends=True)[:3]))
    for name in ("p.csv.bundles.json.tmp", "p.csv.resume.tmp"):
        (tmp_path / name).symlink_to(victim)
    infer_folder(InferConfig(inputs=tiny_data / "test", deploy_dir=tiny_deploy, out_csv=out, workers=0, resume=True))
    assert victim.read_text() == "precious"
    assert len(csv_rows(out)) == len(list((tiny_data / "test").rglob("*.jpg")))


def test_a_local_ray_started_by_a_driver_killed_with_sigkill_does_not_outlive_it(tmp_path):
    """The reaper ``infer --ray`` starts with a local Ray: the driver is SIGKILLed (no atexit, no
    finally) and the processes it started are killed with it."""
    import os
    import signal
    import subprocess
    import sys
    import time

    victim = subprocess.Popen(["sleep", "300"])  # stands for Ray's raylet and GCS
    driver = subprocess.Popen(
        [
            sys.executable,
            "-c",
            (
                "import sys, time; from gi_deploy.runtime.ray_infer import start_reaper; "
                f"start_reaper([{victim.pid}]); print('ready', flush=True); time.sleep(300)"
            ),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert driver.stdout.readline().strip() == "ready"
        os.kill(driver.pid, signal.SIGKILL)
        driver.wait(timeout=30)
        deadline = time.monotonic() + 30
        while victim.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert victim.poll() is not None, "the local Ray's process outlived its driver"
    finally:
        victim.kill()
        driver.kill()


def test_a_router_written_for_another_export_of_a_source_is_said(routed_deploy, tmp_path):
    """The router's manifest names the export of each bundle it was written beside; a bundle exported
    again since (another run) still routes, with a warning naming the command that rewrites the router."""
    from conftest import edit_manifest

    from gi_deploy.runtime.route import Routed

    deploy = tmp_path / "deploy"
    shutil.copytree(routed_deploy[0], deploy)
    edit_manifest(deploy / "_router" / "manifest.json", lambda d: d["bundles"].update(capsule="0" * 64), resealed=True)
    routed = Routed.open(InferConfig(inputs=".", deploy_dir=deploy, sources=["auto"]), load=False)
    assert any(n.startswith("capsule: the router was written beside export 000000000000") for n in routed.notes)
    assert not any(n.startswith("endoscope: the router was written") for n in routed.notes)
