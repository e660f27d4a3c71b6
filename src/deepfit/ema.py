"""An exponential moving average of a model's weights (train.ema): updated after every optimizer
step, evaluated, saved and exported in place of the raw weights; its state is saved with the run."""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn


class WeightAverage:
    """`module`: a copy of the model whose floating-point parameters and buffers (BatchNorm's
    running statistics too) follow the trained ones as ema = decay * ema + (1 - decay) * weights;
    integer buffers (BatchNorm's batch counter) are copied."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        self.module = copy.deepcopy(model).eval()
        self.module.requires_grad_(False)
        self.decay = decay
        self.updates = 0  # optimizer steps averaged so far

    def current_decay(self) -> float:
        """decay, warmed up as (1 + n) / (10 + n): without it the average of a short run still
        holds decay**steps of the random initial weights (0.999**800 = 45%)."""
        return min(self.decay, (1 + self.updates) / (10 + self.updates))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        decay = self.current_decay()
        self.updates += 1
        averaged, current = pairs(self.module, model)
        if averaged:
            torch._foreach_lerp_(averaged, current, 1.0 - decay)  # one fused kernel over all tensors
        for target, source in zip(self.module.buffers(), model.buffers(), strict=True):
            if not target.is_floating_point():
                target.copy_(source)

    def state_dict(self) -> dict[str, Any]:
        return {"updates": self.updates, "decay": self.decay}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.updates = int(state["updates"])


def pairs(average: nn.Module, model: nn.Module) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """The floating-point parameters and buffers of both, in the same order."""
    targets, sources = [], []
    for target, source in zip(tensors(average), tensors(model), strict=True):
        if target.is_floating_point():
            targets.append(target)
            sources.append(source.detach())
    return targets, sources


def tensors(module: nn.Module) -> list[torch.Tensor]:
    return [*module.parameters(), *module.buffers()]
