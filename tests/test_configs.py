"""Every recipe in configs/ loads and validates; the GPU recipe trains on tiny data on the CPU;
test-time flip augmentation and the fast models behave as specified."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from deepfit.config import ModelConfig, config_from_dict, load_config, validate
from deepfit.data import DataBundle, ImageSet
from deepfit.engine import predict_logits
from deepfit.errors import ConfigError
from deepfit.fit import fit
from deepfit.models import build_model, list_models

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


def test_recipes_exist() -> None:
    names = {p.name for p in CONFIGS}
    assert {
        "mnist-99.yaml",
        "fashion-mnist-91.yaml",
        "fashion-mnist-93.yaml",
        "fashion-mnist-94.yaml",
        "cifar10-94-gpu.yaml",
        "cifar10-jpg-85-cpu.yaml",
    } <= names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_loads_and_validates(path: Path) -> None:
    config = load_config(path)
    validate(config)
    assert config.model.name in list_models()


def tiny_colour_bundle(n: int = 64, side: int = 16) -> DataBundle:
    """A learnable 3-channel set: the class sets which colour channel is bright."""
    generator = torch.Generator().manual_seed(0)
    labels = torch.arange(n) % 3
    images = torch.randint(0, 60, (n, 3, side, side), dtype=torch.uint8, generator=generator)
    images[torch.arange(n), labels] = 250
    data = ImageSet(images, labels)
    return DataBundle(data, None, data, ["r", "g", "b"], (0.4, 0.4, 0.4), (0.3, 0.3, 0.3), True, "tiny", "memory")


def test_gpu_recipe_trains_one_epoch_on_cpu(tmp_path: Path) -> None:
    config = load_config(Path(__file__).resolve().parents[1] / "configs" / "cifar10-94-gpu.yaml")
    config.train.epochs, config.train.device, config.train.out = 1, "cpu", str(tmp_path / "run")
    config.data.batch_size = 16
    result = fit(config, data=tiny_colour_bundle())
    assert config.train.tta == "flip" and config.train.precision == "bf16"
    assert 0.0 <= result.metrics["test_acc"] <= 1.0
    assert len(result.history) == 1 and torch.isfinite(torch.tensor(result.history[0]["train_loss"]))


def test_tta_averages_the_logits_of_image_and_mirror() -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.Flatten(), torch.nn.Linear(4 * 6 * 6, 5)).eval()
    x, y = torch.randn(10, 1, 8, 8), torch.arange(10) % 5
    batches = [(x[:6], y[:6]), (x[6:], y[6:])]
    plain, labels = predict_logits(model, batches)
    mirrored, _ = predict_logits(model, batches, tta="flip")
    with torch.no_grad():
        expected = (model(x) + model(x.flip(3))) / 2
    torch.testing.assert_close(plain, model(x).detach())
    torch.testing.assert_close(mirrored, expected)
    assert not torch.allclose(plain, mirrored)  # this model is not mirror-symmetric
    assert torch.equal(labels, y)
    torch.testing.assert_close(predict_logits(model, batches, tta=True)[0], mirrored)  # the bool of older callers


def moved(x: torch.Tensor, dx: int, dy: int) -> torch.Tensor:
    """x moved dx pixels right and dy down, the uncovered edge repeating its neighbour (index arithmetic)."""
    h, w = x.shape[-2:]
    return x[:, :, (torch.arange(h) - dy).clamp(0, h - 1)][:, :, :, (torch.arange(w) - dx).clamp(0, w - 1)]


def test_tta_flip_shift_averages_ten_views_and_unknown_modes_are_refused() -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.Flatten(), torch.nn.Linear(4 * 6 * 6, 5)).eval()
    x, y = torch.randn(10, 1, 8, 8), torch.arange(10) % 5
    batches = [(x[:6], y[:6]), (x[6:], y[6:])]
    offsets = ((0, 0), (1, 0), (-1, 0), (0, 1), (0, -1))
    with torch.no_grad():
        shift = torch.stack([model(moved(x, dx, dy)) for dx, dy in offsets]).mean(0)
        both = torch.stack([model(moved(v, dx, dy)) for v in (x, x.flip(3)) for dx, dy in offsets]).mean(0)
    torch.testing.assert_close(predict_logits(model, batches, tta="shift")[0], shift)
    torch.testing.assert_close(predict_logits(model, batches, tta="flip-shift")[0], both)
    assert not torch.allclose(shift, both)
    with pytest.raises(ValueError, match="unknown test-time augmentation 'rotate'"):
        predict_logits(model, batches, tta="rotate")


@pytest.mark.parametrize(("written", "read"), [(True, "flip"), (False, "none"), ("true", "flip"), ("shift", "shift")])
def test_tta_of_older_configs_reads_as_a_mode(written: object, read: str) -> None:
    """train.tta was a bool before it named a mode: configs and checkpoints saved then still load."""
    assert config_from_dict({"train": {"tta": written}}).train.tta == read


def test_tta_unknown_mode_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match=r"train\.tta must be one of none, flip, shift, flip-shift"):
        config_from_dict({"train": {"tta": "rotate"}})


@pytest.mark.parametrize("name", ["fastnet", "fastnet_small", "fastnet_wide", "fastnet_res", "airbench"])
@pytest.mark.parametrize("shape", [(1, 28, 28), (3, 32, 32)])
def test_fast_models_map_images_to_class_logits(name: str, shape: tuple[int, int, int]) -> None:
    model = build_model(ModelConfig(name=name), input_shape=shape, num_classes=7)
    out = model(torch.randn(2, *shape))
    assert out.shape == (2, 7)
    out.sum().backward()
    assert all(p.grad is not None for p in model.parameters())
