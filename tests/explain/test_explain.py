"""Saliency maps: shapes and ranges, placement back on the original image, a real check that the
maps find the region that carries the class signal, and the CLI."""

import shutil

import numpy as np
import pytest
import timm
import torch
from PIL import Image

from gi_deploy.core.preprocess import PreprocessSpec
from gi_deploy.errors import ConfigError
from gi_deploy.explain.config import METHODS
from gi_deploy.explain.maps import map_to_original, saliency, target_layer_name

PX = 64
DISTRACTOR = 2.0
NOISE = 0.05


def _square_images(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Class 0: a red square, class 1: a green one, always in the top-left quadrant; both classes
    also get a blue distractor square in one of the other three quadrants and noise everywhere."""
    g = np.random.default_rng(seed)
    # a smooth random background (4x4 noise upsampled), like mucosa more than like TV static
    x = np.kron(g.normal(0.0, 0.5, (n, 3, 4, 4)), np.ones((PX // 4, PX // 4))).astype(np.float32)
    x += g.normal(0.0, NOISE, x.shape).astype(np.float32)
    y = g.integers(0, 2, n)
    q = PX // 2
    for i in range(n):
        r, c = g.integers(0, q - 12, 2)
        x[i, y[i], r : r + 12, c : c + 12] += 2.0  # the class signal: channel 0 (red) or 1 (green)
        qr, qc = [(0, q), (q, 0), (q, q)][g.integers(0, 3)]
        r, c = g.integers(0, q - 12, 2)
        x[i, 2, qr + r : qr + r + 12, qc + c : qc + c + 12] += DISTRACTOR  # distractor, no class information
    return torch.from_numpy(x), torch.from_numpy(y)


@pytest.fixture(scope="module")
def region_model():
    torch.manual_seed(0)
    model = timm.create_model("resnet10t", num_classes=2, pretrained=False)
    x, y = _square_images(256, seed=0)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    model.train()
    for step in range(60):
        i = torch.arange(step * 32, step * 32 + 32) % len(x)
        loss = torch.nn.functional.cross_entropy(model(x[i]), y[i])
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    xt, yt = _square_images(16, seed=1)
    with torch.no_grad():
        accuracy = (model(xt).argmax(1) == yt).float().mean().item()
    assert accuracy >= 0.9, f"the region task did not train (accuracy {accuracy:.2f}); the check would be empty"
    return model, xt, yt


@pytest.mark.parametrize("method", METHODS)
def test_maps_peak_in_the_region_that_carries_the_class(region_model, method):
    model, x, y = region_model
    maps = saliency(model, x, y.tolist(), method)
    assert maps.shape == (16, PX, PX) and maps.dtype == np.float32
    assert maps.min() >= 0.0 and maps.max() <= 1.0 and np.allclose(maps.reshape(16, -1).max(1), 1.0, atol=1e-3)
    q = PX // 2
    inside = maps[:, :q, :q].mean(axis=(1, 2))
    outside = (maps.sum(axis=(1, 2)) - maps[:, :q, :q].sum(axis=(1, 2))) / (PX * PX - q * q)
    peaks = [np.unravel_index(m.argmax(), m.shape) for m in maps]
    in_region = np.mean([r < q and c < q for r, c in peaks])
    # measured: Grad-CAM/++ 100% of peaks, 7-8x the weight; SmoothGrad (pixel-level, noisier) 81%, 1.3x
    assert in_region >= 0.75, f"{method}: only {in_region:.0%} of the maps peak in the signal's quadrant"
    assert np.median(inside / np.maximum(outside, 1e-6)) > 1.2, f"{method}: no more weight on the signal's quadrant"


def test_target_layer_per_backbone_and_override_errors():
    atto, resnet = timm.create_model("convnextv2_atto", num_classes=2), timm.create_model("resnet18", num_classes=2)
    assert target_layer_name(atto) == "stages.3" and target_layer_name(resnet) == "layer4"  # 7x7 at 224 px
    assert target_layer_name(atto, (48, 48)) == "stages.1"  # stages.3 would be 1x1 there: a constant map
    assert target_layer_name(resnet, (64, 64)) == "layer3"
    model = timm.create_model("resnet18", num_classes=2).eval()
    with pytest.raises(ConfigError, match="layer 'layer9' is not in ResNet"):
        saliency(model, torch.zeros(1, 3, 32, 32), [0], "gradcam", layer="layer9")
    with pytest.raises(ConfigError, match="unknown"):
        saliency(model, torch.zeros(1, 3, 32, 32), [0], "occlusion")


def test_maps_go_back_onto_the_original_pixels():
    ones = np.ones((32, 32), np.float32)
    direct = PreprocessSpec(size=(32, 32), mean=(0, 0, 0), std=(1, 1, 1))
    assert map_to_original(ones, (200, 100), direct).shape == (100, 200)  # (height, width) of a 200x100 image
    crop = PreprocessSpec(size=(32, 32), mean=(0, 0, 0), std=(1, 1, 1), resize="crop", crop_pct=0.8)
    m = map_to_original(ones, (200, 100), crop)  # the model saw a 80x80 centre crop of the 200x100 image
    assert m.shape == (100, 200) and m[:, :55].max() == 0 and m[:, 145:].max() == 0
    assert m[12:88, 62:138].min() == 1.0


def test_explain_cli_writes_one_png_per_image_and_a_side_by_side_sheet(tiny_run, tiny_data, tmp_path):
    from tests.cli.test_cli import invoke

    runs = tmp_path / "runs"
    for source in ("capsule", "endoscope"):
        shutil.copytree(tiny_run, runs / source)
    folder = tmp_path / "images"
    shutil.copytree(tiny_data / "test" / "polyp", folder / "polyp")
    Image.new("RGB", (60, 30), (200, 40, 40)).save(folder / "wide.png")  # another aspect ratio
    (folder / "broken.jpg").write_bytes(b"not a jpeg")
    out = tmp_path / "explain"
    r = invoke(
        "explain",
        folder,
        "--runs",
        runs,
        "--source",
        "capsule",
        "--source",
        "endoscope",
        "--method",
        "gradcam++",
        "--out",
        out,
    )
    assert r.exit_code == 0, r.output
    polyps = sorted((folder / "polyp").glob("*.jpg"))
    assert len(polyps) == 3
    assert sorted(p.name for p in out.glob("*.png")) == sorted(
        ["contact_sheet.png", "wide.png"] + [f"polyp__{p.stem}.png" for p in polyps]
    )
    assert "2 source(s) side by side" in r.output and "1 image(s) could not be read" in r.output
    sheet = Image.open(out / "contact_sheet.png")
    one = Image.open(out / "wide.png")
    assert sheet.height > 3 * one.height and one.width > 2 * one.height  # 4 rows; 3 panels in a row
    r = invoke("explain", folder / "wide.png", "--runs", runs, "--target", "not-a-class", "--out", out)
    assert r.exit_code == 1 and "not a class of capsule" in r.output


@pytest.mark.parametrize("method,model", [("colora", "resnet18"), ("full", "convnextv2_atto")])
def test_explain_works_from_colora_and_full_runs(tiny_data, tmp_path, method, model):
    """The maps come from each run's deployed function: CoLoRA merged into a ResNet, a full
    fine-tune as it is; a named --target class gets its own map."""
    from gi_deploy.explain.maps import explain_images, load_source
    from gi_deploy.training.trainer import train
    from tests.conftest import tiny_train_config

    run = train(tiny_train_config(tiny_data, tmp_path / "runs", method=method, model=model)).run_dir
    source = load_source(run)
    assert not any("colora" in type(m).__name__.lower() for m in source.model.modules())  # merged: plain layers
    image = sorted((tiny_data / "test" / "ulcer").glob("*.jpg"))[0]
    result = explain_images([image], [source], "gradcam", target="polyp", out_dir=tmp_path / "out")
    assert [p.name for p in result.images] == [image.stem + ".png"] and result.sheet.is_file()
    x = torch.from_numpy(np.stack([np.zeros((3, 32, 32), np.float32)]))
    maps = saliency(source.model, x + 0.5, [source.classes.index("polyp")], "gradcam")
    assert maps.shape == (1, 32, 32) and np.isfinite(maps).all() and 0 <= maps.min() <= maps.max() <= 1


def test_a_layer_without_an_nchw_feature_map_is_refused():
    atto = timm.create_model("convnextv2_atto", num_classes=2).eval()
    x = torch.zeros(1, 3, 64, 64)
    with pytest.raises(ConfigError, match="'head.fc' outputs \\(1, 2\\), not an NCHW feature map"):
        saliency(atto, x, [0], "gradcam", layer="head.fc")
    resnet = timm.create_model("resnet18", num_classes=2).eval()
    with pytest.raises(ConfigError, match="not an NCHW feature map"):
        saliency(resnet, x, [0], "gradcam", layer="global_pool")
    assert saliency(atto, x + 0.1, [0], "gradcam", layer="stages.2").shape == (1, 64, 64)


def test_output_names_never_collide():
    from gi_deploy.explain.maps import _unique_names

    assert _unique_names(["a__b", "a__b", "A__B", "contact_sheet"]) == [
        "a__b.png",
        "a__b-2.png",
        "A__B-3.png",
        "contact_sheet-2.png",
    ]


def test_explain_wrong_refuses_a_run_that_changed_after_export(tiny_deploy, tmp_path):
    import json

    from gi_deploy.core.bundles import BundleManifest
    from gi_deploy.errors import BundleError
    from gi_deploy.explain.maps import explain_wrong

    bundle = tiny_deploy / "capsule"
    manifest = json.loads((bundle / "manifest.json").read_text())
    csv_path = tmp_path / "pred.csv"
    csv_path.write_text("path,source,true_label,predicted,confidence,error\nulcer/a.jpg,capsule,ulcer,polyp,0.9,\n")
    stale = {**manifest, "training": {**manifest["training"], "run_manifest_sha256": "0" * 64}}
    with pytest.raises(BundleError, match="changed after this bundle was exported"):
        explain_wrong(
            csv_path, tmp_path, BundleManifest.from_dict(stale, bundle, check_seal=False), 1, tmp_path / "wrong"
        )
    with pytest.raises(BundleError, match="has no 'training' field"):  # no record without the run it came from
        BundleManifest.from_dict({k: v for k, v in manifest.items() if k != "training"}, bundle)
