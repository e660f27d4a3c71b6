"""data.augment crop: a random translation (2 px on 28-px images, 4 from 32 px), never a mirror;
flip-crop: a mirror of half the batch, then the same translation. Drawn from the loader's
generator (the same seed gives the same batch)."""

from __future__ import annotations

import pytest
import torch

from deepfit.data.loader import BatchPrep


def prep(seed: int, augment: str = "crop") -> BatchPrep:
    generator = torch.Generator().manual_seed(seed)
    return BatchPrep(mean=(0.0,), std=(1 / 255,), device=torch.device("cpu"), generator=generator, augment=augment)


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


@pytest.mark.parametrize(("side", "pad"), [(28, 2), (32, 4)])
def test_flip_crop_mirrors_about_half_and_translates_as_crop_does(side: int, pad: int) -> None:
    image = torch.arange(side * side, dtype=torch.float32).view(side, side) % 251 + 1
    batch = image.expand(64, 1, side, side).to(torch.uint8)
    out = prep(0, "flip-crop")(batch)
    mirrors = []
    for row in out:
        found = [
            (mirror, dy, dx)
            for mirror in (False, True)
            for dy in range(-4, 5)  # wider than the 28-px pad: a 3- or 4-pixel move would be found and fail
            for dx in range(-4, 5)
            if torch.equal(row[0], shifted(image.flip(1) if mirror else image, dy, dx))
        ]
        assert len(found) == 1 and max(abs(found[0][1]), abs(found[0][2])) <= pad
        mirrors.append(found[0][0])
    assert 16 <= sum(mirrors) <= 48  # about half of the 64 images are mirrored


def shifted(image: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """image moved by (dy, dx) pixels, zeros where it moved out of view."""
    h, w = image.shape
    out = torch.zeros_like(image)
    out[max(dy, 0) : h + min(dy, 0), max(dx, 0) : w + min(dx, 0)] = image[max(-dy, 0) : h + min(-dy, 0), max(-dx, 0) : w + min(-dx, 0)]
    return out
