"""Models: the MODELS registry and build_model(); every model is sized from the input shape."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from deepfit.config import ModelConfig
from deepfit.registry import Registry

ModelBuilder = Callable[..., nn.Module]
MODELS: Registry[ModelBuilder] = Registry("model")

# Importing the modules registers their models.
from deepfit.models import cnns, fast, mlp  # noqa: E402,F401

__all__ = ["MODELS", "build_model", "list_models"]


def list_models() -> list[str]:
    return MODELS.names()


def build_model(config: ModelConfig, *, input_shape: tuple[int, int, int], num_classes: int) -> nn.Module:
    """Build the registered model `config.name` for (C, H, W) inputs and `num_classes` outputs."""
    return MODELS.get(config.name)(config=config, input_shape=input_shape, num_classes=num_classes)
