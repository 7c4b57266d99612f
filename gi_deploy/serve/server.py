"""``gi-deploy serve``: the deploy folder's models behind Triton's server core (PyTriton 0.7.0, the
serve extra), speaking KServe v2 over HTTP and gRPC, with dynamic batching, model instances, health
and readiness per model and Prometheus metrics. Torch-free: the models run on the runtime's backends
inside the served callables (serve/models.py); the bundled server core has only the Python backend.

Three things PyTriton does not do for us, done here:
- its Python-backend stubs load ``libpythonX.Y.so`` through the system's library path, not the running
  interpreter's: on a pyenv / non-system Python the server starts and then fails. The interpreter's
  LIBDIR goes first in ``LD_LIBRARY_PATH`` before the server process starts (it inherits it);
- it binds every interface (0.0.0.0) by default: every endpoint binds ``cfg.host`` (127.0.0.1 unless told);
- started in the background it ignores SIGINT: SIGTERM and SIGINT both stop it here, and Triton drains
  the requests in flight (``exit_timeout_secs``) before the process returns.
"""

from __future__ import annotations

import logging
import os
import signal
import sysconfig
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

from gi_deploy.errors import DependencyError, GiDeployError
from gi_deploy.runtime.backends.base import cpu_threads
from gi_deploy.serve.config import ServeConfig
from gi_deploy.serve.models import ServedModel, model_names, open_served

log = logging.getLogger(__name__)


@dataclass
class ServeInfo:
    """What is up: the endpoints and, per model, what each instance runs on."""

    http: str
    grpc: str
    metrics: str
    models: dict[str, list[str]] = field(default_factory=dict)


class ServerDied(GiDeployError):
    """The Triton server could not load the models, or it (or a model's proxy) exited while serving."""


def libpython_first(env: dict | None = None) -> str:
    """Put this interpreter's LIBDIR first in ``LD_LIBRARY_PATH`` of ``env`` (os.environ by default),
    so the Triton server and its Python-backend stubs, started after this, load this interpreter's
    libpython. Returns the new value."""
    env = os.environ if env is None else env
    libdir = sysconfig.get_config_var("LIBDIR") or ""
    parts = [p for p in env.get("LD_LIBRARY_PATH", "").split(os.pathsep) if p and p != libdir]
    env["LD_LIBRARY_PATH"] = os.pathsep.join([libdir, *parts] if libdir else parts)
    return env["LD_LIBRARY_PATH"]


def _require_pytriton():
    try:
        import pytriton.triton as pt
    except ImportError as e:
        raise DependencyError(
            f"gi-deploy serve needs the serve extra ({e}): pip install 'gi-deploy[serve]' (PyTriton "
            "0.7.0 needs numpy<2: give it its own environment, see docs/serving.md)"
        ) from e
    return pt


