"""Multi-layer perceptron: flatten, then hidden Linear(+LayerNorm)+activation layers, then a head."""

from __future__ import annotations

import math

from torch import nn

from deepfit.config import ModelConfig
from deepfit.models import MODELS
from deepfit.models.layers import ACTIVATIONS


@MODELS.register("mlp")
def build_mlp(*, config: ModelConfig, input_shape: tuple[int, int, int], num_classes: int) -> nn.Module:
    """Multi-layer perceptron: --model.hidden widths, --model.activation, optional LayerNorm and dropout."""
    layers: list[nn.Module] = [nn.Flatten()]  # (B, C, H, W) -> (B, C*H*W)
    width = math.prod(input_shape)
    for hidden in config.hidden:
        layers.append(nn.Linear(width, hidden))
        if config.layer_norm:
            layers.append(nn.LayerNorm(hidden))
        layers.append(ACTIVATIONS[config.activation]())
        if config.dropout > 0:
            layers.append(nn.Dropout(config.dropout))
        width = hidden
    layers.append(nn.Linear(width, num_classes))
    return nn.Sequential(*layers)
