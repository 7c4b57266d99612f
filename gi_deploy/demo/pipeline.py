"""The main job on an embedded default, end to end on CPU in a few minutes.

No ImageNet weights can be downloaded everywhere, so the demo first trains its own small base
(``convnextv2_atto``, full fine-tuning) on both sources pooled, then fits one LoRA adapter per
source on that base through ``weights=`` (the path a user's local checkpoint takes), exports the
three models, and scores every model on every source's test set. Synthetic data: it shows the
pipeline, not clinical accuracy.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from gi_deploy.core.runs import FULL_WEIGHTS
from gi_deploy.demo.config import BASE, MODEL, DemoConfig
from gi_deploy.demo.synthetic import write_source
from gi_deploy.export.writer import ExportConfig, export_runs
from gi_deploy.runtime.infer import InferConfig, infer_folder
from gi_deploy.training.config import TrainConfig
from gi_deploy.training.trainer import train


@dataclass
class DemoResult:
    out_dir: Path
    seconds: float
    # scores[model][test source] = metrics dict of that bundle on that source's test folder
    scores: dict[str, dict[str, dict]] = field(default_factory=dict)
    params: dict[str, tuple[int, int]] = field(default_factory=dict)
    verification: dict[str, dict] = field(default_factory=dict)


def _pool(data_dir: Path, sources: tuple[str, ...], pooled: Path) -> None:
    """Copy every source's train/ and val/ images into one tree for the base model."""
    for source in sources:
        for split in ("train", "val"):
            for f in (data_dir / source / split).rglob("*.jpg"):
                dst = pooled / split / f.relative_to(data_dir / source / split)
                dst.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(f, dst)


def run_demo(cfg: DemoConfig, say: Callable[[str], None] = print) -> DemoResult:
    t0 = time.time()
    out = Path(cfg.out_dir)
    data, runs, deploy = out / "data", out / "runs", out / "deploy"
    shutil.rmtree(data, ignore_errors=True)
    for source in cfg.sources:
        write_source(data, source, seed=cfg.seed, size=cfg.image_px, split_sizes=cfg.split_sizes)
    _pool(data, cfg.sources, data / "pooled")
    say(f"data: synthetic {', '.join(cfg.sources)} images under {data}")
    result = DemoResult(out_dir=out, seconds=0.0)
    common = dict(model=MODEL, img_size=cfg.img_size, batch_size=cfg.batch_size, seed=cfg.seed, out_dir=runs,
                  device="cpu", overwrite=True)  # the demo regenerates its data, so its runs are stale
    say(f"train {BASE}: {MODEL} from random init, full fine-tuning on all sources pooled")
    r = train(TrainConfig(source=BASE, data_dir=data / "pooled", method="full", pretrained=False,
                          epochs=cfg.base_epochs, patience=cfg.base_epochs, lr=cfg.base_lr, **common))
    result.params[BASE] = (r.trainable_params, r.total_params)
    for source in cfg.sources:
        say(f"train {source}: LoRA r=16 on the {BASE} weights")
        r = train(TrainConfig(source=source, data_dir=data / source, method="lora",
                              weights=runs / BASE / FULL_WEIGHTS, epochs=cfg.lora_epochs,
                              patience=cfg.lora_epochs, lr=cfg.lora_lr, **common))
        result.params[source] = (r.trainable_params, r.total_params)
    say("export: merge, ONNX, verify")
    bundles = export_runs(ExportConfig(runs_dir=runs, deploy_dir=deploy, sources=[BASE, *cfg.sources]))
    result.verification = {name: r.manifest["verification"] for name, r in bundles.items()}
    models = [BASE, *cfg.sources]
    result.scores = {model: {} for model in models}
    for source in cfg.sources:  # every model on each test set in one pass: each image decoded once
        res = infer_folder(InferConfig(inputs=data / source / "test", deploy_dir=deploy, sources=models,
                                       out_csv=out / "predictions" / f"{source}_test.csv"))
        for model in models:
            result.scores[model][source] = res.sources[model].metrics
    result.seconds = time.time() - t0
    return result
