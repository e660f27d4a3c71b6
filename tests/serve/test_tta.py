"""`deepfit serve` answers as `deepfit predict` and `evaluate` do for a run trained with test-time
augmentation: the logits of each image's views averaged, on both backends; `--tta` overrides."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest
import torch

from deepfit.cli import main
from deepfit.evaluation import evaluate_checkpoint
from deepfit.serve.model import load_served_model
from tests.conftest import write_tiny_idx

SIDE = 12


@pytest.fixture(scope="module")
def shift_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("tta")
    data = write_tiny_idx(root / "idx", train=200, test=60, side=SIDE, seed=5)
    args = ["train", "--data", "mnist", "--data-dir", str(data), "--epochs", "1", "--no-progress", "--model", "lenet"]
    assert main([*args, "--data.batch-size", "16", "--train.tta", "shift", "--out", str(root / "run")]) == 0
    return root / "run"


def tiny_test_images(run: Path) -> torch.Tensor:
    raw = gzip.decompress((run.parent / "idx" / "t10k-images-idx3-ubyte.gz").read_bytes())
    return torch.from_numpy(np.frombuffer(raw[16:], dtype=np.uint8).reshape(-1, 1, SIDE, SIDE).copy())


@pytest.mark.parametrize("backend", ["torch", "onnx"])
def test_served_answers_average_the_runs_own_views(shift_run: Path, backend: str) -> None:
    images = tiny_test_images(shift_run)
    shifted = evaluate_checkpoint(shift_run, write=False).predictions  # the run's train.tta: shift
    plain = evaluate_checkpoint(shift_run, tta="none", write=False).predictions
    assert not np.array_equal(shifted, plain)  # the two modes can be told apart on these images
    served = load_served_model(shift_run, backend=backend)
    assert served.info["tta"] == "shift"
    assert np.array_equal(served.run_batch(images).argmax(1), shifted)
    assert np.array_equal(load_served_model(shift_run, backend=backend, tta="none").run_batch(images).argmax(1), plain)


def test_both_backends_give_the_same_averaged_logits(shift_run: Path) -> None:
    images = tiny_test_images(shift_run)
    by_torch = load_served_model(shift_run, backend="torch").run_batch(images)
    by_onnx = load_served_model(shift_run, backend="onnx").run_batch(images)
    np.testing.assert_allclose(by_onnx, by_torch, atol=1e-4)
