"""Shared tiny fixtures: a synthetic two-class-plus dataset at 32 px and one trained LoRA run.

Everything is deterministic (fixed seeds) and small enough for 2 CPU cores."""

from __future__ import annotations

import importlib.util
import os
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import pytest

TINY_MODEL = "convnextv2_atto"
TINY_PX = 32
TINY_SPLITS = {"train": 6, "val": 2, "test": 3}


@pytest.fixture(autouse=True, scope="session")
def _measurements_cached_in_the_test_folder(tmp_path_factory):
    """``--backend auto`` caches its CPU measurement (runtime/backends/select.py) under XDG_CACHE_HOME:
    tests keep theirs out of the user's cache."""
    mp = pytest.MonkeyPatch()
    mp.setenv("XDG_CACHE_HOME", str(tmp_path_factory.mktemp("xdg-cache")))
    yield
    mp.undo()


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    """``<tmp>/capsule/{train,val,test}/<class>/*.jpg``: 4 classes, 11 images each, 32 px."""
    from gi_deploy.demo.synthetic import write_source

    return write_source(tmp_path_factory.mktemp("data"), "capsule", seed=1, size=TINY_PX, split_sizes=TINY_SPLITS)


def reseal(d: dict) -> dict:
    """Recompute a manifest dict's content hash (bundles) and seal in place, as a forger (or a
    legitimate relocation) would, so that only the checks beyond the seal remain."""
    from gi_deploy.core.bundles import CONTENT_FIELDS
    from gi_deploy.core.records import canonical_sha256, seal_of

    if "content_sha256" in d:
        d["content_sha256"] = canonical_sha256({k: d.get(k) for k in CONTENT_FIELDS})
    d.pop("seal", None)
    d["seal"] = seal_of(d)
    return d


def edit_manifest(path: Path, change, resealed: bool = False) -> dict:
    """Edit the JSON manifest at ``path`` in place with ``change(d)`` (and :func:`reseal` it with
    ``resealed``). Returns the edited dict."""
    import json

    d = json.loads(Path(path).read_text())
    change(d)
    if resealed:
        reseal(d)
    Path(path).write_text(json.dumps(d))
    return d


def tiny_train_config(data_dir: Path, out_dir: Path, **overrides):
    from gi_deploy.training.config import TrainConfig

    kwargs = dict(
        source="capsule",
        data_dir=data_dir,
        method="lora",
        model=TINY_MODEL,
        pretrained=False,
        img_size=TINY_PX,
        epochs=1,
        batch_size=8,
        lr=1e-3,
        out_dir=out_dir,
        device="cpu",
    )
    kwargs.update(overrides)
    return TrainConfig(**kwargs)


@pytest.fixture(scope="session")
def tiny_run(tiny_data, tmp_path_factory) -> Path:
    """A finished one-epoch LoRA run on ``tiny_data`` (random-init base)."""
    from gi_deploy.training.trainer import train

    result = train(tiny_train_config(tiny_data, tmp_path_factory.mktemp("runs")))
    return result.run_dir


@pytest.fixture(scope="session")
def tiny_deploy(tiny_run, tmp_path_factory) -> Path:
    """A deploy folder holding the verified fp32 + fp16 bundle of ``tiny_run``."""
    from gi_deploy.export.writer import export_source

    deploy = tmp_path_factory.mktemp("deploy")
    export_source(tiny_run, deploy / "capsule")
    return deploy


@pytest.fixture(scope="session")
def two_source_deploy(tmp_path_factory, tiny_data, tiny_deploy) -> Path:
    """``<basetemp>/two-source/deploy/{capsule,endoscope}``: the tiny capsule bundle and a second
    tiny run, trained as source "endoscope" with another seed."""
    import shutil

    from gi_deploy.export.writer import export_source
    from gi_deploy.training.trainer import train

    root = tmp_path_factory.getbasetemp() / "two-source"
    run = train(tiny_train_config(tiny_data, root / "runs", source="endoscope", seed=1)).run_dir
    deploy = root / "deploy"
    export_source(run, deploy / "endoscope")
    shutil.copytree(tiny_deploy / "capsule", deploy / "capsule")
    return deploy


