"""Seg-XRes-CAM (Hasany, Petitjean, Mériaudeau, CVPR Workshops 2023)."""

from typing import Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F

from ...errors import InputError
from .base import CAMMethod, spatial_dims


class SegXResCAM(CAMMethod):
    """Average-pool ``G`` in windows of ``pool_size``, expand back (nearest), ``map = sum_k G_p,k * A_k``.

    ``pool_size = 1`` is Seg-HiRes-Grad CAM; ``pool_size = None`` (one window over the whole grid) is
    Seg-Grad-CAM. Windows tile the grid from index 0; a window cut by the border averages its in-grid voxels.

    Args:
        pool_size: window size in layer voxels, one int for every axis or one per spatial axis; ``None`` for
            the whole grid.
    """

    name = "seg-xres-cam"
    citation = "Hasany et al., Seg-XRes-CAM: Explaining Spatially Local Regions in Image Segmentation, CVPRW 2023"

    def __init__(self, pool_size: Optional[Union[int, Sequence[int]]] = 2):
        if pool_size is not None:
            sizes = (pool_size,) if isinstance(pool_size, int) else tuple(pool_size)
            if not sizes or any((not isinstance(s, int)) or s < 1 for s in sizes):
                raise InputError("pool size must be a positive integer (or one per axis), got %r" % (pool_size,))
        self.pool_size = pool_size
        self.uses_mean_gradient = pool_size is None

    def _window(self, shape: Tuple[int, ...]) -> Tuple[int, ...]:
        if self.pool_size is None:
            return tuple(shape)
        if isinstance(self.pool_size, int):
            return tuple(min(self.pool_size, s) for s in shape)
        if len(self.pool_size) != len(shape):
            raise InputError("pool size %s has %d entries but the layer grid has %d axes"
                             % (tuple(self.pool_size), len(self.pool_size), len(shape)))
        return tuple(min(p, s) for p, s in zip(self.pool_size, shape))

    def combine(self, activations: torch.Tensor, gradients: torch.Tensor) -> torch.Tensor:
        dims = spatial_dims(gradients)
        shape = tuple(gradients.shape[2:])
        window = self._window(shape)
        pad = []
        for size, win in zip(reversed(shape), reversed(window)):
            pad += [0, (-size) % win]
        pooled_sum = _sum_pool(F.pad(gradients, pad), window)
        counts = _sum_pool(F.pad(torch.ones_like(gradients[:1, :1]), pad), window)
        pooled = pooled_sum / counts
        for axis, win in zip(dims, window):
            pooled = pooled.repeat_interleave(win, dim=axis)
        pooled = pooled[(slice(None), slice(None)) + tuple(slice(0, s) for s in shape)]
        return (pooled * activations).sum(dim=1)

    def options(self) -> dict:
        size = self.pool_size if self.pool_size is None or isinstance(self.pool_size, int) else list(self.pool_size)
        return {"pool_size": size}


def _sum_pool(tensor: torch.Tensor, window: Tuple[int, ...]) -> torch.Tensor:
    """Sum over non-overlapping windows (N-D), exact for any float dtype."""
    shape = tuple(tensor.shape[2:])
    view = []
    for size, win in zip(shape, window):
        view += [size // win, win]
    blocks = tensor.reshape(tensor.shape[:2] + tuple(view))
    return blocks.sum(dim=tuple(range(3, 3 + 2 * len(shape), 2)))
