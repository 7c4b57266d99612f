import pytest

from gi_deploy.demo.pipeline import DemoConfig, run_demo


def test_demo_pipeline_scores_every_model_on_every_source_and_routes(tmp_path):
    """The demo's code path at toy size (the README's first command runs it at full size)."""
    cfg = DemoConfig(
        out_dir=tmp_path,
        img_size=32,
        image_px=32,
        base_epochs=1,
        lora_epochs=1,
        ood_per_kind=2,
        split_sizes={"train": 4, "val": 2, "test": 2},
        triage_minutes=1.0,
    )
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


def test_paper_effect_verdict_against_hand_computed_gaps():
    """Each model must beat the other model on its own source by >= 20 points: README-like numbers meet it
    (84.17 - 25.00 = 59.17, 59.17 - 27.50 = 31.67); a model only 19 points better on its own source does not."""
    from gi_deploy.demo.pipeline import paper_effect

    def scores(cc, ce, ec, ee):  # model x test source, fractions
        return {
            "capsule": {"capsule": {"accuracy": cc}, "endoscope": {"accuracy": ce}},
            "endoscope": {"capsule": {"accuracy": ec}, "endoscope": {"accuracy": ee}},
        }

    met = paper_effect(scores(0.8417, 0.2750, 0.2500, 0.5917))
    assert met["met"] and met["gaps"] == {"capsule": pytest.approx(59.17), "endoscope": pytest.approx(31.67)}
    assert met["line"].startswith("paper's effect") and ": met (" in met["line"]
    short = paper_effect(scores(0.8417, 0.2750, 0.2500, 0.4650))  # endoscope: 46.50 - 27.50 = 19.00
    assert not short["met"] and short["gaps"]["endoscope"] == pytest.approx(19.0) and "NOT met" in short["line"]
