"""Data-whitened stems and the pieces of airbench94 (Keller Jordan) as reusable parts: a 2x2
convolution initialised to whiten image patches (`Whiten`, fitted by the model's own
`init_from_data`), BatchNorm that learns only its bias, identity-started convolutions, and the
registered `airbench_whiten` CIFAR-10 net that puts them together.

A model that defines `init_from_data(x)` gets it called once by fit() before training starts
(not on resume: the checkpoint holds the weights), with up to trained.INIT_IMAGES normalised,
un-augmented training images (N, C, H, W) on the CPU."""

from __future__ import annotations

import torch
from torch import nn

from deepfit.config import ModelConfig
from deepfit.models import MODELS


class Whiten(nn.Conv2d):
    """2x2 convolution whose filters are the eigenvectors of the covariance of 2x2 patches, scaled by
    1/sqrt(eigenvalue), and their negatives: its 2*C*4 outputs are decorrelated, unit-variance
    patch features (with a GELU after it, both signs matter). The filters stay fixed; the bias learns.
    (B, C, H, W) -> (B, 8C, H-1, W-1)."""

    def __init__(self, in_channels: int, eps: float = 5e-4) -> None:
        super().__init__(in_channels, 2 * in_channels * 4, kernel_size=2, padding=0, bias=True)
        self.eps = eps
        self.weight.requires_grad_(False)

    @torch.no_grad()
    def init_from_data(self, x: torch.Tensor) -> None:
        c = x.shape[1]
        covariance = torch.zeros(c * 4, c * 4, dtype=torch.float64)
        count = 0
        for chunk in x.split(256):  # 256 images of 32x32: 246k patches, 24 MB in float64
            patches = chunk.unfold(2, 2, 1).unfold(3, 2, 1)  # (n, C, H-1, W-1, 2, 2)
            patches = patches.permute(0, 2, 3, 1, 4, 5).reshape(-1, c * 4).double()  # (P, C*2*2), C-major like the weight
            covariance += patches.T @ patches
            count += len(patches)
        covariance /= max(count, 1)
        eigenvalues, eigenvectors = torch.linalg.eigh(covariance)  # ascending, columns
        scaled = (eigenvectors.T / torch.sqrt(eigenvalues + self.eps).view(-1, 1)).view(c * 4, c, 2, 2)
        self.weight.copy_(torch.cat((scaled, -scaled)).to(self.weight.dtype))
        if self.bias is not None:
            self.bias.zero_()


class BiasOnlyBatchNorm(nn.BatchNorm2d):
    """BatchNorm with its scale fixed at 1: only the shift learns (airbench's choice; fewer
    parameters for the same function, since the next convolution can scale)."""

    def __init__(self, num_features: int, momentum: float = 0.4, eps: float = 1e-12) -> None:
        super().__init__(num_features, momentum=momentum, eps=eps)
        self.weight.requires_grad_(False)


def dirac_init(conv: nn.Conv2d) -> nn.Conv2d:
    """Start the first in_channels filters as identities (torch.nn.init.dirac_): a deep stack of
    them begins near the identity map and trains faster (airbench)."""
    with torch.no_grad():
        n = min(conv.in_channels, conv.out_channels)
        torch.nn.init.dirac_(conv.weight[:n])
    return conv


class WhitenedBlock(nn.Module):
    """conv -> max pool 2 -> BN (bias only) -> GELU -> conv -> BN -> GELU: halves the side."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv1 = dirac_init(nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False))
        self.pool = nn.MaxPool2d(2)
        self.norm1 = BiasOnlyBatchNorm(out_channels)
        self.conv2 = dirac_init(nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False))
        self.norm2 = BiasOnlyBatchNorm(out_channels)
        self.activation = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.activation(self.norm1(self.pool(self.conv1(x))))
        return self.activation(self.norm2(self.conv2(x)))


class AirbenchWhiten(nn.Module):
    """airbench94's net: whitened 2x2 stem, three blocks (64, 256, 256), a global max over the
    map (amax: its backward is deterministic on CUDA, AdaptiveMaxPool2d's is not), a bias-free
    head scaled by 1/9. With `stem_bias_epochs` (airbench's 3) the stem's bias learns for that
    many epochs only: then nothing before the first block needs a gradient, and the backward pass
    skips the first block's input gradient, the largest of them. None: it learns throughout."""

    def __init__(
        self, in_channels: int, num_classes: int, widths: tuple[int, int, int] = (64, 256, 256), stem_bias_epochs: int | None = None
    ) -> None:
        super().__init__()
        self.stem_bias_epochs = stem_bias_epochs
        self.whiten = Whiten(in_channels)  # (B, 8C, H-1, W-1)
        self.activation = nn.GELU()
        stem = 8 * in_channels
        self.blocks = nn.Sequential(
            WhitenedBlock(stem, widths[0]), WhitenedBlock(widths[0], widths[1]), WhitenedBlock(widths[1], widths[2])
        )
        self.head = nn.Linear(widths[2], num_classes, bias=False)
        self.scale = 1 / 9

    def init_from_data(self, x: torch.Tensor) -> None:
        self.whiten.init_from_data(x)

    def on_train_epoch_start(self, epoch: int) -> None:
        """fit() calls it before each training epoch (0-based), a resumed run too."""
        if self.whiten.bias is not None:
            self.whiten.bias.requires_grad_(self.stem_bias_epochs is None or epoch < self.stem_bias_epochs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks(self.activation(self.whiten(x))).amax(dim=(2, 3))  # (B, C, H, W) -> (B, widths[2])
        return self.head(x) * self.scale


@MODELS.register("airbench_whiten")
def build_airbench_whiten(*, config: ModelConfig, input_shape: tuple[int, int, int], num_classes: int) -> nn.Module:
    """airbench94's CIFAR-10 net: data-whitened 2x2 stem (its bias learning for 3 epochs), BN bias-only, identity-started convs (configs/cifar10-jpg-gpu.yaml)."""
    return AirbenchWhiten(input_shape[0], num_classes, stem_bias_epochs=3)


@MODELS.register("airbench_whiten_small")
def build_airbench_whiten_small(*, config: ModelConfig, input_shape: tuple[int, int, int], num_classes: int) -> nn.Module:
    """airbench_whiten with blocks 32-128-256 and the stem's bias learning throughout: 1/3 of the work, for CIFAR-10 on the CPU (configs/cifar10-jpg-85-cpu.yaml)."""
    return AirbenchWhiten(input_shape[0], num_classes, widths=(32, 128, 256))
