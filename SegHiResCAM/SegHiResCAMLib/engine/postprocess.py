"""From the raw, signed map on the layer grid to the heatmap on the input grid.

Order (docs/algorithms.md): keep the raw map; ReLU (on by default); up-sample straight to the input grid with
linear/bilinear/trilinear interpolation, ``align_corners=False`` (never cubic: it overshoots); normalise.
Nothing is ever inverted.
"""

from typing import Sequence, Tuple

import torch
import torch.nn.functional as F

from ..errors import InputError

NORMALIZATIONS = ("max", "minmax", "none")
UPSAMPLING = ("linear", "nearest")
_LINEAR_MODES = {1: "linear", 2: "bilinear", 3: "trilinear"}


def upsample(maps: torch.Tensor, size: Sequence[int], mode: str = "linear") -> torch.Tensor:
    """Resize maps ``[B, *S_l]`` to ``[B, *size]``: (bi/tri)linear with ``align_corners=False``, or nearest."""
    if mode not in UPSAMPLING:
        raise InputError("upsampling must be one of %s, got %r" % (", ".join(UPSAMPLING), mode))
    size = tuple(int(s) for s in size)
    if tuple(maps.shape[1:]) == size:
        return maps
    nd = len(size)
    if maps.ndim - 1 != nd or nd not in _LINEAR_MODES:
        raise InputError("cannot resize a map of shape %s to %s" % (tuple(maps.shape[1:]), size))
    if mode == "nearest":
        return F.interpolate(maps[:, None], size=size, mode="nearest-exact")[:, 0]
    return F.interpolate(maps[:, None], size=size, mode=_LINEAR_MODES[nd], align_corners=False)[:, 0]


def normalize(maps: torch.Tensor, how: str = "max", inplace: bool = False) -> Tuple[torch.Tensor, torch.Tensor]:
    """Normalise each map of ``[B, *S]`` separately.

    - ``max``: divide by the largest absolute value (with ReLU on: by the maximum, as in the papers);
    - ``minmax``: ``(m - min) / (max - min)``;
    - ``none``: unchanged.

    A map that is constant (``max == 0`` or ``max == min``) is returned as zeros instead of dividing by zero.
    ``inplace=True`` overwrites ``maps`` (no second volume-sized tensor: on a whole CT each map is ~0.3 GB).

    Returns:
        ``(maps, flat)`` where ``flat`` is a boolean ``[B]`` marking the constant maps.
    """
    if how not in NORMALIZATIONS:
        raise InputError("normalisation must be one of %s, got %r" % (", ".join(NORMALIZATIONS), how))
    dims = tuple(range(1, maps.ndim))
    shape = (-1,) + (1,) * (maps.ndim - 1)
    peak = maps.abs().amax(dim=dims) if maps.numel() else torch.zeros(maps.shape[0], device=maps.device)
    if how == "none":
        return maps, peak == 0
    if how == "max":
        flat = peak == 0
        scale = torch.where(flat, torch.ones_like(peak), peak).view(shape)
        out = maps.div_(scale) if inplace else maps / scale
        return out.masked_fill_(flat.view(shape), 0.0), flat
    low = maps.amin(dim=dims)
    high = maps.amax(dim=dims)
    span = high - low
    flat = span == 0
    out = maps.sub_(low.view(shape)) if inplace else maps - low.view(shape)
    out.div_(torch.where(flat, torch.ones_like(span), span).view(shape))
    return out.masked_fill_(flat.view(shape), 0.0), flat


def postprocess(raw: torch.Tensor, size: Sequence[int], relu: bool = True, upsampling: str = "linear",
                normalization: str = "max") -> Tuple[torch.Tensor, torch.Tensor]:
    """Raw map ``[B, *S_l]`` -> heatmap ``[B, *size]`` (float32) and the ``flat`` flags ``[B]``."""
    maps = raw.float()
    if relu:
        maps = torch.relu(maps)
    maps = upsample(maps, size, upsampling)
    return normalize(maps, normalization, inplace=maps is not raw)  # never overwrite the caller's raw map
