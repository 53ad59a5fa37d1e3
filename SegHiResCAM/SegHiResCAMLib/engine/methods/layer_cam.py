"""LayerCAM (Jiang et al., IEEE TIP 2021)."""

import torch

from .base import CAMMethod


class LayerCAM(CAMMethod):
    """``map = sum_k relu(G_k) * A_k``: like HiRes, but only positive gradients weigh in."""

    name = "layer-cam"
    citation = "Jiang et al., LayerCAM: Exploring Hierarchical Class Activation Maps for Localization, IEEE TIP 2021"

    def combine(self, activations: torch.Tensor, gradients: torch.Tensor) -> torch.Tensor:
        return (torch.relu(gradients) * activations).sum(dim=1)
