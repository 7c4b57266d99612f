"""Two sources' bundles in one deploy folder: one row per (image, source), resume across sources,
--strict, and the cross-source matrix."""

import csv
import json
import shutil
from pathlib import Path

import pytest

from gi_deploy.core.preprocess import list_images
from gi_deploy.errors import ConfigError, DataError
from gi_deploy.runtime.cross import cross_evaluate
from gi_deploy.runtime.infer import InferConfig, infer_folder

SOURCES = ["capsule", "endoscope"]  # list_bundles order: the CSV's per-image row order


def read_rows(path: Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def rel_images(folder: Path) -> list[str]:
    return [p.relative_to(folder).as_posix() for p in list_images(folder)]


@pytest.fixture(scope="module")
def all_run(two_source_deploy, tiny_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("all") / "pred.csv"
    result = infer_folder(
        InferConfig(
            inputs=tiny_data / "test",
            deploy_dir=two_source_deploy,
            sources=["all"],
            out_csv=out,
            batch_size=5,
            workers=0,
        )
    )
    return result, read_rows(out)


def test_the_second_bundle_is_another_model(two_source_deploy):
    manifests = {s: json.loads((two_source_deploy / s / "manifest.json").read_text()) for s in SOURCES}
    assert [m["source"] for m in manifests.values()] == SOURCES
    assert manifests["capsule"]["classes"] == manifests["endoscope"]["classes"]
    assert manifests["capsule"]["models"]["fp32"]["sha256"] != manifests["endoscope"]["models"]["fp32"]["sha256"]


def test_all_sources_write_one_row_per_image_and_source(all_run, tiny_data, two_source_deploy):
    result, rows = all_run
    images = rel_images(tiny_data / "test")
    assert [(r["path"], r["source"]) for r in rows] == [(p, s) for p in images for s in SOURCES]
    classes = json.loads((two_source_deploy / "capsule" / "manifest.json").read_text())["classes"]
    assert [c for c in rows[0] if c.startswith("prob:")] == [f"prob:{c}" for c in classes]
    assert all(r[f"prob:{c}"] for r in rows for c in classes)
    assert set(result.sources) == set(SOURCES) and result.n_images == len(images) and result.n_errors == 0
    for s in SOURCES:
        run = result.sources[s]
        assert run.n_rows == len(images) and ("CPUExecutionProvider" in run.backend or "OpenVINO" in run.backend)
        assert run.metrics_path == result.csv_path.with_name(f"pred.{s}.metrics.json")
        saved = json.loads(run.metrics_path.read_text())
        mine = [r for r in rows if r["source"] == s]
        assert saved["source"] == s and saved["n"] == len(images)
        assert saved["accuracy"] == pytest.approx(sum(r["predicted"] == r["true_label"] for r in mine) / len(mine))
    assert not result.csv_path.with_name("pred.metrics.json").exists()


@pytest.mark.parametrize("source", SOURCES)
def test_each_sources_rows_equal_a_single_source_run(source, all_run, tiny_data, two_source_deploy, tmp_path):
    _, rows = all_run
    out = tmp_path / "one.csv"
    infer_folder(
        InferConfig(
            inputs=tiny_data / "test",
            deploy_dir=two_source_deploy,
            sources=[source],
            out_csv=out,
            batch_size=3,
            workers=0,
        )
    )
    single = read_rows(out)
    mine = [r for r in rows if r["source"] == source]
    assert [r["path"] for r in single] == [r["path"] for r in mine]
    for a, b in zip(single, mine):
        assert a["predicted"] == b["predicted"] and a["true_label"] == b["true_label"]
        for column in a:
            if column.startswith("prob:") or column == "confidence":
                assert float(a[column]) == pytest.approx(float(b[column]), abs=2e-6)
    assert out.with_name("one.metrics.json").is_file()  # one source: no source in the name


def test_resume_after_a_kill_classifies_each_image_and_source_once(all_run, tiny_data, two_source_deploy, tmp_path):
    _, full = all_run
    out = tmp_path / "pred.csv"
    infer_folder(
        InferConfig(inputs=tiny_data / "test", deploy_dir=two_source_deploy, sources=["all"], out_csv=out, workers=0)
    )
    lines = out.read_text(encoding="utf-8").splitlines(keepends=True)
    # killed mid-write: the header, 7 complete rows (image 4 has only its capsule row), half a row
    out.write_text("".join(lines[:8]) + lines[8][: len(lines[8]) // 2], encoding="utf-8")
    result = infer_folder(
        InferConfig(
            inputs=tiny_data / "test",
            deploy_dir=two_source_deploy,
            sources=["all"],
            out_csv=out,
            workers=0,
            resume=True,
        )
    )
    rows = read_rows(out)
    pairs = [(r["path"], r["source"]) for r in rows]
    assert sorted(pairs) == sorted((r["path"], r["source"]) for r in full)
    assert len(set(pairs)) == len(pairs) == 2 * len(rel_images(tiny_data / "test"))
    assert result.n_resumed == 7 and result.n_classified == len(rel_images(tiny_data / "test")) - 3
    by_pair = {(r["path"], r["source"]): r for r in full}
    assert all(r["predicted"] == by_pair[(r["path"], r["source"])]["predicted"] for r in rows)
    assert all(r["path"] and r["source"] in SOURCES for r in rows)  # the half row is gone
    for s in SOURCES:
        assert json.loads(out.with_name(f"pred.{s}.metrics.json").read_text())["n"] == len(
            rel_images(tiny_data / "test")
        )


def test_strict_stops_at_the_broken_file_keeping_the_rows_before_it(tiny_data, two_source_deploy, tmp_path):
    folder = tmp_path / "imgs"
    shutil.copytree(tiny_data / "test", folder)
    (folder / "normal" / "zz_broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    images = rel_images(folder)
    before = images[: images.index("normal/zz_broken.jpg")]
    assert before and len(before) < len(images) - 1 and len(before) % 4  # in the middle of a batch of 4
    out = tmp_path / "pred.csv"
    with pytest.raises(DataError, match=r"cannot read image .*zz_broken\.jpg.*--strict"):
        infer_folder(
            InferConfig(
                inputs=folder,
                deploy_dir=two_source_deploy,
                sources=["all"],
                out_csv=out,
                batch_size=4,
                workers=0,
                strict=True,
            )
        )
    rows = read_rows(out)
    assert [(r["path"], r["source"]) for r in rows] == [(p, s) for p in before for s in SOURCES]
    assert not any(r["error"] for r in rows)


def accuracy_from_csv(csv_path: Path, source: str, rename: dict[str, str] | None = None) -> tuple[float, int]:
    rename = rename or {}
    rows = [r for r in read_rows(csv_path) if r["source"] == source]
    truth = [rename.get(Path(r["path"]).parts[0], Path(r["path"]).parts[0]) for r in rows]
    correct = sum(rename.get(r["predicted"], r["predicted"]) == t for r, t in zip(rows, truth))
    return correct / len(rows), len(rows)


@pytest.fixture(scope="module")
def cross(two_source_deploy, tiny_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("cross")
    tests = {"capsule": tiny_data / "test", "endoscope": tiny_data / "test"}
    return cross_evaluate(two_source_deploy, out, tests, workers=0), out


def test_cross_matrix_cells_are_the_accuracy_of_the_predictions(cross, tiny_data):
    r, out = cross
    assert r.models == SOURCES and r.tests == SOURCES
    n = len(rel_images(tiny_data / "test"))
    for m in SOURCES:
        for t in SOURCES:
            acc, rows = accuracy_from_csv(out / f"{t}.predictions.csv", m)
            cell = r.cells[(m, t)]
            assert rows == n and cell.n == n and cell.n_skipped == 0 and cell.accuracy == pytest.approx(acc)
    with open(r.files["matrix"], newline="") as f:
        matrix = list(csv.reader(f))
    assert matrix[0] == ["model \\ test", *SOURCES]
    assert {row[0]: [float(v) for v in row[1:]] for row in matrix[1:]} == {
        m: [pytest.approx(r.cells[(m, t)].accuracy, abs=1e-4) for t in SOURCES] for m in SOURCES
    }
    saved = json.loads(r.files["json"].read_text())
    assert {(c["model"], c["test"]): c["correct"] for c in saved["cells"]} == {k: c.correct for k, c in r.cells.items()}


def test_cross_with_a_class_map_renaming_classes_still_scores(cross, two_source_deploy, tiny_data, tmp_path):
    plain, _ = cross
    class_map = tmp_path / "map.json"
    class_map.write_text(json.dumps({"capsule": {"polyp": "lesion"}, "endoscope": {"polyp": "lesion"}}))
    tests = {"capsule": tiny_data / "test", "endoscope": tiny_data / "test"}
    r = cross_evaluate(two_source_deploy, tmp_path / "out", tests, class_map=class_map, workers=0)
    for key, cell in r.cells.items():
        acc, _ = accuracy_from_csv(tmp_path / "out" / f"{key[1]}.predictions.csv", key[0], {"polyp": "lesion"})
        assert cell.n == plain.cells[key].n and cell.accuracy == pytest.approx(acc)
        assert cell.correct == plain.cells[key].correct  # a consistent renaming changes no verdict


def test_cross_with_a_map_that_renames_only_the_test_labels_skips_them(two_source_deploy, tiny_data, tmp_path):
    """The model still says "polyp", the test set now says "lesion": those images are counted, not scored."""
    class_map = tmp_path / "map.json"
    class_map.write_text(json.dumps({"capsule": {"polyp": "lesion"}}))
    r = cross_evaluate(
        two_source_deploy, tmp_path / "out", {"capsule": tiny_data / "test"}, class_map=class_map, workers=0
    )
    n_polyp = len(list_images(tiny_data / "test" / "polyp"))
    for m in SOURCES:
        cell = r.cells[(m, "capsule")]
        if m == "capsule":  # its own map renames its own "polyp" too: everything scores
            assert cell.n_skipped == 0
        else:
            assert cell.n_skipped == n_polyp and cell.n == len(rel_images(tiny_data / "test")) - n_polyp
            # the strict reading counts the images of classes the model lacks as wrong
            assert cell.accuracy_all == pytest.approx(cell.correct / (cell.n + n_polyp))
            assert cell.accuracy_all < cell.accuracy or cell.correct == 0
    with open(r.files["matrix_all"], newline="") as f:
        strict = {row[0]: row[1:] for row in list(csv.reader(f))[1:]}
    assert float(strict["endoscope"][0]) == pytest.approx(r.cells[("endoscope", "capsule")].accuracy_all, abs=1e-4)


def test_cross_class_map_naming_an_unknown_source_is_a_config_error(two_source_deploy, tiny_data, tmp_path):
    class_map = tmp_path / "map.json"
    class_map.write_text(json.dumps({"capsule": {"polyp": "lesion"}, "kvasir": {"polyp": "lesion"}}))
    with pytest.raises(ConfigError, match="names sources with no bundle: kvasir"):
        cross_evaluate(two_source_deploy, tmp_path / "out", {"capsule": tiny_data / "test"}, class_map=class_map)
    assert not (tmp_path / "out" / "capsule.predictions.csv").exists()  # refused before running anything


def test_cross_default_test_sets_are_the_runs_test_splits(cross, two_source_deploy, tmp_path):
    plain, _ = cross  # the runs were trained on tiny_data, so their test splits are tiny_data/test
    r = cross_evaluate(two_source_deploy, tmp_path / "out", workers=0)
    assert r.tests == SOURCES
    for s in SOURCES:
        listed = read_rows(tmp_path / "out" / f"{s}.test.csv")
        assert len(listed) == plain.cells[(s, s)].n and all(Path(row["path"]).is_absolute() for row in listed)
    assert {k: (c.n, c.correct) for k, c in r.cells.items()} == {k: (c.n, c.correct) for k, c in plain.cells.items()}


def test_the_shipped_kvasir_gastrovision_class_map_names_real_classes():
    from gi_deploy.runtime.cross import read_class_map
    from gi_deploy.training.sources import GASTROVISION, KVASIR

    path = Path(__file__).parents[2] / "docs" / "class_map_kvasir_gastrovision.json"
    maps = read_class_map(path, ["kvasir", "gastrovision"])
    for spec in (KVASIR, GASTROVISION):
        assert set(maps[spec.name]) <= set(spec.classes), spec.name
    shared = {s: set(maps[s].values()) for s in maps}
    assert shared["kvasir"] == shared["gastrovision"] == {"blood", "ileocecal valve", "pylorus"}


def test_two_folders_of_one_source_are_refused(tiny_deploy, tiny_data, tmp_path):
    deploy = tmp_path / "deploy"
    shutil.copytree(tiny_deploy / "capsule", deploy / "capsule")
    shutil.copytree(tiny_deploy / "capsule", deploy / "capsule_old")  # a kept copy: its manifest says capsule
    with pytest.raises(ConfigError, match="both bundles of source 'capsule'"):
        infer_folder(
            InferConfig(inputs=tiny_data / "test", deploy_dir=deploy, sources=["all"], out_csv=tmp_path / "p.csv")
        )
    assert not (tmp_path / "p.csv").exists()  # refused before anything was written


def test_a_class_map_mixing_both_forms_is_a_config_error(two_source_deploy, tiny_data, tmp_path):
    class_map = tmp_path / "map.json"
    class_map.write_text(json.dumps({"capsule": {"polyp": "lesion"}, "endoscope": "lesion"}))
    with pytest.raises(ConfigError, match="mixes the two forms"):
        cross_evaluate(two_source_deploy, tmp_path / "out", {"capsule": tiny_data / "test"}, class_map=class_map)
