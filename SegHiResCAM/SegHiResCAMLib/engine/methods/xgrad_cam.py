"""XGrad-CAM (Fu et al., BMVC 2020), with N-D axes."""

import torch

from .base import CAMMethod, spatial_dims


class XGradCAM(CAMMethod):
    """``w_k = sum_q (A_kq / sum_q' A_kq') G_kq``; ``map = sum_k w_k A_k`` (denominator guarded by ``eps``)."""

    name = "xgrad-cam"
    citation = "Fu et al., Axiom-based Grad-CAM: Towards Accurate Visualization and Explanation of CNNs, BMVC 2020"

    def __init__(self, eps: float = 1e-7):
        self.eps = float(eps)

    def combine(self, activations: torch.Tensor, gradients: torch.Tensor) -> torch.Tensor:
        dims = spatial_dims(gradients)
        total = activations.sum(dim=dims, keepdim=True)
        total = torch.where(total.abs() < self.eps, torch.full_like(total, self.eps), total)
        weights = (activations * gradients / total).sum(dim=dims, keepdim=True)
        return (weights * activations).sum(dim=1)

    def options(self) -> dict:
        return {"eps": self.eps}
