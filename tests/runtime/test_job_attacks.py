"""A hostile-but-ordinary user against the one job pipeline (runtime/job.py), after issue 21: each test
plants what the user did and asserts the refusal (or the fix) and that nothing already there was lost."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from conftest import csv_rows, snapshot_files

from gi_deploy.errors import ConfigError
from gi_deploy.runtime.infer import InferConfig, infer_folder


def _cut(path: Path, keep_lines: int) -> None:
    path.write_text("".join(path.read_text().splitlines(keepends=True)[:keep_lines]))


def test_parquet_folder_holding_the_csv_and_user_files_keeps_them(tiny_data, tiny_deploy, tmp_path):
    """`--out results/p.csv --parquet results`: the Parquet copy went into a new folder that then
    replaced `results` whole, deleting the CSV just written, its reports and the user's notes."""
    pq = pytest.importorskip("pyarrow.parquet", reason="pyarrow comes with the scale extra")
    results = tmp_path / "results"
    results.mkdir()
    (results / "notes.txt").write_text("the user's notes")
    out = results / "p.csv"
    r = infer_folder(
        InferConfig(inputs=tiny_data / "test", deploy_dir=tiny_deploy, out_csv=out, workers=0, parquet_dir=results)
    )
    assert (results / "notes.txt").read_text() == "the user's notes"
    assert len(csv_rows(out)) == len(list((tiny_data / "test").rglob("*.jpg")))
    assert out.with_name(out.name + ".bundles.json").is_file()
    assert pq.read_table(r.parquet).num_rows == len(csv_rows(out))


def test_parquet_folder_with_another_runs_parquet_files_is_refused_before_the_job(tiny_data, tiny_deploy, tmp_path):
    """A folder already holding other Parquet files (an older gi-deploy's Ray parts, someone's
    table): a reader of the folder would mix them with this run's rows; refused, nothing touched."""
    pdir = tmp_path / "pq"
    pdir.mkdir()
    (pdir / "0000_part.parquet").write_bytes(b"an older run's part")
    before = snapshot_files(tmp_path)
    with pytest.raises(ConfigError, match="0000_part.parquet"):
        infer_folder(
            InferConfig(
                inputs=tiny_data / "test",
                deploy_dir=tiny_deploy,
                out_csv=tmp_path / "p.csv",
                workers=0,
                parquet_dir=pdir,
            )
        )
    assert snapshot_files(tmp_path) == before and not (tmp_path / "p.csv").exists()


def test_resume_into_a_foreign_csv_refuses_without_cutting_its_last_line(tiny_data, tiny_deploy, tmp_path):
    """`--resume --out` at a CSV gi-deploy did not write, whose last line has no newline (as many
    editors save it): its last line was cut off before the header check refused it."""
    out = tmp_path / "mine.csv"
    out.write_text("name,score\nalice,1\nbob,2")
    with pytest.raises(ConfigError, match="columns"):
        infer_folder(
            InferConfig(inputs=tiny_data / "test", deploy_dir=tiny_deploy, out_csv=out, workers=0, resume=True)
        )
    assert out.read_text() == "name,score\nalice,1\nbob,2"


def test_resume_with_fewer_sources_keeps_the_others_models_in_the_sidecar(tiny_data, two_source_deploy, tmp_path):
    """`--source all` killed; `--source capsule --resume` finishes capsule's rows; `--source all
    --resume` then refused the endoscope rows its own first run wrote: the sidecar had been
    rewritten naming capsule only."""
    out = tmp_path / "p.csv"
    cfg = dict(inputs=tiny_data / "test", deploy_dir=two_source_deploy, out_csv=out, workers=0)
    infer_folder(InferConfig(**cfg, sources=["all"]))
    n = len(list((tiny_data / "test").rglob("*.jpg")))
    _cut(out, 5)  # header + 4 rows: two images, both sources
    infer_folder(InferConfig(**cfg, sources=["capsule"], resume=True))
    r = infer_folder(InferConfig(**cfg, sources=["all"], resume=True))
    rows = csv_rows(out)
    assert r.n_resumed == 4 + (n - 2)
    assert sorted((row["path"], row["source"]) for row in rows) == sorted(
        {(row["path"], s) for row in rows for s in ("capsule", "endoscope")}
    )
    assert len(rows) == 2 * n


def test_resume_over_another_folder_with_the_same_names_is_refused(tiny_data, tiny_deploy, tmp_path):
    """The CSV's paths are relative to the folder classified: `--resume` over another folder whose
    images have the same relative names kept the first folder's rows as this folder's answers."""
    from PIL import Image

    a, b = tmp_path / "a", tmp_path / "b"
    shutil.copytree(tiny_data / "test", a)
    shutil.copytree(tiny_data / "test", b)
    for p in b.rglob("*.jpg"):  # other images under the same names
        Image.open(p).transpose(Image.Transpose.ROTATE_90).save(p)
    out = tmp_path / "p.csv"
    infer_folder(InferConfig(inputs=a, deploy_dir=tiny_deploy, out_csv=out, workers=0))
    _cut(out, 4)
    before = snapshot_files(out)
    with pytest.raises(ConfigError, match="resume"):
        infer_folder(InferConfig(inputs=b, deploy_dir=tiny_deploy, out_csv=out, workers=0, resume=True))
    assert snapshot_files(out) == before


