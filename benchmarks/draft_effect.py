"""What JPEG draft decoding changes: one trained run's model on one labelled folder, decoded whole
and with draft (DCT-domain) scaling, side by side: decode time per image, mean pixel difference,
accuracy of each, and how many predictions change.

    PYTHONPATH=. python3 benchmarks/draft_effect.py --run runs/capsule --images data/test [--device cuda]

A run trained with draft decoding (the default since it exists) is evaluated the way it was trained
by the draft column; the full column shows what a decoder without it would give the same model.
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path

import numpy as np
import torch

from gi_deploy.core.preprocess import list_images, load_rgb, normalize_pixels, to_pixels
from gi_deploy.core.runs import read_run_manifest
from gi_deploy.model.run import load_merged_model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", type=Path, required=True)
    ap.add_argument("--images", type=Path, required=True, help="class-named sub-folders of the run's classes")
    ap.add_argument("--device", default="cpu")
    a = ap.parse_args()
    manifest = read_run_manifest(a.run)
    classes = list(manifest.classes)
    paths = [p for p in list_images(a.images) if p.parent.name in classes]
    labels = np.array([classes.index(p.parent.name) for p in paths])
    model = load_merged_model(a.run).to(a.device).eval()
    base = manifest.preprocess
    pixels, preds = {}, {}
    for mode in ("full", "draft"):
        spec = dataclasses.replace(base, decode=mode)
        t = time.perf_counter()
        pixels[mode] = np.stack([to_pixels(load_rgb(p, spec), spec) for p in paths])
        ms = (time.perf_counter() - t) / len(paths) * 1000
        with torch.no_grad():
            logits = torch.cat(
                [
                    model(torch.from_numpy(normalize_pixels(pixels[mode][i : i + 64], spec)).to(a.device))
                    for i in range(0, len(paths), 64)
                ]
            )
        preds[mode] = logits.argmax(1).cpu().numpy()
        print(f"{mode:5s}: decode + resize {ms:.2f} ms/image (one core), accuracy {(preds[mode] == labels).mean():.4f}")
    diff = np.abs(pixels["full"].astype(np.int16) - pixels["draft"].astype(np.int16))
    print(
        f"mean |Δpixel| {diff.mean():.3f} (max {diff.max()}), predictions changed "
        f"{int((preds['full'] != preds['draft']).sum())} of {len(paths)}, model trained with decode="
        f"{base.decode!r}"
    )


if __name__ == "__main__":
    main()
