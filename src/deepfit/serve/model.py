"""The model behind the server: a checkpoint (a run folder stands for best.pt) loaded once, with
`deepfit predict`'s decoding and normalisation, run by PyTorch or by its verified ONNX export.
`ServedModel.run_batch` is what the batcher's worker thread calls; it never touches the event loop."""

from __future__ import annotations

import csv
import json
import math
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from deepfit.data.decode import read_header
from deepfit.data.loader import BatchPrep
from deepfit.engine import view_logits
from deepfit.errors import DataError, DeepfitError
from deepfit.export import default_out, export_checkpoint, onnx_runner, verify
from deepfit.predict import Prediction, Predictor, decode
from deepfit.runtime import select_device, set_threads
from deepfit.trained import TrainedModel, load_trained_model, run_folder

BACKENDS = ("torch", "onnx")
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
Logits = Callable[[torch.Tensor], np.ndarray]  # normalised float (B, C, H, W) -> logits (B, K)


class ServeError(DeepfitError):
    """A serve option or model that cannot be served."""


class ImageRejected(DeepfitError):
    """One uploaded image that cannot be classified; `status` is the HTTP status it earns."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


@dataclass
class ServedModel:
    predictor: Predictor  # classes, shape, normalisation and the Prediction rule of `deepfit predict`
    logits: Logits
    backend: str
    onnx_path: Path | None = None
    max_pixels: int = 40_000_000  # width x height an upload may declare before it is decoded
    info: dict[str, Any] = field(default_factory=dict)  # what GET /v1/model returns
    prepare: BatchPrep | None = None  # uint8 batch -> normalised float, on the model's device

    @property
    def trained(self) -> TrainedModel:
        return self.predictor.trained

    def decode(self, data: bytes) -> torch.Tensor:
        """Encoded image bytes -> uint8 (C, H, W) at the model's shape, exactly as `deepfit predict`
        decodes a file; an unreadable or oversized image raises ImageRejected."""
        width, height = declared_size(data)
        if width * height > self.max_pixels:
            raise ImageRejected(f"image of {width}x{height} pixels is over the server's limit of {self.max_pixels:,} pixels", status=413)
        c, h, w = self.predictor.input_shape
        try:
            return decode(data, channels=c, size=(h, w))
        except DeepfitError as err:
            raise ImageRejected(f"not a usable image: {err}") from None

    def run_batch(self, images: torch.Tensor) -> np.ndarray:
        """uint8 (B, C, H, W) -> float logits (B, K), normalised by the BatchPrep that the training
        and `deepfit predict` BatchLoaders use (built once: a BatchLoader per batch cost 0.6 ms)."""
        if self.prepare is None:
            t = self.trained
            self.prepare = BatchPrep(mean=t.mean, std=t.std, device=t.device, generator=torch.Generator(), channels_last=t.channels_last)
        return self.logits(self.prepare(images))

    def process(self, items: Sequence[bytes]) -> list[np.ndarray | Exception]:
        """The batcher's work, in its worker thread: decode each upload (a bad one fails alone),
        then one forward pass over the good ones. Returns a logits row (K,) or the error, per item."""
        results: list[np.ndarray | Exception] = []
        good: list[torch.Tensor] = []
        for data in items:
            try:
                good.append(self.decode(data))
                results.append(np.empty(0))
            except ImageRejected as err:
                results.append(err)
        if good:
            logits = iter(self.run_batch(torch.stack(good)))
            results = [next(logits) if isinstance(r, np.ndarray) else r for r in results]
        return results

    def predictions(self, logits: np.ndarray, topk: int) -> list[Prediction]:
        """`deepfit predict`'s rule: argmax label, its softmax probability, the k most likely."""
        return self.predictor.predictions(torch.from_numpy(logits), [None] * logits.shape[0], topk)


def declared_size(data: bytes) -> tuple[int, int]:
    """(width, height) an upload declares, before any pixel is decoded. PNG's IHDR is read here
    directly: opening the file with PIL once more cost a third of a small PNG's decode time."""
    if data[:8] == PNG_SIGNATURE and data[12:16] == b"IHDR" and len(data) >= 24:
        width, height = struct.unpack(">II", data[16:24])
        return width, height
    try:
        header = read_header(data)  # JPEG markers, else PIL's header parse; refuses non-images
    except DataError as err:
        raise ImageRejected(f"not a usable image: {err}") from None
    return header.width, header.height


