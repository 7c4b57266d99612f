"""Peak memory of `gi-deploy infer` against the number of images: it must stay flat (bounded
prefetch queues, rows streamed to the CSV), so a 100k-frame folder costs what 1k frames cost.

Each size runs in its own process (peak RSS is per process); the list file repeats a folder's
images, so no 100k files are needed. Decode workers are measured too (RUSAGE_CHILDREN: the largest
child's peak).

    python benchmarks/infer_memory.py --deploy deploy --images data/capsule/test --sizes 1000,10000,100000 [--check]

Goal (``--check`` exits 1 when NOT met): flat, i.e. the main process's peak at the largest size at most
``FLAT`` (1.5x) its peak at the smallest. The list of paths itself grows with the images (100k paths: ~30 MiB),
so "flat" allows that, not a copy of every decoded image.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _goals import Goals

FLAT = 1.5

CHILD = """
import json, resource, sys, time
from gi_deploy.runtime.infer import InferConfig, infer_folder
t = time.perf_counter()
r = infer_folder(InferConfig(inputs=sys.argv[1], deploy_dir=sys.argv[2], out_csv=sys.argv[3], batch_size=32))
print(json.dumps({"seconds": time.perf_counter() - t, "rows": sum(s.n_rows for s in r.sources.values()),
                  "main_peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "worker_peak_mib": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}))
"""


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--deploy", type=Path, required=True)
    ap.add_argument("--images", type=Path, required=True, help="a folder of images to repeat")
    ap.add_argument("--sizes", default="1000,10000,100000")
    ap.add_argument("--check", action="store_true", help="exit 1 when the goal is NOT met")
    args = ap.parse_args(argv)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from gi_deploy.core.preprocess import list_images

    images = [p.resolve() for p in list_images(args.images)]
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in (int(s) for s in args.sizes.split(",")):
            listing = Path(tmp) / f"list_{n}.txt"
            listing.write_text("".join(f"{images[i % len(images)]}\n" for i in range(n)))
            t = time.perf_counter()
            out = subprocess.run(
                [sys.executable, "-c", CHILD, str(listing), str(args.deploy), str(Path(tmp) / f"pred_{n}.csv")],
                capture_output=True,
                text=True,
                check=True,
            )
            r = json.loads(out.stdout.strip().splitlines()[-1])
            r.update(images=n, wall_s=time.perf_counter() - t)
            results.append(r)
            print(
                f"{n:>7} images: {r['rows']} rows in {r['seconds']:.1f}s ({n / r['seconds']:.0f} img/s); peak RSS "
                f"main {r['main_peak_mib']:.0f} MiB, largest decode worker {r['worker_peak_mib']:.0f} MiB",
                flush=True,
            )
    first, last = results[0], results[-1]
    goals = Goals()
    goals.at_most(
        f"main-process peak at {last['images']} / at {first['images']} images",
        last["main_peak_mib"] / first["main_peak_mib"],
        FLAT,
        "x",
    )
    return goals.finish(args.check)


if __name__ == "__main__":
    raise SystemExit(main())
