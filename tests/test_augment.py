"""data.augment crop: a random translation (2 px on 28-px images, 4 from 32 px, or data.crop_pad's), never a mirror,
the uncovered border filled as data.pad_mode says; flip-crop: a mirror of half the batch, then the
same translation, the mirror drawn per batch (data.flip random) or alternating per image each
epoch (alternate). Drawn from the loader's generator (the same seed gives the same batch)."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import torch

import deepfit
from deepfit.config import Config, set_value
from deepfit.data import BatchLoader, ImageSet
from deepfit.data.loader import BatchPrep
from deepfit.errors import DataError


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


@pytest.mark.parametrize("mode", ["reflect", "replicate"])
def test_crop_fills_the_uncovered_border_as_pad_mode_says(mode: str) -> None:
    side, pad = 32, 2
    image = torch.arange(side * side, dtype=torch.float32).view(1, 1, side, side) % 251 + 1  # no zeros
    batch = image.expand(128, 1, side, side).to(torch.uint8)
    generator = torch.Generator().manual_seed(0)
    out = BatchPrep(
        mean=(0.0,), std=(1 / 255,), device=torch.device("cpu"), generator=generator, augment="crop", crop_pad=pad, pad_mode=mode
    )(batch)
    padded = torch.nn.functional.pad(image, (pad,) * 4, mode=mode)[0, 0]
    windows = {
        (dy, dx): padded[pad - dy : pad - dy + side, pad - dx : pad - dx + side]
        for dy in range(-pad, pad + 1)
        for dx in range(-pad, pad + 1)
    }
    moved = 0
    for row in out:
        found = [shift for shift, window in windows.items() if torch.equal(row[0], window)]
        assert len(found) == 1
        moved += found[0] != (0, 0)
    assert moved > 64 and bool((out > 0).all())  # moved images, yet no black border anywhere (constant's zeros)


def test_a_reflected_border_wider_than_the_image_is_refused_in_one_line() -> None:
    generator = torch.Generator().manual_seed(0)
    prepare = BatchPrep(
        mean=(0.0,), std=(1.0,), device=torch.device("cpu"), generator=generator, augment="crop", crop_pad=8, pad_mode="reflect"
    )
    with pytest.raises(DataError, match=r"reflect needs data\.crop_pad below the image side \(8 px\); got 8"):
        prepare(torch.zeros(2, 1, 8, 8, dtype=torch.uint8))
    assert prepare(torch.zeros(2, 1, 9, 9, dtype=torch.uint8)).shape == (2, 1, 9, 9)


def test_a_run_with_a_reflected_border_too_wide_stops_before_its_run_folder(tiny_idx: Path, tmp_path: Path) -> None:
    """The tiny images are 12 px: the loader refuses the border when it is built, not at the first batch."""
    config = Config()
    for key, value in {
        "data.name": "mnist", "data.dir": str(tiny_idx), "data.augment": "flip-crop", "data.crop_pad": "12",
        "data.pad_mode": "reflect", "train.epochs": "1", "train.out": str(tmp_path / "runs"), "train.progress": "false",
    }.items():  # fmt: skip
        set_value(config, key, value)
    with pytest.raises(DataError, match=r"reflect needs data\.crop_pad below the image side \(12 px\); got 12"):
        deepfit.fit(config)
    assert not (tmp_path / "runs").exists()
    set_value(config, "data.crop_pad", "11")
    assert deepfit.fit(config).history[0]["epoch"] == 1.0


def mirrored_each_epoch(seed: int, epochs: int, state_after: int | None = None) -> list[list[bool]]:
    """Per epoch, whether each of 40 distinct asymmetric images came out mirrored (flip alternate, no shift)."""
    images = (torch.arange(40 * 6 * 6).view(40, 1, 6, 6) % 251 + 1).to(torch.uint8)
    options = {"batch_size": 8, "mean": (0.0,), "std": (1 / 255,), "device": torch.device("cpu"), "shuffle": True, "seed": seed}
    loader = BatchLoader(ImageSet(images, torch.arange(40)), augment="flip-crop", crop_pad=0, flip="alternate", **options)
    seen = []
    for epoch in range(epochs):
        if epoch == state_after:  # a new loader resumed from the state the old one saved at this epoch's start
            state = loader.state_dict()
            loader = BatchLoader(ImageSet(images, torch.arange(40)), augment="flip-crop", crop_pad=0, flip="alternate", **options)
            loader.load_state_dict(state)
        flips = [False] * 40
        for x, y in loader:
            for row, i in zip(x, y.tolist(), strict=True):
                assert torch.equal(row, images[i].float()) or torch.equal(row, images[i].float().flip(2))
                flips[i] = torch.equal(row, images[i].float().flip(2))
        seen.append(flips)
    return seen


def test_alternate_flip_mirrors_a_random_half_then_each_image_the_other_way_every_epoch() -> None:
    seen = mirrored_each_epoch(seed=0, epochs=4)
    assert 10 <= sum(seen[0]) <= 30  # a coin per image in the first epoch
    for before, after in itertools.pairwise(seen):
        assert after == [not flipped for flipped in before]  # every image the other way round next epoch
    assert mirrored_each_epoch(seed=0, epochs=4, state_after=3) == seen  # a resumed run keeps the parity
    assert mirrored_each_epoch(seed=1, epochs=1)[0] != seen[0]  # the coins come from the seed


def test_random_flips_do_not_alternate() -> None:
    images = (torch.arange(40 * 6 * 6).view(40, 1, 6, 6) % 251 + 1).to(torch.uint8)
    loader = BatchLoader(
        ImageSet(images, torch.arange(40)), batch_size=40, mean=(0.0,), std=(1 / 255,), device=torch.device("cpu"),
        augment="flip-crop", crop_pad=0, seed=0,
    )  # fmt: skip
    epochs = [
        [torch.equal(row, images[i].float().flip(2)) for row, i in zip(x, y.tolist(), strict=True)]
        for x, y in (next(iter(list(loader))) for _ in range(4))
    ]
    assert any(after != [not f for f in before] for before, after in itertools.pairwise(epochs))


def windows_on_the_device(x: torch.Tensor, pad: int, generator: torch.Generator, mode: str) -> torch.Tensor:
    """random_crop as it was before: two copies of the offsets and two aranges a batch."""
    b, c, h, w = x.shape
    padded = torch.nn.functional.pad(x, (pad, pad, pad, pad), mode=mode)
    dy = torch.randint(0, 2 * pad + 1, (b,), generator=generator).to(x.device)
    dx = torch.randint(0, 2 * pad + 1, (b,), generator=generator).to(x.device)
    rows = (dy.view(b, 1) + torch.arange(h, device=x.device)).view(b, 1, h, 1).expand(b, c, h, w + 2 * pad)
    cols = (dx.view(b, 1) + torch.arange(w, device=x.device)).view(b, 1, 1, w).expand(b, c, h, w)
    return padded.gather(2, rows).gather(3, cols)


@pytest.mark.parametrize("mode", ["constant", "reflect", "replicate"])
def test_crop_offsets_travel_in_one_copy_with_the_same_pixels(mode: str, device: torch.device) -> None:
    """A batch's row and column offsets go to the device in one copy, and the 0..n-1 positions
    added to them are made once: six ops on the device a batch (one copy, two adds, the pad, two
    gathers) where there were nine (a launch each on a GPU), and the same pixels from the same draws."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from deepfit.data.loader import random_crop

    class DeviceOps(TorchDispatchMode):  # ops whose output lives on the meta device: a GPU's launches
        def __init__(self) -> None:
            super().__init__()
            self.names: list[str] = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
            out = func(*args, **(kwargs or {}))
            if isinstance(out, torch.Tensor) and out.device.type == "meta" and not func.is_view:
                self.names.append(func.overloadpacket.__name__)
            return out

    x = torch.rand(6, 3, 10, 10, device=device)
    crops = [random_crop(x, pad=3, generator=torch.Generator().manual_seed(s), mode=mode) for s in range(4)]
    before = [windows_on_the_device(x, 3, torch.Generator().manual_seed(s), mode) for s in range(4)]
    assert all(torch.equal(a, b) for a, b in zip(crops, before, strict=True))
    assert not torch.equal(crops[0], crops[1])  # the seeds do move the windows
    on_meta = torch.empty(6, 3, 10, 10, device="meta")
    random_crop(on_meta, pad=3, generator=torch.Generator().manual_seed(0), mode=mode)  # its positions are made once
    now, then = DeviceOps(), DeviceOps()
    with now:
        random_crop(on_meta, pad=3, generator=torch.Generator().manual_seed(0), mode=mode)
    with then:
        windows_on_the_device(on_meta, 3, torch.Generator().manual_seed(0), mode)
    assert len(now.names) == 6 and now.names.count("_to_copy") == 1 and now.names.count("add") == 2, now.names
    assert len(then.names) == 9, then.names
