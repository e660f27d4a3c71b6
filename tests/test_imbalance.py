"""Class imbalance (issue 17): loss.class_weights balanced|FILE against scikit-learn and the
weighted cross-entropy formula, data.sampler balanced, the `data info` warning, one-line errors;
and (slow, real data) macro-F1 on an imbalanced Fashion-MNIST subset with and without weights."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.utils.class_weight import compute_class_weight

from deepfit.config import Config, set_value
from deepfit.data.balance import balanced_class_weights, read_class_weights
from deepfit.errors import ConfigError
from deepfit.fit import fit, prepare_run
from deepfit.optim import build_loss
from tests.conftest import write_idx
from tests.test_data_sources import noise_folder

CLASSES = ["cat", "dog", "owl"]


def test_balanced_weights_match_scikit_learn() -> None:
    labels = torch.tensor([0] * 50 + [1] * 7 + [2] * 3)
    expected = compute_class_weight("balanced", classes=np.arange(3), y=labels.numpy())
    torch.testing.assert_close(balanced_class_weights(labels, 3), torch.tensor(expected, dtype=torch.float32))


def test_weighted_cross_entropy_is_the_weighted_mean_of_the_terms() -> None:
    logits, labels = torch.randn(9, 3), torch.tensor([0, 1, 2, 0, 0, 1, 2, 2, 0])
    weight = torch.tensor([0.2, 1.0, 3.0])
    terms = -torch.log_softmax(logits, 1)[torch.arange(9), labels]
    expected = (weight[labels] * terms).sum() / weight[labels].sum()
    torch.testing.assert_close(build_loss("cross_entropy", weight=weight)(logits, labels), expected)


def test_weight_files_in_order_or_by_name(tmp_path: Path) -> None:
    ordered = tmp_path / "ordered.txt"
    ordered.write_text("# one per class\n0.5\n2\n1e0\n")
    named = tmp_path / "named.csv"
    named.write_text("owl,3\ncat, 0.5\ndog,2\n")
    assert read_class_weights(ordered, CLASSES).tolist() == [0.5, 2.0, 1.0]
    assert read_class_weights(named, CLASSES).tolist() == [0.5, 2.0, 3.0]
    bad = {"short.txt": ("1\n2\n", "2 weights for 3 classes"), "word.txt": ("1\nx\n2\n", "'x' is not a number"),
           "names.csv": ("cat,1\nemu,1\n", "unknown classes ['emu'], missing classes ['dog', 'owl']"),
           "negative.txt": ("1\n-1\n1\n", "non-negative")}  # fmt: skip
    for name, (text, message) in bad.items():
        (tmp_path / name).write_text(text)
        with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
            read_class_weights(tmp_path / name, CLASSES)


def test_fit_trains_with_balanced_weights_and_sampler(tiny_idx: Path, tmp_path: Path) -> None:
    config = Config()
    for key, value in {"data.name": "mnist", "data.dir": str(tiny_idx), "loss.class-weights": "balanced", "data.sampler": "balanced",
                       "train.out": str(tmp_path / "run"), "train.progress": "false"}.items():  # fmt: skip
        set_value(config, key, value)
    run = prepare_run(config, None, None, None)
    expected = compute_class_weight("balanced", classes=np.arange(10), y=run.data.train.labels.numpy())
    weight = run.loss_fn.weight  # on the device the run trains on
    assert weight is not None and weight.device.type == run.device.type  # cuda:0 for the run's cuda
    torch.testing.assert_close(weight.cpu(), torch.tensor(expected, dtype=torch.float32))  # type: ignore[union-attr]
    labels = run.data.train.labels
    assert run.loader.sample_weights is not None
    torch.testing.assert_close(run.loader.sample_weights, 1.0 / torch.bincount(labels).double()[labels])


def test_bad_class_weights_are_one_line_and_no_run_folder(cli, tiny_idx: Path, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    base = ["train", "--data", "mnist", "--data-dir", str(tiny_idx), "--out", "run", "--no-progress"]
    for extra, message in (
        (["--loss.class-weights", "nowhere.txt"], "cannot read"),
        (["--loss.class-weights", "balanced", "--loss.name", "mse"], "works with loss.name cross_entropy or nll"),
        (["--data.mix", "mixup", "--loss.name", "nll"], "data.mix needs loss.name cross_entropy"),
        (["--data.sampler", "weighted"], "data.sampler must be one of shuffle, balanced"),
    ):
        result = cli(*base, *extra)
        assert result.code == 2 and message in result.err and result.err.count("\n") == 1, (extra, result.err)
        assert not (tmp_path / "run").exists()


def test_data_info_warns_about_imbalanced_classes(cli, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    noise_folder(tmp_path / "skewed", {"many": 14, "few": 2})  # train split after 10% validation: 13 and 1
    noise_folder(tmp_path / "even", {"many": 4, "few": 4})
    skewed = cli("data", "info", str(tmp_path / "skewed"))
    assert skewed.code == 0 and "warning: imbalanced classes: many has 13 training images, 13.0x the 1 of few" in skewed.out
    even = cli("data", "info", str(tmp_path / "even"))
    assert even.code == 0 and "imbalanced" not in even.out


def imbalanced_fashion(source: Path, target: Path, *, many: int, few: int) -> Path:
    """Even classes keep `many` training images, odd ones `few`; the test split stays whole."""
    from deepfit.data.idx import read_idx_images, read_idx_labels

    images = read_idx_images(source / "train-images-idx3-ubyte.gz").squeeze(1).numpy()
    labels = read_idx_labels(source / "train-labels-idx1-ubyte.gz").numpy()
    keep = np.concatenate([np.flatnonzero(labels == k)[: many if k % 2 == 0 else few] for k in range(10)])
    target.mkdir(parents=True)
    write_idx(target / "train-images-idx3-ubyte", images[np.sort(keep)])
    write_idx(target / "train-labels-idx1-ubyte", labels[np.sort(keep)])
    for name in ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"):
        (target / name).write_bytes((source / name).read_bytes())
    return target


@pytest.mark.slow
@pytest.mark.data
@pytest.mark.timeout(1800)
def test_balanced_weights_raise_macro_f1_on_imbalanced_fashion_mnist(fashion_dir: Path, tmp_path: Path) -> None:
    folder = imbalanced_fashion(fashion_dir, tmp_path / "imbalanced", many=1500, few=15)  # 100:1, alternating classes
    scores = {}
    for weights in ("none", "balanced"):
        config = Config()
        for key, value in {"data.name": "fashion-mnist", "data.dir": str(folder), "model.name": "fastnet_small", "train.epochs": "3",
                           "data.batch-size": "128", "optim.lr": "0.01", "loss.class-weights": weights, "train.progress": "false",
                           "train.out": str(tmp_path / weights), "train.seed": "0"}.items():  # fmt: skip
            set_value(config, key, value)
        scores[weights] = fit(config).metrics["test_f1"]
    print(f"macro-F1 on the balanced test split: without weights {scores['none']:.4f}, balanced {scores['balanced']:.4f}")
    assert scores["balanced"] > scores["none"] + 0.02
