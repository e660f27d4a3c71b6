"""deepfit.metrics against torchmetrics, whose functional forms it replaced (start-up cost)."""

from __future__ import annotations

import math

import pytest
import torch

from deepfit.metrics import classification_metrics

classification = pytest.importorskip("torchmetrics.functional.classification", reason="torchmetrics is a dev dependency")


@pytest.mark.parametrize(("rows", "classes", "topk", "seed"), [(500, 10, 5, 0), (37, 7, 3, 1), (64, 3, 5, 2), (9, 12, 5, 3)])
def test_the_metrics_equal_torchmetrics(rows: int, classes: int, topk: int, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, classes, (rows,), generator=generator)
    logits = torch.randn(rows, classes, generator=generator)
    logits[torch.arange(rows), labels] += 1.0  # better than chance, wrong often enough
    got = classification_metrics(logits, labels, topk=topk)
    k = min(topk, classes)
    assert got["acc"] == pytest.approx(float(classification.multiclass_accuracy(logits, labels, num_classes=classes, average="micro")))
    expected_topk = classification.multiclass_accuracy(logits, labels, num_classes=classes, top_k=k, average="micro")
    assert got[f"top{k}"] == pytest.approx(float(expected_topk))
    expected_f1 = classification.multiclass_f1_score(logits.argmax(1), labels, num_classes=classes, average="macro")
    assert got["f1"] == pytest.approx(float(expected_f1), abs=1e-6)


def test_a_class_absent_from_labels_and_predictions_is_left_out_of_macro_f1() -> None:
    labels = torch.tensor([0, 0, 1, 1])
    logits = torch.nn.functional.one_hot(torch.tensor([0, 1, 1, 1]), 4).float()  # classes 2 and 3 never occur
    got = classification_metrics(logits, labels, topk=1)
    assert got["f1"] == pytest.approx((2 / 3 + 4 / 5) / 2)
    assert got["acc"] == pytest.approx(0.75) and got["top1"] == pytest.approx(0.75)
    expected = classification.multiclass_f1_score(logits.argmax(1), labels, num_classes=4, average="macro")
    assert got["f1"] == pytest.approx(float(expected))


def test_no_rows_give_nan() -> None:
    got = classification_metrics(torch.zeros(0, 10), torch.zeros(0, dtype=torch.long))
    assert set(got) == {"acc", "top5", "f1"} and all(math.isnan(v) for v in got.values())
