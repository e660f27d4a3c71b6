"""Small networks built for time-to-accuracy: `fastnet` (and its widths) for 28x28 gray images
on the CPU, and `airbench`, a CIFAR-10 net in the spirit of Keller Jordan's airbench94."""

from __future__ import annotations

import torch
from torch import nn

from deepfit.config import ModelConfig
from deepfit.models import MODELS
from deepfit.models.layers import flat_size


def conv_pool_bn(in_channels: int, out_channels: int, *, pool: bool) -> list[nn.Module]:
    """3x3 same-size convolution without bias (BatchNorm adds it), an optional 2x2 max pool, then
    BatchNorm and ReLU: pooling before the norm does the element-wise work on a quarter of the pixels."""
    conv = nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False)
    return [conv, *([nn.MaxPool2d(2)] if pool else []), nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True)]


def build_fastnet(input_shape: tuple[int, int, int], widths: tuple[int, int, int], num_classes: int) -> nn.Sequential:
    """Three conv-pool-BN-ReLU stages (1/2, 1/4, 1/8 size), flatten, one linear head.
    Pooling early keeps the costly wide layers on small maps; flattening the last (3x3 for 28x28)
    map keeps where features are, which a global pool loses (measured: Fashion-MNIST 91.0% after
    12 epochs with a global max pool). (B, C, 28, 28) -> (B, num_classes)."""
    c1, c2, c3 = widths
    features = nn.Sequential(
        *conv_pool_bn(input_shape[0], c1, pool=True),  # (B, c1, H/2, W/2)
        *conv_pool_bn(c1, c2, pool=True),  # (B, c2, H/4, W/4)
        *conv_pool_bn(c2, c3, pool=True),  # (B, c3, H/8, W/8)
        nn.Flatten(),  # (B, c3 * H/8 * W/8)
    )
    return nn.Sequential(features, nn.Linear(flat_size(features, input_shape), num_classes))


@MODELS.register("fastnet")
def build_fastnet_default(*, config: ModelConfig, input_shape: tuple[int, int, int], num_classes: int) -> nn.Module:
    """fastnet with widths 32-64-128: the MNIST / Fashion-MNIST time-to-accuracy net."""
    return build_fastnet(input_shape, (32, 64, 128), num_classes)


@MODELS.register("fastnet_small")
def build_fastnet_small(*, config: ModelConfig, input_shape: tuple[int, int, int], num_classes: int) -> nn.Module:
    """fastnet with widths 16-32-64: a quarter of the work, for a first quick result."""
    return build_fastnet(input_shape, (16, 32, 64), num_classes)


@MODELS.register("fastnet_wide")
def build_fastnet_wide(*, config: ModelConfig, input_shape: tuple[int, int, int], num_classes: int) -> nn.Module:
    """fastnet with widths 64-128-256: for the higher Fashion-MNIST targets."""
    return build_fastnet(input_shape, (64, 128, 256), num_classes)


class Residual(nn.Module):
    """x + ReLU(BN(conv3x3(x))): one more same-width, same-size layer that starts near the identity
    path, for depth where the map is already small. (B, C, H, W) -> (B, C, H, W)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        conv = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.body = nn.Sequential(conv, nn.BatchNorm2d(channels), nn.ReLU(inplace=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


@MODELS.register("fastnet_res")
def build_fastnet_res(*, config: ModelConfig, input_shape: tuple[int, int, int], num_classes: int) -> nn.Module:
    """fastnet 32-64-128 with a residual 3x3 layer after the 1/4 and 1/8 stages: 2.8x the
    parameters for 1.4x the time per image, for the Fashion-MNIST 94% recipe."""
    c1, c2, c3 = 32, 64, 128
    features = nn.Sequential(
        *conv_pool_bn(input_shape[0], c1, pool=True),  # (B, 32, H/2, W/2)
        *conv_pool_bn(c1, c2, pool=True),  # (B, 64, H/4, W/4)
        Residual(c2),
        *conv_pool_bn(c2, c3, pool=True),  # (B, 128, H/8, W/8)
        Residual(c3),
        nn.Flatten(),  # (B, 128 * H/8 * W/8)
    )
    return nn.Sequential(features, nn.Linear(flat_size(features, input_shape), num_classes))


class AirbenchBlock(nn.Module):
    """conv -> max pool 2 -> BN -> GELU -> conv -> BN -> GELU: halves the side, sets the width."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False)
        self.pool = nn.MaxPool2d(2)
        self.norm1 = nn.BatchNorm2d(out_channels, momentum=0.4)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.norm2 = nn.BatchNorm2d(out_channels, momentum=0.4)
        self.activation = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.activation(self.norm1(self.pool(self.conv1(x))))
        return self.activation(self.norm2(self.conv2(x)))


class Airbench(nn.Module):
    """airbench94's shape: a 2x2 stem conv, three blocks (64, 256, 256 wide), global max pool and
    a bias-free linear head whose logits are scaled down (1/9) as in the original."""

    def __init__(self, in_channels: int, num_classes: int, widths: tuple[int, int, int] = (64, 256, 256)) -> None:
        super().__init__()
        stem = 24
        self.stem = nn.Sequential(nn.Conv2d(in_channels, stem, 2, padding=0, bias=True), nn.GELU())  # (B, 24, H-1, W-1)
        self.blocks = nn.Sequential(
            AirbenchBlock(stem, widths[0]), AirbenchBlock(widths[0], widths[1]), AirbenchBlock(widths[1], widths[2])
        )
        self.head = nn.Linear(widths[2], num_classes, bias=False)
        self.scale = 1 / 9

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # a global max as amax: the same values as AdaptiveMaxPool2d(1), whose CUDA backward has no deterministic kernel
        x = self.blocks(self.stem(x)).amax(dim=(2, 3))  # (B, C, H, W) -> (B, widths[2])
        return self.head(x) * self.scale


@MODELS.register("airbench")
def build_airbench(*, config: ModelConfig, input_shape: tuple[int, int, int], num_classes: int) -> nn.Module:
    """The fast CIFAR-10 net (about 2M parameters) of configs/cifar10-94-gpu.yaml."""
    return Airbench(input_shape[0], num_classes)
