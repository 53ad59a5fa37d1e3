"""Seg-Grad-CAM (Vinogradova, Dibrov, Myers, AAAI 2020, arXiv 2002.11434)."""

import torch

from .base import CAMMethod, spatial_dims


class SegGradCAM(CAMMethod):
    """``alpha_k = mean_q G_kq``, ``map = sum_k alpha_k A_k``.

    The channel weights average the gradient over the whole layer grid, so the map is not restricted to the
    target region: with a linear 1x1 head it equals ``(|M| / N) (Y^c - b_c)`` everywhere.
    """

    name = "seg-grad-cam"
    uses_mean_gradient = True
    citation = "Vinogradova et al., Towards Interpretable Semantic Segmentation via Gradient-weighted Class Activation Mapping, AAAI 2020"

    def combine(self, activations: torch.Tensor, gradients: torch.Tensor) -> torch.Tensor:
        alpha = gradients.mean(dim=spatial_dims(gradients), keepdim=True)
        return (alpha * activations).sum(dim=1)
