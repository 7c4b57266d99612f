"""TorchScript vs dynamo ONNX exporter, side by side on the same models: export time, parity with
torch (max |Δlogit| in onnxruntime, batch 1 and batch 3), node count. The evidence behind
``gi-deploy export``'s default exporter (gi_deploy/export/onnx_export.py).

    python benchmarks/exporter_parity.py --models convnextv2_atto,convnextv2_tiny,resnet50 --img-size 224
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import timm
import torch

from gi_deploy.export import onnx_export


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="convnextv2_atto,convnextv2_tiny,resnet50")
    ap.add_argument("--img-size", type=int, default=224)
    ap.add_argument("--classes", type=int, default=11)
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            torch.manual_seed(0)
            model = timm.create_model(name, num_classes=args.classes, pretrained=False).eval()
            x = torch.randn(4, 3, args.img_size, args.img_size, generator=torch.Generator().manual_seed(1))
            with torch.no_grad():
                ref = model(x).numpy()
            for exporter in onnx_export.EXPORTERS:
                path = Path(tmp) / f"{name}-{exporter}.onnx"
                t0 = time.perf_counter()
                opset = onnx_export.export_onnx(model, path, (args.img_size, args.img_size), exporter=exporter).opset
                seconds = time.perf_counter() - t0
                out, _ = onnx_export.run_onnx(path, x.numpy())
                nodes = len(onnx.load(str(path), load_external_data=False).graph.node)
                rows.append(
                    (
                        name,
                        exporter,
                        opset,
                        seconds,
                        float(np.abs(out - ref).max()),
                        bool((out.argmax(1) == ref.argmax(1)).all()),
                        nodes,
                    )
                )
                print(
                    f"{name:18s} {exporter:11s} opset {opset}  export {seconds:6.1f}s  "
                    f"max|Δlogit| {rows[-1][4]:.2e}  top-1 equal {rows[-1][5]}  nodes {nodes}",
                    flush=True,
                )
    print("\n| model | exporter | opset | export s | max abs Δlogit vs torch | top-1 equal | nodes |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r[0]} | {r[1]} | {r[2]} | {r[3]:.1f} | {r[4]:.2e} | {r[5]} | {r[6]} |")


if __name__ == "__main__":
    main()
