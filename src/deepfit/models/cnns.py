"""The convolutional networks of the lessons, each sized from the input shape."""

from __future__ import annotations

from torch import nn

from deepfit.config import ModelConfig
from deepfit.models import MODELS
from deepfit.models.layers import flat_size


class ConvNet(nn.Module):
    """features (convolutions) -> flatten -> classifier (fully connected); hooks can name either."""

    def __init__(self, features: nn.Sequential, classifier: nn.Sequential) -> None:
        super().__init__()
        self.features = features
        self.classifier = classifier

    def forward(self, x):  # type: ignore[no-untyped-def]
        return self.classifier(self.features(x).flatten(1))  # (B, C, H, W) -> (B, num_classes)


@MODELS.register("lenet")
def build_lenet(*, config: ModelConfig, input_shape: tuple[int, int, int], num_classes: int) -> nn.Module:
    """The Fashion-MNIST lesson's net: Conv(C,20,3), pool, Conv(20,40,3), pool, FC 240-120-84-classes."""
    features = nn.Sequential(
        nn.Conv2d(input_shape[0], 20, 3), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(20, 40, 3), nn.ReLU(), nn.MaxPool2d(2),
    )  # fmt: skip
    classifier = nn.Sequential(
        nn.Linear(flat_size(features, input_shape), 240), nn.ReLU(),
        nn.Linear(240, 120), nn.ReLU(),
        nn.Linear(120, 84), nn.ReLU(),
        nn.Linear(84, num_classes),
    )  # fmt: skip
    return ConvNet(features, classifier)


@MODELS.register("cnn_bn")
def build_cnn_bn(*, config: ModelConfig, input_shape: tuple[int, int, int], num_classes: int) -> nn.Module:
    """Two Conv-BN-ReLU-MaxPool blocks (32, 64 channels), FC 600, dropout 0.25, FC 120, FC classes."""
    features = nn.Sequential(
        nn.Conv2d(input_shape[0], 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3), nn.BatchNorm2d(64), nn.ReLU(), nn.MaxPool2d(2),
    )  # fmt: skip
    classifier = nn.Sequential(
        nn.Linear(flat_size(features, input_shape), 600), nn.ReLU(), nn.Dropout(0.25),
        nn.Linear(600, 120), nn.ReLU(),
        nn.Linear(120, num_classes),
    )  # fmt: skip
    return ConvNet(features, classifier)


@MODELS.register("cnn3")
def build_cnn3(*, config: ModelConfig, input_shape: tuple[int, int, int], num_classes: int) -> nn.Module:
    """The MNIST CNN lesson's net as written: unpadded 5x5 convolutions (16, 32, 64), two max-pools, FC 100, FC classes."""
    return three_conv_net(input_shape, num_classes, padding=0)  # 123,222 parameters on 1x28x28; needs at least 20x20


@MODELS.register("cnn3_pad")
def build_cnn3_pad(*, config: ModelConfig, input_shape: tuple[int, int, int], num_classes: int) -> nn.Module:
    """cnn3 with size-preserving (padding 2) convolutions: fits images down to 4x4, such as the 8x8 digits."""
    return three_conv_net(input_shape, num_classes, padding=2)  # 379,222 parameters on 1x28x28


def three_conv_net(input_shape: tuple[int, int, int], num_classes: int, *, padding: int) -> ConvNet:
    """Conv5 16, Conv5 32, pool, Conv5 64, pool (ReLU after each convolution), FC 100, FC classes."""
    features = nn.Sequential(
        nn.Conv2d(input_shape[0], 16, 5, padding=padding), nn.ReLU(),
        nn.Conv2d(16, 32, 5, padding=padding), nn.ReLU(), nn.MaxPool2d(2),  # unpadded: (B, 32, (H-8)/2, (W-8)/2)
        nn.Conv2d(32, 64, 5, padding=padding), nn.ReLU(), nn.MaxPool2d(2),  # unpadded 28x28: (B, 64, 3, 3)
    )  # fmt: skip
    classifier = nn.Sequential(
        nn.Linear(flat_size(features, input_shape), 100), nn.ReLU(),
        nn.Linear(100, num_classes),
    )  # fmt: skip
    return ConvNet(features, classifier)


@MODELS.register("cifar_cnn")
def build_cifar_cnn(*, config: ModelConfig, input_shape: tuple[int, int, int], num_classes: int) -> nn.Module:
    """The CIFAR-10 lesson's net: Conv(C,16,5) with ReLU, max-pool, FC 128, FC classes."""
    features = nn.Sequential(nn.Conv2d(input_shape[0], 16, 5), nn.ReLU(), nn.MaxPool2d(2))  # (B, 16, (H-4)/2, (W-4)/2)
    classifier = nn.Sequential(
        nn.Linear(flat_size(features, input_shape), 128), nn.ReLU(),
        nn.Linear(128, num_classes),
    )  # fmt: skip
    return ConvNet(features, classifier)
