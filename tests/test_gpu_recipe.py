"""The GPU recipe (configs/cifar10-jpg-gpu.yaml) and the airbench parts it is built from: the
whitened stem really whitens, BatchNorm learns only its bias, fit() runs a model's own
data-dependent init (not on resume), and the recipe trains on tiny data (a CPU-sized smoke run:
its accuracy and time can only be measured on a GPU, by bench/gpu.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from deepfit.config import ModelConfig, load_config
from deepfit.fit import fit
from deepfit.models import build_model
from deepfit.models.whitening import BiasOnlyBatchNorm, Whiten
from tests.test_configs import tiny_colour_bundle

RECIPE = Path(__file__).resolve().parents[1] / "configs" / "cifar10-jpg-gpu.yaml"
CPU_RECIPE = RECIPE.with_name("cifar10-jpg-85-cpu.yaml")  # the same parts at a CPU's size


def smooth_images(n: int = 64, side: int = 12) -> torch.Tensor:
    """Strongly correlated neighbouring pixels and channels: (n, 3, side, side), zero mean."""
    g = torch.Generator().manual_seed(0)
    base = torch.randn(n, 1, side // 2, side // 2, generator=g)
    x = torch.nn.functional.interpolate(base, size=(side, side), mode="bilinear", align_corners=False)
    noise = torch.randn(n, 2, side, side, generator=g)
    return torch.cat([x, 0.8 * x + 0.2 * noise[:, :1], 0.3 * noise[:, 1:] - x], dim=1)


def test_whiten_makes_patch_features_uncorrelated_with_unit_variance() -> None:
    x = smooth_images()
    layer = Whiten(3, eps=1e-6)
    layer.init_from_data(x)
    with torch.no_grad():
        out = layer(x)[:, :12]  # the eigen-filters; the other 12 are their negatives
    features = out.permute(0, 2, 3, 1).reshape(-1, 12).double()
    covariance = features.T @ features / len(features)
    torch.testing.assert_close(covariance, torch.eye(12, dtype=torch.float64), atol=1e-3, rtol=0)
    torch.testing.assert_close(layer(x)[:, 12:], -layer(x)[:, :12])
    assert not layer.weight.requires_grad and layer.bias.requires_grad


def test_bias_only_batchnorm_keeps_its_scale() -> None:
    norm = BiasOnlyBatchNorm(4)
    optimizer = torch.optim.SGD([p for p in norm.parameters() if p.requires_grad], lr=0.5)
    (norm(torch.randn(8, 4, 3, 3)) * torch.arange(4.0).view(1, 4, 1, 1)).sum().backward()
    optimizer.step()
    assert torch.equal(norm.weight, torch.ones(4)) and norm.weight.grad is None
    assert not torch.equal(norm.bias, torch.zeros(4))


@pytest.mark.parametrize("recipe", [RECIPE, CPU_RECIPE], ids=lambda p: p.name)
def test_fit_whitens_the_stem_from_the_training_images_and_the_recipe_trains(tmp_path: Path, recipe: Path) -> None:
    config = load_config(recipe)
    config.train.epochs, config.train.out, config.data.batch_size = 1, str(tmp_path / "run"), 16
    assert config.model.name.startswith("airbench_whiten") and config.train.tta.startswith("flip") and config.loss.label_smoothing == 0.2
    config.train.precision = "32"  # the recipe's bf16 runs slower on CPUs without bf16 units; tests/test_configs.py covers bf16
    bundle = tiny_colour_bundle()
    result = fit(config, data=bundle)
    assert 0.0 <= result.metrics["test_acc"] <= 1.0 and torch.isfinite(torch.tensor(result.history[0]["train_loss"]))
    mean, std = torch.tensor(bundle.mean).view(1, 3, 1, 1), torch.tensor(bundle.std).view(1, 3, 1, 1)
    x = (bundle.train.images.float() / 255 - mean) / std  # type: ignore[union-attr]
    whiten = result.model.whiten.cpu().float()  # type: ignore[union-attr,operator]
    with torch.no_grad():  # the stem's fixed filters whiten the training images' patches (a random init would not)
        out = torch.nn.functional.conv2d(x, whiten.weight[:12])
    features = out.permute(0, 2, 3, 1).reshape(-1, 12).double()
    covariance = features.T @ features / len(features)
    torch.testing.assert_close(covariance, torch.eye(12, dtype=torch.float64), atol=0.02, rtol=0)


def test_the_gpu_recipe_takes_airbench_step_sizes() -> None:
    """lr and weight decay on the mean loss from airbench94's decoupled 11.5 and 0.0153 per 1024
    examples at momentum 0.85 (divided by 1 + 1 / (1 - 0.85), and by the lr for the decay); its
    BatchNorm biases at 64x; translation by 2 pixels into a reflected border; alternating flips;
    lookahead every 5 steps; its linear schedule 0.2 -> 1 (at 23% of the steps) -> 0.07; cuDNN's
    autotuner on, as airbench94 runs (so not train.deterministic); full batches only, as its loader."""
    config = load_config(RECIPE)
    scale = 1 + 1 / (1 - 0.85)
    assert config.data.batch_size == 1024 and config.optim.nesterov
    assert config.optim.lr == pytest.approx(11.5 / scale, rel=0.01)
    assert config.optim.weight_decay == pytest.approx(0.0153 / scale / config.optim.lr, rel=0.01)
    assert config.optim.norm_lr_scale == 64 and config.data.crop_pad == 2 and config.data.augment == "flip-crop"
    assert config.train.lookahead == 5 and config.data.flip == "alternate" and config.data.pad_mode == "reflect"
    assert config.train.cudnn_benchmark and not config.train.deterministic and config.data.drop_last
    assert (config.sched.name, config.sched.pct_start, config.sched.start_factor, config.sched.end_factor) == ("linear", 0.23, 0.2, 0.07)


def test_resume_does_not_init_from_data_again(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = load_config(RECIPE)
    config.train.epochs, config.train.out, config.data.batch_size = 1, str(tmp_path / "run"), 32
    config.train.precision, config.train.tta = "32", "none"
    fit(config, data=tiny_colour_bundle())
    calls: list[int] = []
    monkeypatch.setattr(Whiten, "init_from_data", lambda self, x: calls.append(len(x)))
    config.train.epochs = 2
    fit(config, data=tiny_colour_bundle(), resume=tmp_path / "run")
    assert calls == []


def test_the_stem_bias_learns_for_three_epochs_then_stays(tmp_path: Path) -> None:
    """airbench's schedule for the whitened stem's bias: trained in epochs 1-3, fixed from epoch 4
    on (in a resumed run too), while the other weights keep learning. Without lookahead, which
    would move it toward its slow copy."""
    config = load_config(RECIPE)
    config.train.epochs, config.train.out, config.data.batch_size = 3, str(tmp_path / "run"), 32
    config.train.precision, config.train.tta, config.train.lookahead, config.train.restore_best = "32", "none", 0, False
    three = fit(config, data=tiny_colour_bundle()).model
    bias, block = three.whiten.bias.detach().clone(), three.blocks[0].conv1.weight.detach().clone()  # type: ignore[union-attr, index]
    assert bias.abs().sum() > 0  # init_from_data starts it at zero: it learned
    config.train.epochs = 5
    five = fit(config, data=tiny_colour_bundle(), resume=tmp_path / "run").model
    assert torch.equal(five.whiten.bias, bias) and not five.whiten.bias.requires_grad  # type: ignore[union-attr]
    assert not torch.equal(five.blocks[0].conv1.weight, block)  # type: ignore[union-attr, index]
    five.on_train_epoch_start(2)  # type: ignore[operator]
    assert five.whiten.bias.requires_grad  # type: ignore[union-attr]
    small = build_model(ModelConfig(name="airbench_whiten_small"), input_shape=(3, 32, 32), num_classes=10)
    small.on_train_epoch_start(5)  # type: ignore[operator]
    assert small.whiten.bias.requires_grad  # type: ignore[union-attr]  # the CPU recipe's net: measured with it learning throughout


@pytest.mark.parametrize(("name", "widths"), [("airbench_whiten", (64, 256, 256)), ("airbench_whiten_small", (32, 128, 256))])
def test_airbench_whiten_maps_cifar_images_to_logits(name: str, widths: tuple[int, int, int]) -> None:
    model = build_model(ModelConfig(name=name), input_shape=(3, 32, 32), num_classes=10)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    assert tuple(block.conv2.out_channels for block in model.blocks) == widths  # type: ignore[union-attr]
