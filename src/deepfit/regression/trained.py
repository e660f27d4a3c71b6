"""A regression model rebuilt from nothing but its checkpoint: the architecture and weights, the
schema that turns CSV rows into features, and the feature and target statistics."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from deepfit.checkpoint import checkpoint_task, load_checkpoint, load_model_state, resolve_run_checkpoint
from deepfit.config import Config, config_from_dict
from deepfit.errors import CheckpointError, ConfigError
from deepfit.regression.batches import predict_values
from deepfit.regression.models import build_regression_model
from deepfit.regression.split import Scaling
from deepfit.regression.table import Schema


@dataclass
class RegressionModel:
    """A trained regression model in eval mode on the CPU, and how to feed it."""

    path: Path  # the checkpoint file read
    model: nn.Module  # standardised features (B, F) -> standardised target (B, 1)
    config: Config
    schema: Schema
    scaling: Scaling
    history: list[dict[str, float]]

    @property
    def target(self) -> str:
        return self.schema.target

    def predict(self, features: torch.Tensor) -> torch.Tensor:
        """Features (N, F) in the file's units -> predictions (N,) in the target's units (float64)."""
        return self.scaling.undo_target(predict_values(self.model, self.scaling.features(features.double().numpy())))


def checkpoint_file(path: Path) -> Path:
    return resolve_run_checkpoint(path) if path.is_dir() else path


def load_regression_model(path: str | Path) -> RegressionModel:
    """Rebuild the model of a regression checkpoint (or run folder: best.pt, else last.pt); every
    problem with the file is a CheckpointError."""
    path = Path(path)
    state = load_checkpoint(path)
    file = checkpoint_file(path)
    if checkpoint_task(state) != "regression":
        raise CheckpointError(f"{file} holds a {checkpoint_task(state)} model, not a regression model")
    try:
        config = config_from_dict(state["config"])
        schema = Schema.from_dict(state["schema"])
        scaling = scaling_of(state, len(schema.feature_names()))
        model = build_regression_model(config.model, num_features=len(scaling.mean))
    except (ConfigError, TypeError, ValueError, KeyError, AttributeError) as err:
        raise CheckpointError(f"{file}: cannot rebuild its regression model: {err}") from None
    load_model_state(model, state["model"], file)
    return RegressionModel(file, model.eval(), config, schema, scaling, [dict(row) for row in state.get("history", [])])


def scaling_of(state: dict[str, Any], width: int) -> Scaling:
    mean, std = [float(v) for v in state["mean"]], [float(v) for v in state["std"]]
    if len(mean) != width or len(std) != width:
        raise ValueError(f"statistics for {len(mean)} features, the schema has {width}")
    if min(std) <= 0 or float(state["target_std"]) <= 0:
        raise ValueError("standard deviations must be positive")
    return Scaling(mean, std, float(state["target_mean"]), float(state["target_std"]))
