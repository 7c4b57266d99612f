"""Shared tiny fixtures: a synthetic two-class-plus dataset at 32 px and one trained LoRA run.

Everything is deterministic (fixed seeds) and small enough for 2 CPU cores."""

from __future__ import annotations

import os
import sys
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
