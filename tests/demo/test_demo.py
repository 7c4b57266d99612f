from gi_deploy.demo.pipeline import BASE, DemoConfig, run_demo


def test_demo_pipeline_scores_every_model_on_every_source(tmp_path):
    """The demo's code path at toy size (the README's first command runs it at full size)."""
    cfg = DemoConfig(out_dir=tmp_path, img_size=32, image_px=32, base_epochs=1, lora_epochs=1,
                     split_sizes={"train": 4, "val": 2, "test": 2})
    result = run_demo(cfg, say=lambda s: None)
    assert set(result.scores) == {BASE, "capsule", "endoscope"}
    for model, by_source in result.scores.items():
        assert set(by_source) == {"capsule", "endoscope"}
        assert all(m["n"] == 8 for m in by_source.values())
    for source in ("capsule", "endoscope"):
        assert result.verification[source]["merge"]["max_abs_logit_diff"] <= 1e-4
        assert (tmp_path / "deploy" / source / "model.onnx").is_file()
        assert (tmp_path / "runs" / source / "adapter").is_dir()
