"""The regression task's defaults, over the image task's. Measured (README, "Regression"): on
standardised features, full-batch SGD with momentum 0.9 at lr 0.1 reached the least-squares
training MSE (within 1%) after 10 epochs on `line` and 38 on `diabetes`; Adam at 0.1 with
one-cycle needed 48/49 of 100, mini-batches of 32 with Adam 3e-2 26/21 epochs at 5-10 steps each.
A batch of 1024 rows is the whole training split of small tables and still bounds memory for big ones."""

from __future__ import annotations

from typing import Any

from deepfit.config import Config, config_from_dict

DEFAULTS: dict[str, dict[str, Any]] = {
    "data": {"task": "regression", "name": "line", "batch_size": 1024},
    "model": {"name": "linear"},
    "optim": {"name": "sgd", "lr": 0.1, "momentum": 0.9},
    "sched": {"name": "none"},
    "loss": {"name": "mse"},
    "train": {"epochs": 100, "monitor": "val_loss"},
}


def default_config() -> Config:
    """A Config with the regression defaults: what `deepfit train --task regression` starts from."""
    return config_from_dict(DEFAULTS)
