"""The test split's confusion matrix and a grid of predictions, drawn at the end of fit() for the
experiment trackers (TensorBoard images); only called when a tracker takes images."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from deepfit.data import DataBundle, build_loader
from deepfit.engine import predict_logits


def draw_test_figures(model: nn.Module, data: DataBundle, *, device: torch.device, batch_size: int, count: int = 16) -> dict[str, Any]:
    """{"test/confusion": Figure, "test/predictions": Figure of the first `count` test images}."""
    from deepfit.plots import plot_confusion, plot_predictions

    test = data.test
    if test is None or len(test) == 0:
        return {}
    loader = build_loader(test, batch_size=batch_size, mean=data.mean, std=data.std, device=device)
    logits, labels = predict_logits(model, loader)
    preds, k = logits.argmax(1), data.num_classes
    matrix = torch.bincount(labels * k + preds, minlength=k * k).reshape(k, k).numpy()  # rows: true class, columns: predicted
    figures = {"test/confusion": plot_confusion(matrix, data.classes)}
    if test.images.shape[0] >= count:  # a streamed split holds no pixels in memory
        figures["test/predictions"] = plot_predictions(
            test.images[:count].numpy(), labels[:count].numpy(), preds[:count].numpy(), data.classes
        )
    return figures
