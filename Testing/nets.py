"""Tiny networks with known answers, shared by the engine tests (2D and 3D)."""

import torch
from torch import nn


def conv(nd, *args, **kwargs):
    return (nn.Conv2d if nd == 2 else nn.Conv3d)(*args, **kwargs)


class LinearHeadNet(nn.Module):
    """features -> A (hooked: ``features``) -> 1x1 conv head with bias: ``Y^c = sum_k w_ck A_k + b_c``."""

    def __init__(self, nd=3, in_channels=1, features=4, classes=2):
        super().__init__()
        self.features = nn.Sequential(conv(nd, in_channels, features, 3, padding=1), nn.Tanh())
        self.head = conv(nd, features, classes, 1)
        with torch.no_grad():
            self.head.bias.uniform_(-1.0, 1.0)

    def forward(self, x):
        return self.head(self.features(x))


class HomogeneousNet(nn.Module):
    """Everything after the hooked layer ``features`` is bias-free and piecewise linear (Euler identity)."""

    def __init__(self, nd=3, in_channels=1, features=4, classes=2):
        super().__init__()
        self.features = nn.Sequential(conv(nd, in_channels, features, 3, padding=1), nn.Tanh())
        self.mid = nn.Sequential(conv(nd, features, 6, 3, padding=1, bias=False), nn.ReLU(inplace=True))
        self.head = conv(nd, 6, classes, 1, bias=False)

    def forward(self, x):
        return self.head(self.mid(self.features(x)))


class TinyUNet(nn.Module):
    """A small encoder-decoder with a skip connection, in-place ReLUs and optional deep supervision."""

    def __init__(self, nd=3, in_channels=1, classes=2, width=4, deep_supervision=None):
        super().__init__()
        pool = nn.MaxPool2d if nd == 2 else nn.MaxPool3d
        self.enc = nn.Sequential(conv(nd, in_channels, width, 3, padding=1), nn.ReLU(inplace=True))
        self.down = nn.Sequential(pool(2), conv(nd, width, 2 * width, 3, padding=1), nn.ReLU(inplace=True))
        self.up = nn.Upsample(scale_factor=2, mode="nearest")
        self.dec = nn.Sequential(conv(nd, 3 * width, width, 3, padding=1), nn.ReLU(inplace=True))
        self.head = conv(nd, width, classes, 1)
        self.aux = conv(nd, 2 * width, classes, 1)
        self.deep_supervision = deep_supervision

    def forward(self, x):
        e = self.enc(x)
        d = self.down(e)
        y = self.head(self.dec(torch.cat([self.up(d), e], 1)))
        if self.deep_supervision == "tuple":
            return (self.aux(d), y)  # low-resolution first: the engine must still pick the full-res one
        if self.deep_supervision == "dict":
            return {"aux": self.aux(d), "out": y}
        return y


class ErrorToyNet(nn.Module):
    """A two-class net with known evidence, for the error targets (fixed weights, no training; 3D, or 2D with
    ``nd=2``).

    ``detect`` (the explained layer) splits the input (the sum of its channels) into bright ``relu(x)`` and dark
    ``relu(-x)`` voxels; ``spread`` averages bright over 3x3(x3) and sums dark over ``7x7(x7)``; the class-1 logit
    (class 0 is 0) is ``mean3(bright) - inhibit * sum7(dark) - 0.5``. So a bright blob anywhere is segmented (a
    false positive when the reference lacks it), and a dark blob suppresses the class within 3 voxels (false
    negatives there).
    """

    def __init__(self, inhibit=1.0, in_channels=1, nd=3):
        super().__init__()
        self.detect = nn.Sequential(conv(nd, in_channels, 2, 1), nn.ReLU())
        self.spread = conv(nd, 2, 2, 7, padding=3, bias=False)
        self.head = conv(nd, 2, 2, 1)
        with torch.no_grad():
            self.detect[0].weight.copy_(torch.tensor([1.0, -1.0]).view((2, 1) + (1,) * nd).expand(
                (2, in_channels) + (1,) * nd))
            self.detect[0].bias.zero_()
            self.spread.weight.zero_()
            self.spread.weight[(0, 0) + (slice(2, 5),) * nd] = 1.0 / 3 ** nd
            self.spread.weight[1, 1] = 1.0
            self.head.weight.zero_()
            self.head.weight[1, 0] = 1.0
            self.head.weight[1, 1] = -float(inhibit)
            self.head.bias.copy_(torch.tensor([0.0, -0.5]))

    def forward(self, x):
        return self.head(self.spread(self.detect(x)))
