"""The regression task's defaults, over the image task's. Full-batch gradient descent on
standardised features is the textbook fit of a least-squares model, and epochs of one step
each take milliseconds. Measured (epochs until the training MSE is within 1% / 0.1% of the
least-squares optimum; line, diabetes, a 2-feature table with R^2 ~ 1): SGD lr 0.2 momentum 0.7:
16/16/35 and 16/81/40; SGD lr 0.1 momentum 0.9: 10/38/115 and 10/72/136; Adam lr 0.1: 47/38/117;
SGD lr 0.3 momentum 0.5 is faster still (9/9/19) but diverges on collinear features sooner
(stable while 2 x the largest eigenvalue of the feature correlation matrix < 2(1 + momentum)/lr:
8.5 for the default, diabetes has 4.0). A batch of 1024 rows is the whole training split of small
tables and still bounds memory for big ones."""

from __future__ import annotations

from typing import Any

from deepfit.config import Config, config_from_dict

DEFAULTS: dict[str, dict[str, Any]] = {
    "data": {"task": "regression", "name": "line", "batch_size": 1024},
    "model": {"name": "linear"},
    "optim": {"name": "sgd", "lr": 0.2, "momentum": 0.7},
    "sched": {"name": "none"},
    "loss": {"name": "mse"},
    # best.pt by the training MSE: the linear model is a convex least-squares fit, so its best is its
    # converged state; diabetes's 35 validation rows picked epoch 14 by val_loss (test R^2 0.41, converged 0.52).
    # restore_best: the test metrics printed after training are those of best.pt, as `evaluate` reports them.
    "train": {"epochs": 100, "monitor": "train_mse", "restore_best": True},
}


def default_config() -> Config:
    """A Config with the regression defaults: what `deepfit train --task regression` starts from."""
    return config_from_dict(DEFAULTS)
