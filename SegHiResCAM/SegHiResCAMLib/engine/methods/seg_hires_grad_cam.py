"""Seg-HiRes-Grad CAM (Rheude, Wirtz, Kuijper, Wesarg, MELBA 2024, arXiv 2409.20287), after HiResCAM
(Draelos & Carin, arXiv 2011.08891)."""

import torch

from .base import CAMMethod


class SegHiResGradCAM(CAMMethod):
    """``map = sum_k G_k * A_k`` element-wise, with no averaging of the gradient.

    When the explained score is affine in the layer activation (e.g. a 1x1 linear head), the map sums to the
    score minus the bias terms: it shows exactly where the score comes from. Elsewhere it is a first-order
    gradient-times-activation attribution.
    """

    name = "seg-hires-grad-cam"
    citation = "Rheude et al., Leveraging CAM Algorithms for Explaining Medical Semantic Segmentation, MELBA 2024"

    def combine(self, activations: torch.Tensor, gradients: torch.Tensor) -> torch.Tensor:
        return (gradients * activations).sum(dim=1)
