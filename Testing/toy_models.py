"""Factories for CLI tests: ``toy_models:unet3d`` etc. (importable because Testing/ is on the path)."""

from nets import TinyUNet


def unet3d(classes=2, in_channels=1):
    return TinyUNet(nd=3, classes=classes, in_channels=in_channels)


def unet2d(classes=2, in_channels=1):
    return TinyUNet(nd=2, classes=classes, in_channels=in_channels)
