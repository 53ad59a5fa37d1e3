"""The one override point shared by every CAM method: ``combine(A, G) -> raw map``."""

from typing import Tuple

import torch

from ... import catalog


def spatial_dims(tensor: torch.Tensor) -> Tuple[int, ...]:
    """Spatial axes of a ``[B, K, *S]`` tensor: ``range(2, ndim)`` (never a hard-coded ``(2, 3)``)."""
    return tuple(range(2, tensor.ndim))


class CAMMethod:
    """Base class of the CAM methods.

    Subclasses set :attr:`name` and :attr:`citation` and override :meth:`combine` only; capture, targets,
    up-sampling and normalisation are shared (see :mod:`SegHiResCAMLib.engine.cam`).
    """

    name = ""
    citation = ""
    #: the method weighs channels by the spatial mean of the gradient (Grad-CAM family): when those means
    #: cancel (e.g. a layer followed by instance normalisation), the map is rounding noise and is flagged
    uses_mean_gradient = False

    @property
    def elementwise(self) -> bool:
        """The map is a sum of per-voxel terms, so windowed maps add up exactly (catalog: ``elementwise``)."""
        return catalog.method(self.name).elementwise

    def combine(self, activations: torch.Tensor, gradients: torch.Tensor) -> torch.Tensor:
        """Combine layer activations ``A`` and gradients ``G`` (both ``[B, K, *S_l]``) into the raw, signed
        map ``[B, *S_l]`` on the layer grid."""
        raise NotImplementedError

    def options(self) -> dict:
        """Method options, for provenance metadata."""
        return {}

    def describe(self) -> dict:
        info = {"method": self.name}
        info.update(self.options())
        return info
