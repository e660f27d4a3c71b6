"""Seeded mini-batches of table rows with a resumable position: the order of epoch e depends only
on (seed, e), so a run resumed from (epoch, position) sees exactly the batches a straight run sees."""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import torch

from deepfit.engine import predict_logits

SEED_STRIDE = 1_000_003  # keeps (seed, epoch) pairs apart: seed 0 epoch 1 != seed 1 epoch 0


class RowBatches:
    """(x, y) batches of `batch_size` rows, reshuffled each epoch; iterating once is one epoch."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, *, batch_size: int, seed: int, device: torch.device) -> None:
        self.x, self.y = x.to(device), y.to(device)
        self.batch_size = min(batch_size, len(y))  # larger than the split: one full batch
        self.seed = seed
        self.epoch = 0  # epochs finished
        self.position = 0  # batches of the current epoch already handed out

    def __len__(self) -> int:
        return math.ceil(len(self.y) / self.batch_size)

    def order(self) -> torch.Tensor:
        generator = torch.Generator().manual_seed(self.seed * SEED_STRIDE + self.epoch)
        return torch.randperm(len(self.y), generator=generator).to(self.x.device)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        order = self.order()
        while self.position < len(self):
            rows = order[self.position * self.batch_size : (self.position + 1) * self.batch_size]
            self.position += 1  # before the step: a checkpoint taken after it resumes with the next batch
            yield self.x[rows], self.y[rows]
        self.epoch, self.position = self.epoch + 1, 0

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch, self.position = int(state["epoch"]), int(state["position"])


def predict_values(model: torch.nn.Module, x: torch.Tensor, *, batch_size: int = 4096) -> torch.Tensor:
    """The model's outputs (N,) for standardised rows x (N, F), on the CPU, without gradients."""
    device = next(model.parameters()).device
    chunks = [(x[i : i + batch_size].to(device), torch.zeros(0)) for i in range(0, len(x), batch_size)]
    outputs, _ = predict_logits(model, chunks)
    return outputs.reshape(-1) if len(outputs) else torch.zeros(0)
