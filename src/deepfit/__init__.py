"""deepfit: train, evaluate, explain, export and serve PyTorch models (image classifiers, regression
on tables, node classification on graphs).

The names below load on first use (PEP 562), so `import deepfit.cli` and `deepfit --help` do not
pay for torch; `import deepfit` alone imports nothing heavy until a name is touched."""

from __future__ import annotations

import importlib
import sys
import types
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from deepfit.config import Config, load_config
    from deepfit.data import DataBundle, build_data, list_datasets
    from deepfit.engine import evaluate, predict_logits, train_one_epoch
    from deepfit.errors import CheckpointError, ConfigError, DataError, DeepfitError
    from deepfit.evaluation import evaluate_checkpoint
    from deepfit.export import export_checkpoint
    from deepfit.fit import FitResult, fit
    from deepfit.models import build_model, list_models
    from deepfit.predict import Prediction, Predictor

__version__ = "0.1.0"  # kept equal to pyproject.toml's version (tests/test_startup.py checks)

# public name -> the module that defines it
_HOMES = {
    "CheckpointError": "deepfit.errors",
    "Config": "deepfit.config",
    "ConfigError": "deepfit.errors",
    "DataBundle": "deepfit.data",
    "DataError": "deepfit.errors",
    "DeepfitError": "deepfit.errors",
    "FitResult": "deepfit.fit",
    "Prediction": "deepfit.predict",
    "Predictor": "deepfit.predict",
    "build_data": "deepfit.data",
    "build_model": "deepfit.models",
    "evaluate": "deepfit.engine",
    "evaluate_checkpoint": "deepfit.evaluation",
    "export_checkpoint": "deepfit.export",
    "fit": "deepfit.fit",
    "list_datasets": "deepfit.data",
    "list_models": "deepfit.models",
    "load_config": "deepfit.config",
    "predict_logits": "deepfit.engine",
    "train_one_epoch": "deepfit.engine",
}

__all__ = [
    "CheckpointError",
    "Config",
    "ConfigError",
    "DataBundle",
    "DataError",
    "DeepfitError",
    "FitResult",
    "Prediction",
    "Predictor",
    "build_data",
    "build_model",
    "evaluate",
    "evaluate_checkpoint",
    "export_checkpoint",
    "fit",
    "list_datasets",
    "list_models",
    "load_config",
    "predict_logits",
    "train_one_epoch",
]


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module 'deepfit' has no attribute {name!r}")
    value = getattr(importlib.import_module(home), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])


class _Package(types.ModuleType):
    """`deepfit.fit` names both a submodule and the function users call. Importing the submodule
    makes Python set the package attribute to the module; ignore that, so `deepfit.fit(...)` stays
    the function (found by __getattr__), as it was when this package imported everything eagerly."""

    def __setattr__(self, name: str, value: Any) -> None:
        if name in _HOMES and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
