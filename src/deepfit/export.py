"""`deepfit export`: a checkpoint -> a self-contained ONNX or TorchScript file with a dynamic batch
dimension. The file carries the class names and the preprocessing (ONNX metadata_props,
TorchScript extra file deepfit.json), and every export checks itself: the written file is run
(onnxruntime / torch.jit.load) on sample inputs and compared with the PyTorch model."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

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
from deepfit.optional import import_optional
from deepfit.trained import TrainedModel, load_trained_model, run_folder

TOLERANCE = 1e-4  # largest absolute logit difference an export may show against PyTorch
CHECK_BATCHES = (1, 5)  # sample batch sizes run through the exported file (export traces with 2)
METADATA_VERSION = 1


class ExportError(DeepfitError):
    """An export that could not be written, or whose file does not compute what the model does."""


class ExportMismatch(ExportError):
    """The exported file runs but its outputs differ from PyTorch's beyond TOLERANCE."""

    exit_code = 1


@dataclass
class ExportResult:
    path: Path
    format: str
    max_abs_diff: float  # largest |exported - PyTorch| logit over the sample inputs
    batch_sizes: tuple[int, ...]  # sample batch sizes the check ran
    exporter: str = ""  # ONNX: "dynamo" (torch.export based) or "torchscript" (the fallback, dynamo=False)


def export_checkpoint(path: str | Path, *, format: str, out: str | Path | None = None) -> ExportResult:
    """Export a run folder or checkpoint; the written file has been checked against PyTorch."""
    if format not in FORMATS:
        raise ExportError(f"unknown export format {format!r}; valid: {', '.join(FORMATS)}")
    if format == "onnx":
        require_onnx()  # before anything is read or written
    trained = load_trained_model(path, channels_last=False)  # exported graphs take plain NCHW
    target = Path(out) if out is not None else default_out(Path(path), trained.path, format)
    example = sample_inputs(trained, 2, seed=0)
    exporter = ""
    with staged_file(target, format=format, error=ExportError) as staging:
        if format == "onnx":
            exporter = write_onnx(trained, example, staging)
        else:
            write_torchscript(trained, example, staging)
        diff = verify(trained, staging, format)
        if not diff <= TOLERANCE:  # also catches NaN
            raise ExportMismatch(f"{format} export differs from the PyTorch model by {diff:.3g} (> {TOLERANCE:g}); {target} not written")
    return ExportResult(target, format, diff, CHECK_BATCHES, exporter)


ONNX_PACKAGES = ("onnx", "onnxruntime")  # write, check (without onnxscript write_onnx falls back to the TorchScript-based exporter)


def require_onnx() -> None:
    """deepfit depends on these, but a partial install may lack one: one line and the pip command."""
    for module in ONNX_PACKAGES:
        import_optional(module, extra="", purpose="deepfit export --format onnx")


def default_out(given: Path, checkpoint: Path, format: str) -> Path:
    """runs/<name>/export/model.onnx for a run; <checkpoint stem>.onnx beside a bare checkpoint."""
    return export_path(run_folder(given) or run_folder(checkpoint), checkpoint, format)


def metadata(trained: TrainedModel) -> dict[str, Any]:
    """What a consumer needs besides the graph: class names and how to prepare an image."""
    c, h, w = trained.input_shape
    return {
        "deepfit_metadata_version": METADATA_VERSION,
        "classes": list(trained.classes),
        "input_shape": [c, h, w],
        "mean": list(trained.mean),
        "std": list(trained.std),
        "input_layout": "NCHW float32",
        "preprocessing": f"resize to {h}x{w}, {c} channel(s), x = (pixels / 255 - mean) / std per channel",
        "output": "logits (N, num_classes); softmax gives probabilities",
        "model": trained.config.model.name,
    }


def sample_inputs(trained: TrainedModel, batch: int, *, seed: int) -> torch.Tensor:
    """Random uint8 images prepared exactly like real ones: (batch, C, H, W) float32."""
    generator = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (batch, *trained.input_shape), generator=generator, dtype=torch.uint8)
    x, _ = next(iter(trained.batches(images, batch_size=batch)))
    return x.cpu()


def write_onnx(trained: TrainedModel, example: torch.Tensor, target: Path) -> str:
    """Write the ONNX file; returns which exporter wrote it (see exportfile.export_onnx)."""
    proto, exporter = export_onnx(trained.model.cpu(), example, error=ExportError, what=trained.config.model.name)
    save_onnx(proto, metadata(trained), target)
    return exporter


def write_torchscript(trained: TrainedModel, example: torch.Tensor, target: Path) -> None:
    save_torchscript(trained.model.cpu(), (example,), target, metadata(trained), error=ExportError, what=trained.config.model.name)


def verify(trained: TrainedModel, target: Path, format: str) -> float:
    """Largest absolute logit difference between the written file and the PyTorch model."""
    run = onnx_runner(target) if format == "onnx" else torchscript_runner(target)
    worst = 0.0
    for i, batch in enumerate(CHECK_BATCHES):
        x = sample_inputs(trained, batch, seed=1 + i)
        with torch.inference_mode():
            expected = trained.model.cpu()(x).float().numpy()
        on = f"a batch of {batch}"
        worst = max(worst, difference(run, (x.numpy(),), expected, error=ExportError, shape_error=ExportMismatch, format=format, on=on))
    return worst


def onnx_runner(target: Path) -> Any:
    session = onnx_session(target, error=ExportError)
    name = session.get_inputs()[0].name
    return lambda x: np.asarray(session.run(None, {name: x})[0])


def torchscript_runner(target: Path) -> Any:
    loaded = load_torchscript(target, error=ExportError)

    def run(x: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return np.asarray(loaded(torch.from_numpy(x)).float().numpy())

    return run


def read_onnx_metadata(path: str | Path) -> dict[str, Any]:
    """The deepfit metadata of an exported ONNX file (JSON values decoded)."""
    import onnx

    props = {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
    return {key: decode(value) for key, value in props.items()}


def decode(value: str) -> Any:
    try:
        return json.loads(value)
    except ValueError:
        return value
