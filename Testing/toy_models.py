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
