"""Small shared pieces of model building: activations by name and flattened feature sizes."""

from __future__ import annotations

import torch
from torch import nn

ACTIVATIONS: dict[str, type[nn.Module]] = {
    "relu": nn.ReLU,
    "sigmoid": nn.Sigmoid,
    "leaky_relu": nn.LeakyReLU,
    "tanh": nn.Tanh,
    "gelu": nn.GELU,
}


def flat_size(features: nn.Module, input_shape: tuple[int, int, int]) -> int:
    """Number of values `features` yields per image, found by one dummy forward pass."""
    with torch.no_grad():
        was_training = features.training
        features.eval()
        out = features(torch.zeros(1, *input_shape))
        features.train(was_training)
    return int(out.flatten(1).shape[1])
