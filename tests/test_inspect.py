"""inspect: layer lookup, forward-hook capture, Grad-CAM on a model that must look at a corner,
image choice, and `deepfit show` for every figure kind on a tiny trained run."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.metrics import confusion_matrix
from torch import nn

from deepfit.config import ModelConfig
from deepfit.data import BatchLoader, ImageSet
from deepfit.engine import train_one_epoch
from deepfit.inspect import (
    FIGURE_KINDS,
    InspectError,
    capture_output,
    choose_mistakes,
    confusion_counts,
    find_conv,
    find_layer,
    grad_cam,
    list_layer_names,
)
from deepfit.models import build_model


def small_cnn(side: int = 12, num_classes: int = 4) -> nn.Module:
    torch.manual_seed(0)
    return build_model(ModelConfig(name="cnn_bn"), input_shape=(1, side, side), num_classes=num_classes).eval()


def test_captured_feature_maps_equal_the_layers_own_output() -> None:
    model = small_cnn()
    x = torch.randn(3, 1, 12, 12)
    features = model.features  # type: ignore[union-attr]
    with torch.no_grad():
        layer_input = features[:4](x)  # what features.4 (the second conv) receives
        expected = features[4](layer_input)
    caught = capture_output(model, "features.4", x)
    assert torch.equal(caught, expected)
    assert len(features[4]._forward_hooks) == 0


def test_hook_is_removed_even_when_the_forward_pass_fails() -> None:
    model = small_cnn()
    with pytest.raises(RuntimeError):
        capture_output(model, "features.0", torch.randn(1, 3, 12, 12))  # wrong channel count
    assert all(len(m._forward_hooks) == 0 for m in model.modules())


def test_unknown_layer_lists_the_valid_names() -> None:
    model = small_cnn()
    with pytest.raises(InspectError) as err:
        find_layer(model, "features.99")
    for name in list_layer_names(model):
        assert name in str(err.value)


def test_filters_need_a_convolution() -> None:
    model = small_cnn()
    assert find_conv(model)[0] == "features.0"
    assert find_conv(model, "features.4")[1] is model.features[4]  # type: ignore[index]
    with pytest.raises(InspectError, match=r"not a Conv2d; convolution layers: features\.0, features\.4"):
        find_conv(model, "features.1")


def corner_images(count: int, *, side: int = 16, seed: int = 0) -> ImageSet:
    """Noise images whose class (0..3) is the corner holding a bright 5x5 square:
    0 top-left, 1 top-right, 2 bottom-left, 3 bottom-right."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 60, (count, 1, side, side)).astype(np.uint8)
    labels = rng.integers(0, 4, count)
    for i, label in enumerate(labels):
        dy, dx = rng.integers(0, 3, 2)
        top = dy if label < 2 else side - 5 - dy
        left = dx if label % 2 == 0 else side - 5 - dx
        images[i, 0, top : top + 5, left : left + 5] = 255
    return ImageSet(torch.from_numpy(images), torch.from_numpy(labels).long())


def test_gradcam_peaks_in_the_quadrant_that_sets_the_class() -> None:
    torch.manual_seed(0)
    train, test = corner_images(800, seed=0), corner_images(200, seed=1)
    model = build_model(ModelConfig(name="cnn_bn"), input_shape=(1, 16, 16), num_classes=4)
    stats = ((0.2,), (0.3,))
    loader = BatchLoader(train, batch_size=32, mean=stats[0], std=stats[1], device=torch.device("cpu"), shuffle=True)
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    for _ in range(3):
        train_one_epoch(model, loader, optimizer, nn.functional.cross_entropy)
    x = (test.images.float() / 255 - 0.2) / 0.3
    cam = grad_cam(model, x)
    assert (cam.targets == test.labels).float().mean() >= 0.95  # the model learnt the task
    assert cam.heatmaps.shape == (200, 16, 16) and float(cam.heatmaps.max()) <= 1.0 + 1e-6
    peak = cam.heatmaps.flatten(1).argmax(1)
    rows, cols = peak // 16, peak % 16
    quadrant = (rows >= 8).long() * 2 + (cols >= 8).long()  # same numbering as the classes
    assert (quadrant == test.labels).float().mean() >= 0.9
    assert all(len(m._forward_hooks) == 0 for m in model.modules())


def test_gradcam_explains_a_chosen_class() -> None:
    model = small_cnn()
    cam = grad_cam(model, torch.randn(3, 1, 12, 12), target=2, layer="features.0")
    assert cam.targets.tolist() == [2, 2, 2] and cam.heatmaps.shape == (3, 12, 12)


