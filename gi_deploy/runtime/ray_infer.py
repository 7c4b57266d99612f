"""``gi-deploy infer --ray``: the same job as runtime/infer.py, on a Ray cluster through Ray Data.

The driver (this process) plans and opens the job exactly as a local run does (runtime/job.py:
inputs, outputs, labels, the lock, what a resumed CSV already holds) with the strategy's manifests,
without loading a model. Ray Data then runs two stages over the images still to classify:

1. ``map_batches(_decode)``: Ray tasks read and decode each batch with the shared decoder
   (``gi_deploy.runtime.decode.cpu.decode_batch``, the one the local run and training use), so an
   unreadable file becomes an error entry, never a failed task;
2. ``map_batches(_Classifier, compute=ActorPoolStrategy(size=N), num_gpus=G)``: a pool of N actors, each holding the
   run's strategy (every selected bundle, or the router and its models for ``--source auto``) on any
   backend ``infer`` has, turns the pixels into answers.

The answers stream back to the driver, which writes them with the job's own rows (same columns, same
error rows, flushed as they come, in completion order) and finishes the job as a local run does. So
``--resume``, the sidecar of models, ``--parquet`` and every other guarantee are the same.

Ray is imported only here, inside the functions: the runtime-only install does not need it (it is
the ``scale`` extra). ``ray.init(address)`` joins a running cluster (``ray start --head`` is the
user's); with no address ``ray.init()`` joins RAY_ADDRESS or the cluster started on this node, else
starts a local Ray on this machine.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from gi_deploy.core.fields import helped
from gi_deploy.core.preprocess import PreprocessSpec
from gi_deploy.errors import ConfigError, DependencyError
from gi_deploy.runtime.decode.cpu import decode_batch
from gi_deploy.runtime.infer import open_strategy
from gi_deploy.runtime.inputs import collect_inputs
from gi_deploy.runtime.job import Answer, Answered, InferConfig, InferResult, plan_job, run_job


@dataclass
class RayOptions:
    address: str | None = helped(
        None,
        "Ray cluster to join (HOST:6379, ray://HOST:10001, 'auto'); none: as "
        "ray.init() does: RAY_ADDRESS, else the cluster `ray start` started on this "
        "node, else a new local Ray on this machine, shut down with the run.",
    )
    actors: int | None = helped(None, "Classifier actors (none: one per GPU of the cluster, else one per 4 CPUs).")
    gpus_per_actor: float | None = helped(
        None, "GPUs each actor holds (none: 1 when the cluster has GPUs and --device is not cpu, else 0)."
    )
    cpus_per_actor: float = helped(1.0, "CPUs each actor holds (its model's threads).")

    def __post_init__(self) -> None:
        if self.actors is not None and self.actors < 1:
            raise ConfigError(f"--ray-actors must be >= 1, got {self.actors}")
        if self.cpus_per_actor <= 0 or (self.gpus_per_actor is not None and self.gpus_per_actor < 0):
            raise ConfigError("--ray-cpus-per-actor must be > 0 and --ray-gpus-per-actor >= 0")


def _decode(batch: dict, specs: tuple[PreprocessSpec, ...]) -> dict:
    """Ray task: decode one batch of paths with the shared decoder. Columns: path, error ("" when
    readable), and ``x<j>`` the pixels under specs[j] (an unreadable image's rows are zeros)."""
    paths = [Path(p) for p in batch["path"]]
    decoded = decode_batch(paths, specs)
    good = np.array([e is None for e in decoded.errors], dtype=bool)
    out = {"path": np.asarray(batch["path"]), "error": np.array([e or "" for e in decoded.errors], dtype=object)}
    for j, (x, spec) in enumerate(zip(decoded.inputs, specs)):
        full = np.zeros((len(paths), *x.shape[1:]) if x.ndim == 4 else (len(paths), *spec.size, 3), dtype=x.dtype)
        full[good] = x
        out[f"x{j}"] = full
    return out


def _encode(answers: list[Answer]) -> str:
    return json.dumps(
        [[a.source, None if a.probs is None else a.probs.tolist(), a.extra, a.rejected, a.reason] for a in answers]
    )


def _decode_answers(text: str) -> list[Answer]:
    return [
        Answer(s, None if p is None else np.asarray(p, dtype=np.float32), extra, rejected, reason)
        for s, p, extra, rejected, reason in json.loads(text)
    ]


class _Classifier:
    """Ray actor: opens the run's strategy once (every selected bundle, or the router and its
    models) and answers the decoded batches. Columns out: path, error, ``answers`` (JSON per image:
    one answer per slot; "" on error rows) and ``backend`` (JSON: each source's provider and notes)."""

    def __init__(self, cfg: InferConfig):
        self.strategy = open_strategy(cfg)
        self.backends = json.dumps(self.strategy.backends())

    def __call__(self, batch: dict) -> dict:
        good = np.array([not e for e in batch["error"]], dtype=bool)
        n = len(good)
        answers = iter(
            self.strategy.classify([batch[f"x{j}"][good] for j in range(len(self.strategy.specs))])
            if good.any()
            else []
        )
        return {
            "path": batch["path"],
            "error": batch["error"],
            "backend": np.array([self.backends] * n, dtype=object),
            "answers": np.array([_encode(next(answers)) if g else "" for g in good], dtype=object),
        }


def _ray():
    try:
        import ray  # lazy: the scale extra's, only for --ray
        import ray.data  # noqa: F401
    except ImportError as e:
        raise DependencyError(
            f"`gi-deploy infer --ray` needs Ray Data ({e}); install it with: pip install 'gi-deploy[scale]'"
        ) from e
    return ray


def _connect(ray, address: str | None) -> bool:
    """Join (or start) Ray; True when this call started a local Ray that the run must shut down."""
    if ray.is_initialized():  # a caller (a notebook, the tests) already joined a cluster
        return False
    ray.init(address=address, include_dashboard=False, log_to_driver=False, configure_logging=False)
    started = address is None and not os.environ.get("RAY_ADDRESS")
    if started:
        node = getattr(getattr(ray, "_private", None) and ray._private.worker, "_global_node", None)
        pids = [p.process.pid for procs in getattr(node, "all_processes", {}).values() for p in procs]
        start_reaper(pids)
    return started


# Run in a child process that the kernel signals when this driver dies (even by SIGKILL, which runs no
# atexit and no `finally`): it then kills the local Ray's processes this run started, so none outlive it.
_REAPER = """
import ctypes, os, signal, sys
def reap(*_):
    for pid in map(int, sys.argv[2:]):
        try:
            os.kill(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    os._exit(0)
signal.signal(signal.SIGTERM, reap)
ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
if os.getppid() != int(sys.argv[1]):  # the driver died before the line above
    reap()
print("armed", flush=True)
sys.stdout.close()
while True:
    signal.pause()
"""


def start_reaper(pids: list[int]):
    """A watchdog process that kills ``pids`` when this process dies, however it dies (Linux; elsewhere
    None: ``ray.shutdown()`` at the end of a run is all there is). Killed quietly (SIGKILL, no reaping)
    by the caller once it has shut Ray down itself."""
    import subprocess
    import sys

    if not pids or not sys.platform.startswith("linux"):
        return None
    reaper = subprocess.Popen(
        [sys.executable, "-c", _REAPER, str(os.getpid()), *map(str, pids)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    reaper.stdout.readline()  # "armed": from here on this process's death reaches it
    reaper.stdout.close()
    _REAPERS.append(reaper)
    return reaper


_REAPERS: list = []


def _placement(ray, cfg: InferConfig, opts: RayOptions) -> tuple[int, float]:
    """(actors, GPUs per actor) from the options and the cluster's resources."""
    resources = ray.cluster_resources()
    gpus = resources.get("GPU", 0.0)
    per_actor = (
        opts.gpus_per_actor if opts.gpus_per_actor is not None else (1.0 if gpus >= 1 and cfg.device != "cpu" else 0.0)
    )
    if per_actor > gpus:
        raise ConfigError(
            f"--ray-gpus-per-actor {per_actor} but the Ray cluster has {gpus:g} GPU(s); "
            "use --ray-gpus-per-actor 0 or join a cluster with GPUs"
        )
    actors = opts.actors or (int(gpus // per_actor) if per_actor else max(1, int(resources.get("CPU", 1) // 4)))
    return actors, per_actor


def infer_on_ray(
    cfg: InferConfig, opts: RayOptions | None = None, progress: Callable[[int, int], None] | None = None
) -> InferResult:
    """Run ``infer_folder``'s job on Ray Data: same strategy (one source, several, or ``auto``), same
    CSV columns and rows (in completion order, not input order), same error rows, sidecar, metrics
    and ``--resume``. ``progress(done, total)`` after every batch that comes back, so its rate is the
    whole cluster's images/s.

    Every path must be readable at the same location on every node (shared storage). Raises
    DependencyError without the scale extra, ConfigError for a GPU request the cluster cannot
    meet or for ``--decode gpu`` (Ray decodes on the CPU), DataError with ``cfg.strict`` at the
    first unreadable file."""
    opts = opts or RayOptions()
    if cfg.decode == "gpu":  # Ray's tasks decode with Pillow; the GPU decoder feeds a model in its own process
        raise ConfigError(
            "--decode gpu is not available with --ray: Ray tasks decode on the CPU (Pillow) before the "
            "actors' models; drop --decode, or run without --ray to decode on the GPU"
        )
    ray = _ray()
    inputs = collect_inputs(cfg.inputs, cfg.labels)
    strategy = open_strategy(cfg, load=False)  # manifests and router only: the actors load the models
    job = plan_job(cfg, inputs, strategy)
    started = _connect(ray, opts.address)
    try:
        actors, gpus_per_actor = _placement(ray, cfg, opts)
        backends: dict[str, tuple[str, list[str]]] = {}

        def batches(todo: list) -> Iterator[Answered]:
            if not todo:
                return
            by_name = {str(p): p for p in todo}
            ctx = ray.data.DataContext.get_current()
            ctx.enable_progress_bars = False  # ours shows the cluster-wide rate
            ds = ray.data.from_items(
                [{"path": str(p)} for p in todo], override_num_blocks=max(1, -(-len(todo) // cfg.batch_size))
            )
            ds = ds.map_batches(_decode, batch_size=cfg.batch_size, fn_kwargs={"specs": strategy.specs})
            ds = ds.map_batches(
                _Classifier,
                batch_size=cfg.batch_size,
                num_gpus=gpus_per_actor,
                compute=ray.data.ActorPoolStrategy(size=actors),  # `concurrency=` before 2.51
                num_cpus=opts.cpus_per_actor,
                fn_constructor_kwargs={"cfg": _actor_config(cfg, opts)},
            )
            for out in ds.iter_batches(batch_size=None, batch_format="numpy", prefetch_batches=2):
                if not backends and len(out["backend"]):
                    backends.update({s: (v[0], v[1]) for s, v in json.loads(out["backend"][0]).items()})
                errors = [e or None for e in out["error"]]
                yield Answered(
                    [by_name[p] for p in out["path"]],
                    errors,
                    [_decode_answers(a) for a, e in zip(out["answers"], errors) if e is None],
                )

        def ran() -> dict[str, tuple[str, list[str]]]:
            got = backends or {s: ("ray (nothing classified in this run)", []) for s in strategy.bundles}
            return {
                s: (f"{p} on Ray ({actors} actor(s), {gpus_per_actor:g} GPU each)", notes)
                for s, (p, notes) in got.items()
            }

        return run_job(cfg, job, batches, progress, backends=ran)
    finally:
        if started:  # a local Ray this run started: its processes end with the run
            ray.shutdown()
            while _REAPERS:
                _REAPERS.pop().kill()


def _actor_config(cfg: InferConfig, opts: RayOptions) -> InferConfig:
    """The run's config as each actor opens its strategy: its own CPU threads, no outputs of its own."""
    from dataclasses import replace

    return replace(cfg, threads=cfg.threads or max(1, int(opts.cpus_per_actor)), parquet_dir=None)