def test_out_symlink_writes_its_sidecar_and_reports_beside_the_real_csv_not_in_the_input_folder(
    tiny_data, tiny_deploy, tmp_path
):
    """`infer scans/ --out scans/alias.csv` where alias.csv links to elsewhere/p.csv: the checks
    passed (the real CSV is outside), then the sidecar, metrics and report PNGs were written beside
    the link, inside the input folder (the next run over it classifies the PNGs)."""
    scans = tmp_path / "scans"
    shutil.copytree(tiny_data / "test", scans)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (scans / "alias.csv").symlink_to(elsewhere / "p.csv")
    before = sorted(p.name for p in scans.rglob("*"))
    r = infer_folder(InferConfig(inputs=scans, deploy_dir=tiny_deploy, out_csv=scans / "alias.csv", workers=0))
    assert sorted(p.name for p in scans.rglob("*")) == before
    assert (elsewhere / "p.csv.bundles.json").is_file() and (elsewhere / "p.metrics.json").is_file()
    assert r.csv_path == (elsewhere / "p.csv").resolve()


def test_a_hard_link_to_a_csv_being_written_cannot_write_it_too(tiny_data, tiny_deploy, tmp_path):
    from gi_deploy.runtime.job import _claim

    out = tmp_path / "p.csv"
    out.write_text("rows of a running job\n")
    (tmp_path / "h.csv").hardlink_to(out)
    fd = _claim(out)  # what a run writing p.csv holds while it writes
    try:
        with pytest.raises(ConfigError, match="being written by another gi-deploy process"):
            infer_folder(
                InferConfig(inputs=tiny_data / "test", deploy_dir=tiny_deploy, out_csv=tmp_path / "h.csv", workers=0)
            )
    finally:
        os.close(fd)
    assert out.read_text() == "rows of a running job\n"


@pytest.mark.parametrize("sources, link", [(None, "p_wrong"), (["all"], "p_endoscope_wrong")])
def test_explain_wrong_folder_that_is_a_symlink_to_the_input_folder_is_refused(
    tiny_data, two_source_deploy, tmp_path, sources, link
):
    """`<stem>_wrong` (or, with several sources, `<stem>_<source>_wrong`) is a symlink to the input
    folder: the check compared the link's own path (or did not list the per-source folders at all),
    so the heatmaps were written into the input folder."""
    cases = tmp_path / "cases"
    shutil.copytree(tiny_data / "test", cases)
    (tmp_path / link).symlink_to(cases)
    before = snapshot_files(cases)
    with pytest.raises(ConfigError, match="input"):
        infer_folder(
            InferConfig(
                inputs=cases,
                deploy_dir=two_source_deploy,
                out_csv=tmp_path / "p.csv",
                sources=sources or ["capsule"],
                explain_wrong=2,
                workers=0,
            )
        )
    assert snapshot_files(cases) == before and not (tmp_path / "p.csv").exists()


def test_an_image_and_its_csv_of_the_same_stem_is_not_refused_but_a_report_name_is(tiny_data, tiny_deploy, tmp_path):
    """`infer scans/a.jpg --out scans/a.csv` was refused as if a.jpg were one of a.csv's report files
    (every `<stem>.<anything>` was); only the names the job really writes are."""
    scans = tmp_path / "scans"
    scans.mkdir()
    image = sorted((tiny_data / "test").rglob("*.jpg"))[0]
    shutil.copy(image, scans / "a.jpg")
    r = infer_folder(InferConfig(inputs=scans / "a.jpg", deploy_dir=tiny_deploy, out_csv=scans / "a.csv", workers=0))
    assert r.n_images == 1 and len(csv_rows(scans / "a.csv")) == 1
    shutil.copy(image, scans / "b.confusion.png")  # an image named like b.csv's confusion-matrix plot
    with pytest.raises(ConfigError, match="b.confusion.png"):
        infer_folder(
            InferConfig(inputs=scans / "b.confusion.png", deploy_dir=tiny_deploy, out_csv=scans / "b.csv", workers=0)
        )


def test_the_csv_stays_locked_while_it_is_scored_and_copied(tiny_data, tiny_deploy, tmp_path, monkeypatch):
    """The lock was released when the last row was written, before the CSV was scored and copied to
    Parquet: a second run on the same --out started then truncated the CSV under the first's scoring."""
    import gi_deploy.runtime.job as job
    from gi_deploy._io import exclusive_lock

    out = tmp_path / "p.csv"
    seen = []
    score = job.score_predictions

    def second_run_starts_now(csv_path, **kw):
        try:
            with exclusive_lock(out, "choose another --out"):
                seen.append("a second run could take the CSV")
        except ConfigError:
            seen.append("refused")
        return score(csv_path, **kw)

    monkeypatch.setattr(job, "score_predictions", second_run_starts_now)
    infer_folder(InferConfig(inputs=tiny_data / "test", deploy_dir=tiny_deploy, out_csv=out, workers=0))
    assert seen == ["refused"]


def test_ray_refuses_decode_gpu_instead_of_decoding_on_the_cpu_unsaid(tmp_path):
    """`--ray --decode gpu`: Ray's tasks always decode with Pillow; the option was dropped silently."""
    from gi_deploy.runtime.ray_infer import infer_on_ray

    with pytest.raises(ConfigError, match="--decode gpu"):
        infer_on_ray(
            InferConfig(inputs=tmp_path, deploy_dir=tmp_path / "deploy", out_csv=tmp_path / "p.csv", decode="gpu")
        )
    assert not (tmp_path / "p.csv").exists()
