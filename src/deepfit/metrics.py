"""Classification metrics from logits and labels, in plain torch: importing torchmetrics for these
three took 2.5-3.2 s of every training process (it loads scipy.signal, its audio and image
metrics and torchvision's model zoo), a tenth of the MNIST recipe. tests/test_metrics.py checks
them against torchmetrics' multiclass_accuracy and multiclass_f1_score."""

from __future__ import annotations

import torch


def classification_metrics(logits: torch.Tensor, labels: torch.Tensor, *, topk: int = 5) -> dict[str, float]:
    """acc (micro accuracy), top-k accuracy (k capped at the class count) and macro F1."""
    num_classes = logits.shape[1]
    k = min(topk, num_classes)
    if not len(labels):
        return {"acc": float("nan"), f"top{k}": float("nan"), "f1": float("nan")}
    preds = logits.argmax(1)
    in_topk = (logits.topk(k, dim=1).indices == labels.unsqueeze(1)).any(1)
    return {
        "acc": float((preds == labels).float().mean()),
        f"top{k}": float(in_topk.float().mean()),
        "f1": macro_f1(preds, labels, num_classes),
    }


def macro_f1(preds: torch.Tensor, labels: torch.Tensor, num_classes: int) -> float:
    """Mean over classes of 2TP / (2TP + FP + FN); a class absent from both predictions and labels
    is left out of the mean (torchmetrics' rule)."""
    confusion = confusion_matrix(preds, labels, num_classes)
    tp = confusion.diag().double()
    fp = confusion.sum(0).double() - tp  # predicted as the class, labelled otherwise
    fn = confusion.sum(1).double() - tp  # labelled as the class, predicted otherwise
    seen = (tp + fp + fn) > 0  # every labelled class is seen: never empty for a non-empty input
    return float((2 * tp[seen] / (2 * tp[seen] + fp[seen] + fn[seen])).mean())


def confusion_matrix(preds: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(K, K) int64 counts, rows = true class, columns = predicted class."""
    flat = labels.long() * num_classes + preds.long()
    return torch.bincount(flat, minlength=num_classes * num_classes).view(num_classes, num_classes)
