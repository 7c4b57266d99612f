"""Fixtures of the serving tests: a deploy folder with two sources and a router, images to send, and a
running ``gi-deploy serve`` on free loopback ports.

The serve extra (PyTriton 0.7.0) needs numpy<2, so it lives in its own environment without torch
(README: ``.venv-serve``), where no bundle can be trained or exported. The deploy folder therefore comes
from outside: ``GI_DEPLOY_TEST_BUNDLES`` names a deploy folder with bundles and a router (CI: the
demo's ``gi-deploy-demo/deploy``, built by the main environment's set-up). Without it, an environment
with torch (the main one) builds the tiny ``routed_deploy`` of tests/conftest.py; an environment with
neither skips, saying which variable to set."""

from __future__ import annotations

import importlib.util
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ENV = "GI_DEPLOY_TEST_BUNDLES"
HAVE_TRITON = importlib.util.find_spec("pytriton") is not None and importlib.util.find_spec("tritonclient") is not None
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def serve_deploy(request) -> Path:
    """A deploy folder holding bundles of ``capsule`` and ``endoscope`` and a router."""
    given = os.environ.get(ENV)
    if given:
        deploy = Path(given)
        if not (deploy / "_router" / "manifest.json").is_file():
            pytest.fail(
                f"{ENV}={given} is not a deploy folder with a router (gi-deploy demo writes one: gi-deploy-demo/deploy)"
            )
        return deploy
    if importlib.util.find_spec("torch") is None:
        pytest.skip(
            f"no bundles to serve: set {ENV} to a deploy folder with a router (e.g. the demo's "
            "gi-deploy-demo/deploy); this environment has no torch to build one"
        )
    return request.getfixturevalue("routed_deploy")[0]


@pytest.fixture(scope="session")
def images(tmp_path_factory, serve_deploy) -> dict[str, list[Path]]:
    """Synthetic test frames of each source (the demo's generator, another seed than training) and
    frames no source covers (blank, saturated, colour fields, patterns): JPEG and PNG files."""
    from gi_deploy.demo.synthetic import write_ood, write_source

    root = tmp_path_factory.mktemp("serve-images")
    out = {}
    for source in ("capsule", "endoscope"):
        folder = write_source(root, source, seed=7, size=64, split_sizes={"train": 0, "val": 0, "test": 2})
        out[source] = sorted((folder / "test").rglob("*.jpg"))
    out["ood"] = sorted(write_ood(root / "ood", size=64, n=2, seed=7).rglob("*.png"))
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A ``gi-deploy serve`` subprocess on free loopback ports."""

    def __init__(self, deploy: Path, *extra: str):
        self.http_port, self.grpc_port, self.metrics_port = free_port(), free_port(), free_port()
        self.http, self.grpc = f"127.0.0.1:{self.http_port}", f"127.0.0.1:{self.grpc_port}"
        self.log = open(Path(os.environ.get("TMPDIR", "/tmp")) / f"gi-serve-{self.http_port}.log", "w+")
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "gi_deploy.cli",
                "serve",
                str(deploy),
                "--http-port",
                str(self.http_port),
                "--grpc-port",
                str(self.grpc_port),
                "--metrics-port",
                str(self.metrics_port),
                *extra,
            ],
            stdout=self.log,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )

    def output(self) -> str:
        self.log.flush()
        self.log.seek(0)
        return self.log.read()

    def wait_ready(self, models: list[str], timeout: float = 120) -> None:
        from tritonclient import http

        client = http.InferenceServerClient(self.http)
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"gi-deploy serve exited {self.proc.returncode}:\n{self.output()}")
            try:
                if client.is_server_ready() and all(client.is_model_ready(m) for m in models):
                    return
            except Exception:  # noqa: BLE001 (not listening yet: connection refused)
                pass
            time.sleep(0.5)
        raise AssertionError(f"gi-deploy serve not ready after {timeout}s:\n{self.output()}")

    def stop(self, timeout: float = 60) -> int:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, 9)
                self.proc.wait()
        self.log.close()
        return self.proc.returncode


@pytest.fixture
def start_server():
    """``start_server(deploy, *options)``: a Server of its own for one test (stopped after it)."""
    started = []

    def start(deploy: Path, *extra: str) -> Server:
        started.append(Server(deploy, *extra))
        return started[-1]

    yield start
    for s in started:
        s.stop()


@pytest.fixture(scope="session")
def server(serve_deploy):
    """One running server for the session: capsule, endoscope and auto; max batch 32, 5 ms queue delay."""
    if not HAVE_TRITON:
        pytest.skip("needs the serve extra (nvidia-pytriton, tritonclient; numpy<2): run in .venv-serve")
    s = Server(serve_deploy, "--max-batch", "32", "--max-queue-delay-ms", "5", "--threads", "1")
    try:
        s.wait_ready(["capsule", "endoscope", "auto"])
        yield s
    finally:
        s.stop()
