"""Exact resume for the streaming pipeline with 2 DataLoader workers: tests/test_resume.py's
resume points and left-out state items, on a tiny image folder decoded per batch in worker
processes. The loader's shuffle order, position and generator are left out in turn like every
other item, and each changes the final hash."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from deepfit.config import Config, set_value
from deepfit.data import StreamLoader
from deepfit.fit import prepare_run
from tests import test_resume
from tests.test_resume import EveryGenerator, _scaled  # noqa: F401  (_scaled: the autouse CPU GradScaler there)

BATCHES_PER_EPOCH = test_resume.BATCHES_PER_EPOCH  # 108 training images in batches of 16, as there


def write_band_folder(root: Path, *, count: int = 120, side: int = 12, seed: int = 0) -> Path:
    """tests/conftest.py's tiny learnable set as a folder of grey PNGs: class k brightens row band k."""
    rng = np.random.default_rng(seed)
    for i in range(count):
        label = i % 10
        pixels = rng.integers(0, 40, size=(side, side)).astype(np.uint8)
        pixels[label * side // 10 : label * side // 10 + max(1, side // 10), :] = 255
        folder = root / str(label)
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).save(folder / f"{i:04d}.png")
    return root


def stream_config(folder: Path, out: Path) -> Config:
    """test_resume's run (flip-crop, onecycle, a step checkpoint every 3 steps), streamed from the folder."""
    config = Config()
    values = {
        "data.name": str(folder), "data.pipeline": "stream", "data.num-workers": "2", "data.cache": "false",
        "data.batch-size": "16", "data.augment": "flip-crop",
        "train.epochs": "3", "train.progress": "false", "train.out": str(out), "train.seed": "7",
        "train.checkpoint-every": "3", "train.keep-last": "100", "sched.name": "onecycle",
        "train.deterministic": "true",  # equal hashes: on CUDA only with deterministic kernels
    }  # fmt: skip
    for key, value in values.items():
        set_value(config, key, value)
    return config


@pytest.fixture
def band_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The folder, with test_resume's runs pointed at it through the streaming pipeline."""
    monkeypatch.setattr(test_resume, "tiny_config", stream_config)
    return write_band_folder(tmp_path / "bands")


def test_the_runs_here_stream_with_two_workers(band_folder: Path, tmp_path: Path) -> None:
    run = prepare_run(stream_config(band_folder, tmp_path / "run"), EveryGenerator(), None, None)
    assert isinstance(run.loader, StreamLoader) and run.loader.loader.num_workers == 2
    assert run.loader.batches_per_epoch == BATCHES_PER_EPOCH


LOADER_ITEMS = ("position in epoch", "shuffle order", "data generator")  # what the streaming loader itself saves


def test_stream_resume_points_and_left_out_loader_state(band_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every resume point, and the loader's own state items left out; the other items (model,
    optimizer, RNGs...) do not depend on the pipeline: the in-memory test and the slow one here
    leave them out."""
    monkeypatch.setattr(test_resume, "LEFT_OUT", {item: test_resume.LEFT_OUT[item] for item in LOADER_ITEMS})
    test_resume.test_resume_points_and_left_out_items(band_folder, tmp_path)


@pytest.mark.slow
def test_stream_resume_points_and_every_left_out_item(band_folder: Path, tmp_path: Path) -> None:
    test_resume.test_resume_points_and_left_out_items(band_folder, tmp_path)
