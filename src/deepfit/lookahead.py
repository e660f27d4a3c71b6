"""Lookahead (train.lookahead N), as airbench94 uses it: a slow copy of the weights that, every N
optimizer steps, moves toward the trained weights by 1 - decay, after which the trained weights
are set to it. decay = 0.95**N * (progress)**3, progress = batches trained / the run's batches: no
pull early in training, a strong one near the end, and at the last step the trained weights
become the slow copy. Its state is saved with
the run, so a resumed run continues exactly."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

BASE_DECAY = 0.95  # airbench94's: the slow weights keep up to 0.95**N of themselves per update


class Lookahead:
    """The slow copy of `model`'s floating-point parameters and buffers (BatchNorm statistics too)."""

    def __init__(self, model: nn.Module, every: int, total_steps: int) -> None:
        self.every = every
        self.total_steps = max(1, total_steps)
        self.slow = [t.detach().clone() for t in floating(model)]
        self.updates = 0  # optimizer steps seen (with train.accumulate, fewer than batches trained)

    def decay(self, step: int) -> float:
        return 1.0 if step >= self.total_steps else BASE_DECAY**self.every * (step / self.total_steps) ** 3

    @torch.no_grad()
    def update(self, model: nn.Module, step: int) -> None:
        """After each optimizer step; `step`: batches trained so far, of total_steps in the run."""
        self.updates += 1
        if self.updates % self.every and step < self.total_steps:
            return
        fast = [t.detach() for t in floating(model)]
        torch._foreach_lerp_(self.slow, fast, 1.0 - self.decay(step))  # one fused kernel over all tensors
        torch._foreach_copy_(fast, self.slow)

    def state_dict(self) -> dict[str, Any]:
        return {"every": self.every, "updates": self.updates, "slow": [t.detach().clone() for t in self.slow]}

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.updates = int(state.get("updates", 0))
        torch._foreach_copy_(self.slow, [t.to(s.device) for t, s in zip(state["slow"], self.slow, strict=True)])


def floating(model: nn.Module) -> list[torch.Tensor]:
    return [t for t in (*model.parameters(), *model.buffers()) if t.is_floating_point()]
