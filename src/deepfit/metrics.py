"""Classification metrics from logits and labels (torchmetrics' functional forms)."""

from __future__ import annotations

import torch


def classification_metrics(logits: torch.Tensor, labels: torch.Tensor, *, topk: int = 5) -> dict[str, float]:
    """acc (micro accuracy), top-k accuracy (k capped at the class count) and macro F1."""
    from torchmetrics.functional.classification import multiclass_accuracy, multiclass_f1_score  # slow import: on first use

    num_classes = logits.shape[1]
    k = min(topk, num_classes)
    preds = logits.argmax(1)
    return {
        "acc": float((preds == labels).float().mean()) if len(labels) else float("nan"),
        f"top{k}": float(multiclass_accuracy(logits, labels, num_classes=num_classes, top_k=k, average="micro")),
        "f1": float(multiclass_f1_score(preds, labels, num_classes=num_classes, average="macro")),
    }
