"""Grad-CAM++ (Chattopadhay et al., WACV 2018), with N-D axes."""

import torch

from .base import CAMMethod, spatial_dims


class GradCAMPlusPlus(CAMMethod):
    """``w_k = sum_q relu(G_kq) a_kq`` with ``a_kq = G^2 / (2 G^2 + sum_q' A_kq' G^3)``; ``map = sum_k w_k A_k``.

    The closed form of ``a`` assumes an exponential of the score (as in the paper and its reference code);
    ``a`` is set to 0 where the gradient is 0 and the denominator is guarded by ``eps``.
    """

    name = "grad-cam++"
    citation = "Chattopadhay et al., Grad-CAM++: Improved Visual Explanations for Deep Convolutional Networks, WACV 2018"

    def __init__(self, eps: float = 1e-7):
        self.eps = float(eps)

    def combine(self, activations: torch.Tensor, gradients: torch.Tensor) -> torch.Tensor:
        dims = spatial_dims(gradients)
        g2 = gradients.pow(2)
        g3 = g2 * gradients
        sum_a = activations.sum(dim=dims, keepdim=True)
        denom = 2 * g2 + sum_a * g3
        denom = torch.where(denom.abs() < self.eps, torch.full_like(denom, self.eps), denom)
        alpha = torch.where(gradients != 0, g2 / denom, torch.zeros_like(g2))
        weights = (alpha * torch.relu(gradients)).sum(dim=dims, keepdim=True)
        return (weights * activations).sum(dim=1)

    def options(self) -> dict:
        return {"eps": self.eps}