def load_served_model(
    path: str | Path, *, backend: str = "torch", device: str = "cpu", threads: int = 0, max_pixels: int = 40_000_000,
    tta: str | None = None,
) -> ServedModel:  # fmt: skip
    """Load RUN_OR_CHECKPOINT for serving; CheckpointError / ServeError for anything unusable.
    `tta`: test-time augmentation as in `deepfit predict` (default: the run's own train.tta)."""
    if backend not in BACKENDS:
        raise ServeError(f"unknown backend {backend!r}; valid: {', '.join(BACKENDS)}")
    set_threads(threads)
    if backend == "onnx":
        if device != "cpu":
            raise ServeError("--backend onnx runs on the CPU through onnxruntime; leave --device at cpu")
        trained = load_trained_model(path, channels_last=False)  # the exported graph takes plain NCHW
        onnx_file: Path | None = verified_onnx(Path(path), trained)
    else:
        trained = load_trained_model(path, device=select_device(device))
        onnx_file = None
    predictor = Predictor(trained, tta=tta)  # resolves the mode: the run's train.tta unless told
    logits = torch_logits(trained.model, predictor.tta) if onnx_file is None else onnx_logits(onnx_runner(onnx_file), predictor.tta)
    served = ServedModel(predictor, logits, backend, onnx_file, max_pixels)
    served.info = describe(Path(path), trained, backend) | {"tta": predictor.tta}
    return served


def torch_logits(model: torch.nn.Module, tta: str = "none") -> Logits:
    def run(x: torch.Tensor) -> np.ndarray:
        with torch.inference_mode():
            return view_logits(model, x, tta).cpu().numpy()

    return run


def onnx_logits(run: Callable[[np.ndarray], Any], tta: str = "none") -> Logits:
    """The exported graph is the plain forward pass: view_logits makes the test-time views before
    it and averages their logits, as for PyTorch."""

    def forward(view: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(np.asarray(run(view.contiguous().numpy()), dtype=np.float32))

    return lambda x: view_logits(forward, x, tta).numpy()


def verified_onnx(given: Path, trained: TrainedModel) -> Path:
    """The checkpoint's ONNX export: an existing one newer than the checkpoint is re-checked against
    PyTorch (deepfit.export.verify); otherwise it is exported (and checked) afresh."""
    target = default_out(given, trained.path, "onnx")
    if target.is_file() and target.stat().st_mtime >= trained.path.stat().st_mtime:
        try:
            if verify(trained, target, "onnx") <= 1e-4:
                return target
        except DeepfitError:
            pass  # a stale or broken file: export it again below
    return export_checkpoint(given, format="onnx", out=target).path


def describe(given: Path, trained: TrainedModel, backend: str) -> dict[str, Any]:
    """Class names, input shape, architecture, preprocessing and the run's final metrics."""
    c, h, w = trained.input_shape
    return {
        "classes": list(trained.classes),
        "num_classes": trained.num_classes,
        "input_shape": [c, h, w],
        "architecture": trained.config.model.name,
        "mean": list(trained.mean),
        "std": list(trained.std),
        "checkpoint": trained.path.name,
        "run": (run_folder(given) or run_folder(trained.path) or given).name,
        "backend": backend,
        "metrics": final_metrics(run_folder(given) or run_folder(trained.path)),
    }


def final_metrics(run_dir: Path | None) -> dict[str, float | None]:
    """The last row of metrics.csv, and the test accuracy of report.json when evaluate wrote one."""
    if run_dir is None:
        return {}
    metrics: dict[str, float | None] = {}
    try:
        with (run_dir / "metrics.csv").open(newline="") as handle:
            rows = list(csv.DictReader(handle))
        if rows:
            metrics = {key: number(value) for key, value in rows[-1].items() if key}
    except (OSError, csv.Error):
        pass  # a checkpoint without its run's table still serves
    try:
        report = json.loads((run_dir / "report.json").read_text())
        metrics["evaluate_accuracy"] = number(report.get("accuracy"))
    except (OSError, ValueError, AttributeError):
        pass
    return metrics


def number(value: object) -> float | None:
    try:
        result = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return result if math.isfinite(result) else None
