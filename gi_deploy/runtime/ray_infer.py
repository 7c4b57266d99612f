"""``gi-deploy infer --ray``: the same job as runtime/infer.py, on a Ray cluster through Ray Data.

The driver (this process) plans the job exactly as a local run does (``plan_job``: inputs, labels,
what a resumed CSV already holds) from the bundles' manifests, without loading a model. Ray Data
then runs two stages over the image list:

1. ``map_batches(_decode)``: Ray tasks read and decode each batch with the shared decoder
   (``gi_deploy.runtime.decode.cpu.decode_batch``, the one the local run and training use), so an
   unreadable file becomes an error entry, never a failed task;
2. ``map_batches(_Classifier, compute=ActorPoolStrategy(size=N), num_gpus=G)``: a pool of N actors, each holding every
   selected bundle's session on any backend ``infer`` has, turns the pixels into probabilities.

The results stream back to the driver, which writes the predictions CSV with the local run's own
``write_rows`` (same columns, same error rows, flushed as they come, in completion order) and scores
it with ``finish_job``. So ``--resume`` works the same way: the rows already in the CSV are skipped.

Ray is imported only here, inside the functions: the runtime-only install does not need it (it is
the ``scale`` extra). ``ray.init(address)`` joins a running cluster (``ray start --head`` is the
user's); with no address ``ray.init()`` joins RAY_ADDRESS or the cluster started on this node, else
starts a local Ray on this machine.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from gi_deploy.core.bundles import BundleManifest, read_bundle_manifest, resolve_bundle_dirs
from gi_deploy.core.fields import helped
from gi_deploy.core.metrics import softmax
from gi_deploy.core.preprocess import PreprocessSpec
from gi_deploy.errors import ConfigError, DependencyError
from gi_deploy.runtime.infer import InferConfig, InferResult, check_out_path, finish_job, open_csv, plan_job, write_rows
from gi_deploy.runtime.inputs import collect_inputs
from gi_deploy.runtime.decode.cpu import decode_batch


@dataclass
class RayOptions:
    address: str | None = helped(None, "Ray cluster to join (HOST:6379, ray://HOST:10001, 'auto'); none: as "
                                       "ray.init() does: RAY_ADDRESS, else the cluster `ray start` started on this "
                                       "node, else a new local Ray on this machine.")
    actors: int | None = helped(None, "Classifier actors (none: one per GPU of the cluster, else one per 4 CPUs).")
    gpus_per_actor: float | None = helped(None, "GPUs each actor holds (none: 1 when the cluster has GPUs and "
                                                "--device is not cpu, else 0).")
    cpus_per_actor: float = helped(1.0, "CPUs each actor holds (its model's threads).")
    parquet_dir: Path | None = helped(None, "Also write the predictions as Parquet shards into this folder.")

    def __post_init__(self) -> None:
        if self.actors is not None and self.actors < 1:
            raise ConfigError(f"--ray-actors must be >= 1, got {self.actors}")
        if self.cpus_per_actor <= 0 or (self.gpus_per_actor is not None and self.gpus_per_actor < 0):
            raise ConfigError("--ray-cpus-per-actor must be > 0 and --ray-gpus-per-actor >= 0")


@dataclass(frozen=True)
class _BundleInfo:
    """What the driver needs of a bundle to plan and write rows; the model stays on the actors."""

    path: Path
    source: str
    classes: list[str]
    preprocess: PreprocessSpec
    manifest: BundleManifest  # the model that writes this source's rows is recorded in the CSV's sidecar


def _bundle_info(bundle_dir: Path) -> _BundleInfo:
    m = read_bundle_manifest(bundle_dir)
    return _BundleInfo(bundle_dir, m.source, list(m.classes), m.preprocess, m)


def _decode(batch: dict, specs: tuple[PreprocessSpec, ...]) -> dict:
    """Ray task: decode one batch of paths with the shared decoder. Columns: path, error ("" when
    readable), and ``x<j>`` the pixels under specs[j] (an unreadable image's rows are zeros)."""
    paths = [Path(p) for p in batch["path"]]
    decoded = decode_batch(paths, specs)
    good = np.array([e is None for e in decoded.errors], dtype=bool)
    out = {"path": np.asarray(batch["path"]), "error": np.array([e or "" for e in decoded.errors], dtype=object)}
    for j, (x, spec) in enumerate(zip(decoded.inputs, specs)):
        full = np.zeros((len(paths), *x.shape[1:]) if x.ndim == 4 else (len(paths), 3, *spec.size), dtype=x.dtype)
        full[good] = x
        out[f"x{j}"] = full
    return out


class _Classifier:
    """Ray actor: opens every selected bundle once (as ``load_bundle`` does for a local run) and
    classifies the decoded batches. Columns out: path, error, ``p<i>`` bundle i's probabilities
    (zeros on error rows) and ``backend`` (JSON: each source's provider and notes)."""

    def __init__(self, dirs: list[str], precision: str, device: str, backend: str, threads: int | None,
                 spec_of: list[int]):
        from gi_deploy.runtime.loader import load_bundle

        self.bundles = [load_bundle(Path(d), precision, device, backend=backend, threads=threads) for d in dirs]
        self.spec_of = spec_of
        self.backends = json.dumps({b.source: [b.provider, list(b.backend.notes)] for b in self.bundles})

    def __call__(self, batch: dict) -> dict:
        good = np.array([not e for e in batch["error"]], dtype=bool)
        n = len(good)
        out = {"path": batch["path"], "error": batch["error"], "backend": np.array([self.backends] * n, dtype=object)}
        for i, (b, j) in enumerate(zip(self.bundles, self.spec_of)):
            p = softmax(b.predict_logits(batch[f"x{j}"][good])) if good.any() else None
            full = np.zeros((n, len(b.classes)), dtype=p.dtype if p is not None else np.float32)
            if p is not None:
                full[good] = p
            out[f"p{i}"] = full
        return out


def _ray():
    try:
        import ray  # lazy: the scale extra's, only for --ray
        import ray.data  # noqa: F401
    except ImportError as e:
        raise DependencyError(f"`gi-deploy infer --ray` needs Ray Data ({e}); install it with: "
                              "pip install 'gi-deploy[scale]'") from e
    return ray


def _connect(ray, address: str | None) -> None:
    if ray.is_initialized():  # a caller (a notebook, the tests) already joined a cluster
        return
    ray.init(address=address, include_dashboard=False, log_to_driver=False, configure_logging=False)


def _placement(ray, cfg: InferConfig, opts: RayOptions) -> tuple[int, float]:
    """(actors, GPUs per actor) from the options and the cluster's resources."""
    resources = ray.cluster_resources()
    gpus = resources.get("GPU", 0.0)
    per_actor = opts.gpus_per_actor if opts.gpus_per_actor is not None else (
        1.0 if gpus >= 1 and cfg.device != "cpu" else 0.0)
    if per_actor > gpus:
        raise ConfigError(f"--ray-gpus-per-actor {per_actor} but the Ray cluster has {gpus:g} GPU(s); "
                          "use --ray-gpus-per-actor 0 or join a cluster with GPUs")
    actors = opts.actors or (int(gpus // per_actor) if per_actor else max(1, int(resources.get("CPU", 1) // 4)))
    return actors, per_actor


def infer_on_ray(cfg: InferConfig, opts: RayOptions | None = None,
                 progress: Callable[[int, int], None] | None = None) -> InferResult:
    """Run ``infer_folder``'s job on Ray Data: same CSV columns and rows (in completion order,
    not input order), same error rows, same metrics files, same ``--resume``. ``progress(done,
    total)`` after every batch that comes back, so its rate is the whole cluster's images/s.

    Every path must be readable at the same location on every node (shared storage). Raises
    DependencyError without the scale extra, ConfigError for a GPU request the cluster cannot
    meet, DataError with ``cfg.strict`` at the first unreadable file."""
    opts = opts or RayOptions()
    ray = _ray()
    dirs = resolve_bundle_dirs(cfg.deploy_dir, cfg.sources)
    inputs = collect_inputs(cfg.inputs, cfg.labels)
    check_out_path(cfg, inputs)  # never over an input, nor inside the input folder
    job = plan_job(cfg, inputs, [_bundle_info(d) for d in dirs])
    _connect(ray, opts.address)
    actors, gpus_per_actor = _placement(ray, cfg, opts)
    by_name = {str(p): p for p in job.todo}
    start, n_done, n_classified = time.perf_counter(), 0, 0
    backends: dict[str, tuple[str, list[str]]] = {}
    with open_csv(cfg, job) as (f, writer):
        if job.todo:
            ctx = ray.data.DataContext.get_current()
            ctx.enable_progress_bars = False  # ours shows the cluster-wide rate
            ds = ray.data.from_items([{"path": str(p)} for p in job.todo],
                                     override_num_blocks=max(1, -(-len(job.todo) // cfg.batch_size)))
            ds = ds.map_batches(_decode, batch_size=cfg.batch_size, fn_kwargs={"specs": job.specs})
            ds = ds.map_batches(_Classifier, batch_size=cfg.batch_size, num_gpus=gpus_per_actor,
                                compute=ray.data.ActorPoolStrategy(size=actors),  # `concurrency=` before 2.51
                                num_cpus=opts.cpus_per_actor,
                                fn_constructor_kwargs=dict(dirs=[str(d) for d in dirs], precision=cfg.precision,
                                                           device=cfg.device, backend=cfg.backend,
                                                           threads=cfg.threads or max(1, int(opts.cpus_per_actor)),
                                                           spec_of=job.spec_of))
            for out in ds.iter_batches(batch_size=None, batch_format="numpy", prefetch_batches=2):
                paths = [by_name[p] for p in out["path"]]
                good = np.array([not e for e in out["error"]], dtype=bool)
                probs = [out[f"p{i}"][good] for i in range(len(job.bundles))]
                write_rows(cfg, job, writer, f, paths, [e or None for e in out["error"]], probs)
                if not backends and len(out["backend"]):
                    backends = {s: (v[0], v[1]) for s, v in json.loads(out["backend"][0]).items()}
                n_done += len(paths)
                n_classified += int(good.sum())
                if progress:
                    progress(n_done, len(job.todo))
    seconds = time.perf_counter() - start
    if not backends:  # nothing left to classify (a finished job resumed)
        backends = {b.source: ("ray (nothing classified in this run)", []) for b in job.bundles}
    result = finish_job(cfg, job, {s: (f"{p} on Ray ({actors} actor(s), {gpus_per_actor:g} GPU each)", notes)
                                   for s, (p, notes) in backends.items()}, n_classified, seconds)
    if opts.parquet_dir is not None:
        ray.data.read_csv(str(cfg.out_csv.resolve())).write_parquet(str(opts.parquet_dir.resolve()))
    return result
