"""Per-channel heatmaps and channel shares of a multi-channel model, on the image grid.

:func:`channel_attribution` runs :func:`~SegHiResCAMLib.engine.attribution.input_attribution` (gradient x input of
the same explained scalar as the CAM) on the model input and maps each channel's map back onto the image grid
(the inverse of the model-space steps, as for the heatmap). The shares count the model-grid voxels that come from
the image (the padding added to reach a multiple of ``divisible_by`` is left out); docs/algorithms.md, "Channel
shares", defines them.
"""

from dataclasses import dataclass
from typing import List, Sequence

import numpy as np
import torch

from ..engine.attribution import channel_shares, input_attribution
from ..engine.targets import SegmentTarget
from ..errors import InputError
from ..imaging.model_space import ModelSpace
from ..models.base import SegModel


@dataclass
class ChannelAttribution:
    """``maps``: one signed gradient x input map per input channel, float32 on the image grid (not normalised,
    so that channels compare); ``shares``: per channel, its fraction of the total absolute attribution (sum 1, or
    all 0 when nothing in the input moves the score); ``names``: the channels' names."""

    maps: List[np.ndarray]
    shares: List[float]
    names: List[str]

    def describe(self) -> dict:
        """``{name: share}`` in channel order, for the JSON provenance (``channel_shares``)."""
        return {name: share for name, share in zip(self.names, self.shares)}


def image_crop(space: ModelSpace) -> tuple:
    """The slices of the model grid that hold the image (the padding cut off)."""
    return tuple(slice(before, size - after) for (before, after), size in zip(space.pad, space.grid.array_shape))


def channel_attribution(model: SegModel, x: torch.Tensor, space: ModelSpace, target: SegmentTarget,
                        names: Sequence[str]) -> ChannelAttribution:
    """Per-channel gradient x input maps on the image grid and the channel shares (see the module docstring)."""
    if len(names) != x.shape[1]:
        raise InputError("%d channel names for a model input of %d channels" % (len(names), x.shape[1]))
    result = input_attribution(model.network, x, target, output_key=model.output_key)
    attribution = result.attribution
    shares = channel_shares(attribution, image_crop(space))
    maps = [space.to_image(attribution[0, k].cpu().numpy(), "linear").astype(np.float32, copy=False)
            for k in range(attribution.shape[1])]
    return ChannelAttribution(maps, shares, list(names))


__all__ = ["ChannelAttribution", "channel_attribution", "image_crop"]
