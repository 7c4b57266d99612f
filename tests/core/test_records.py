"""The typed records (issue 21): run.json, a bundle's and the router's manifest read by ``from_dict``
and written by ``to_dict`` without loss; every field type- and range-checked, one error naming the
field, its value and the fix; the seal naming the field that changed."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from gi_deploy.core.bundles import BundleManifest, read_bundle_manifest
from gi_deploy.core.records import Fields, check_seal, seal_of
from gi_deploy.core.router import ROUTER_DIR, RouterManifest
from gi_deploy.core.runs import RunRecord, read_run_manifest
from gi_deploy.errors import BundleError


def _json(path: Path) -> dict:
    return json.loads(path.read_text())


def test_bundle_manifest_round_trips_and_reseals_to_the_same_seal(tiny_deploy):
    d = _json(tiny_deploy / "capsule" / "manifest.json")
    m = BundleManifest.from_dict(d, tiny_deploy / "capsule")
    assert m.to_dict() == d  # nothing lost, nothing added, the same order of fields
    assert list(m.to_dict()) == list(d)
    assert m.sealed().seal == d["seal"] and m.sealed().content_sha256 == d["content_sha256"]
    assert m.source == "capsule" and m.ood.status == "fitted" and m.ood.threshold > 0
    assert m.models["fp32"].file == "model.onnx" and m.files["model.onnx"].sha256 == m.models["fp32"].sha256
    assert read_bundle_manifest(tiny_deploy / "capsule") == m


def test_run_record_round_trips(tiny_run):
    d = _json(tiny_run / "run.json")
    r = RunRecord.from_dict(d, tiny_run)
    assert r.to_dict() == d and list(r.to_dict()) == list(d)
    assert r.method == "lora" and r.best_artifact_sha256 and r.status == "done"
    assert read_run_manifest(tiny_run) == r


def test_router_manifest_round_trips(routed_deploy):
    folder = routed_deploy[0] / ROUTER_DIR
    d = _json(folder / "manifest.json")
    m = RouterManifest.from_dict(d, folder)
    assert m.to_dict() == d and list(m.to_dict()) == list(d)
    assert m.sealed().seal == d["seal"]
    assert m.sources == ("capsule", "endoscope") and m.gate["small_val"] is True


@pytest.mark.parametrize("change, message", [
    (lambda d: d.update(status="finished"), "field status = 'finished' must be one of training, interrupted"),
    (lambda d: d.update(classes=["a", "a"]), "field classes = ['a'] appear more than once"),
    (lambda d: d["model"].update(num_classes=7), "field model.num_classes = 7 does not match the 4 classes"),
    (lambda d: d["preprocess"].update(size=[0, 32]), "field preprocess.size = [0, 32] must be [height, width]"),
    (lambda d: d.pop("splits"), "has no 'splits' field"),
    (lambda d: d.update(history={}), "field history = {} must be a list of per-epoch records"),
], ids=["status", "classes", "num_classes", "size", "no-splits", "history"])
def test_run_record_refuses_a_malformed_field_naming_it(tiny_run, tmp_path, change, message):
    run = tmp_path / "capsule"
    shutil.copytree(tiny_run, run)
    d = _json(run / "run.json")
    change(d)
    (run / "run.json").write_text(json.dumps(d))
    with pytest.raises(BundleError, match="run.json: field|has no") as e:
        read_run_manifest(run)
    assert message in str(e.value) and "--overwrite" in str(e.value)


def test_the_seal_names_the_field_that_was_changed_added_or_removed(tmp_path):
    record = {"sources": ["a", "b"], "novelty": {"tpr": 0.99, "sources": {"a": 1.0}}, "files": {"x": {"sha256": "0"}}}
    sealed = {**record, "seal": seal_of(record)}
    check_seal(json.loads(json.dumps(sealed)), tmp_path / "m.json", "fix it")  # survives a JSON round trip
    cases = [
        (lambda d: d["sources"].reverse(), "field sources = ['b', 'a'] differs from what was sealed"),
        (lambda d: d["novelty"].update(tpr=0.5), "field novelty.tpr = 0.5 differs from what was sealed"),
        (lambda d: d.update(extra=1), "field extra = 1 was added since it was written"),
        (lambda d: d["files"].pop("x"), "field files.x was removed since it was written"),
        (lambda d: d["seal"].update(sha256="0" * 64), "field seal.sha256 does not match its fields"),
        (lambda d: d.pop("seal"), "field seal is missing"),
    ]
    for change, message in cases:
        d = json.loads(json.dumps(sealed))
        change(d)
        with pytest.raises(BundleError) as e:
            check_seal(d, tmp_path / "m.json", "fix it")
        assert message in str(e.value) and str(tmp_path / "m.json") in str(e.value) and "fix it" in str(e.value)


@pytest.mark.parametrize("getter, data, message", [
    (lambda f: f.text("k"), {"k": 3}, "field p.k = 3 must be a non-empty string"),
    (lambda f: f.text("k", choices=("a", "b")), {"k": "c"}, "field p.k = 'c' must be one of a, b"),
    (lambda f: f.integer("k", 1, 9), {"k": 10}, "field p.k = 10 must be an integer in [1, 9]"),
    (lambda f: f.integer("k", 1), {"k": True}, "field p.k = True must be an integer"),
    (lambda f: f.number("k", 0.0, lo_open=True), {"k": "abc"},
     "field p.k = 'abc' must be a finite number in (0.0, inf]"),
    (lambda f: f.number("k", 0.0, lo_open=True), {"k": float("inf")}, "field p.k = inf must be a finite number"),
    (lambda f: f.sha256("k"), {"k": "ABC"}, "field p.k = 'ABC' must be a sha256 hex digest"),
    (lambda f: f.flag("k"), {"k": "yes"}, "field p.k = 'yes' must be true or false"),
    (lambda f: f.obj("k"), {"k": []}, "field p.k = [] must be an object"),
    (lambda f: f.sub("k"), {"k": None}, "field p.k = None must be a JSON object"),
    (lambda f: f.str_list("k"), {"k": ["a", ""]}, "field p.k = '' is not a name"),
    (lambda f: f.raw("k"), {}, "has no 'p.k' field"),
])
def test_every_field_reader_names_the_field_its_value_and_the_fix(getter, data, message):
    with pytest.raises(BundleError) as e:
        getter(Fields(data, Path("m.json"), "re-export it", "p."))
    assert message in str(e.value) and str(e.value).startswith("m.json") and str(e.value).endswith("re-export it")
