"""``gi-deploy serve``'s settings, validated when built (the CLI, the Python API and the tests build the
same object). No PyTriton import: the CLI reads the help without the serve extra."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from pathlib import Path

from gi_deploy.core.choices import BACKENDS, PRECISIONS
from gi_deploy.core.fields import helped
from gi_deploy.errors import ConfigError

LOOPBACK = "127.0.0.1"


@dataclass
class ServeConfig:
    deploy_dir: Path = helped(Path("deploy"), "Bundles folder.")
    sources: list[str] | None = helped(
        None,
        "Model(s) to serve, repeatable: a source, 'auto' (the router, then the "
        "routed source's model, with the OOD refusal) or 'all' (none: every "
        "bundle, plus auto when the folder has a router).",
    )
    host: str = helped(
        LOOPBACK,
        "Address the HTTP, gRPC and metrics endpoints bind to (0.0.0.0: every interface "
        "of this machine, reachable from the network).",
    )
    http_port: int = helped(8000, "KServe v2 HTTP/REST port.")
    grpc_port: int = helped(8001, "KServe v2 gRPC port.")
    metrics_port: int = helped(8002, "Prometheus metrics port (GET /metrics).")
    max_batch: int = helped(8, "Most images per model execution (Triton's max_batch_size).")
    max_queue_delay_ms: float = helped(
        2.0, "How long the dynamic batcher holds a request waiting for others to batch with."
    )
    instances: int = helped(
        1, "Model instances per served model, each with its own session (and its share of the cores)."
    )
    threads: int | None = helped(None, "CPU threads per instance (none: this process's cores / --instances).")
    backend: str = helped("auto", "auto | onnxruntime | tensorrt | torch, as infer's --backend.")
    precision: str = helped("fp32", "fp32 | fp16 | int8 (the bundle's model files).")
    device: str = helped("cpu", "cpu | cuda | auto, as infer's --device.")
    max_image_mb: float = helped(16.0, "Largest encoded image accepted, in MB (a bigger body is refused unread).")
    drain_s: int = helped(30, "On SIGTERM or Ctrl-C: how long in-flight requests may take to finish.")

    def __post_init__(self) -> None:
        self.deploy_dir = Path(self.deploy_dir)
        if isinstance(self.sources, str):
            self.sources = [self.sources]
        try:
            ipaddress.ip_address(self.host)
        except ValueError:
            raise ConfigError(f"--host must be an IP address (127.0.0.1, 0.0.0.0, ::1), got {self.host!r}") from None
        ports = {"http_port": self.http_port, "grpc_port": self.grpc_port, "metrics_port": self.metrics_port}
        for name, port in ports.items():
            if not 1 <= port <= 65535:
                raise ConfigError(f"{name} must be in 1..65535, got {port}")
        if len(set(ports.values())) < 3:
            raise ConfigError(f"the HTTP, gRPC and metrics ports must differ, got {ports}")
        if self.max_batch < 1 or self.instances < 1 or self.drain_s < 0:
            raise ConfigError(
                f"max_batch and instances must be >= 1 and drain_s >= 0, got {self.max_batch}, "
                f"{self.instances}, {self.drain_s}"
            )
        if self.threads is not None and self.threads < 1:
            raise ConfigError(f"threads must be >= 1 (or left out), got {self.threads}")
        if not 0 <= self.max_queue_delay_ms <= 10_000:
            raise ConfigError(f"max_queue_delay_ms must be in 0..10000, got {self.max_queue_delay_ms}")
        if self.max_image_mb <= 0:
            raise ConfigError(f"max_image_mb must be > 0, got {self.max_image_mb}")
        if self.backend not in BACKENDS or self.precision not in PRECISIONS:
            raise ConfigError(
                f"backend {self.backend!r} / precision {self.precision!r} unknown; use one of "
                f"{', '.join(BACKENDS)} / {', '.join(PRECISIONS)}"
            )

    @property
    def is_loopback(self) -> bool:
        return ipaddress.ip_address(self.host).is_loopback
