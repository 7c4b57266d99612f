"""Small torch-free helpers for self-describing artifacts: JSON manifests, hashes, versions."""

from __future__ import annotations

import hashlib
import json
import os
import platform
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

from gi_deploy.errors import BundleError

_HASH_CHUNK = 1 << 20


def sha256_file(path: Path) -> str:
    """Hex SHA-256 of a file's bytes, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_HASH_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def write_json(path: Path, data: Any) -> None:
    """Write JSON atomically (temp file + rename), so a crash never leaves half a manifest."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")
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
TRACKED_LIBRARIES = ("gi-deploy", "torch", "torchvision", "timm", "peft", "onnx", "onnxruntime", "onnxruntime-gpu",
                     "onnxscript", "tensorrt", "numpy", "Pillow")


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
