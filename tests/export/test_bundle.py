import json
import shutil

import numpy as np
import onnx
import pytest
import torch

from gi_deploy._io import sha256_file
from gi_deploy.core.bundles import CONTENT_FIELDS
from gi_deploy.core.methods import method_spec
from gi_deploy.core.records import canonical_sha256
from gi_deploy.core.runs import RANDOM_BASE_WEIGHTS, select_runs
from gi_deploy.errors import BundleError, ExportFailed, GateFailed
from gi_deploy.export import fp16, onnx_export, verify
from gi_deploy.export.options import ExportConfig
from gi_deploy.export.writer import export_runs, export_source
from gi_deploy.model import lora, merge
from gi_deploy.model.run import load_run_model
from gi_deploy.runtime.loader import load_bundle


def test_adapter_under_test_has_nonzero_b(tiny_run):
    """peft starts LoRA B at zero; a merge check on such an adapter could not fail."""
    from safetensors.torch import load_file

    state = load_file(str(tiny_run / "adapter" / "adapter_model.safetensors"))
    b = [v for k, v in state.items() if "lora_B" in k]
    assert b and all(v.abs().max() > 0 for v in b)


def test_bundle_is_verified_and_self_describing(tiny_run, tiny_deploy):
    bundle = tiny_deploy / "capsule"
    m = json.loads((bundle / "manifest.json").read_text())
    run = json.loads((tiny_run / "run.json").read_text())
    v = m["verification"]
    assert v["merge"]["max_abs_logit_diff"] <= verify.MERGE_ATOL
    assert v["onnx_fp32"]["max_abs_logit_diff"] <= verify.FP32_ATOL == 1e-4
    assert v["onnx_fp32"]["top1_agreement"] == 1.0 == v["onnx_fp32"]["min_top1_agreement"]
    assert v["onnx_fp32"]["batch_sizes"][0] == 1 and v["onnx_fp32"]["batch_sizes"][1] > 2  # dynamic batch axis
    for gate in ("onnx_fp16", "fp16_emulated"):  # fp16 is on by default
        assert v[gate]["finite"] and v[gate]["top1_agreement"] >= verify.FP16_MIN_TOP1 == 0.995
        assert 0 < v[gate]["max_abs_prob_diff"] < 0.01
    assert v["inputs"]["real_images"] == 8 and len(v["inputs"]["stress_images"]) == 8
    assert json.loads((bundle / "labels.json").read_text()) == m["classes"] == run["classes"]
    assert set(m["files"]) == {p.name for p in bundle.iterdir()} - {"manifest.json"}
    assert {e["file"] for e in m["models"].values()} == {"model.onnx", "model.fp16.onnx"}
    for name, entry in m["files"].items():
        assert sha256_file(bundle / name) == entry["sha256"]
    assert m["preprocess"] == run["preprocess"] and m["base_weights"]["license"]
    assert m["adapter"]["lora"]["r"] == 16 and m["adapter"]["lora"]["alpha"] == 32 and m["model"]["merged"] is True
    assert m["model"]["exporter"] == "torchscript" and m["model"]["opset"] >= 17
    fp = m["footprint"]
    assert (
        fp["artifact_bytes"] == method_spec("lora").artifact_bytes(tiny_run)
        and fp["merged_model_bytes"] == m["files"]["model.onnx"]["bytes"]
    )
    assert fp["artifact_vs_merged_model"] < 0.15  # the storage argument: r=16 adapters are a small fraction
    assert m["engine"] is None and m["versions"]["onnxruntime"]
    assert not list(tiny_deploy.glob(".*"))  # no staging left behind


def test_a_lone_onnx_file_says_what_it_is(tiny_deploy):
    m = json.loads((tiny_deploy / "capsule" / "manifest.json").read_text())
    for precision in ("fp32", "fp16"):
        meta = onnx_export.read_metadata(tiny_deploy / "capsule" / m["models"][precision]["file"])
        assert meta["source"] == "capsule" and meta["precision"] == precision
        assert json.loads(meta["classes"]) == m["classes"] and json.loads(meta["preprocess"]) == m["preprocess"]
        assert meta["model"] == "convnextv2_atto" and meta["method"] == "lora" and meta["base_weights_license"]
        assert meta["export_key"] == m["export_key"]
        # the whole content the runtime acts on (OOD threshold included), and its hash, as in the manifest
        assert json.loads(meta["content"]) == {k: m[k] for k in CONTENT_FIELDS} and m["ood"]["threshold"] > 0
        assert meta["content_sha256"] == m["content_sha256"] == canonical_sha256({k: m[k] for k in CONTENT_FIELDS})