def test_mistakes_are_the_wrong_predictions_with_the_highest_loss() -> None:
    torch.manual_seed(0)
    logits, labels = torch.randn(200, 5) * 3, torch.randint(0, 5, (200,))
    chosen = choose_mistakes(logits, labels, 10)
    losses = nn.functional.cross_entropy(logits, labels, reduction="none")
    wrong = [i for i in range(200) if logits[i].argmax() != labels[i]]
    expected = sorted(wrong, key=lambda i: -float(losses[i]))[:10]
    assert chosen.tolist() == expected


def test_confusion_counts_match_sklearn() -> None:
    preds, labels = torch.randint(0, 4, (300,)), torch.randint(0, 4, (300,))
    assert np.array_equal(confusion_counts(preds, labels, 4), confusion_matrix(labels, preds, labels=range(4)))


@pytest.fixture
def tiny_run(cli, tiny_idx: Path, tmp_path: Path) -> Path:  # type: ignore[no-untyped-def]
    args = ("--data", "mnist", "--data-dir", str(tiny_idx), "--model", "cnn_bn", "--epochs", "2", "--no-progress")
    assert cli("train", *args, "--data.batch-size", "32", "--out", "run").code == 0
    return tmp_path / "run"


def test_show_draws_every_kind_into_the_run_plots(cli, tiny_run: Path) -> None:  # type: ignore[no-untyped-def]
    for kind in FIGURE_KINDS:
        result = cli("show", kind, str(tiny_run), "--count", "4")
        assert result.code == 0, result.err
        path = Path(result.out.strip())
        assert path == tiny_run / "plots" / f"{kind}.png"
        assert path.read_bytes().startswith(b"\x89PNG")


def test_show_features_of_an_image_file(cli, tiny_run: Path, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from PIL import Image

    Image.fromarray(np.full((30, 20), 200, dtype=np.uint8)).save(tmp_path / "x.png")
    for kind in ("features", "gradcam"):
        result = cli("show", kind, str(tiny_run), "--image", str(tmp_path / "x.png"), "--layer", "features.4")
        assert result.code == 0, result.err


def test_show_with_a_wrong_layer_lists_the_layers(cli, tiny_run: Path) -> None:  # type: ignore[no-untyped-def]
    result = cli("show", "features", str(tiny_run), "--layer", "conv9")
    assert result.code == 2
    assert "features.0 (Conv2d)" in result.err and "classifier.5 (Linear)" in result.err
    assert len(result.err.strip().splitlines()) == 1


@pytest.mark.parametrize("count", ["0", "-3"])
def test_show_refuses_a_count_below_1(cli, tiny_run: Path, count: str) -> None:  # type: ignore[no-untyped-def]
    result = cli("show", "samples", str(tiny_run), "--count", count)  # 0 drew 32, -3 all test images but 3
    assert result.code == 2 and result.err == "deepfit: error: --count must be at least 1\n"
    assert not (tiny_run / "plots" / "samples.png").exists()


def test_show_an_unknown_kind_lists_the_kinds(cli, tiny_run: Path) -> None:  # type: ignore[no-untyped-def]
    result = cli("show", "histogram", str(tiny_run))
    assert result.code == 2 and "gradcam" in result.err


def test_show_finds_the_runs_data_through_data_dir(cli, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    """A run trained on $DEEPFIT_DATASETS's mnist, shown from a shell without it: the message names
    --data-dir, and show takes it (the folder itself or the one above it), as evaluate does."""
    from tests.conftest import write_tiny_idx

    datasets = tmp_path / "datasets"
    write_tiny_idx(datasets / "mnist", train=60, test=20, side=8)
    monkeypatch.setenv("DEEPFIT_DATASETS", str(datasets))
    assert cli("train", "--data", "mnist", "--epochs", "1", "--no-progress", "--out", "run").code == 0
    monkeypatch.delenv("DEEPFIT_DATASETS")
    lost = cli("show", "samples", "run")
    assert lost.code == 2 and "pass --data-dir DIR" in lost.err
    for folder in (datasets / "mnist", datasets):
        shown = cli("show", "samples", "run", "--data-dir", str(folder))
        assert shown.code == 0, shown.err
        assert shown.out.strip() == "run/plots/samples.png" and (tmp_path / "run" / "plots" / "samples.png").is_file()
    assert cli("show", "samples", "run", "--data-dir", str(tmp_path / "nowhere")).code == 2
