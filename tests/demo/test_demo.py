from gi_deploy.demo.pipeline import DemoConfig, run_demo


def test_demo_pipeline_scores_every_model_on_every_source_and_routes(tmp_path):
    """The demo's code path at toy size (the README's first command runs it at full size)."""
    cfg = DemoConfig(out_dir=tmp_path, img_size=32, image_px=32, base_epochs=1, lora_epochs=1, ood_per_kind=2,
                     split_sizes={"train": 4, "val": 2, "test": 2}, triage_minutes=1.0)
    result = run_demo(cfg, say=lambda s: None)
    assert set(result.scores) == {"capsule", "endoscope"}
    for model, by_source in result.scores.items():
        assert set(by_source) == {"capsule", "endoscope"}
        assert all(m["n"] == 8 for m in by_source.values())
    for source in ("capsule", "endoscope"):
        assert result.verification[source]["merge"]["max_abs_logit_diff"] <= 1e-4
        assert (tmp_path / "deploy" / source / "model.onnx").is_file()
        assert (tmp_path / "runs" / source / "adapter").is_dir()
    assert not (tmp_path / "deploy" / "base").exists()  # the pretext base is no source: no bundle, not routed to
    assert result.router_gate["accuracy"] >= result.router_gate["min_accuracy"]
    assert result.routing["n_images"] == 16 and result.routing["n_ood"] == 8
    assert result.auto["rows"] == 24 and result.auto["ood_frames"] == 8
    assert {"routed_accuracy", "own_model_accuracy", "single_model_accuracy", "ood"} <= set(result.routing)
    t = result.triage  # the synthetic capsule video, triaged and scored against its labels
    assert t.summary["videos"][0]["n_frames"] == 120 and t.evaluation["events"] == 6
    assert (tmp_path / "triage" / "report" / "report.html").is_file()
