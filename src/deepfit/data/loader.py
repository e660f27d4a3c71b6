"""Batches as index slices of an in-memory uint8 tensor; float conversion, normalisation and
augmentation run per batch as tensor ops on the training device (DESIGN.md section 3)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch

from deepfit.data.bundle import ImageSet

AUGMENT_PRESETS = ("none", "flip-crop", "random-resized-crop")


class BatchLoader:
    """Iterates (x, y) batches: x float (B, C, H, W) normalised, y int64 (B,), both on `device`.

    A dedicated generator decides the shuffle order and the augmentation, and `state_dict()`
    records the epoch's order and position, so a run resumed mid-epoch sees the same batches.
    """

    def __init__(
        self,
        data: ImageSet,
        *,
        batch_size: int,
        mean: tuple[float, ...],
        std: tuple[float, ...],
        device: torch.device,
        shuffle: bool = False,
        augment: str = "none",
        seed: int = 0,
        channels_last: bool = False,
    ) -> None:
        self.images = data.images.to(device)
        self.labels = data.labels.to(device)
        self.batch_size = batch_size
        self.device = device
        self.shuffle = shuffle
        self.augment = augment
        self.channels_last = channels_last
        stats = torch.tensor(std, dtype=torch.float32, device=device).view(1, -1, 1, 1)
        # x_norm = (x / 255 - mean) / std = x * scale - shift
        self.scale = 1.0 / (255.0 * stats)
        self.shift = torch.tensor(mean, dtype=torch.float32, device=device).view(1, -1, 1, 1) / stats
        self.generator = torch.Generator().manual_seed(seed)
        self.order: torch.Tensor | None = None  # this epoch's permutation, drawn lazily
        self.position = 0  # batches of this epoch already handed out

    @property
    def batches_per_epoch(self) -> int:
        return (len(self.labels) + self.batch_size - 1) // self.batch_size

    def __len__(self) -> int:
        """Batches still to come in this epoch (all of them unless resumed mid-epoch)."""
        return self.batches_per_epoch - self.position

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if self.order is None:
            self.order = self.draw_order()
        order = self.order
        while self.position < self.batches_per_epoch:
            start = self.position * self.batch_size
            index = order[start : start + self.batch_size]
            self.position += 1
            yield self.prepare(self.images[index]), self.labels[index]
        self.order, self.position = None, 0

    def draw_order(self) -> torch.Tensor:
        n = len(self.labels)
        if not self.shuffle:
            return torch.arange(n, device=self.device)
        return torch.randperm(n, generator=self.generator).to(self.device)

    def prepare(self, batch: torch.Tensor) -> torch.Tensor:
        """uint8 (B, C, H, W) -> normalised float, augmented when training."""
        x = batch.float()
        if self.augment == "flip-crop":
            x = random_crop(random_flip(x, self.generator), pad=4, generator=self.generator)
        elif self.augment == "random-resized-crop":
            x = random_resized_crop(random_flip(x, self.generator), generator=self.generator)
        x = x.mul_(self.scale).sub_(self.shift)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x

    def state_dict(self) -> dict[str, Any]:
        return {
            "generator": self.generator.get_state(),
            "order": self.order.cpu() if self.order is not None else None,
            "position": self.position,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.generator.set_state(state["generator"])
        self.order = state["order"].to(self.device) if state["order"] is not None else None
        self.position = int(state["position"])


def random_flip(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Mirror a random half of the batch left-right."""
    flip = (torch.rand(x.shape[0], generator=generator) < 0.5).to(x.device)
    return torch.where(flip.view(-1, 1, 1, 1), x.flip(3), x)


def random_crop(x: torch.Tensor, *, pad: int, generator: torch.Generator) -> torch.Tensor:
    """Zero-pad by `pad` pixels, then take a random HxW window per image (a translation)."""
    b, c, h, w = x.shape
    padded = torch.nn.functional.pad(x, (pad, pad, pad, pad))
    dy = torch.randint(0, 2 * pad + 1, (b,), generator=generator).to(x.device)
    dx = torch.randint(0, 2 * pad + 1, (b,), generator=generator).to(x.device)
    rows = (dy.view(b, 1) + torch.arange(h, device=x.device)).view(b, 1, h, 1).expand(b, c, h, w + 2 * pad)
    padded = padded.gather(2, rows)  # (B, C, H, W+2p)
    cols = (dx.view(b, 1) + torch.arange(w, device=x.device)).view(b, 1, 1, w).expand(b, c, h, w)
    return padded.gather(3, cols)  # (B, C, H, W)


def random_resized_crop(x: torch.Tensor, *, generator: torch.Generator, scale: tuple[float, float] = (0.35, 1.0)) -> torch.Tensor:
    """Per image, a random square crop of `scale` of the area at a random place, resized back."""
    b = x.shape[0]
    side = torch.empty(b).uniform_(scale[0], scale[1], generator=generator).sqrt()  # (B,) share of side
    cx = (torch.rand(b, generator=generator) * 2 - 1) * (1 - side)
    cy = (torch.rand(b, generator=generator) * 2 - 1) * (1 - side)
    theta = torch.zeros(b, 2, 3)
    theta[:, 0, 0], theta[:, 1, 1], theta[:, 0, 2], theta[:, 1, 2] = side, side, cx, cy
    grid = torch.nn.functional.affine_grid(theta.to(x.device), list(x.shape), align_corners=False)
    return torch.nn.functional.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
