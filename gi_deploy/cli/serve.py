"""``gi-deploy serve``: the deploy folder's models behind Triton's server core (the serve extra),
KServe v2 over HTTP and gRPC. PyTriton is imported inside the library call, so the CLI loads without it."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

from gi_deploy.cli._display import arg, err, opt, out, reported
from gi_deploy.core.choices import BackendName, Device, Precision
from gi_deploy.core.fields import default_of
from gi_deploy.serve.config import ServeConfig
from gi_deploy.serve.server import ServeInfo, serve

S = ServeConfig


def _ready(info: ServeInfo) -> None:
    for name, lines in info.models.items():
        out.print(f"model {name}: " + "; ".join(lines), soft_wrap=True)
    out.print(
        f"ready: HTTP {info.http}  gRPC {info.grpc}  metrics {info.metrics}  (SIGTERM or Ctrl-C drains and stops)",
        soft_wrap=True,
    )


def serve_cmd(
    deploy_dir: Annotated[Path, arg(S, "deploy_dir", metavar="DEPLOY_DIR")] = default_of(S, "deploy_dir"),
    source: Annotated[list[str] | None, opt(S, "sources", "--source")] = None,
    host: Annotated[str, opt(S, "host")] = default_of(S, "host"),
    http_port: Annotated[int, opt(S, "http_port")] = default_of(S, "http_port"),
    grpc_port: Annotated[int, opt(S, "grpc_port")] = default_of(S, "grpc_port"),
    metrics_port: Annotated[int, opt(S, "metrics_port")] = default_of(S, "metrics_port"),
    max_batch: Annotated[int, opt(S, "max_batch")] = default_of(S, "max_batch"),
    max_queue_delay_ms: Annotated[float, opt(S, "max_queue_delay_ms")] = default_of(S, "max_queue_delay_ms"),
    instances: Annotated[int, opt(S, "instances")] = default_of(S, "instances"),
    threads: Annotated[int | None, opt(S, "threads")] = None,
    backend: Annotated[BackendName, opt(S, "backend")] = BackendName(default_of(S, "backend")),
    precision: Annotated[Precision, opt(S, "precision")] = Precision(default_of(S, "precision")),
    device: Annotated[Device, opt(S, "device")] = Device(default_of(S, "device")),
    max_image_mb: Annotated[float, opt(S, "max_image_mb")] = default_of(S, "max_image_mb"),
    drain_s: Annotated[int, opt(S, "drain_s")] = default_of(S, "drain_s"),
) -> None:
    """Serve each source's model (and `auto` where the folder has a router) over KServe v2 HTTP and gRPC
    (Triton's server core): send an encoded JPEG/PNG, get the probabilities, label and confidence."""
    with reported():
        cfg = ServeConfig(
            deploy_dir=deploy_dir,
            sources=source,
            host=host,
            http_port=http_port,
            grpc_port=grpc_port,
            metrics_port=metrics_port,
            max_batch=max_batch,
            max_queue_delay_ms=max_queue_delay_ms,
            instances=instances,
            threads=threads,
            backend=backend.value,
            precision=precision.value,
            device=device.value,
            max_image_mb=max_image_mb,
            drain_s=drain_s,
        )
        if not cfg.is_loopback:
            err.print(
                f"warning: binding {cfg.host}: the endpoints are reachable from other machines, with no "
                "authentication; put them behind your network's access control",
                style="bold yellow",
                soft_wrap=True,
            )
        serve(cfg, on_ready=_ready)
    out.print("stopped: in-flight requests drained", soft_wrap=True)
