"""Regression models, losses and metrics: a registry of its own, so `linear`/`mlp` do not clash
with the image models, and losses that compare a value with a value (deepfit.optim's losses take
class logits and integer labels)."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from deepfit.config import ModelConfig
from deepfit.registry import Registry

REGRESSION_MODELS: Registry[Callable[..., nn.Module]] = Registry("regression model")
REGRESSION_LOSSES: Registry[Callable[[], nn.Module]] = Registry("regression loss")
ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "relu": nn.ReLU, "sigmoid": nn.Sigmoid, "leaky_relu": nn.LeakyReLU, "tanh": nn.Tanh, "gelu": nn.GELU,
}  # fmt: skip
HUBER_DELTA = 1.0  # in standardised target units: squared error within one standard deviation, absolute beyond


@REGRESSION_MODELS.register("linear")
def build_linear(*, num_features: int, **_: Any) -> nn.Module:
    """The lesson's model: y = x @ w + b, one nn.Linear (its weight holds the slopes)."""
    return nn.Linear(num_features, 1)


@REGRESSION_MODELS.register("mlp")
def build_mlp(*, num_features: int, hidden: list[int], activation: str, layer_norm: bool, dropout: float, **_: Any) -> nn.Module:
    """Linear layers of model.hidden widths with model.activation between them, one output."""
    layers: list[nn.Module] = []
    width = num_features
    for size in hidden:
        layers.append(nn.Linear(width, size))
        if layer_norm:
            layers.append(nn.LayerNorm(size))
        layers.append(ACTIVATIONS[activation]())
        if dropout > 0:
            layers.append(nn.Dropout(dropout))
        width = size
    layers.append(nn.Linear(width, 1))
    return nn.Sequential(*layers)


def build_regression_model(config: ModelConfig, *, num_features: int) -> nn.Module:
    """The registered model config.name for `num_features` inputs; (B, F) -> (B, 1)."""
    builder = REGRESSION_MODELS.get(config.name)
    return builder(num_features=num_features, hidden=list(config.hidden), activation=config.activation,
                   layer_norm=config.layer_norm, dropout=config.dropout)  # fmt: skip


def list_regression_models() -> list[str]:
    return REGRESSION_MODELS.names()


class ValueLoss(nn.Module):
    """A loss of predictions (B, 1) against targets (B,)."""

    def __init__(self, loss: nn.Module) -> None:
        super().__init__()
        self.loss = loss

    def forward(self, prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return self.loss(prediction.reshape(-1).float(), target.float())


@REGRESSION_LOSSES.register("mse")
def build_mse() -> nn.Module:
    return ValueLoss(nn.MSELoss())


@REGRESSION_LOSSES.register("l1")
def build_l1() -> nn.Module:
    return ValueLoss(nn.L1Loss())


@REGRESSION_LOSSES.register("huber")
def build_huber() -> nn.Module:
    return ValueLoss(nn.HuberLoss(delta=HUBER_DELTA))


def build_regression_loss(name: str) -> nn.Module:
    return REGRESSION_LOSSES.get(name)()


def regression_metrics(prediction: torch.Tensor, target: torch.Tensor) -> dict[str, float]:
    """mse, rmse, mae and r2 of predictions against targets, both (N,) in the target's units.
    r2 = 1 - SS_res / SS_tot (NaN for fewer than two rows or a constant target)."""
    p, y = prediction.double().reshape(-1), target.double().reshape(-1)
    if len(y) == 0:
        return {"mse": math.nan, "rmse": math.nan, "mae": math.nan, "r2": math.nan}
    error = p - y
    mse = float((error**2).mean())
    total = float(((y - y.mean()) ** 2).sum())
    r2 = 1.0 - float((error**2).sum()) / total if total > 0 else math.nan
    return {"mse": mse, "rmse": math.sqrt(mse), "mae": float(error.abs().mean()), "r2": r2}
