"""Exact resume: a run resumed from a mid-epoch step checkpoint, an epoch boundary or its end finishes
with weights and optimizer state that hash identically to the uninterrupted run (same seed, with
train.deterministic: the CUDA promise; on the CPU it holds without it); leaving any one state item
out of the checkpoint changes the hash.

The test model gives every random generator a real consumer: dropout draws from torch's, input
noise from numpy's, a per-batch gain from python's; flip-crop augmentation and the shuffle order
draw from the loader's dedicated generator; a CPU GradScaler started near overflow skips steps
depending on its saved scale (deepfit itself scales only for fp16 on CUDA). The suite's device
(DEEPFIT_TEST_DEVICE) trains it."""

from __future__ import annotations

import hashlib
import importlib
import random
import shutil
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from deepfit.checkpoint import load_checkpoint, save_checkpoint
from deepfit.config import Config, set_value
from deepfit.fit import fit, prepare_run
from deepfit.runstate import checkpoint_state
from deepfit.runtime import seed_everything

fit_module = importlib.import_module("deepfit.fit")  # the module; deepfit.fit is also the function
BATCHES_PER_EPOCH = 7  # 108 training images (120 minus a 10% validation split) in batches of 16


def tiny_config(tiny_idx: Path, out: Path) -> Config:
    config = Config()
    values = {
        "data.name": "mnist", "data.dir": str(tiny_idx), "data.batch-size": "16", "data.augment": "flip-crop",
        "train.epochs": "3", "train.progress": "false", "train.out": str(out), "train.seed": "7",
        "train.checkpoint-every": "3", "train.keep-last": "100", "sched.name": "onecycle", "train.deterministic": "true",
    }  # fmt: skip
    for key, value in values.items():
        set_value(config, key, value)
    return config


