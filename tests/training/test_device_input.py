"""The CUDA training input path, run on the CPU device: uint8 pixels from the loader, normalised
(and augmented) where the model runs, giving what the CPU workers give; and JPEG draft decoding
seen identically by training and inference."""

import numpy as np
import torch
from PIL import Image

from gi_deploy.core.preprocess import PreprocessSpec, load_input, load_rgb, normalize_pixels
from gi_deploy.runtime.decode.cpu import decode_batch
from gi_deploy.training.data import Augment, ImageDataset
from gi_deploy.training.device_input import DeviceFeed, augments_on_device

SPEC = PreprocessSpec(size=(40, 40), mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225), decode="draft")


def _frames(root, n=3, size=(200, 160)):
    rng = np.random.default_rng(0)
    paths = []
    for i in range(n):
        small = rng.integers(0, 255, (size[1] // 8, size[0] // 8, 3), dtype=np.uint8)
        p = root / f"f{i}.jpg"
        Image.fromarray(small).resize(size, Image.BICUBIC).save(p, quality=90)
        paths.append(p)
    return paths


def test_draft_decoding_is_the_same_for_training_and_inference_and_really_scales(tmp_path):
    paths = _frames(tmp_path)
    with Image.open(paths[0]) as img:
        img.draft(None, (40, 40))
        assert img.size == (50, 40)  # libjpeg's 1/4 scale: still at least the 40x40 the resize needs
    ds = ImageDataset(tmp_path, [(p.name, 0) for p in paths], SPEC)
    trained = torch.stack([ds[i][0] for i in range(len(paths))]).numpy()
    runtime = normalize_pixels(decode_batch(paths, (SPEC,)).inputs[0], SPEC)
    np.testing.assert_allclose(runtime, trained, atol=1e-6, rtol=0)
    np.testing.assert_allclose(np.stack([load_input(p, SPEC) for p in paths]), trained, atol=1e-6, rtol=0)
    full = PreprocessSpec(**{**SPEC.__dict__, "decode": "full"})
    assert load_rgb(paths[0], SPEC).size == (50, 40) and load_rgb(paths[0], full).size == (200, 160)


def test_small_images_are_decoded_whole(tmp_path):
    paths = _frames(tmp_path, n=1, size=(70, 60))  # under twice the 40 px input: no draft
    assert load_rgb(paths[0], SPEC).size == (70, 60)


def test_device_feed_normalises_pixels_as_the_cpu_workers_do(tmp_path):
    paths = _frames(tmp_path)
    items = [(p.name, 0) for p in paths]
    cpu = torch.stack([ImageDataset(tmp_path, items, SPEC)[i][0] for i in range(len(items))])
    pixels = torch.stack([ImageDataset(tmp_path, items, SPEC, pixels=True)[i][0] for i in range(len(items))])
    assert pixels.dtype == torch.uint8 and pixels.shape == (3, 40, 40, 3)
    feed = DeviceFeed(SPEC, torch.device("cpu"), channels_last=True, augment=Augment(), on_device=True)
    x = feed(pixels, train=False)
    assert x.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(x, cpu, atol=1e-6, rtol=0)


def test_device_augmentation_flips_and_rotates_each_image_on_its_own():
    torch.manual_seed(0)
    feed = DeviceFeed(SPEC, torch.device("cpu"), False, Augment(hflip=True, rotation_degrees=0.0), on_device=True)
    img = torch.zeros((64, 40, 40, 3), dtype=torch.uint8)
    img[:, :, :20] = 255  # left half white
    out = feed._augment(img.permute(0, 3, 1, 2).float())
    flipped = out[:, 0, 0, -1] == 255  # white moved to the right edge
    assert 10 < int(flipped.sum()) < 54  # about half, drawn per image
    rot = DeviceFeed(SPEC, torch.device("cpu"), False, Augment(hflip=False, rotation_degrees=30.0), on_device=True)
    square = torch.full((8, 3, 40, 40), 200.0)
    turned = rot._augment(square)
    assert (turned[:, :, 0, 0] < 200).any() and torch.allclose(turned[:, :, 20, 20], square[:, :, 20, 20])
    assert augments_on_device(torch.device("cuda"), Augment()) and not augments_on_device(
        torch.device("cpu"), Augment()
    )
    assert not augments_on_device(torch.device("cuda"), Augment(color_jitter=0.2))  # jitter stays with torchvision
