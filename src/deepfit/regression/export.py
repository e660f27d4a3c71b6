"""`deepfit export` for regression checkpoints: ONNX or TorchScript of the whole prediction,
standardisation included (raw feature rows (N, F) float32 in, the target's value (N, 1) out),
with the schema and statistics as metadata, checked against PyTorch like deepfit.export does.
The file side (metadata, tracing, loading the file back, comparing) is deepfit.exportfile's,
shared by every task."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from deepfit.errors import DeepfitError
from deepfit.exportfile import (
    FORMATS,
    difference,
    export_onnx,
    export_path,
    load_torchscript,
    onnx_session,
    save_onnx,
    save_torchscript,
    staged_file,
)
from deepfit.regression.trained import RegressionModel, load_regression_model

TOLERANCE = 1e-4  # largest difference from PyTorch, in standardised target units (x target_std in the target's)
CHECK_BATCHES = (1, 5)


class RegressionExportError(DeepfitError):
    """An export that could not be written, or whose file does not compute what the model does."""


@dataclass
class RegressionExport:
    path: Path
    format: str
    max_abs_diff: float  # in the target's units, over the sample rows
    tolerance: float  # in the target's units
    batch_sizes: tuple[int, ...]


class RawFeaturesModel(nn.Module):
    """The trained model with its standardisation: raw features (N, F) -> predicted target (N, 1)."""

    def __init__(self, trained: RegressionModel) -> None:
        super().__init__()
        s = trained.scaling
        self.model = trained.model.requires_grad_(False)  # the exported graph is for inference: outputs need no .detach()
        self.mean: torch.Tensor
        self.std: torch.Tensor
        self.register_buffer("mean", torch.tensor(s.mean, dtype=torch.float32))
        self.register_buffer("std", torch.tensor(s.std, dtype=torch.float32))
        self.target_mean, self.target_std = float(s.target_mean), float(s.target_std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model((x - self.mean) / self.std) * self.target_std + self.target_mean


def export_regression(path: str | Path, *, format: str, out: str | Path | None = None) -> RegressionExport:
    """Export a regression run folder or checkpoint; the written file has been checked against PyTorch."""
    if format not in FORMATS:
        raise RegressionExportError(f"unknown export format {format!r}; valid: {', '.join(FORMATS)}")
    trained = load_regression_model(path)
    module = RawFeaturesModel(trained).eval()
    target = Path(out) if out is not None else default_out(Path(path), trained.path, format)
    example = sample_rows(trained, 2, seed=0)
    tolerance = TOLERANCE * max(1.0, trained.scaling.target_std)
    with staged_file(target, format=format, error=RegressionExportError) as staging:
        (write_onnx if format == "onnx" else write_torchscript)(module, example, staging, metadata(trained))
        diff = verify(module, trained, staging, format)
        if not diff <= tolerance:  # also catches NaN
            raise RegressionExportError(
                f"{format} export differs from the PyTorch model by {diff:.3g} (> {tolerance:g}); {target} not written"
            )
    return RegressionExport(target, format, diff, tolerance, CHECK_BATCHES)


def default_out(given: Path, checkpoint: Path, format: str) -> Path:
    run_dir = given if given.is_dir() else checkpoint.parent.parent if checkpoint.parent.name == "checkpoints" else None
    is_run = run_dir is not None and (run_dir / "config.yaml").is_file()
    return export_path(run_dir if is_run else None, checkpoint, format)


def metadata(trained: RegressionModel) -> dict[str, Any]:
    """What a consumer needs besides the graph: the input columns and what comes out."""
    return {
        "deepfit_metadata_version": 1,
        "task": "regression",
        "features": trained.schema.feature_names(),
        "columns": trained.schema.columns,
        "categories": trained.schema.categories,
        "target": trained.target,
        "mean": trained.scaling.mean,
        "std": trained.scaling.std,
        "target_mean": trained.scaling.target_mean,
        "target_std": trained.scaling.target_std,
        "input_layout": "(N, F) float32 raw feature values in the order of `features` (one-hot columns as 0/1)",
        "output": f"(N, 1) predicted {trained.target}, in its own units (standardisation is inside the graph)",
        "model": trained.config.model.name,
    }


def sample_rows(trained: RegressionModel, batch: int, *, seed: int) -> torch.Tensor:
    """Random raw rows around the training distribution: (batch, F) float32."""
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn(batch, len(trained.scaling.mean), generator=generator)
    return noise * torch.tensor(trained.scaling.std) + torch.tensor(trained.scaling.mean)


def write_onnx(module: nn.Module, example: torch.Tensor, target: Path, meta: dict[str, Any]) -> None:
    proto, _ = export_onnx(module, example, error=RegressionExportError, what="the regression model", names=("features", "prediction"))
    save_onnx(proto, meta, target)


def write_torchscript(module: nn.Module, example: torch.Tensor, target: Path, meta: dict[str, Any]) -> None:
    save_torchscript(module, (example,), target, meta, error=RegressionExportError, what="the regression model")


def verify(module: nn.Module, trained: RegressionModel, target: Path, format: str) -> float:
    """Largest absolute difference between the written file's outputs and PyTorch's."""
    run = onnx_runner(target) if format == "onnx" else torchscript_runner(target)
    worst = 0.0
    for i, batch in enumerate(CHECK_BATCHES):
        x = sample_rows(trained, batch, seed=1 + i)
        with torch.inference_mode():
            expected = module(x).numpy()
        worst = max(worst, difference(run, (x.numpy(),), expected, error=RegressionExportError, format=format, on=f"{batch} row(s)"))
    return worst


def onnx_runner(target: Path) -> Any:
    session = onnx_session(target, error=RegressionExportError)
    name = session.get_inputs()[0].name
    return lambda x: np.asarray(session.run(None, {name: x})[0])


def torchscript_runner(target: Path) -> Any:
    loaded = load_torchscript(target, error=RegressionExportError)

    def run(x: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return np.asarray(loaded(torch.from_numpy(x)).numpy())

    return run
