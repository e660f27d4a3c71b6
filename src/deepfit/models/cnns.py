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
