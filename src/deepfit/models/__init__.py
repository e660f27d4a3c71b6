"""Models: the MODELS registry and build_model(); every model is sized from the input shape."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from deepfit.config import ModelConfig
from deepfit.errors import ConfigError
from deepfit.registry import Registry

ModelBuilder = Callable[..., nn.Module]
MODELS: Registry[ModelBuilder] = Registry("model")

# Importing the modules registers their models.
from deepfit.models import cnns, fast, mlp, resnet, whitening  # noqa: E402,F401
from deepfit.models.summary import ModelSummary, format_summary, summarize_model, training_bytes  # noqa: E402
from deepfit.models.transfer import (  # noqa: E402
    WeightCopy,
    copy_matching_weights,
    freeze_backbone,
    head_name,
    parameter_groups,
    starts_pretrained,
)
from deepfit.models.user import allow_model_class, build_user_model, class_path_of  # noqa: E402

__all__ = [
    "MODELS",
    "ModelSummary",
    "WeightCopy",
    "allow_model_class",
    "build_model",
    "class_path_of",
    "copy_matching_weights",
    "describe_models",
    "format_summary",
    "freeze_backbone",
    "head_name",
    "list_models",
    "parameter_groups",
    "starts_pretrained",
    "summarize_model",
    "training_bytes",
]


def list_models() -> list[str]:
    return MODELS.names()


def describe_models() -> list[tuple[str, str]]:
    """(name, one-line description) of every registered model: its builder's docstring summary."""
    return MODELS.describe()


def build_model(config: ModelConfig, *, input_shape: tuple[int, int, int], num_classes: int) -> nn.Module:
    """Build the registered model `config.name` for (C, H, W) inputs and `num_classes` outputs.
    An input too small for the architecture (a dummy forward pass fails) is a ConfigError."""
    if config.class_path:  # the user's own nn.Module, rebuilt from its import path
        return build_user_model(config.class_path)
    builder = MODELS.get(config.name)
    try:
        model = builder(config=config, input_shape=input_shape, num_classes=num_classes)
        probe(model, input_shape)
        return model
    except RuntimeError as err:  # torch's shape errors, e.g. "Output size is too small"
        c, h, w = input_shape
        detail = " ".join(str(err).split())[:200]
        raise ConfigError(
            f"model {config.name} cannot take {c}x{h}x{w} input: {detail}; train on larger images (--data.image-size N) or another --model"
        ) from None


def probe(model: nn.Module, input_shape: tuple[int, int, int]) -> None:
    """One forward pass of a zero image in eval mode (no statistics change): an input the net
    pools away (8x8 digits into airbench's 2x2 stem and three 2x2 pools) fails here, as a
    ConfigError, not at the first training step. A net sized by layers.flat_size has already
    been through one such pass; the others, with a global pool, have not."""
    was_training = model.training
    model.eval()
    with torch.no_grad():
        model(torch.zeros(1, *input_shape))
    model.train(was_training)
