"""Optional packages (serving, graphs, tracking): imported where used, and a missing one is one
line naming the package and the pip command that installs it, exit code 2."""

from __future__ import annotations

import importlib
from types import ModuleType

from deepfit.errors import DeepfitError


class MissingDependencyError(DeepfitError):
    """An optional package that a command needs is not installed."""


def import_optional(module: str, *, extra: str, purpose: str) -> ModuleType:
    """import `module`, or raise MissingDependencyError saying what needs it and how to install it.
    `extra` is the deepfit extra that brings it (serve, graph, track), or "" for a package deepfit
    itself depends on (onnx: a broken or partial install); `purpose` says what needs it."""
    try:
        return importlib.import_module(module)
    except ImportError as err:
        missing = (err.name or module).split(".")[0]
        command = f"pip install 'deepfit[{extra}]'" if extra else f"pip install {missing}"
        raise MissingDependencyError(f"{purpose} needs the package {missing!r}, which is not installed: {command}") from None
