"""Checks for optional dependencies, so a runtime-only install gets a fix instead of a traceback."""

from __future__ import annotations

import importlib

from gi_deploy.errors import DependencyError

TRAINING_MODULES = ("torch", "torchvision", "timm", "peft", "safetensors", "onnx", "matplotlib", "yaml")


def require_onnxruntime() -> None:
    """Raise DependencyError naming both installs when no onnxruntime build is installed."""
    from importlib.util import find_spec

    if find_spec("onnxruntime") is None:
        raise DependencyError(
            "onnxruntime is not installed: install one of the two builds, "
            "pip install 'gi-deploy[cpu]' (CPU) or pip install 'gi-deploy[gpu]' "
            "(onnxruntime-gpu: CUDA/TensorRT providers), never both"
        )


def onnxruntime_builds() -> list[str]:
    """The onnxruntime distributions installed (more than one breaks the ``onnxruntime`` module)."""
    from importlib import metadata

    found = []
    for name in ("onnxruntime", "onnxruntime-gpu", "onnxruntime-directml", "onnxruntime-openvino"):
        try:
            metadata.version(name)
            found.append(name)
        except metadata.PackageNotFoundError:
            continue
    return found


def require_training_extra(command: str) -> None:
    """Raise DependencyError naming the missing module and the install command."""
    for name in TRAINING_MODULES:
        try:
            importlib.import_module(name)
        except ImportError as e:
            raise DependencyError(
                f"`gi-deploy {command}` needs the training extra ({name} is not importable: {e}); "
                "install it with: pip install 'gi-deploy[train]'"
            ) from e
