"""data.augment crop: a random translation (2 px on 28-px images, 4 from 32 px), never a mirror,
drawn from the loader's generator (the same seed gives the same batch)."""

from __future__ import annotations

import pytest
import torch

from deepfit.data.loader import BatchPrep


def prep(seed: int) -> BatchPrep:
    generator = torch.Generator().manual_seed(seed)
    return BatchPrep(mean=(0.0,), std=(1 / 255,), device=torch.device("cpu"), generator=generator, augment="crop")


@pytest.mark.parametrize(("side", "pad"), [(28, 2), (32, 4)])
def test_crop_only_translates_within_its_pad(side: int, pad: int) -> None:
    image = torch.arange(side * side, dtype=torch.float32).view(1, 1, side, side) % 251 + 1  # no zeros, no symmetry
    batch = image.expand(64, 1, side, side).to(torch.uint8)
    out = prep(0)(batch)  # std 1/255, mean 0: the pixel values come back unchanged
    shifts = set()
    for row in out:
        found = [
            (dy, dx)
            for dy in range(-pad, pad + 1)
            for dx in range(-pad, pad + 1)
            if torch.equal(row[0], shifted(batch[0, 0].float(), dy, dx))
        ]
        assert len(found) == 1, "each image is exactly one translation of the original (no mirror)"
        shifts.add(found[0])
    assert len(shifts) > 5  # the shifts vary across the batch
    assert torch.equal(out, prep(0)(batch)) and not torch.equal(out, prep(1)(batch))


def shifted(image: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """image moved by (dy, dx) pixels, zeros where it moved out of view."""
    h, w = image.shape
    out = torch.zeros_like(image)
    out[max(dy, 0) : h + min(dy, 0), max(dx, 0) : w + min(dx, 0)] = image[max(-dy, 0) : h + min(-dy, 0), max(-dx, 0) : w + min(-dx, 0)]
    return out
