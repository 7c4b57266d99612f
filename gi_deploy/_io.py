"""Small torch-free helpers for self-describing artifacts: JSON manifests, hashes, versions."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import platform
from contextlib import contextmanager
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

from gi_deploy.errors import BundleError, ConfigError

_HASH_CHUNK = 1 << 20


def sha256_file(path: Path) -> str:
    """Hex SHA-256 of a file's bytes, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_HASH_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def real_path(path: Path) -> Path:
    """``path`` with every symlink resolved (also for a path that does not exist yet), without
    raising on a loop: what two names of one file have in common."""
    return Path(os.path.realpath(path))


@contextmanager
def create_exclusive(path: Path, mode: str = "w"):
    """Open a new temporary file for writing that is really new: a stale one (a killed run's) is
    removed first, and the open refuses to follow a symlink planted in its place (O_EXCL), so a
    write never goes through a link to somewhere else. Removed again if the block fails."""
    try:
        path.unlink()  # a stale temp file, or a planted link (unlink removes the link, not its target)
    except FileNotFoundError:
        pass
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o644)
    try:
        with open(fd, mode, newline="" if "b" not in mode else None, encoding=None if "b" in mode else "utf-8") as f:
            yield f
    except BaseException:
        path.unlink(missing_ok=True)
        raise


def write_json(path: Path, data: Any) -> None:
    """Write JSON atomically (a new temp file + rename), so a crash never leaves half a manifest and
    a symlink planted at the temp name is never written through."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with create_exclusive(tmp) as f:
        f.write(json.dumps(data, indent=2, sort_keys=False) + "\n")
    os.replace(tmp, path)


def read_json(path: Path, what: str) -> Any:
    """Read a JSON file, raising BundleError that names the file and what it should be."""
    if not path.is_file():
        raise BundleError(f"{what} not found: {path}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BundleError(f"{what} {path} is not valid JSON ({e}); re-create it") from e


# The distributions whose versions every run and bundle manifest records.
TRACKED_LIBRARIES = (
    "gi-deploy",
    "torch",
    "torchvision",
    "timm",
    "peft",
    "onnx",
    "onnxruntime",
    "onnxruntime-gpu",
    "onnxscript",
    "tensorrt",
    "numpy",
    "Pillow",
)


def library_versions(names: tuple[str, ...] = TRACKED_LIBRARIES) -> dict[str, str]:
    """Installed versions of the named distributions (absent ones are skipped), plus Python."""
    versions = {"python": platform.python_version()}
    for name in names:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions


def utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def lock_path_of(target: Path) -> Path:
    """The lock file that guards ``target`` (a file or folder being written): ``.<name>.lock`` beside
    its real path, so two names of one file (a symlink, ``a/../a``) take the same lock."""
    target = real_path(target)
    return target.with_name(f".{target.name}.lock")


@contextmanager
def exclusive_lock(target: Path, what: str):
    """Hold an exclusive lock on ``target`` (``fcntl.flock`` on :func:`lock_path_of`, which records
    this process's id) while the block writes it. A second gi-deploy process asking for the same
    target gets ConfigError naming the process that holds it, instead of interleaving its writes.
    The lock is the kernel's: it goes with the process, so a killed run leaves no stale lock."""
    try:
        import fcntl  # POSIX; where it is missing (Windows) the output is not locked
    except ImportError:
        yield
        return
    lock = lock_path_of(target)
    lock.parent.mkdir(parents=True, exist_ok=True)
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                os.close(fd)
                raise
            holder = os.pread(fd, 200, 0).decode("utf-8", "replace").strip() or "unknown"
            os.close(fd)
            raise ConfigError(
                f"{target} is being written by another gi-deploy process ({holder}); wait for it to "
                f"finish or stop it, or {what}"
            ) from None
        try:  # the holder before us may have removed the file between our open and our lock: lock the new one
            same = os.path.samestat(os.fstat(fd), os.stat(lock))
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"pid {os.getpid()}\n".encode(), 0)
    try:
        yield
    finally:
        lock.unlink(missing_ok=True)
        os.close(fd)