def load_models(cfg: ServeConfig) -> dict[str, list[ServedModel]]:
    """Every model ``cfg`` serves, ``cfg.instances`` instances each, loaded before any port opens
    (a missing bundle or router fails here, naming it)."""
    threads = cfg.threads or max(1, cpu_threads() // cfg.instances)
    return {
        name: [
            open_served(
                cfg.deploy_dir,
                name,
                cfg.backend,
                cfg.precision,
                cfg.device,
                threads,
                cfg.max_batch,
                int(cfg.max_image_mb * (1 << 20)),
            )
            for _ in range(cfg.instances)
        ]
        for name in model_names(cfg.deploy_dir, cfg.sources)
    }


def _bind(triton, name: str, instances: list[ServedModel], cfg: ServeConfig) -> None:
    from pytriton.model_config import DynamicBatcher, ModelConfig, Tensor

    m = instances[0]

    def tensors(defs):
        return [Tensor(name=t.name, dtype=t.dtype, shape=t.shape, optional=t.optional) for t in defs]

    triton.bind(
        model_name=name,
        infer_func=instances,
        inputs=tensors(m.inputs),
        outputs=tensors(m.outputs),
        config=ModelConfig(
            max_batch_size=cfg.max_batch,
            batching=True,
            batcher=DynamicBatcher(max_queue_delay_microseconds=int(cfg.max_queue_delay_ms * 1000)),
        ),
        strict=True,
    )
    # PyTriton's ModelConfig has no parameters field; the classes and preprocessing go into the model config
    # Triton serves (GET /v2/models/<name>/config) through the backend parameters it writes anyway.
    model = next(x for x in triton._model_manager.models if x.model_name == name)
    model._get_triton_model_config().backend_parameters.update(m.parameters)


# PyTriton 0.7's stubs give a second model instance 1 s (hard-coded) to find the first one's handshake socket:
# on a busy machine --instances > 1 can miss it and the model fails to load. A fresh start is the only remedy.
_HANDSHAKE_RACE = "Timeout occurred while waiting for config file"
START_ATTEMPTS = 3


def _started(pt, tc, models: dict[str, list[ServedModel]], cfg: ServeConfig):
    """A running Triton with every model bound and ready, started again (up to ``START_ATTEMPTS``) when a model
    instance lost PyTriton's handshake race."""
    from tritonclient.utils import InferenceServerException

    for attempt in range(1, START_ATTEMPTS + 1):
        triton = pt.Triton(config=tc)
        try:
            for name, instances in models.items():
                _bind(triton, name, instances, cfg)
            triton.run()
            return triton
        except InferenceServerException as e:
            triton.stop()
            if _HANDSHAKE_RACE not in str(e) or attempt == START_ATTEMPTS:
                raise ServerDied(f"Triton could not load the models (attempt {attempt}): {e}") from e
            log.warning("a model instance missed PyTriton's start-up handshake (a busy machine); starting again")
    raise AssertionError("unreachable")


def serve(
    cfg: ServeConfig, on_ready: Callable[[ServeInfo], None] | None = None, stop: threading.Event | None = None
) -> ServeInfo:
    """Load the models, start Triton on ``cfg``'s address and ports, call ``on_ready`` once every model
    is ready, and serve until SIGTERM / SIGINT (in the main thread) or ``stop`` is set; then drain the
    requests in flight (up to ``cfg.drain_s``) and return. Raises DependencyError without the serve extra,
    BundleError / ConfigError for the deploy folder (before any port opens), ServerDied when Triton exits
    on its own."""
    pt = _require_pytriton()
    models = load_models(cfg)
    libpython_first()
    stop = stop or threading.Event()
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):  # SIGINT too: a background job inherits it ignored
            signal.signal(sig, lambda *_: stop.set())
    h = cfg.host if ":" not in cfg.host else f"[{cfg.host}]"
    info = ServeInfo(
        http=f"http://{h}:{cfg.http_port}",
        grpc=f"{h}:{cfg.grpc_port}",
        metrics=f"http://{h}:{cfg.metrics_port}/metrics",
        models={n: [f"{s}: {b[0]}" for s, b in ms[0].strategy.backends().items()] for n, ms in models.items()},
    )
    tc = pt.TritonConfig(
        http_address=cfg.host,
        http_port=cfg.http_port,
        grpc_address=cfg.host,
        grpc_port=cfg.grpc_port,
        metrics_address=cfg.host,
        metrics_port=cfg.metrics_port,
        allow_metrics=True,
        allow_gpu_metrics=False,
        exit_timeout_secs=cfg.drain_s,
        strict_readiness=True,
    )
    triton = _started(pt, tc, models, cfg)
    try:
        if on_ready:
            on_ready(info)
        while not stop.wait(0.5):
            if not triton.is_alive():
                raise ServerDied(
                    "the Triton server (or a model's proxy) exited while serving; rerun with -v to see its log"
                )
        log.info("stopping: draining the requests in flight (up to %d s)", cfg.drain_s)
    finally:
        triton.stop()
    return info
