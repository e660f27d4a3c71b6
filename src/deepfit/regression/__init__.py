"""The regression task: predict a number from table rows (a CSV file, or the embedded `line` and
`diabetes` data) with `linear` or `mlp`, beside the image task and sharing its engine,
checkpoints, config, history and plots."""

from deepfit.regression.defaults import default_config
from deepfit.regression.fit import RegressionResult, fit_regression
from deepfit.regression.models import list_regression_models

__all__ = ["RegressionResult", "default_config", "fit_regression", "list_regression_models"]
