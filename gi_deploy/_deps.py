"""Checks for optional dependencies, so a runtime-only install gets a fix instead of a traceback."""

from __future__ import annotations

import importlib

from gi_deploy.errors import DependencyError

TRAINING_MODULES = ("torch", "torchvision", "timm", "peft", "safetensors", "onnx", "matplotlib", "yaml")


def require_training_extra(command: str) -> None:
    """Raise DependencyError naming the missing module and the install command."""
    for name in TRAINING_MODULES:
        try:
            importlib.import_module(name)
        except ImportError as e:
            raise DependencyError(f"`gi-deploy {command}` needs the training extra ({name} is not importable: {e}); "
                                  "install it with: pip install 'gi-deploy[train]'") from e
