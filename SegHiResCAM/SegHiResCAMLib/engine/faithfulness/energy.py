"""Energy in the segment: how much of a heatmap's positive heat lies inside the explained region M
(docs/algorithms.md, "Faithfulness checks"; gathered with the other checks in :mod:`SegHiResCAMLib.engine.faithfulness`).

:func:`energy_in_region` is the fraction of the positive heat inside M, and inside M dilated by a max-pool of
radius r voxels (:func:`dilate`, a cube of side ``2r + 1``); compare it with :func:`region_fraction`, the
fraction of voxels that M covers, which is what a uniform map scores. Dimension-generic (1 to 3 spatial axes).
"""

from typing import Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from ...errors import InputError


def _spatial(t: torch.Tensor) -> Tuple[int, ...]:
    return tuple(range(1, t.ndim))


def dilate(mask: torch.Tensor, radius: int) -> torch.Tensor:
    """Binary dilation of ``mask`` ``[B, *S]`` (1 to 3 spatial axes) by a cube of side ``2 radius + 1``.

    The cube is the product of 1-D segments, so each axis in turn takes the OR of the mask shifted by up to
    ``radius`` voxels each way (on a 128^3 mask at radius 3 about fifty times faster than the max-pools of stride 1
    used before, ad hoc; the same voxels: ``test_dilation_and_energy_against_brute_force``)."""
    if isinstance(radius, bool) or int(radius) != radius or radius < 0:
        raise InputError("dilation radius must be a whole number of voxels >= 0, got %r" % (radius,))
    if not 1 <= mask.ndim - 1 <= 3:
        raise InputError("dilation needs 1 to 3 spatial axes, got a mask of shape %s" % (tuple(mask.shape),))
    grown = mask.bool()
    for axis in range(1, mask.ndim):
        size = grown.shape[axis]
        out = grown.clone()
        for shift in range(1, min(int(radius), size - 1) + 1):
            out.narrow(axis, shift, size - shift).logical_or_(grown.narrow(axis, 0, size - shift))
            out.narrow(axis, 0, size - shift).logical_or_(grown.narrow(axis, shift, size - shift))
        grown = out
    return grown


def region_on_grid(region: torch.Tensor, spatial: Sequence[int]) -> torch.Tensor:
    """The region ``[B, *S']`` on the heatmap grid (nearest neighbour when the output grid differs from the input's)."""
    spatial = tuple(int(s) for s in spatial)
    if tuple(region.shape[1:]) == spatial:
        return region.bool()
    return F.interpolate(region[:, None].float(), size=spatial, mode="nearest-exact")[:, 0] > 0.5


def energy_in_region(heat: torch.Tensor, region: torch.Tensor, dilation: int = 0,
                     domain: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Fraction of the positive heat that lies inside ``region`` (dilated by ``dilation`` voxels).

    Args:
        heat: maps ``[B, *S]``.
        region: boolean ``[B, *S']`` (resized to ``S`` by nearest neighbour if ``S' != S``).
        dilation: max-pool radius in voxels (see :func:`dilate`).
        domain: boolean ``[*S]``: only these voxels count (e.g. the image inside the model's padding).

    Returns:
        ``[B]`` float64 in [0, 1]; NaN where the map has no positive heat.
    """
    region = dilate(region_on_grid(region.to(heat.device), tuple(heat.shape[1:])), dilation)
    positive = torch.relu(heat.detach()).double()
    if domain is not None:
        positive = positive * domain.to(device=heat.device, dtype=positive.dtype)
    total = positive.sum(dim=_spatial(positive))
    inside = (positive * region).sum(dim=_spatial(positive))
    return torch.where(total > 0, inside / torch.where(total > 0, total, torch.ones_like(total)),
                       torch.full_like(total, float("nan")))


def region_fraction(region: torch.Tensor, spatial: Sequence[int], dilation: int = 0,
                    domain: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Fraction of the (domain's) voxels inside the (dilated) region: the energy of a uniform map, ``[B]``."""
    grid = dilate(region_on_grid(region, tuple(spatial)), dilation).double()
    weights = torch.ones(tuple(spatial), dtype=torch.float64, device=grid.device) if domain is None else \
        domain.to(device=grid.device, dtype=torch.float64)
    return (grid * weights).sum(dim=_spatial(grid)) / weights.sum().clamp_min(1.0)


__all__ = ["dilate", "energy_in_region", "region_fraction", "region_on_grid"]
