"""``gi-deploy infer --ray``: the same job on Ray Data (a local Ray of 2 CPUs) gives the local run's
rows and metrics, error rows included, and resumes to each (image, source) once."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest

ray = pytest.importorskip("ray", reason="the scale extra (ray[data]) is not installed")

from typer.testing import CliRunner  # noqa: E402

from gi_deploy.cli import app  # noqa: E402
from gi_deploy.runtime.infer import InferConfig, infer_folder  # noqa: E402
from gi_deploy.runtime.ray_infer import RayOptions, infer_on_ray  # noqa: E402

pytestmark = pytest.mark.slow  # a local Ray takes ~10 s to start on 2 cores
SOURCES = ["capsule", "endoscope"]
# probabilities are written with 6 decimals: the same float on both sides, or one rounding step apart
# when onnxruntime's batch composition (Ray's blocks vs the local batches) moves the last bit
PROB_ATOL = 1e-6 + 1e-9


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def images(tiny_data, tmp_path_factory) -> Path:
    """The tiny test split plus a planted corrupt JPEG in a class folder."""
    folder = tmp_path_factory.mktemp("ray-images") / "test"
    shutil.copytree(tiny_data / "test", folder)
    cls = sorted(p.name for p in folder.iterdir())[0]
    (folder / cls / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg" * 8)
    return folder


def _rows(path: Path) -> dict[tuple[str, str], dict]:
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    pairs = [(r["path"], r["source"]) for r in rows]
    assert len(set(pairs)) == len(pairs), "a duplicated (image, source) row"
    return dict(zip(pairs, rows))


def _cfg(images: Path, deploy: Path, out: Path, **kw) -> InferConfig:
    return InferConfig(inputs=images, deploy_dir=deploy, sources=["all"], out_csv=out, batch_size=4, workers=0, **kw)


def _same_rows(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        ra, rb = a[key], b[key]
        assert list(ra) == list(rb)
        for column in ra:
            if column.startswith("prob:") or column == "confidence" or column.endswith("_prob"):
                if ra[column] or rb[column]:
                    assert abs(float(ra[column]) - float(rb[column])) <= PROB_ATOL, (key, column)
            else:
                assert ra[column] == rb[column], (key, column)


@pytest.fixture(scope="module")
def local_run(images, two_source_deploy, tmp_path_factory):
    out = tmp_path_factory.mktemp("local") / "pred.csv"
    return infer_folder(_cfg(images, two_source_deploy, out)), out


def test_ray_rows_and_metrics_equal_the_local_run(local_ray, local_run, images, two_source_deploy, tmp_path):
    local, local_csv = local_run
    r = infer_on_ray(_cfg(images, two_source_deploy, tmp_path / "pred.csv"), RayOptions(actors=2))
    a, b = _rows(r.csv_path), _rows(local_csv)
    _same_rows(a, b)
    errors = [row for row in a.values() if row["error"]]
    assert len(errors) == len(SOURCES) and all("corrupt.jpg" in row["path"] for row in errors)
    assert r.n_errors == local.n_errors == 1 and r.n_classified == local.n_classified
    for s in SOURCES:
        assert "on Ray (2 actor(s), 0 GPU each)" in r.sources[s].backend
        mine = json.loads(r.sources[s].metrics_path.read_text())
        theirs = json.loads(local.sources[s].metrics_path.read_text())
        for key in ("n", "accuracy", "f1_weighted", "mcc", "confusion_matrix", "per_class"):
            _close(mine[key], theirs[key], key)


def _close(a, b, where: str) -> None:
    """Equal, floats within 1e-6 (ROC AUC reads the probabilities), recursively."""
    if isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            _close(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, list):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _close(x, y, f"{where}[{i}]")
    elif isinstance(a, float):
        assert a == pytest.approx(b, abs=1e-6), where
    else:
        assert a == b, where


def test_a_stopped_ray_job_resumes_to_each_image_and_source_once(
    local_ray, local_run, images, two_source_deploy, tmp_path
):
    _, local_csv = local_run
    out = tmp_path / "pred.csv"
    calls = []

    def stop_after_first_batch(done: int, total: int) -> None:
        calls.append(done)
        raise KeyboardInterrupt  # Ctrl-C half way: the rows written so far stay

    with pytest.raises(KeyboardInterrupt):
        infer_on_ray(_cfg(images, two_source_deploy, out), RayOptions(actors=1), stop_after_first_batch)
    partial = _rows(out)
    assert 0 < len(partial) < len(_rows(local_csv))
    text = out.read_text(encoding="utf-8")
    out.write_text(text + text.splitlines(keepends=True)[-1][:10], encoding="utf-8")  # a row cut short by a kill
    r = infer_on_ray(_cfg(images, two_source_deploy, out, resume=True), RayOptions(actors=1))
    assert r.n_resumed == len(partial)
    _same_rows(_rows(out), _rows(local_csv))  # no duplicate, none missing, the same values


def test_cli_infer_ray_writes_the_csv_and_parquet_shards(local_ray, images, two_source_deploy, tmp_path):
    import pyarrow.parquet as pq

    out = tmp_path / "pred.csv"
    res = CliRunner().invoke(
        app,
        [
            "infer",
            str(images),
            "--deploy",
            str(two_source_deploy),
            "--source",
            "all",
            "--out",
            str(out),
            "--ray",
            "--ray-actors",
            "1",
            "--parquet",
            str(tmp_path / "parquet"),
            "--workers",
            "0",
        ],
    )
    assert res.exit_code == 0, res.output
    assert "on Ray (1 actor(s)" in res.output
    table = pq.read_table(tmp_path / "parquet")
    with open(out, newline="", encoding="utf-8") as f:
        header = next(csv.reader(f))
    assert table.num_rows == len(_rows(out)) and table.column_names == header


def test_ray_options_without_ray_are_a_usage_error(two_source_deploy, images, tmp_path):
    res = CliRunner().invoke(
        app,
        [
            "infer",
            str(images),
            "--deploy",
            str(two_source_deploy),
            "--source",
            "all",
            "--out",
            str(tmp_path / "p.csv"),
            "--ray-actors",
            "2",
        ],
    )
    assert res.exit_code == 2 and "need --ray" in res.output


def test_ray_runs_auto_with_the_local_runs_routes_refusals_and_sidecar(local_ray, routed_deploy, tmp_path):
    """--source auto on Ray is the same job: the same routed rows (source, refusal, reason) as the local
    run, and the sidecar naming every routed model and the router, so --resume cannot mix models."""
    deploy, data = routed_deploy
    folder = tmp_path / "in"
    shutil.copytree(data / "capsule" / "test", folder / "capsule")
    shutil.copytree(data / "endoscope" / "test", folder / "endoscope")
    (folder / "capsule" / "corrupt.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    cfg = lambda out: InferConfig(
        inputs=folder,
        deploy_dir=deploy,
        sources=["auto"],
        out_csv=out,  # noqa: E731
        batch_size=4,
        workers=0,
    )
    local = infer_folder(cfg(tmp_path / "local.csv"))
    r = infer_on_ray(cfg(tmp_path / "ray.csv"), RayOptions(actors=1))

    def by_path(p):
        with open(p, newline="", encoding="utf-8") as f:
            return {row["path"]: row for row in csv.DictReader(f)}

    a, b = by_path(r.csv_path), by_path(local.csv_path)
    assert a.keys() == b.keys()
    for path in a:
        for col in ("source", "rejected", "predicted", "error", "true_label"):
            assert a[path][col] == b[path][col], (path, col)
        assert a[path]["reason"].split(":")[0] == b[path]["reason"].split(":")[0]  # its numbers may move a last bit
    assert a["capsule/corrupt.jpg"]["source"] == "auto" and r.n_errors == 1
    side = json.loads((tmp_path / "ray.csv.bundles.json").read_text())
    assert {"capsule", "endoscope", "_router"} <= side.keys()
