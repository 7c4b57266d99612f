"""Inputs of `gi-deploy infer`: a folder, one image, a glob, a list file; labels from sub-folders,
--labels or the list, with a clear error for names that are not classes."""

import csv
import shutil

import pytest

from gi_deploy.errors import ConfigError
from gi_deploy.runtime.infer import InferConfig, infer_folder
from gi_deploy.runtime.inputs import collect_inputs


@pytest.fixture()
def images(tiny_data, tmp_path):
    root = tmp_path / "exam"
    shutil.copytree(tiny_data / "test", root)
    (root / "polyp" / "UPPER.JPG").write_bytes((next((root / "polyp").glob("*.jpg"))).read_bytes())
    return root


def _rows(path):
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def test_the_four_input_forms(images, tmp_path):
    folder = collect_inputs(images)
    assert len(folder.paths) == 13 and folder.root == images  # 12 + the upper-case extension
    one = collect_inputs(images / "polyp" / "UPPER.JPG")
    assert one.paths == [images / "polyp" / "UPPER.JPG"] and one.rel(one.paths[0]) == "UPPER.JPG"
    globbed = collect_inputs(f"{images}/**/*.jpg")
    assert len(globbed.paths) == 12 and globbed.root == images  # the glob is case-sensitive, as the shell's
    assert globbed.rel(globbed.paths[0]).count("/") == 1
    listed = tmp_path / "list.txt"
    listed.write_text(
        "# a comment\nexam/polyp/UPPER.JPG\n\nexam/ulcer/" + next((images / "ulcer").glob("*.jpg")).name + "\n"
    )
    from_list = collect_inputs(listed)
    assert [from_list.rel(p) for p in from_list.paths][0] == "exam/polyp/UPPER.JPG" and len(from_list.paths) == 2
    with pytest.raises(ConfigError, match="nothing to classify"):
        collect_inputs(tmp_path / "missing")
    (tmp_path / "notes.md").write_text("x")
    with pytest.raises(ConfigError, match="not a folder, an image"):
        collect_inputs(tmp_path / "notes.md")


def test_labels_csv_scores_a_flat_folder_and_unknown_names_are_refused(images, tiny_deploy, tmp_path):
    flat = tmp_path / "flat"
    flat.mkdir()
    truth = {}
    for p in sorted(images.rglob("*.jpg")):
        name = f"{p.parent.name}_{p.name}"
        shutil.copyfile(p, flat / name)
        truth[name] = p.parent.name
    labels = tmp_path / "labels.csv"
    labels.write_text("path,class\n" + "".join(f"{n},{c}\n" for n, c in truth.items()))
    out = tmp_path / "pred.csv"
    r = infer_folder(InferConfig(inputs=flat, labels=labels, deploy_dir=tiny_deploy, out_csv=out))
    rows = _rows(out)
    assert {row["path"]: row["true_label"] for row in rows} == truth
    assert r.sources["capsule"].metrics["n"] == 12 and r.sources["capsule"].n_unlabelled == 0
    labels.write_text("path,class\n" + "".join(f"{n},{'Polyps' if c == 'polyp' else c}\n" for n, c in truth.items()))
    with pytest.raises(ConfigError, match="labels that are not classes of the bundle: Polyps; its classes are"):
        infer_folder(InferConfig(inputs=flat, labels=labels, deploy_dir=tiny_deploy, out_csv=tmp_path / "x.csv"))
    assert not (tmp_path / "x.csv").exists()  # refused before anything ran


def test_a_csv_list_with_a_label_column(images, tiny_deploy, tmp_path):
    listing = tmp_path / "list.csv"
    chosen = sorted((images / "ulcer").glob("*.jpg"))[:2]
    listing.write_text("filename,label\n" + "".join(f"exam/ulcer/{p.name},ulcer\n" for p in chosen))
    out = tmp_path / "pred.csv"
    r = infer_folder(InferConfig(inputs=listing, deploy_dir=tiny_deploy, out_csv=out))
    assert [row["true_label"] for row in _rows(out)] == ["ulcer", "ulcer"] and r.sources["capsule"].metrics["n"] == 2


def test_a_killed_run_resumes_with_every_image_exactly_once(images, tiny_deploy, tmp_path, monkeypatch):
    from gi_deploy.runtime import loader as bundle_mod

    full = tmp_path / "full.csv"
    infer_folder(InferConfig(inputs=images, deploy_dir=tiny_deploy, out_csv=full, batch_size=3))
    out = tmp_path / "pred.csv"
    real, calls = bundle_mod.Bundle.predict_logits, []

    def dies_on_the_third_batch(self, batch):
        calls.append(len(batch))
        if len(calls) == 3:
            raise KeyboardInterrupt  # the user's Ctrl-C, or the machine going down
        return real(self, batch)

    monkeypatch.setattr(bundle_mod.Bundle, "predict_logits", dies_on_the_third_batch)
    with pytest.raises(KeyboardInterrupt):
        infer_folder(InferConfig(inputs=images, deploy_dir=tiny_deploy, out_csv=out, batch_size=3))
    monkeypatch.setattr(bundle_mod.Bundle, "predict_logits", real)
    assert len(_rows(out)) == 6  # two batches were flushed
    with open(out, "a", encoding="utf-8") as f:
        f.write("polyp/half-written.jpg,caps")  # a SIGKILL in the middle of a row
    r = infer_folder(InferConfig(inputs=images, deploy_dir=tiny_deploy, out_csv=out, batch_size=3, resume=True))
    rows = _rows(out)
    assert r.n_resumed == 6 and r.n_images == 13 == len(rows)
    assert sorted(row["path"] for row in rows) == sorted(row["path"] for row in _rows(full))  # each exactly once
    by_path = {row["path"]: row for row in _rows(full)}
    assert all(row == by_path[row["path"]] for row in rows)  # the same predictions as an uninterrupted run
    import json

    expected = json.loads(full.with_suffix(".metrics.json").read_text())
    assert (
        r.sources["capsule"].metrics["n"],
        r.sources["capsule"].metrics["accuracy"],
        r.sources["capsule"].metrics["mcc"],
    ) == (expected["n"], expected["accuracy"], expected["mcc"])
    with pytest.raises(ConfigError, match="--resume: .* has columns"):
        infer_folder(InferConfig(inputs=images, deploy_dir=tiny_deploy, out_csv=out, top_k=2, resume=True))


def test_rows_carry_source_and_top_k(images, tiny_deploy, tmp_path):
    out = tmp_path / "pred.csv"
    infer_folder(InferConfig(inputs=images, deploy_dir=tiny_deploy, out_csv=out, top_k=3))
    row = _rows(out)[0]
    assert row["source"] == "capsule" and row["top1_class"] == row["predicted"]
    probs = [float(row[f"top{i}_prob"]) for i in (1, 2, 3)]
    assert probs == sorted(probs, reverse=True) and float(row["confidence"]) == probs[0]
    assert len({row[f"top{i}_class"] for i in (1, 2, 3)}) == 3


def test_labels_with_absolute_paths(images, tmp_path):
    chosen = sorted((images / "ulcer").glob("*.jpg"))[0]
    labels = tmp_path / "elsewhere" / "labels.csv"
    labels.parent.mkdir()
    labels.write_text(f"path,class\n{chosen},ulcer\n")
    assert collect_inputs(images, labels).labels == {chosen.resolve(): "ulcer"}
