"""Factories for CLI tests: ``toy_models:unet3d`` etc. (importable because Testing/ is on the path)."""

from nets import TinyUNet


def unet3d(classes=2, in_channels=1):
    return TinyUNet(nd=3, classes=classes, in_channels=in_channels)


def unet2d(classes=2, in_channels=1):
    return TinyUNet(nd=2, classes=classes, in_channels=in_channels)


class TinyUNetOOM(TinyUNet):
    """Its forward is replaced in a test to raise an out-of-memory error."""


def unet3d_oom():
    return TinyUNetOOM(nd=3)


class WithAuxBranch(TinyUNet):
    """A branch whose output is computed but never reaches the segmentation: its gradient is zero."""

    def __init__(self):
        super().__init__(nd=3)
        import torch.nn as nn
        self.aux_branch = nn.Conv3d(1, 2, 1)

    def forward(self, x):
        self.last_aux = self.aux_branch(x)
        return super().forward(x)


def unet3d_aux():
    return WithAuxBranch()


class TinyUNetSigmoidModule(TinyUNet):
    """TinyUNet whose forward ends in an ``nn.Sigmoid`` module (same parameters and layer names as TinyUNet)."""

    def __init__(self, nd=3, classes=1):
        super().__init__(nd=nd, classes=classes)
        import torch.nn as nn
        self.final = nn.Sigmoid()

    def forward(self, x):
        return self.final(super().forward(x))


class TinyUNetSoftmaxModule(TinyUNetSigmoidModule):
    def __init__(self, nd=3, classes=3):
        super().__init__(nd=nd, classes=classes)
        import torch.nn as nn
        self.final = nn.Softmax(dim=1)


class TinyUNetSigmoidFunction(TinyUNet):
    def forward(self, x):
        import torch
        return torch.sigmoid(super().forward(x))


class TinyUNetSoftmaxFunction(TinyUNet):
    def forward(self, x):
        import torch.nn.functional as F
        return F.softmax(super().forward(x), dim=1)


class TinyUNetManualSoftmax(TinyUNet):
    """Probabilities computed by hand (exp / sum): no sigmoid/softmax op to bypass, only the values tell."""

    def forward(self, x):
        e = super().forward(x).exp()
        return e / e.sum(1, keepdim=True)


class TinyUNetManualSigmoid(TinyUNet):
    def forward(self, x):
        return 1.0 / (1.0 + (-super().forward(x)).exp())


def unet3d_sigmoid_module(classes=1):
    return TinyUNetSigmoidModule(classes=classes)


def unet3d_sigmoid_function(classes=1):
    return TinyUNetSigmoidFunction(nd=3, classes=classes)


def unet3d_softmax_module(classes=3):
    return TinyUNetSoftmaxModule(classes=classes)


def unet3d_softmax_function(classes=3):
    return TinyUNetSoftmaxFunction(nd=3, classes=classes)


def unet3d_manual_softmax(classes=3):
    return TinyUNetManualSoftmax(nd=3, classes=classes)


def unet3d_manual_sigmoid(classes=1):
    return TinyUNetManualSigmoid(nd=3, classes=classes)


def error_net():
    """:class:`nets.ErrorToyNet`: fixed weights (no weights file needed), for the error-target tests."""
    from nets import ErrorToyNet
    return ErrorToyNet()


class ChannelSplitNet(TinyUNet):
    """Two classes from separate input channels: class 0's logits see input channel 0 only, class 1's logits see
    input channel 1 only. The first convolution takes both channels (groups=2: one half of its features per
    channel); class 1 comes from a TinyUNet on the channel-1 half (``unet.dec``), class 0 from ``other``. The
    gradient of a class-1 score is exactly 0 on input channel 0, and the reverse."""

    def __init__(self, width=4):
        import torch.nn as nn
        nn.Module.__init__(self)
        self.stem = nn.Conv3d(2, 2 * width, 3, padding=1, groups=2)
        self.other = nn.Sequential(nn.ReLU(), nn.Conv3d(width, 1, 1))
        self.unet = TinyUNet(nd=3, in_channels=width, classes=2)

    def forward(self, x):
        import torch
        features = self.stem(x)
        half = features.shape[1] // 2
        return torch.cat([self.other(features[:, :half]), self.unet(features[:, half:])[:, 1:]], 1)


def channel_split():
    return ChannelSplitNet()


def fconv2d(classes=2, in_channels=1):
    """A 2D network whose convolutions call ``F.conv2d`` (no ``nn.Conv2d``): its dimensions cannot be read from
    its layers, only found by running it (a 3D input fails, a 2D slice runs)."""
    import torch
    import torch.nn.functional as F
    from torch import nn

    class Conv(nn.Module):
        def __init__(self, cin, cout, k):
            super().__init__()
            self.weight = nn.Parameter(torch.randn(cout, cin, k, k) / k)
            self.bias = nn.Parameter(torch.randn(cout) * 0.1)

        def forward(self, x):
            return F.conv2d(x, self.weight, self.bias, padding=self.weight.shape[-1] // 2)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.features = nn.Sequential(Conv(in_channels, 4, 3), nn.Tanh())
            self.head = Conv(4, classes, 1)

        def forward(self, x):
            return self.head(self.features(x))

    return Net()


def instance_normed():
    """A 3D two-class net that normalises by its input's statistics (conv, InstanceNorm3d, ReLU, 1x1x1 conv; seeded):
    a small box of an uneven image scores quite differently from the whole image."""
    import torch
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv3d(1, 4, 3, padding=1), torch.nn.InstanceNorm3d(4), torch.nn.ReLU(),
                               torch.nn.Conv3d(4, 2, 1)).eval()


def uneven_volume(size, bright, cube):
    """``(image, mask, geometry)``: ``size``^3 noise whose first ``bright`` slices are 4 brighter, a mask of the
    ``cube`` (one slice, every axis) and 1 mm geometry."""
    import numpy as np
    from SegHiResCAMLib.geometry import Geometry
    shape = (size,) * 3
    image = np.random.RandomState(0).randn(*shape).astype(np.float32)
    image[:bright] += 4.0
    mask = np.zeros(shape, np.uint8)
    mask[cube, cube, cube] = 1
    geometry = Geometry(size=shape, spacing=(1.0, 1.0, 1.0), origin=(0.0, 0.0, 0.0),
                        direction=tuple(np.eye(3).flatten()))
    return image, mask, geometry


def cancelling():
    """A 3D two-class net whose logits are the small difference of two large, nearly equal convolutions (their
    weights 0.1% apart, then scaled up 1000 times; seeded): bfloat16, which keeps about 3 significant digits, rounds
    both convolutions alike and loses the difference, so the net scores an input quite differently in bfloat16."""
    import torch

    class Cancelling(torch.nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.a = torch.nn.Conv3d(1, 2, 3, padding=1)
            self.b = torch.nn.Conv3d(1, 2, 3, padding=1)
            with torch.no_grad():
                self.a.weight.abs_().add_(1.0)
                self.b.weight.copy_(self.a.weight * 1.001)
                self.b.bias.copy_(self.a.bias)

        def forward(self, x):
            return (self.b(x) - self.a(x)) * 1000.0

    return Cancelling().eval()
