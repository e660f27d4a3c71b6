"""data.drop_last: full training batches only, as airbench's loader. Both pipelines hand out the
same full batches (the first batches of the epoch without it), a different few images are left out
each epoch, a resumed epoch goes on exactly, the schedule spans the steps taken, and a split
smaller than one batch stops before a run folder exists."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

import deepfit
from deepfit.checkpoint import load_checkpoint
from deepfit.data import BatchLoader, ImageSet, StreamLoader, build_loader
from deepfit.data.stream import TensorItems, stream_set
from deepfit.errors import DataError
from tests.test_fit_api import tiny_config

CPU = torch.device("cpu")
IMAGES = ImageSet(torch.arange(50, dtype=torch.uint8).view(50, 1, 1, 1).expand(50, 1, 2, 2).contiguous(), torch.arange(50) % 5)
OPTIONS: dict[str, Any] = {"batch_size": 8, "mean": (0.0,), "std": (1.0,), "device": CPU, "shuffle": True, "seed": 4}


def loader(pipeline: str, drop_last: bool) -> BatchLoader | StreamLoader:
    if pipeline == "memory":
        return BatchLoader(IMAGES, drop_last=drop_last, **OPTIONS)
    items = stream_set(TensorItems(IMAGES), IMAGES.labels, (1, 2, 2))
    return StreamLoader(items, num_workers=0, drop_last=drop_last, **OPTIONS)


def image_ids(batches: list[tuple[torch.Tensor, torch.Tensor]]) -> list[list[int]]:
    """Each image's pixels hold its index in IMAGES: the indices of every batch."""
    return [(x[:, 0, 0, 0] * 255).round().long().tolist() for x, _ in batches]


@pytest.mark.parametrize("pipeline", ["memory", "stream"])
def test_every_batch_is_full_and_each_epoch_leaves_out_a_different_few(pipeline: str) -> None:
    dropping, keeping = loader(pipeline, drop_last=True), loader(pipeline, drop_last=False)
    assert (dropping.batches_per_epoch, len(dropping), keeping.batches_per_epoch) == (6, 6, 7)
    left_out = []
    for _ in range(2):
        full, whole = image_ids(list(dropping)), image_ids(list(keeping))
        assert [len(b) for b in full] == [8] * 6 and [len(b) for b in whole] == [8] * 6 + [2]
        assert full == whole[:6]  # the same order, its tail left out
        seen = [i for b in full for i in b]
        assert len(set(seen)) == 48
        left_out.append(set(range(50)) - set(seen))
    assert left_out[0] != left_out[1]


def test_a_run_resumed_mid_epoch_draws_the_same_full_batches() -> None:
    whole = loader("memory", drop_last=True)
    straight = image_ids(list(whole) + list(whole))
    first = loader("memory", drop_last=True)
    batches = iter(first)
    done = [next(batches) for _ in range(2)]
    resumed = loader("memory", drop_last=True)
    resumed.load_state_dict(first.state_dict())
    assert len(resumed) == 4
    assert image_ids(done + list(resumed) + list(resumed)) == straight


def test_fit_takes_full_batches_and_its_schedule_ends_on_the_last_of_them(tiny_idx: Path, tmp_path: Path) -> None:
    """110 training images in batches of 16: 6 full ones an epoch (7 without drop_last)."""
    overrides = {"data.batch_size": "16", "data.drop_last": "true", "train.epochs": "2", "optim.lr": "0.01"}
    overrides |= {"sched.name": "linear", "sched.end_factor": "0.25", "sched.start_factor": "0.5"}
    result = deepfit.fit(tiny_config(tiny_idx, tmp_path, **overrides))
    state = load_checkpoint(result.run_dir / "checkpoints" / "last.pt")
    assert state["step"] == 12
    assert state["optimizer"]["param_groups"][0]["lr"] == pytest.approx(0.01 * 0.25)


def test_fewer_images_than_one_batch_stop_before_the_run_folder(tiny_idx: Path, tmp_path: Path) -> None:
    config = tiny_config(tiny_idx, tmp_path, **{"data.batch_size": "111", "data.drop_last": "true"})
    with pytest.raises(
        DataError, match=r"data\.drop_last keeps full batches only, and 110 training images fill none of data\.batch_size 111"
    ):
        deepfit.fit(config)
    assert not (tmp_path / "run").exists()
    with pytest.raises(DataError, match="fill none"):
        build_loader(IMAGES, drop_last=True, **(OPTIONS | {"batch_size": 51}))
    assert len(build_loader(IMAGES, drop_last=True, **(OPTIONS | {"batch_size": 50}))) == 1
