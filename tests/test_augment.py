"""data.augment crop: a random translation (2 px on 28-px images, 4 from 32 px, or data.crop_pad's), never a mirror;
flip-crop: a mirror of half the batch, then the same translation. Drawn from the loader's
generator (the same seed gives the same batch)."""

from __future__ import annotations

import pytest
import torch

from deepfit.data.loader import BatchPrep


def prep(seed: int, augment: str = "crop", crop_pad: int | None = None) -> BatchPrep:
    generator = torch.Generator().manual_seed(seed)
    return BatchPrep(mean=(0.0,), std=(1 / 255,), device=torch.device("cpu"), generator=generator, augment=augment, crop_pad=crop_pad)


@pytest.mark.parametrize(("side", "pad", "asked"), [(28, 2, None), (32, 4, None), (32, 2, 2), (28, 3, 3)])
def test_crop_only_translates_within_its_pad(side: int, pad: int, asked: int | None) -> None:
    """The default pad by image size, or data.crop_pad's; every shift up to it is drawn, none beyond."""
    image = torch.arange(side * side, dtype=torch.float32).view(1, 1, side, side) % 251 + 1  # no zeros, no symmetry
    batch = image.expand(256, 1, side, side).to(torch.uint8)
    out = prep(0, crop_pad=asked)(batch)  # std 1/255, mean 0: the pixel values come back unchanged
    shifts = set()
    for row in out:
        found = [
            (dy, dx)
            for dy in range(-5, 6)  # wider than any pad here: a move beyond it would be found and fail
            for dx in range(-5, 6)
            if torch.equal(row[0], shifted(batch[0, 0].float(), dy, dx))
        ]
        assert len(found) == 1, "each image is exactly one translation of the original (no mirror)"
        shifts.add(found[0])
    assert {max(abs(dy), abs(dx)) for dy, dx in shifts} == set(range(pad + 1))  # every distance up to the pad, none beyond
    assert torch.equal(out, prep(0, crop_pad=asked)(batch)) and not torch.equal(out, prep(1, crop_pad=asked)(batch))


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
