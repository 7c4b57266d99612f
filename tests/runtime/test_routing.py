"""--source auto: the router (planted sources, its gate and hash check), refusal of planted
out-of-distribution images with an honest row, resume, the features output's gate, evaluate
--routing against hand-computed numbers; edited or forged bundle and router manifests (issue 21
breaks 5, 6 and 13) refused naming the field, with nothing written."""

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import edit_manifest
from PIL import Image
from typer.testing import CliRunner

from gi_deploy.cli import app
from gi_deploy.core.bundles import list_bundles
from gi_deploy.core.ood import fit_id_stats, ledoit_wolf
from gi_deploy.core.preprocess import list_images, load_input
from gi_deploy.core.router import ROUTER_DIR, ROUTER_FILE, ROUTER_SPEC, load_router
from gi_deploy.errors import BundleError, GateFailed
from gi_deploy.runtime.routing_eval import OOD, routing_report

runner = CliRunner()
ROUTER_REASON = "not like any source's frames (router features)"


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def read_rows(path: Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def planted_ood(folder: Path, px: int = 32) -> Path:
    """Images no source covers: blank, saturated, a non-endoscopy pattern and noise."""
    folder.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (px, px), (0, 0, 0)).save(folder / "black.png")
    Image.new("RGB", (px, px), (255, 255, 255)).save(folder / "white.png")
    Image.new("RGB", (px, px), (255, 0, 0)).save(folder / "saturated_red.png")
    yy, xx = np.mgrid[0:px, 0:px]
    Image.fromarray(np.where(((yy // 4 + xx // 4) % 2 == 0)[..., None], 255, 0).astype(np.uint8).repeat(3, 2)).save(
        folder / "checker.png"
    )
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (px, px, 3), dtype=np.uint8)).save(folder / "noise.png")
    return folder


@pytest.fixture(scope="module")
def mixed(routed_deploy, tmp_path_factory) -> Path:
    """Both sources' test images in one class-named tree, plus an ood/ folder."""
    _, data = routed_deploy
    root = tmp_path_factory.mktemp("mixed")
    for source in ("capsule", "endoscope"):
        for f in (data / source / "test").rglob("*.jpg"):
            (root / f.parent.name).mkdir(exist_ok=True)
            shutil.copy(f, root / f.parent.name / f.name)
    planted_ood(root / "ood")
    return root


def test_router_routes_planted_sources_and_is_not_a_bundle(routed_deploy):
    deploy, data = routed_deploy
    assert list_bundles(deploy) == ["capsule", "endoscope"]  # _router has a manifest but is not a bundle
    router = load_router(deploy)
    gate = router.manifest.gate
    assert gate["accuracy"] >= gate["min_accuracy"] and gate["n"] == 16
    for i, source in enumerate(router.sources):
        thumbs = np.stack([load_input(p, ROUTER_SPEC) for p in list_images(data / source / "test")])
        idx, conf = router.route(thumbs)
        assert (idx == i).all() and (conf > 0.5).all()


def test_router_hash_check_refuses_an_altered_router(routed_deploy, tmp_path):
    deploy = tmp_path / "deploy"
    shutil.copytree(routed_deploy[0], deploy)
    with np.load(deploy / ROUTER_DIR / ROUTER_FILE) as z:
        arrays = dict(z)
    arrays["bias"] = arrays["bias"] + 1.0
    np.savez(deploy / ROUTER_DIR / ROUTER_FILE, **arrays)
    with pytest.raises(BundleError, match="sha256"):
        load_router(deploy)
    r = invoke(
        "infer",
        routed_deploy[1] / "capsule" / "test",
        "--source",
        "auto",
        "--deploy",
        deploy,
        "--out",
        tmp_path / "p.csv",
        "--workers",
        0,
    )
    assert r.exit_code != 0 and "sha256" in r.output


def test_router_gate_refuses_sources_that_look_alike(two_source_deploy, tmp_path):
    """two_source_deploy's two bundles were trained on the same capsule images: no router can
    tell them apart, so the gate fails and nothing is written."""
    from gi_deploy.export.router import write_router

    deploy = tmp_path / "deploy"
    shutil.copytree(two_source_deploy, deploy)
    with pytest.raises(GateFailed, match="gate router failed") as e:
        write_router(deploy, allow_small_val=True)
    assert e.value.value < e.value.threshold
    assert not (deploy / ROUTER_DIR).exists()


def test_infer_auto_routes_and_refuses_planted_ood_with_an_honest_row(routed_deploy, mixed, tmp_path):
    deploy, _ = routed_deploy
    out = tmp_path / "p.csv"
    r = invoke("infer", mixed, "--source", "auto", "--deploy", deploy, "--out", out, "--workers", 0)
    assert r.exit_code == 0, r.output
    rows = {row["path"]: row for row in read_rows(out)}
    assert len(rows) == len(list_images(mixed))
    for path, row in rows.items():
        if path.startswith("ood/"):
            assert row["rejected"] == "1", row  # every planted OOD image is refused ...
            assert row["predicted"] == "" and row["confidence"] == ""  # ... with no diagnosis ...
            assert not any(v for k, v in row.items() if k.startswith("prob:"))
            assert ROUTER_REASON in row["reason"] or (
                "out of distribution" in row["reason"] and float(row["id_score"]) > float(row["id_threshold"])
            )
        else:  # each test image goes to its own source's model
            assert row["source"] == Path(path).name.split("_")[0], row
            assert float(row["router_confidence"]) > 0.5 and row["id_score"]
            if row["rejected"] == "0":
                assert row["predicted"] and not row["reason"]
    metrics = {s: json.loads((tmp_path / f"p.{s}.metrics.json").read_text()) for s in ("capsule", "endoscope")}
    n_refused = sum(row["rejected"] == "1" for row in rows.values())
    assert sum(m["n_rejected"] for m in metrics.values()) == n_refused  # refused rows are counted, not hidden
    for s, m in metrics.items():
        accepted = [row for row in rows.values() if row["source"] == s and row["rejected"] == "0" and row["true_label"]]
        assert m["n"] == len(accepted)
        labelled_refused = sum(
            row["source"] == s and row["rejected"] == "1" and bool(row["true_label"]) for row in rows.values()
        )
        correct = sum(row["predicted"] == row["true_label"] for row in accepted)
        assert m["accuracy_counting_rejected"] == pytest.approx(correct / (len(accepted) + labelled_refused))


def test_infer_auto_resume_classifies_only_the_rest(routed_deploy, mixed, tmp_path):
    deploy, _ = routed_deploy
    full, part = tmp_path / "full.csv", tmp_path / "part.csv"
    assert invoke("infer", mixed, "--source", "auto", "--deploy", deploy, "--out", full, "--workers", 0).exit_code == 0
    lines = full.read_text().splitlines(keepends=True)
    part.write_text("".join(lines[:8]) + lines[8][:10])  # 7 rows and half a line: a killed run
    shutil.copy(tmp_path / "full.csv.bundles.json", tmp_path / "part.csv.bundles.json")  # the models that wrote them
    r = invoke("infer", mixed, "--source", "auto", "--deploy", deploy, "--out", part, "--workers", 0, "--resume")
    assert r.exit_code == 0, r.output
    assert "7 rows kept" in r.output
    assert read_rows(part) == read_rows(full)  # every image exactly once, the same rows


def test_auto_without_router_says_how_to_add_one(routed_deploy, tmp_path):
    deploy = tmp_path / "deploy"
    shutil.copytree(routed_deploy[0], deploy)
    shutil.rmtree(deploy / ROUTER_DIR)
    r = invoke(
        "infer",
        routed_deploy[1] / "capsule" / "test",
        "--source",
        "auto",
        "--deploy",
        deploy,
        "--out",
        tmp_path / "p.csv",
    )
    assert r.exit_code != 0 and "gi-deploy export --router" in r.output
    r = invoke(
        "infer",
        routed_deploy[1] / "capsule" / "test",
        "--source",
        "auto",
        "--source",
        "capsule",
        "--deploy",
        deploy,
        "--out",
        tmp_path / "p.csv",
    )
    assert r.exit_code != 0 and "do not name other sources" in r.output


def _snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` (relative path -> bytes): what a refused command must leave as it was."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _auto(deploy: Path, data: Path, out: Path):
    return invoke(
        "infer", data / "capsule" / "test", "--source", "auto", "--deploy", deploy, "--out", out, "--workers", 0
    )


def test_a_bundle_of_an_older_format_is_refused_with_the_re_export_command(routed_deploy, tmp_path):
    """Format 3 (and older) manifests are unsealed: refused, naming the versions and the command."""
    deploy = tmp_path / "deploy"
    shutil.copytree(routed_deploy[0], deploy)
    edit_manifest(deploy / "capsule" / "manifest.json", lambda m: m.update(format_version=3), resealed=True)
    before = _snapshot(deploy)
    for extra in (["--source", "capsule"], ["--source", "auto"]):
        r = invoke(
            "infer",
            routed_deploy[1] / "capsule" / "test",
            *extra,
            "--deploy",
            deploy,
            "--out",
            tmp_path / "p.csv",
            "--workers",
            0,
        )
        assert r.exit_code == 1, r.output
        assert "gi-deploy-bundle v3 manifest" in r.output and "gi-deploy export --force" in r.output
        assert "Traceback" not in r.output
    assert not (tmp_path / "p.csv").exists() and _snapshot(deploy) == before


@pytest.mark.parametrize("resealed", [False, True], ids=["edited", "edited-and-resealed"])
def test_swapped_router_sources_are_refused_naming_the_field(routed_deploy, tmp_path, resealed):
    """Issue 21 break 5: swapping ``sources`` in _router/manifest.json sent every capsule frame to the
    endoscope model. The seal names the field; a forger who reseals it meets router.npz's own copy."""
    deploy = tmp_path / "deploy"
    shutil.copytree(routed_deploy[0], deploy)
    edit_manifest(deploy / ROUTER_DIR / "manifest.json", lambda m: m["sources"].reverse(), resealed=resealed)
    before = _snapshot(deploy)
    with pytest.raises(BundleError, match="field sources = ") as e:
        load_router(deploy)
    why = "is not the order router.npz was fitted with" if resealed else "differs from what was sealed"
    assert why in str(e.value)
    r = _auto(deploy, routed_deploy[1], tmp_path / "p.csv")
    assert r.exit_code == 1 and "field sources = " in r.output and "Traceback" not in r.output, r.output
    assert not (tmp_path / "p.csv").exists() and _snapshot(deploy) == before


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda m: m.pop("files"), "has no 'files' field"),
        (lambda m: m.update(sources=["capsule"]), "field sources = ['capsule'] must name at least two sources"),
        (lambda m: m.update(sources="capsule"), "field sources = 'capsule' must be a non-empty list"),
        (lambda m: m["verification"]["router"].update(min_accuracy=0.5), "field verification.router = "),
        (lambda m: m["novelty"]["sources"]["capsule"].update(threshold=1e300), "field novelty.sources = "),
        (lambda m: m.pop("seal"), "field seal is missing"),
    ],
    ids=["no-files", "one-source", "sources-not-a-list", "gate-edited", "novelty-threshold", "no-seal"],
)
def test_edited_router_manifests_are_one_line_naming_the_field(routed_deploy, tmp_path, change, message):
    """Issue 21 break 13: a router manifest without ``files`` was a KeyError, one source listed an
    IndexError; any other edit was silently acted on. Each is now a one-line refusal naming the field."""
    deploy = tmp_path / "deploy"
    shutil.copytree(routed_deploy[0], deploy)
    edit_manifest(deploy / ROUTER_DIR / "manifest.json", change)
    before = _snapshot(deploy)
    r = _auto(deploy, routed_deploy[1], tmp_path / "p.csv")
    assert r.exit_code == 1 and message in r.output and "Traceback" not in r.output, r.output
    assert "gi-deploy export --router" in r.output
    assert not (tmp_path / "p.csv").exists() and _snapshot(deploy) == before


@pytest.mark.parametrize(
    "value, message",
    [
        (1e300, "field ood.threshold = 1e+300 differs from what was sealed"),
        (float("nan"), "field ood.threshold = nan must be a finite number"),
        (-1.0, "field ood.threshold = -1.0 must be a finite number in (0.0, inf]"),
    ],
    ids=["huge", "nan", "negative"],
)
def test_an_edited_ood_threshold_is_refused_naming_the_field(routed_deploy, tmp_path, value, message):
    """Issue 21 break 6: ``ood.threshold`` set to 1e300 or NaN in a bundle manifest refused nothing."""
    deploy = tmp_path / "deploy"
    shutil.copytree(routed_deploy[0], deploy)
    edit_manifest(deploy / "capsule" / "manifest.json", lambda m: m["ood"].update(threshold=value))
    before = _snapshot(deploy)
    r = _auto(deploy, routed_deploy[1], tmp_path / "p.csv")
    assert r.exit_code == 1 and message in r.output and "Traceback" not in r.output, r.output
    assert not (tmp_path / "p.csv").exists() and _snapshot(deploy) == before


def test_a_forged_ood_threshold_meets_the_sealed_files(routed_deploy, tmp_path):
    """The threshold the runtime uses is the one inside the hashed id_stats.npz: a manifest resealed
    by hand with another threshold is refused by the model file's stamped content, and (with that
    forged too) by id_stats.npz's own threshold."""
    from gi_deploy.core.bundles import read_bundle_manifest
    from gi_deploy.core.ood import load_id_stats

    deploy = tmp_path / "deploy"
    shutil.copytree(routed_deploy[0], deploy)
    b = deploy / "capsule"
    real = read_bundle_manifest(b).ood.threshold
    assert load_id_stats(b, read_bundle_manifest(b)).threshold == real
    edit_manifest(b / "manifest.json", lambda m: m["ood"].update(threshold=1e300), resealed=True)
    before = _snapshot(deploy)
    r = _auto(deploy, routed_deploy[1], tmp_path / "p.csv")
    # refused before any image: by id_stats.npz's own threshold (read while the job plans, before a model
    # loads), or by the model file's stamped content; either way naming the field
    assert r.exit_code == 1 and "ood" in r.output, r.output
    assert ("says ood" in r.output and "was exported with" in r.output) or "differs from the threshold" in r.output
    assert not (tmp_path / "p.csv").exists() and _snapshot(deploy) == before
    with pytest.raises(BundleError, match=r"field ood.threshold = 1e\+300 differs from the threshold"):
        load_id_stats(b, read_bundle_manifest(b))


def test_features_output_is_gated_against_torch(routed_deploy, tiny_run, tmp_path):
    from gi_deploy.export.onnx_export import FEATURES_ATOL, WithFeatures, export_onnx, features_gate
    from gi_deploy.model.run import load_merged_model

    m = json.loads((routed_deploy[0] / "capsule" / "manifest.json").read_text())
    gate = m["verification"]["onnx_features"]
    assert gate["max_abs_feature_diff"] <= FEATURES_ATOL and gate["dim"] == 320
    assert m["model"]["features_output"] == "features"
    model = WithFeatures(load_merged_model(tiny_run))
    x = np.random.default_rng(0).standard_normal((3, 3, 32, 32)).astype(np.float32)
    exported = export_onnx(model, tmp_path / "m.onnx", (32, 32), inputs=x)
    assert exported.features_gate["max_abs_feature_diff"] <= FEATURES_ATOL
    import torch

    with torch.no_grad():  # the torch model moves after export: the file's features no longer match
        model.model.head.norm.bias += 0.1
    with pytest.raises(GateFailed, match="onnx_features"):
        features_gate(model, tmp_path / "m.onnx", x, "tiny fp32 ONNX vs adapter model")


def test_evaluate_routing_matches_sklearn(routed_deploy, mixed, tmp_path):
    """Consistency: the report's numbers are what sklearn computes from routing.csv's rows. Whether refusal
    detects anything is test_refusal_detects_hard_near_ood_sets's."""
    from sklearn.metrics import confusion_matrix, roc_auc_score

    deploy, data = routed_deploy
    r = invoke(
        "evaluate",
        "--routing",
        "--deploy",
        deploy,
        "--test",
        f"capsule={data / 'capsule' / 'test'}",
        "--test",
        f"endoscope={data / 'endoscope' / 'test'}",
        "--ood",
        mixed / "ood",
        "--out",
        tmp_path,
    )
    assert r.exit_code == 0, r.output
    rep = json.loads((tmp_path / "routing.json").read_text())
    rows = read_rows(tmp_path / "routing.csv")
    ind = [row for row in rows if row["true_source"] != OOD]
    assert len(ind) == 24 and len(rows) == 29
    cm = confusion_matrix(
        [row["true_source"] for row in ind], [row["routed"] for row in ind], labels=["capsule", "endoscope"]
    )
    assert rep["routing_confusion"]["matrix"] == cm.tolist()
    assert rep["routing_accuracy"] == pytest.approx(np.trace(cm) / cm.sum()) and rep["routing_accuracy"] == 1.0
    # the score refusals are made on: the larger of the router's novelty and the routed model's ratio
    score = [max(float(row[f"id_ratio:{row['routed']}"]), float(row["router_novelty"])) for row in rows]
    assert all((row["rejected"] == "True") == (sc > 1) for row, sc in zip(rows, score))
    assert rep["ood"]["auroc"] == pytest.approx(roc_auc_score([row["true_source"] == OOD for row in rows], score))
    for s in ("capsule", "endoscope"):
        assert rep["single_model_accuracy"][s] == pytest.approx(
            np.mean([row[f"pred:{s}"] == row["label"] for row in ind])
        )


def test_routing_report_against_hand_counts():
    rows = [  # 3 capsule, 2 endoscope test images, 2 OOD; one misrouted, one refused
        {
            "true_source": "a",
            "label": "x",
            "routed": "a",
            "rejected": False,
            "pred:a": "x",
            "pred:b": "y",
            "id_ratio:a": 0.5,
            "id_ratio:b": 3.0,
        },
        {
            "true_source": "a",
            "label": "y",
            "routed": "a",
            "rejected": False,
            "pred:a": "y",
            "pred:b": "y",
            "id_ratio:a": 0.7,
            "id_ratio:b": 3.0,
        },
        {
            "true_source": "a",
            "label": "x",
            "routed": "b",
            "rejected": False,
            "pred:a": "x",
            "pred:b": "x",
            "id_ratio:a": 0.2,
            "id_ratio:b": 0.9,
        },
        {
            "true_source": "b",
            "label": "x",
            "routed": "b",
            "rejected": True,
            "pred:a": "y",
            "pred:b": "x",
            "id_ratio:a": 4.0,
            "id_ratio:b": 1.5,
        },
        {
            "true_source": "b",
            "label": "y",
            "routed": "b",
            "rejected": False,
            "pred:a": "x",
            "pred:b": "y",
            "id_ratio:a": 4.0,
            "id_ratio:b": 0.4,
        },
        {
            "true_source": OOD,
            "label": "",
            "routed": "a",
            "rejected": True,
            "pred:a": "x",
            "pred:b": "x",
            "id_ratio:a": 2.0,
            "id_ratio:b": 9.0,
        },
        {
            "true_source": OOD,
            "label": "",
            "routed": "b",
            "rejected": False,
            "pred:a": "x",
            "pred:b": "x",
            "id_ratio:a": 9.0,
            "id_ratio:b": 0.8,
        },
    ]
    rep = routing_report(rows, ["a", "b"])
    assert rep["routing_confusion"]["matrix"] == [[2, 1], [0, 2]]
    assert rep["routing_accuracy"] == pytest.approx(4 / 5)
    assert rep["single_model_accuracy"] == {"a": pytest.approx(3 / 5), "b": pytest.approx(4 / 5)}
    assert rep["own_model_accuracy"] == pytest.approx(5 / 5)
    assert rep["routed_accuracy"] == pytest.approx(4 / 5)  # the refused one counts as not a diagnosis
    assert rep["id_rejected"] == 1
    assert rep["routed_accuracy_accepted"] == pytest.approx(4 / 4)  # rows 1, 2, 3 (misrouted, still right), 5
    assert rep["own_model_accuracy_accepted"] == pytest.approx(4 / 4)
    # routed scores: ID 0.5, 0.7, 0.9, 1.5, 0.4; OOD 2.0, 0.8. Pairs (OOD > ID): 2.0 beats all 5,
    # 0.8 beats 0.5, 0.7, 0.4 -> 8 of 10. 95% TPR bound = the highest ID score 1.5: OOD 0.8 passes.
    assert rep["ood"]["auroc"] == pytest.approx(8 / 10)
    assert rep["ood"]["fpr_at_95tpr"] == pytest.approx(1 / 2)
    assert rep["ood"]["ood_rejected"] == 1
    assert "ood_by_set" not in rep  # one OOD folder without sub-folders: the pooled numbers are the set's
    rows[5]["ood_set"], rows[6]["ood_set"] = "x", "y"
    by_set = routing_report(rows, ["a", "b"])["ood_by_set"]
    # set x: OOD 2.0 beats all 5 ID scores; set y: 0.8 beats 3 of 5 and passes the 95% bound
    assert by_set["x"]["auroc"] == pytest.approx(1.0) and by_set["x"]["fpr_at_95tpr"] == 0.0
    assert by_set["y"]["auroc"] == pytest.approx(3 / 5) and by_set["y"]["fpr_at_95tpr"] == 1.0
    assert (by_set["x"]["ood_rejected"], by_set["y"]["ood_rejected"]) == (1, 0)


def test_ledoit_wolf_and_threshold():
    from sklearn.covariance import ledoit_wolf as sk_lw

    rng = np.random.default_rng(0)
    x = rng.standard_normal((40, 12))
    cov, shrink = ledoit_wolf(x)
    sk_cov, sk_shrink = sk_lw(x, assume_centered=True)
    assert shrink == pytest.approx(sk_shrink) and np.allclose(cov, sk_cov)
    labels = np.repeat([0, 1], 20)
    val = rng.standard_normal((20, 12))
    stats, info = fit_id_stats(x + labels[:, None] * 3, labels, val)
    # the 95% quantile, "higher": index ceil(0.95 * 19) = 19 of the 20 sorted validation scores
    assert info["val_accepted"] >= 0.95 and stats.threshold == pytest.approx(np.sort(stats.score(val))[19])
    assert stats.rejects(np.full((1, 12), 50.0))[1].all()


def test_export_router_from_the_cli(routed_deploy, tmp_path):
    """`gi-deploy export --router` over the bundles already there (the run is unchanged: skipped)."""
    deploy = tmp_path / "deploy"
    shutil.copytree(routed_deploy[0], deploy)
    shutil.rmtree(deploy / ROUTER_DIR)
    runs = routed_deploy[0].parent / "runs"
    r = invoke("export", "--runs", runs, "--out", deploy, "--router")  # 16 validation images cannot resolve 99%
    assert r.exit_code == 1 and "needs at least 100 validation images" in r.output and "--allow-small-val" in r.output
    assert not (deploy / ROUTER_DIR).exists()
    r = invoke("export", "--runs", runs, "--out", deploy, "--router", "--allow-small-val")
    assert r.exit_code == 0, r.output
    assert "held-out routing accuracy 100.00% on 16 validation images, gate >= 93.75% (all but one image" in r.output
    assert "WARNING: the router's gate (>= 99.0% held-out routing accuracy) needs at least 100" in r.output
    gate = load_router(deploy).manifest.gate
    assert gate["small_val"] is True and gate["goal"] == 0.99 and gate["min_accuracy"] == 1 - 1 / 16
    assert load_router(deploy).sources == ["capsule", "endoscope"]
    r = invoke("export", "--list", "--out", deploy)
    assert r.exit_code == 0 and "│ _router" not in r.output and "│ capsule" in r.output  # (tmp_path holds "_router")


def test_benchmark_has_a_router_row_and_its_cost(routed_deploy, tmp_path):
    from gi_deploy.runtime.benchmark import ROUTER_ROW, BenchmarkConfig, router_cost, run_benchmark

    result = run_benchmark(
        BenchmarkConfig(
            deploy_dir=routed_deploy[0], source="capsule", n_images=8, batch_size=4, latency_runs=5, workers=0
        )
    )
    row = result.row(ROUTER_ROW)
    assert row.status == "ok" and row.model_only > 0 and row.thumb_ms > 0
    assert router_cost(result) is not None and router_cost(result) > 0


def test_router_cost_against_hand_computed_numbers():
    """The README's router-cost figure from its own rows: router features + classifier at 10,000 img/s (0.1 ms)
    plus a 2.9 ms thumbnail is 3.0 ms per image, against 800 ms for one model (1.25 img/s): 0.375%."""
    from gi_deploy.runtime.benchmark import ROUTER_ROW, BenchmarkResult, BenchRow, router_cost

    def result(*rows):
        return BenchmarkResult("capsule", "convnextv2_base", (224, 224), 32, 8, 2, "cpu", list(rows))

    ort = BenchRow("onnxruntime fp32", "ok", model_only=1.25)
    router = BenchRow(ROUTER_ROW, "ok", model_only=10_000.0, thumb_ms=2.9)
    assert router_cost(result(ort, router)) == pytest.approx(0.00375)
    assert router_cost(result(ort, router), base="onnxruntime int8") is None  # no such row
    assert router_cost(result(ort, BenchRow(ROUTER_ROW, "skipped: no router"))) is None
    assert router_cost(result(router)) is None


@pytest.mark.parametrize("extra", [("--backend", "torch"), ("--precision", "fp16")])
def test_infer_auto_on_other_backends_gives_the_same_rows(routed_deploy, mixed, tmp_path, extra):
    """The torch backend computes the same two outputs as the ONNX graph; the fp16 file keeps both."""
    deploy, _ = routed_deploy
    ref, other = tmp_path / "ref.csv", tmp_path / "other.csv"
    assert invoke("infer", mixed, "--source", "auto", "--deploy", deploy, "--out", ref, "--workers", 0).exit_code == 0
    r = invoke("infer", mixed, "--source", "auto", "--deploy", deploy, "--out", other, "--workers", 0, *extra)
    assert r.exit_code == 0, r.output
    for a, b in zip(read_rows(ref), read_rows(other), strict=True):
        assert (a["path"], a["source"], a["rejected"], a["predicted"]) == (
            b["path"],
            b["source"],
            b["rejected"],
            b["predicted"],
        )
        if a["id_score"]:
            assert float(b["id_score"]) == pytest.approx(float(a["id_score"]), rel=1e-2)


def stripes(folder: Path, px: int = 32) -> Path:
    """More frames no source covers: vertical stripes, a green field, a grey ramp."""
    folder.mkdir(parents=True, exist_ok=True)
    xx = np.mgrid[0:px, 0:px][1]
    Image.fromarray(np.where((xx // 2 % 2 == 0)[..., None], 255, 0).astype(np.uint8).repeat(3, 2)).save(
        folder / "stripes.png"
    )
    Image.new("RGB", (px, px), (0, 200, 0)).save(folder / "green.png")
    Image.fromarray((xx * 255 // (px - 1)).astype(np.uint8)[..., None].repeat(3, 2)).save(folder / "ramp.png")
    return folder


def test_router_novelty_refuses_blank_saturated_and_pattern_frames(routed_deploy, mixed, tmp_path):
    """The router's own check: blank, saturated and pattern frames look like no source's frames
    in router-feature space, so they are refused with the router's reason; the sources' own
    validation images are accepted at the calibrated rate (99%), recorded in the manifest."""
    deploy, data = routed_deploy
    router = load_router(deploy)
    m = router.manifest.novelty
    assert m["tpr"] == 0.99 and set(m["sources"]) == set(router.sources)
    with np.load(deploy / ROUTER_DIR / ROUTER_FILE) as z:
        assert z["novelty_thresholds"].tolist() == [m["sources"][s]["threshold"] for s in router.sources]
    ood = stripes(tmp_path / "ood")
    for f in (mixed / "ood").iterdir():
        shutil.copy(f, ood / f.name)
    thumbs = np.stack([load_input(p, ROUTER_SPEC) for p in list_images(ood)])
    _, _, novelty = router.route_with_novelty(thumbs)
    assert (novelty > 1).all(), novelty  # black, white, saturated red, checker, noise, stripes, green, ramp
    for s in router.sources:  # calibration: the val images' share accepted is the manifest's, >= 99%
        val = np.stack([load_input(p, ROUTER_SPEC) for p in list_images(data / s / "val")])
        accepted = (router.route_with_novelty(val)[2] <= 1).mean()
        assert accepted == pytest.approx(m["sources"][s]["val_accepted"]) and accepted >= 0.99
    r = invoke("infer", ood, "--source", "auto", "--deploy", deploy, "--out", tmp_path / "p.csv", "--workers", 0)
    assert r.exit_code == 0, r.output
    rows = read_rows(tmp_path / "p.csv")
    assert len(rows) == 8
    for row in rows:
        assert row["rejected"] == "1" and ROUTER_REASON in row["reason"], row
        assert row["predicted"] == "" and not any(v for k, v in row.items() if k.startswith("prob:"))


def test_router_novelty_keeps_in_distribution_test_images(routed_deploy, tmp_path):
    """The sources' held-out test images (never seen at export) pass the router's check: at a 99%
    calibration, none of the 24 tiny test images is refused by it (through the CLI's rows)."""
    deploy, data = routed_deploy
    for s in ("capsule", "endoscope"):
        out = tmp_path / f"{s}.csv"
        r = invoke("infer", data / s / "test", "--source", "auto", "--deploy", deploy, "--out", out, "--workers", 0)
        assert r.exit_code == 0, r.output
        rows = read_rows(out)
        assert len(rows) == 12 and all(row["source"] == s for row in rows)
        assert not any(ROUTER_REASON in row["reason"] for row in rows), [row["reason"] for row in rows]


def test_a_router_without_novelty_check_still_loads(routed_deploy, mixed, tmp_path):
    """A router without the novelty check (router.npz with the classifier and its source order
    only, no ``novelty`` in its sealed manifest) loads, routes as before and never refuses on its own."""
    deploy = tmp_path / "deploy"
    shutil.copytree(routed_deploy[0], deploy)
    from gi_deploy._io import sha256_file

    path = deploy / ROUTER_DIR / ROUTER_FILE
    with np.load(path) as z:
        old = {k: z[k] for k in ("mean", "scale", "weights", "bias", "sources")}
    np.savez(path, **old)
    edit_manifest(
        deploy / ROUTER_DIR / "manifest.json",
        lambda m: (m.pop("novelty"), m["files"][ROUTER_FILE].update(sha256=sha256_file(path))),
        resealed=True,
    )
    router, new = load_router(deploy), load_router(routed_deploy[0])
    assert router.novelty is None
    thumbs = np.stack([load_input(p, ROUTER_SPEC) for p in list_images(mixed)])
    idx, conf, novelty = router.route_with_novelty(thumbs)
    assert np.isnan(novelty).all()
    assert (idx == new.route(thumbs)[0]).all() and np.allclose(conf, new.route(thumbs)[1])
    r = invoke("infer", mixed, "--source", "auto", "--deploy", deploy, "--out", tmp_path / "p.csv", "--workers", 0)
    assert r.exit_code == 0, r.output
    rows = read_rows(tmp_path / "p.csv")
    assert len(rows) == len(list_images(mixed))
    assert not any(ROUTER_REASON in row["reason"] for row in rows)
    for row in rows:  # only the model's check refuses
        assert (row["rejected"] == "1") == (float(row["id_score"]) > float(row["id_threshold"]))
    r = invoke(
        "evaluate",
        "--routing",
        "--deploy",
        deploy,
        "--ood",
        mixed / "ood",
        "--out",
        tmp_path / "ev",
        "--test",
        f"capsule={routed_deploy[1] / 'capsule' / 'test'}",
    )
    assert r.exit_code == 0, r.output
    rep = json.loads((tmp_path / "ev" / "routing.json").read_text())
    assert (
        rep["ood"]["score"] == "routed model's Mahalanobis / its threshold"
        and rep["ood"]["ood_rejected_by_router"] == 0
    )


def test_routing_report_scores_refusals_and_credits_them_to_router_or_model_by_hand():
    """The report's AUROC / FPR on the rows' refusal score, each refusal credited to the router
    (novelty over 1) or the routed model (ratio over 1); forming the score as max(novelty, ratio)
    is evaluate_routing's, checked in test_evaluate_routing_matches_sklearn."""

    def row(src, routed, ratio, novelty, label="x"):
        return {
            "true_source": src,
            "label": label,
            "routed": routed,
            "rejected": max(ratio, novelty) > 1,
            "pred:a": "x",
            "pred:b": "x",
            "id_ratio:a": ratio,
            "id_ratio:b": ratio,
            "router_novelty": novelty,
            "ood_score": max(ratio, novelty),
        }

    rows = [
        row("a", "a", 0.5, 0.2),
        row("a", "a", 0.6, 1.2),
        row("b", "b", 0.3, 0.9),
        row("b", "b", 0.9, 0.1),
        row(OOD, "a", 0.4, 5.0, ""),
        row(OOD, "b", 2.0, 0.3, ""),
        row(OOD, "a", 0.7, 0.5, ""),
    ]
    rep = routing_report(rows, ["a", "b"])
    # ID scores 0.5, 1.2, 0.9, 0.9; OOD 5.0, 2.0, 0.7. Pairs OOD > ID: 5.0 and 2.0 beat all 4 (8),
    # 0.7 beats 0.5 (1) -> 9 of 12. 95% TPR bound = the highest ID score 1.2: only OOD 0.7 passes.
    assert rep["ood"]["auroc"] == pytest.approx(9 / 12)
    assert rep["ood"]["fpr_at_95tpr"] == pytest.approx(1 / 3)
    assert rep["ood"]["ood_rejected"] == 2 and rep["ood"]["ood_rejected_by_router"] == 1
    assert rep["ood"]["ood_rejected_by_model"] == 1
    assert rep["id_rejected"] == 1 and rep["id_rejected_by_router"] == 1
    assert rep["routed_accuracy"] == pytest.approx(3 / 4)  # the refused one counts as not a diagnosis
    assert rep["ood"]["score"].startswith("max(router novelty")


def test_refusal_detects_hard_near_ood_sets(routed_deploy, mixed, tmp_path):
    """Detection, not consistency: `evaluate --routing --ood` with one folder per hard set (a third device, blurred,
    bubbly and over-exposed frames of the right devices, the pretext mucosa) and the planted frames. On this tiny
    deploy every set is separated (AUROC 1.0, FPR@95TPR 0) and refused at the thresholds --source auto uses, with
    1 of 24 test images refused (measured); on the demo's bundles benchmarks/ood_goals.py reports what holds."""
    from gi_deploy.demo.synthetic import NEAR_OOD, write_near_ood
    from gi_deploy.runtime.routing_eval import evaluate_routing

    deploy, data = routed_deploy
    sets = tmp_path / "sets"
    shutil.copytree(mixed / "ood", sets / "no_source")
    write_near_ood(sets, size=32, n=8, seed=5)
    rep = evaluate_routing(
        deploy, tmp_path / "out", {s: data / s / "test" for s in ("capsule", "endoscope")}, sets
    ).report
    assert sorted(rep["ood_by_set"]) == sorted([*NEAR_OOD, "no_source"])
    for name, k in rep["ood_by_set"].items():
        assert k["n_ood"] == (5 if name == "no_source" else 8)
        assert k["auroc"] >= 0.9 and k["fpr_at_95tpr"] <= 0.5, (name, k)
        assert k["ood_rejected"] == k["n_ood"], (name, k)
    assert rep["id_rejected"] <= 2
