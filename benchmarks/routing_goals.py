"""Router accuracy on held-out images for two pairs of synthetic sources (issue 18's goal: >= 99%):

- ``demo``: the demo's capsule vs endoscope (gi_deploy/demo/synthetic.py);
- ``look-alike``: two endoscopes of one kind. Both draw the same scenes with the same renderer
  (same wide view, side bands, vessels, glare, findings); the second is another unit of the
  same model: its white balance is off by ``--gain`` (default 2%: red x1.02, blue x0.98) and its
  optics blur slightly (Gaussian, ``--blur`` radius, default 0.4 px at 64 px); both store JPEG at
  quality 92. A 2% cast is below what a viewer notices side by side.

Images are written as JPEG and read back through the runtime's decoder, the router is fitted
exactly as export fits it (gi_deploy.export.router.fit_logistic on core/router.py's features) on
the train images and scored on separate test images.

    python benchmarks/routing_goals.py --n 300 [--gain 0.02 --blur 0.4] [--check]

Goal (``--check`` exits 1 when NOT met): held-out routing accuracy >= 99% for each pair, the accuracy the
router's export gate requires (gi_deploy.export.router).
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
from _goals import Goals
from PIL import Image, ImageFilter

from gi_deploy.core.preprocess import load_input
from gi_deploy.core.router import ROUTER_SPEC, Router, router_features
from gi_deploy.demo.synthetic import CLASSES, render
from gi_deploy.export.router import ROUTER_MIN_ACCURACY, fit_logistic

GAIN, BLUR = 0.02, 0.4


def _second_unit(a: np.ndarray) -> Image.Image:
    img = np.clip(a.astype(np.float32) * np.array([1 + GAIN, 1.0, 1 - GAIN]), 0, 255).astype(np.uint8)
    return Image.fromarray(img).filter(ImageFilter.GaussianBlur(BLUR)) if BLUR > 0 else Image.fromarray(img)


def _write(folder: Path, kind: str, n: int, seed: int, px: int) -> list[Path]:
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        finding = CLASSES[i % len(CLASSES)]
        if kind == "endoscope-b":
            img, quality = _second_unit(render(finding, "endoscope", rng, px)), 92
        else:
            img, quality = Image.fromarray(render(finding, kind.removesuffix("-a"), rng, px)), 92
        paths.append(folder / f"{i:04d}.jpg")
        img.save(paths[-1], quality=quality)
    return paths


def _features(paths: list[Path]) -> np.ndarray:
    return router_features(np.stack([load_input(p, ROUTER_SPEC) for p in paths]))


def pair_accuracy(kinds: tuple[str, str], n: int, px: int, root: Path) -> tuple[float, np.ndarray]:
    xs, ys, txs, tys = [], [], [], []
    for i, kind in enumerate(kinds):
        xs.append(_features(_write(root / kind / "train", kind, n, 2 * i, px)))
        txs.append(_features(_write(root / kind / "test", kind, n, 2 * i + 1, px)))
        ys.append(np.full(n, i)), tys.append(np.full(n, i))
    mean, scale, w, b = fit_logistic(np.concatenate(xs), np.concatenate(ys), 2)
    router = Router(list(kinds), mean, scale, w, b)
    pred = router.probabilities_of_features(np.concatenate(txs)).argmax(1)
    truth = np.concatenate(tys)
    cm = np.zeros((2, 2), int)
    np.add.at(cm, (truth, pred), 1)
    return float((pred == truth).mean()), cm


def main(argv: list[str] | None = None) -> int:
    global GAIN, BLUR
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=300, help="train and test images per source")
    ap.add_argument("--px", type=int, default=64, help="image size (the demo's is 64)")
    ap.add_argument("--gain", type=float, default=GAIN, help="look-alike: white-balance difference")
    ap.add_argument("--blur", type=float, default=BLUR, help="look-alike: extra optical blur, px")
    ap.add_argument("--check", action="store_true", help="exit 1 when a goal is NOT met")
    args = ap.parse_args(argv)
    goals = Goals()
    GAIN, BLUR = args.gain, args.blur
    with tempfile.TemporaryDirectory() as tmp:
        for name, kinds in (("demo", ("capsule", "endoscope")), ("look-alike", ("endoscope-a", "endoscope-b"))):
            acc, cm = pair_accuracy(kinds, args.n, args.px, Path(tmp) / name)
            print(
                f"{name} ({kinds[0]} vs {kinds[1]}): held-out routing accuracy {acc:.2%} on {2 * args.n} test "
                f"images; confusion (true x routed) {cm.tolist()}"
            )
            goals.at_least(f"{name} routing accuracy", 100 * acc, 100 * ROUTER_MIN_ACCURACY, "%")
    return goals.finish(args.check)


if __name__ == "__main__":
    raise SystemExit(main())
