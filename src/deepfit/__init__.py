"""deepfit: train, evaluate, explain and export PyTorch image classifiers."""

from deepfit.config import Config, load_config
from deepfit.data import DataBundle, build_data, list_datasets
from deepfit.engine import evaluate, predict_logits, train_one_epoch
from deepfit.errors import CheckpointError, ConfigError, DataError, DeepfitError
from deepfit.evaluation import evaluate_checkpoint
from deepfit.export import export_checkpoint
from deepfit.fit import FitResult, fit
from deepfit.models import build_model, list_models
from deepfit.predict import Prediction, Predictor

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
