"""mixup and cutmix: blend each training batch with a shuffled copy of itself, on the training
device, every random draw taken from the loader's dedicated generator (so seeded runs repeat and
resume exactly: the generator's state is part of the loader's saved state)."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np
import torch

MIX_MODES = ("none", "mixup", "cutmix", "both")
Batch = tuple[torch.Tensor, torch.Tensor]


@dataclass(frozen=True)
class Mix:
    """How batches are mixed; `num_classes` sizes the soft targets."""

    mode: str  # mixup, cutmix, or both (one of the two per batch, even odds)
    alpha: float  # the mixing share is drawn from Beta(alpha, alpha), once per batch
    num_classes: int


def mix_batch(x: torch.Tensor, y: torch.Tensor, mix: Mix, generator: torch.Generator) -> Batch:
    """x (B, C, H, W), y (B,) int -> mixed x and soft targets (B, K): lam of each image's class
    and 1 - lam of its partner's, lam the share of the image the first one keeps."""
    lam = beta_draw(mix.alpha, generator)
    partner = torch.randperm(x.shape[0], generator=generator).to(x.device)
    use_cutmix = mix.mode == "cutmix" or (mix.mode == "both" and bool(torch.rand((), generator=generator) < 0.5))
    if use_cutmix:
        x, lam = cutmix(x, partner, lam, generator)
    else:
        x = x.mul(lam).add_(x[partner], alpha=1.0 - lam)
    one_hot = torch.nn.functional.one_hot(y, mix.num_classes).to(torch.float32)
    return x, one_hot.mul(lam).add_(one_hot[partner], alpha=1.0 - lam)


def beta_draw(alpha: float, generator: torch.Generator) -> float:
    """One Beta(alpha, alpha) sample. torch's Beta takes no generator, so a numpy generator is
    seeded from the dedicated one: the draw is still a function of its state alone."""
    seed = int(torch.randint(0, 2**62, (), generator=generator))
    return float(np.random.default_rng(seed).beta(alpha, alpha))


def cutmix(x: torch.Tensor, partner: torch.Tensor, lam: float, generator: torch.Generator) -> tuple[torch.Tensor, float]:
    """Paste one box of the partner images, covering about 1 - lam of the area, into every image;
    returns the images and lam corrected for the box clipped at the border."""
    h, w = x.shape[2], x.shape[3]
    side = float(np.sqrt(1.0 - lam))
    cy = int(torch.randint(0, h, (), generator=generator))  # the box centre, anywhere in the image
    cx = int(torch.randint(0, w, (), generator=generator))
    top, bottom = max(cy - round(h * side / 2), 0), min(cy + round(h * side / 2), h)
    left, right = max(cx - round(w * side / 2), 0), min(cx + round(w * side / 2), w)
    mixed = x.clone()
    mixed[:, :, top:bottom, left:right] = x[partner][:, :, top:bottom, left:right]
    return mixed, 1.0 - (bottom - top) * (right - left) / (h * w)


class MixedBatches:
    """The loader's batches, mixed. Keeps len() (the engine finds the epoch's last batch by it)."""

    def __init__(self, batches: Iterable[Batch], mix: Mix, generator: torch.Generator) -> None:
        self.batches, self.mix, self.generator = batches, mix, generator

    def __len__(self) -> int:
        return len(self.batches)  # type: ignore[arg-type]

    def __iter__(self) -> Iterator[Batch]:
        for x, y in self.batches:
            yield mix_batch(x, y, self.mix, self.generator)