@pytest.fixture(scope="session")
def routed_deploy(tmp_path_factory, tiny_deploy) -> tuple[Path, Path]:
    """(deploy folder, data folder): the tiny capsule bundle, a tiny run trained on synthetic
    *endoscope* images (a planted second source that looks different), and the router over both.
    The data folder holds ``capsule/`` and ``endoscope/`` splits."""
    import shutil

    from gi_deploy.demo.synthetic import write_source
    from gi_deploy.export.router import write_router
    from gi_deploy.export.writer import export_source
    from gi_deploy.training.trainer import train

    root = tmp_path_factory.getbasetemp() / "routed"
    data = root / "data"
    write_source(data, "capsule", seed=1, size=TINY_PX, split_sizes=TINY_SPLITS)  # the same images as tiny_data
    endo = write_source(data, "endoscope", seed=1, size=TINY_PX, split_sizes=TINY_SPLITS)
    run = train(tiny_train_config(endo, root / "runs", source="endoscope")).run_dir
    deploy = root / "deploy"
    export_source(run, deploy / "endoscope")
    shutil.copytree(tiny_deploy / "capsule", deploy / "capsule")
    write_router(deploy, allow_small_val=True)  # 16 validation images cannot resolve 99%: all but one, recorded
    return deploy, data


# Linux capabilities that let root read any file and list any folder whatever their permissions
# (linux/capability.h); a CI container running as root holds them, an ordinary user does not.
_CAP_DAC_OVERRIDE, _CAP_DAC_READ_SEARCH = 1, 2
_LINUX_CAPABILITY_VERSION_3 = 0x20080522


@contextmanager
def permissions_enforced():
    """Run the block with file permissions enforced as for an ordinary user, also when the tests
    run as root (CI does): a chmod-0 file then fails to open with EACCES and a chmod-0 folder fails
    to list, instead of root reading through them. Root's two permission-bypassing capabilities are
    cleared from this thread's effective set (they stay permitted, so they are raised back after);
    threads started inside the block inherit that. A no-op for a user without them."""
    if os.geteuid() != 0:
        yield
        return
    if not sys.platform.startswith("linux"):
        pytest.fail("running as root outside Linux: no way here to plant a file root cannot read")
    import ctypes

    class Header(ctypes.Structure):
        _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]

    class Data(ctypes.Structure):
        _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]

    libc = ctypes.CDLL(None, use_errno=True)
    header, data = Header(_LINUX_CAPABILITY_VERSION_3, 0), (Data * 2)()  # pid 0: this thread

    def call(fn) -> None:
        if fn(ctypes.byref(header), data) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"{fn.__name__}: {os.strerror(err)}")

    call(libc.capget)
    saved = data[0].effective
    data[0].effective = saved & ~((1 << _CAP_DAC_OVERRIDE) | (1 << _CAP_DAC_READ_SEARCH))
    call(libc.capset)
    try:
        yield
    finally:
        data[0].effective = saved
        call(libc.capset)


# --- serving (tests/serve) --------------------------------------------------------------------------
# The serve extra (PyTriton 0.7.0) needs numpy<2, so it lives in its own environment without torch
# (README: ``.venv-serve``), where no bundle can be trained or exported. The deploy folder therefore
# comes from outside: ``GI_DEPLOY_TEST_BUNDLES`` names a deploy folder with bundles and a router (CI:
# the demo's ``gi-deploy-demo/deploy``, built by the main environment's set-up). Without it, an
# environment with torch (the main one) builds the tiny ``routed_deploy`` above; one with neither
# skips, saying which variable to set. (Here, not in tests/serve/conftest.py: the tests import this
# module as ``conftest``, and a second conftest would take that name.)

SERVE_BUNDLES_ENV = "GI_DEPLOY_TEST_BUNDLES"
HAVE_TRITON = importlib.util.find_spec("pytriton") is not None and importlib.util.find_spec("tritonclient") is not None
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def serve_deploy(request) -> Path:
    """A deploy folder holding bundles of ``capsule`` and ``endoscope`` and a router."""
    given = os.environ.get(SERVE_BUNDLES_ENV)
    if given:
        deploy = Path(given)
        if not (deploy / "_router" / "manifest.json").is_file():
            pytest.fail(
                f"{SERVE_BUNDLES_ENV}={given} is not a deploy folder with a router "
                "(gi-deploy demo writes one: gi-deploy-demo/deploy)"
            )
        return deploy
    if importlib.util.find_spec("torch") is None:
        pytest.skip(
            f"no bundles to serve: set {SERVE_BUNDLES_ENV} to a deploy folder with a router (e.g. the demo's "
            "gi-deploy-demo/deploy); this environment has no torch to build one"
        )
    return request.getfixturevalue("routed_deploy")[0]


@pytest.fixture(scope="session")
def serve_images(tmp_path_factory, serve_deploy) -> dict[str, list[Path]]:
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


def snapshot_files(*roots: Path) -> dict[str, str]:
    """sha256 of every file under ``roots`` (a file root is itself), by path: what a refused run must
    leave as it was."""
    import hashlib

    out = {}
    for root in roots:
        for p in [root] if root.is_file() else sorted(root.rglob("*")):
            if p.is_file() and not p.is_symlink():
                out[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def csv_rows(path: Path) -> list[dict]:
    """A CSV's rows as dicts."""
    import csv

    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))
