"""fastnet: a compact CIFAR-10 network tuned for time-to-accuracy, after the ideas of the
public CIFAR-10 speed records (airbench, Jordan 2024): a 2x2 patch stem initialised by
whitening the training images' patches, three conv groups (conv -> max-pool -> BN -> GELU ->
conv -> BN -> GELU) and a linear head on a global max-pool. Much of ResNet-18's accuracy at
a small fraction of its compute.

Besides the usual module it offers the trainer two hooks:
- `init_from_data(images)`: the data-dependent initialisation (whitening), called once
  before a new run trains, with normalised training images;
- `early_parameters()`: parameters trained only during the first epochs (the stem's bias;
  its weights are never trained)."""

from __future__ import annotations

import torch
from torch import nn

STEM_BIAS_EPOCHS = 3    # the whitening stem's bias trains in these first epochs only
WHITENING_IMAGES = 5000  # images whose 2x2 patches estimate the covariance
WHITENING_EPS = 5e-4     # added to the covariance's eigenvalues before their inverse root


def _conv(channels_in: int, channels_out: int) -> nn.Conv2d:
    """A 3x3 convolution that starts close to passing its input through: the first
    `channels_in` filters are identities (Dirac deltas) on top of the default init."""
    conv = nn.Conv2d(channels_in, channels_out, 3, padding="same", bias=False)
    with torch.no_grad():
        nn.init.dirac_(conv.weight[:min(channels_in, channels_out)])
    return conv


def _norm(channels: int) -> nn.BatchNorm2d:
    """Batch norm with a scale fixed at 1: only the shift learns (the next layer's weights
    can scale)."""
    norm = nn.BatchNorm2d(channels, momentum=0.4)
    norm.weight.requires_grad_(False)
    return norm


class ConvGroup(nn.Module):
    def __init__(self, channels_in: int, channels_out: int) -> None:
        super().__init__()
        self.block = nn.Sequential(
            _conv(channels_in, channels_out),
            nn.MaxPool2d(2),
            _norm(channels_out),
            nn.GELU(),
            _conv(channels_out, channels_out),
            _norm(channels_out),
            nn.GELU(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(x)


class FastNet(nn.Module):
    def __init__(self, in_channels: int = 3, num_classes: int = 10,
                 image_size: tuple[int, int] | None = None,
                 widths: tuple[int, int, int] = (64, 256, 256)) -> None:
        super().__init__()
        # each 2x2 patch's whitened coordinates, positive and negated (GELU keeps both signs)
        stem = 2 * in_channels * 4
        self.stem = nn.Sequential(nn.Conv2d(in_channels, stem, 2, bias=True), nn.GELU())
        self.stem[0].weight.requires_grad_(False)
        self.groups = nn.Sequential(ConvGroup(stem, widths[0]), ConvGroup(widths[0], widths[1]),
                                    ConvGroup(widths[1], widths[2]))
        self.pool = nn.AdaptiveMaxPool2d(1)
        self.head = nn.Linear(widths[2], num_classes, bias=False)
        # A small output scale keeps early logits soft.
        self.scale = 1 / 9

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.groups(self.stem(x))).flatten(1)
        return self.head(x) * self.scale

    @torch.no_grad()
    def init_from_data(self, images: torch.Tensor) -> None:
        """Set the stem's filters to whiten 2x2 patches: the eigenvectors of the patches'
        covariance (estimated on the first WHITENING_IMAGES of `images`, normalised float
        N, C, H, W) scaled by 1 / sqrt(eigenvalue + eps), and their negations; bias zero."""
        conv = self.stem[0]
        c, kh, kw = conv.weight.shape[1:]
        x = images[:WHITENING_IMAGES].float()
        patches = x.unfold(2, kh, 1).unfold(3, kw, 1)  # N, C, H', W', kh, kw
        patches = patches.permute(0, 2, 3, 1, 4, 5).reshape(-1, c * kh * kw).double()
        covariance = patches.T @ patches / len(patches)
        eigenvalues, eigenvectors = torch.linalg.eigh(covariance)  # columns, ascending
        filters = (eigenvectors.T / (eigenvalues + WHITENING_EPS).sqrt().unsqueeze(1)).flip(0)
        filters = filters.reshape(-1, c, kh, kw).float()
        conv.weight.copy_(torch.cat((filters, -filters)))
        conv.bias.zero_()

    def early_parameters(self) -> list[tuple[nn.Parameter, int]]:
        """(parameter, epochs): parameters trained only in their first `epochs` epochs."""
        return [(self.stem[0].bias, STEM_BIAS_EPOCHS)]


def fastnet(in_channels: int = 3, num_classes: int = 10,
            image_size: tuple[int, int] | None = None) -> FastNet:
    return FastNet(in_channels, num_classes, image_size)
