"""A hand-set 3D network and a synthetic cohort for the cohort tests and benchmark (importable by file path too:
it imports nothing from Testing/, so Dask worker processes can load it as ``.../cohort_model.py:blob_net``).

``blob_net``: ``features`` (three fixed filters: the intensity itself, a 3^3 and a 5^3 box mean) -> ``mix``
(identity 1x1x1) -> ``head`` (class 1 where the intensity is above 0.5). On a bright ball in a dark, lightly
noisy scan the prediction is the ball and every feature unit agrees with it (high mean SA score); on a noisy scan
the prediction is speckled, the smooth units disagree with it, and both the Dice and the mean SA score drop.
``delay`` seconds are slept in every forward pass (a slow model for the interruption test and the benchmark);
``width`` adds that many extra 3^3 convolution channels (more work per case, same prediction).
"""

import os
import time

import numpy as np
import torch
from torch import nn


class BlobNet(nn.Module):
    def __init__(self, delay=0.0, width=0):
        super().__init__()
        self.delay = float(delay)
        self.features = nn.Conv3d(1, 3 + width, 5, padding=2, bias=False)
        self.mix = nn.Conv3d(3 + width, 3 + width, 1)
        self.head = nn.Conv3d(3 + width, 2, 1)
        with torch.no_grad():
            w = torch.zeros(3 + width, 1, 5, 5, 5)
            w[0, 0, 2, 2, 2] = 1.0
            w[1, 0, 1:4, 1:4, 1:4] = 1.0 / 27
            w[2, 0] = 1.0 / 125
            if width:
                w[3:, 0, 1:4, 1:4, 1:4] = torch.linspace(0.5, 1.5, width)[:, None, None, None] / 27
            self.features.weight.copy_(w)
            self.mix.weight.zero_()
            self.mix.bias.zero_()
            for k in range(3 + width):
                self.mix.weight[k, k] = 1.0
            self.head.weight.zero_()
            self.head.bias.zero_()
            self.head.weight[1, 0] = 4.0
            self.head.bias[1] = -2.0

    def forward(self, x):
        if self.delay:
            time.sleep(self.delay)
        return self.head(self.mix(self.features(x)))


def blob_net(delay=0.0, width=0):
    return BlobNet(delay, width)


SPEC = os.path.abspath(__file__) + ":blob_net"
SHAPE = (16, 20, 18)


def ball_scan(seed, sigma, shape=SHAPE, radius=5.5):
    """A bright ball (1) on a dark background (0) plus Gaussian noise of ``sigma``; and its mask."""
    rng = np.random.RandomState(seed)
    centre = np.array(shape) / 2.0 + rng.uniform(-1.5, 1.5, 3)
    grid = np.indices(shape)
    mask = (((grid - centre[:, None, None, None]) ** 2).sum(0) < radius ** 2).astype(np.uint8)
    return (mask + rng.normal(0, sigma, shape)).astype(np.float32), mask


def write_cohort(folder, clean=4, degraded_sigma=0.45, broken=True, shape=SHAPE, spacing=(1.0, 1.1, 1.5)):
    """Scans, references and ``manifest.csv`` in ``folder``: ``clean`` cases (noise 0.08), ``degraded`` (noise
    ``degraded_sigma``: low Dice), and with ``broken`` a case whose image file is not an image. Returns the
    manifest path."""
    import SimpleITK as sitk
    os.makedirs(os.path.join(folder, "scans"), exist_ok=True)
    rows = []

    def save(array, name):
        image = sitk.GetImageFromArray(array)
        image.SetSpacing(spacing)
        image.SetOrigin((-4.0, 7.5, 2.0))
        sitk.WriteImage(image, os.path.join(folder, "scans", name))
        return "scans/" + name

    cases = [("clean%d" % i, i, 0.08) for i in range(clean)] + [("degraded", 99, degraded_sigma)]
    for case_id, seed, sigma in cases:
        image, mask = ball_scan(seed, sigma, shape)
        rows.append("%s,%s,%s" % (case_id, save(image, case_id + ".nii.gz"), save(mask, case_id + "-ref.nii.gz")))
    if broken:
        with open(os.path.join(folder, "scans", "broken.nii.gz"), "wb") as handle:
            handle.write(b"this is not a NIfTI file")
        rows.insert(2, "broken,scans/broken.nii.gz,scans/clean0-ref.nii.gz")
    path = os.path.join(folder, "manifest.csv")
    with open(path, "w") as handle:
        handle.write("case_id,image,reference\n" + "\n".join(rows) + "\n")
    return path