def test_reexport_is_a_noop_unless_something_changed(tiny_run, tiny_deploy, tmp_path):
    target = tmp_path / "capsule"
    shutil.copytree(tiny_deploy / "capsule", target)
    before = {p.name: p.stat().st_mtime_ns for p in target.iterdir()}
    again = export_source(tiny_run, target)
    assert again.skipped and {p.name: p.stat().st_mtime_ns for p in target.iterdir()} == before
    forced = export_source(tiny_run, target, force=True)
    assert not forced.skipped and forced.manifest.created >= again.manifest.created
    other = export_source(tiny_run, target, fp16=False)  # other options: a new bundle
    assert not other.skipped and not (target / "model.fp16.onnx").exists()
    (target / "model.onnx").write_bytes(b"tampered")  # a changed file is not "up to date"
    assert not export_source(tiny_run, target, fp16=False).skipped


def test_merged_onnx_has_plain_backbone_cost_and_matches_torch(tiny_run, tiny_deploy):
    graph = onnx.load(str(tiny_deploy / "capsule" / "model.onnx")).graph
    assert not any("lora" in t.name for t in graph.initializer)
    n_weights = sum(int(np.prod(t.dims)) for t in graph.initializer)
    m = json.loads((tiny_deploy / "capsule" / "manifest.json").read_text())
    assert n_weights <= m["model"]["parameters"] + 64  # + a few exporter constants
    # and onnxruntime on a fresh batch of 5 agrees with the un-merged peft model
    x = torch.randn(5, 3, 32, 32, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        ref = load_run_model(tiny_run)(x).numpy()
    out = load_bundle(tiny_deploy / "capsule").predict_logits(x.numpy())
    np.testing.assert_allclose(out, ref, atol=1e-4, rtol=0)


def _copy_run(tiny_run, tmp_path):
    run = tmp_path / "runs" / "capsule"
    shutil.copytree(tiny_run, run)
    return run


def _corrupt_adapter(run, scale: float, pattern: str = "stages.0") -> None:
    """Overwrite the LoRA B of the stage-0 fc1 layers with N(0, scale) values."""
    from safetensors.torch import load_file, save_file

    path = run / "adapter" / "adapter_model.safetensors"
    state = load_file(str(path))
    g = torch.Generator().manual_seed(0)
    for k in [k for k in state if pattern in k and "fc1" in k and "lora_B" in k]:
        state[k] = torch.randn(state[k].shape, generator=g) * scale
    save_file(state, str(path))
    run_json = run / "run.json"  # an edit the test means: recorded, as training would have (export checks it)
    manifest = json.loads(run_json.read_text())
    manifest["best"]["artifact_sha256"]["adapter/adapter_model.safetensors"] = sha256_file(path)
    run_json.write_text(json.dumps(manifest))


def test_a_broken_merge_is_refused_by_the_merge_gate(tiny_run, tiny_deploy, tmp_path, monkeypatch):
    target = tmp_path / "capsule"
    shutil.copytree(tiny_deploy / "capsule", target)
    before = {p.name: p.read_bytes() for p in target.iterdir()}
    real = merge.lora_delta
    monkeypatch.setattr(
        lora, "lora_delta", lambda f: 2 * real(f)
    )  # where the LoRA adapter kind computes ΔW  # e.g. a scaling applied twice
    with pytest.raises(GateFailed, match=r"gate merge failed .*max \|Δlogit\| .*must be at most 0.0001") as e:
        export_source(tiny_run, target, force=True)
    assert e.value.gate == "merge" and e.value.value > 1e-4 and e.value.threshold == 1e-4
    assert {p.name: p.read_bytes() for p in target.iterdir()} == before  # the old bundle survives
    assert sorted(p.name for p in tmp_path.iterdir()) == ["capsule"]  # and no staging is left


def test_failed_onnx_gate_writes_nothing(tiny_run, tmp_path, monkeypatch):
    monkeypatch.setattr(verify, "FP32_ATOL", 0.0)  # nothing can pass a zero tolerance
    with pytest.raises(GateFailed, match="gate onnx_fp32 failed .*must be at most 0; nothing written"):
        export_source(tiny_run, tmp_path / "capsule")
    assert list(tmp_path.iterdir()) == []


def test_naive_fp16_is_refused_and_islands_pass_on_large_activations(tiny_run, tmp_path, monkeypatch):
    """A planted adapter drives stage-0 activations past fp16's range in GRN (peak > 60 over 8x8
    positions). With islands the bundle passes; the naive conversion of the same model passes
    onnxruntime's CPU run (which computes in fp32) but is refused by the true-fp16 gate."""
    run = _copy_run(tiny_run, tmp_path)
    _corrupt_adapter(run, scale=3.0)
    ok = export_source(run, tmp_path / "deploy" / "capsule").manifest.verification
    assert ok["inputs"]["peak_activation"] > 40 and ok["fp16_emulated"]["finite"]
    assert ok["fp16_emulated"]["top1_agreement"] == 1.0
    convert = fp16.convert_fp16
    monkeypatch.setattr(fp16, "convert_fp16", lambda src, dst: convert(src, dst, islands=False))
    with pytest.raises(GateFailed, match="gate fp16_emulated failed .*share of inputs with finite logits 0"):
        export_source(run, tmp_path / "deploy" / "capsule", force=True)
    assert (tmp_path / "deploy" / "capsule" / "model.fp16.onnx").is_file()  # the good bundle is kept


def test_unmerged_export_is_verified_too(tiny_run, tmp_path):
    m = export_source(tiny_run, tmp_path / "capsule", merge=False).manifest
    assert m.model.merged is False and "merge" not in m.verification
    assert m.verification["onnx_fp32"]["max_abs_logit_diff"] <= 1e-4


def test_changed_base_weights_are_detected(tiny_run, tmp_path):
    from safetensors.torch import load_file, save_file

    run = tmp_path / "runs" / "capsule"
    shutil.copytree(tiny_run, run)
    state = load_file(str(run / RANDOM_BASE_WEIGHTS))
    state["stem.0.weight"] += 0.01
    save_file(state, str(run / RANDOM_BASE_WEIGHTS))
    with pytest.raises(ExportFailed, match="differs from the one it was trained on"):
        export_runs(ExportConfig(runs_dir=tmp_path / "runs", deploy_dir=tmp_path / "deploy"))
    assert not (tmp_path / "deploy" / "capsule").exists()


def test_unknown_source_lists_trained_ones(tiny_run, tmp_path):
    with pytest.raises(BundleError, match="no trained run for kvasir .*trained: capsule"):
        select_runs(tiny_run.parent, ["kvasir"])


def test_one_failing_source_does_not_stop_the_others(tiny_run, tmp_path):
    runs = tmp_path / "runs"
    shutil.copytree(tiny_run, runs / "capsule")
    shutil.copytree(tiny_run, runs / "broken")
    (runs / "broken" / RANDOM_BASE_WEIGHTS).unlink()
    with pytest.raises(ExportFailed, match=r"broken: .*base weights this run was trained from are gone") as e:
        export_runs(ExportConfig(runs_dir=runs, deploy_dir=tmp_path / "deploy"))
    assert set(e.value.exported) == {"capsule"} and set(e.value.failures) == {"broken"}
    assert (tmp_path / "deploy" / "capsule" / "model.onnx").is_file()
    assert not (tmp_path / "deploy" / "broken").exists()


def test_an_operator_onnx_cannot_express_is_a_typed_error(tmp_path):
    """timm's VGG head below 224 px pools 2x2 up to 7x7: ONNX has no such adaptive pooling."""
    from gi_deploy.errors import ExportError

    class UpPool(torch.nn.Module):
        def forward(self, x):
            return torch.nn.functional.adaptive_avg_pool2d(x, 7).flatten(1)

    with pytest.raises(ExportError, match="adaptive_avg_pool2d.*--img-size"):
        onnx_export.export_onnx(UpPool(), tmp_path / "m.onnx", (2, 2))
    assert not (tmp_path / "m.onnx").exists()


def test_dynamo_exporter_passes_the_same_gates(tiny_run, tmp_path):
    """The exporter is a deliberate choice (TorchScript by default); the other one is held to the
    same parity gates."""
    pytest.importorskip("onnxscript", reason="the dynamo exporter needs onnxscript (the dev extra installs it)")
    m = export_source(tiny_run, tmp_path / "capsule", exporter="dynamo", fp16=False).manifest
    assert m.model.exporter == "dynamo" and m.verification["onnx_fp32"]["max_abs_logit_diff"] <= 1e-4
    graph = onnx.load(str(tmp_path / "capsule" / "model.onnx"))
    assert graph.graph.input[0].name == "input" and graph.graph.input[0].type.tensor_type.shape.dim[0].dim_param
    assert m.model.opset == max(o.version for o in graph.opset_import if o.domain in ("", "ai.onnx")) >= 18


def test_grouped_split_rows_export_and_an_interrupted_export_is_restored(tiny_run, tmp_path):
    """Kvasir-Capsule runs record (path, class, video) rows; a crash between the final renames
    leaves only .<source>.old, which the next export puts back."""
    run = _copy_run(tiny_run, tmp_path)
    manifest = json.loads((run / "run.json").read_text())
    for split, rows in manifest["splits"]["files"].items():
        manifest["splits"]["files"][split] = [[rel, label, f"video{i % 3}"] for i, (rel, label) in enumerate(rows)]
    (run / "run.json").write_text(json.dumps(manifest))
    deploy = tmp_path / "deploy"
    first = export_source(run, deploy / "capsule", fp16=False)
    assert first.manifest.verification["inputs"]["real_images"] == 8
    (deploy / "capsule").rename(deploy / ".capsule.old")
    from gi_deploy.core.bundles import list_bundles

    assert list_bundles(deploy) == []  # hidden folders are never bundles
    again = export_source(run, deploy / "capsule", fp16=False)
    assert again.skipped and list_bundles(deploy) == ["capsule"]