class EveryGenerator(nn.Module):
    """Conv-BN-dropout classifier for (B, 1, 12, 12) images whose training pass draws from the torch,
    numpy and python generators."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(123)  # the same initial weights in every run of this test
        self.features = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2))
        self.head = nn.Sequential(nn.Flatten(), nn.Dropout(0.3), nn.Linear(8 * 6 * 6, 10))
        self.loud = nn.Parameter(torch.zeros(10))  # enters as 100 * loud: gradients ~10, which overflow at scale ~2**124

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            noise = torch.from_numpy(np.random.standard_normal(x.shape)).float().to(x.device)  # numpy's generator
            x = (x + 0.1 * noise) * (1.0 + 0.1 * random.random())  # python's generator
        return self.head(self.features(x)) + 100.0 * self.loud


def cpu_scaler(precision: str, device: torch.device) -> torch.amp.GradScaler:
    """A GradScaler on the training device (fp16's, in any precision): doubles after every good step until the scaled gradients of the model's loud bias overflow
    fp32, then skips a step and halves: which steps are skipped depends on the scale it resumes with."""
    return torch.amp.GradScaler(device.type, init_scale=2.0**118, growth_interval=1)


@pytest.fixture(autouse=True)
def _scaled(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fit_module, "build_scaler", cpu_scaler)
    warnings.filterwarnings("ignore", message=".*flips images.*")


def state_hash(path: Path) -> str:
    """sha256 of the model weights and the optimizer state (every tensor and number, in order)."""
    state = load_checkpoint(path)
    digest = hashlib.sha256()

    def feed(value: Any) -> None:
        if isinstance(value, torch.Tensor):
            digest.update(value.detach().cpu().reshape(-1).contiguous().view(torch.uint8).numpy().tobytes())
        elif isinstance(value, dict):
            for key in sorted(value, key=str):
                digest.update(str(key).encode())
                feed(value[key])
        elif isinstance(value, (list, tuple)):
            for item in value:
                feed(item)
        else:
            digest.update(repr(value).encode())

    feed(state["model"])
    feed(state["optimizer"])
    return digest.hexdigest()[:16]


def train_full(tiny_idx: Path, root: Path) -> Path:
    """The uninterrupted run; keeps a copy of last.pt at each epoch end."""
    out = root / "full"

    def keep(row: dict[str, float]) -> None:
        shutil.copy(out / "checkpoints" / "last.pt", out / f"epoch-{int(row['epoch'])}.pt")

    fit(tiny_config(tiny_idx, out), model=EveryGenerator(), on_epoch=keep)
    return out


def resume_from(tiny_idx: Path, checkpoint: Path, folder: Path, edit: Callable[[dict[str, Any]], None] | None = None) -> str:
    """Put `checkpoint` (optionally edited) into a fresh run folder as last.pt, resume, hash the end."""
    (folder / "checkpoints").mkdir(parents=True)
    state = load_checkpoint(checkpoint)
    if edit is not None:
        edit(state)
    save_checkpoint(state, folder / "checkpoints" / "last.pt")
    fit(tiny_config(tiny_idx, folder), model=EveryGenerator(), resume=folder)
    return state_hash(folder / "checkpoints" / "last.pt")


def fresh_state(tiny_idx: Path, folder: Path) -> dict[str, Any]:
    """What a resumed run holds for each item before restoring: a new run's state at step 0."""
    config = tiny_config(tiny_idx, folder)
    seed_everything(config.train.seed)
    return checkpoint_state(prepare_run(config, EveryGenerator(), None, None))


def replace(*keys: str) -> Callable[[dict[str, Any], dict[str, Any]], None]:
    """An edit that puts the fresh value at state[k1][k2]...: the item as if it were never saved."""

    def edit(state: dict[str, Any], fresh: dict[str, Any]) -> None:
        target, source = state, fresh
        for key in keys[:-1]:
            target, source = target[key], source[key]
        target[keys[-1]] = source[keys[-1]]

    return edit


def replace_present(*paths: tuple[str, ...]) -> Callable[[dict[str, Any], dict[str, Any]], None]:
    """replace() for each of `paths` that the checkpoint holds (rng.cuda: where CUDA is available)."""

    def edit(state: dict[str, Any], fresh: dict[str, Any]) -> None:
        for path in paths:
            if path[-1] in state[path[0]]:
                replace(*path)(state, fresh)

    return edit


LEFT_OUT = {
    "model": replace("model"),
    "optimizer": replace("optimizer"),
    "scheduler": replace("scheduler"),
    "scaler": replace("scaler"),
    "position in epoch": replace("loader", "position"),
    "shuffle order": replace("loader", "order"),
    "torch RNG": replace_present(("rng", "torch"), ("rng", "cuda")),  # dropout draws from the generator of the device it runs on
    "numpy RNG": replace("rng", "numpy"),
    "python RNG": replace("rng", "python"),
    "data generator": replace("loader", "generator"),
}


def resume_without(tiny_idx: Path, checkpoint: Path, folder: Path, edit: Any, fresh: dict[str, Any]) -> str:
    """The hash after resuming without one item, or why the run could not even finish
    (e.g. without the position, the one-cycle schedule runs out of steps)."""
    try:
        return resume_from(tiny_idx, checkpoint, folder, lambda state: edit(state, fresh))
    except ValueError as err:
        return f"failed: {err}"


def test_resume_points_and_left_out_items(tiny_idx: Path, tmp_path: Path) -> None:
    full = train_full(tiny_idx, tmp_path)
    expected = state_hash(full / "checkpoints" / "last.pt")
    points = {
        "mid-epoch 1 (step 3)": full / "checkpoints" / "step-00000003.pt",
        "mid-epoch 2 (step 9)": full / "checkpoints" / "step-00000009.pt",
        "epoch boundary (end of epoch 1)": full / "epoch-1.pt",
        "end of run": full / "epoch-3.pt",
    }
    table = {"uninterrupted": expected}
    for i, (name, path) in enumerate(points.items()):
        table[f"resume from {name}"] = resume_from(tiny_idx, path, tmp_path / f"point-{i}")
    fresh = fresh_state(tiny_idx, tmp_path / "fresh")
    for i, (item, edit) in enumerate(LEFT_OUT.items()):
        table[f"step 3 without {item}"] = resume_without(tiny_idx, points["mid-epoch 1 (step 3)"], tmp_path / f"out-{i}", edit, fresh)
    print("\n".join(f"{hash_}  {name}" for name, hash_ in table.items()))
    for name, hash_ in table.items():
        assert (hash_ == expected) == ("without" not in name), name
