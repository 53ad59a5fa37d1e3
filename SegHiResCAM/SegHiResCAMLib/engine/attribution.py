"""Gradient x input of the explained scalar, per input channel (which of T1, T2, ... a prediction rests on).

For the explained scalar ``S = sum_{p in M} Y^c_p`` of a :class:`~.targets.SegmentTarget` (the same scalar the
CAM explains) and the network input ``x`` ``[B, C_in, *S]``, the attribution of input channel ``k`` at voxel ``v``
is ``A_k(v) = x_k(v) * dS/dx_k(v)`` (gradient x input, Shrikumar et al. 2016 / Simonyan et al. 2014), and the
channel's share is ``|A_k|_1 / sum_j |A_j|_1`` (docs/algorithms.md, "Channel shares"). A channel the explained
logits do not depend on gets ``dS/dx_k = 0`` exactly: a zero map and a share of exactly 0.

Example:
    >>> import torch
    >>> from SegHiResCAMLib.engine import SegmentTarget, WholeRegion
    >>> net = torch.nn.Conv2d(2, 2, 1, bias=False)
    >>> with torch.no_grad():
    ...     _ = net.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 2.0]]).view(2, 2, 1, 1))
    >>> res = input_attribution(net, torch.ones(1, 2, 3, 3), SegmentTarget(1, WholeRegion()))
    >>> res.attribution[0, :, 0, 0], channel_shares(res.attribution)
    (tensor([0., 2.]), [0.0, 1.0])
"""

from dataclasses import dataclass
from typing import List, Optional, Sequence

import torch
from torch import nn

from .cam import check_input
from .hooks import model_guard
from .outputs import main_output, run_model
from .targets import SegmentTarget


@dataclass
class InputAttribution:
    """``attribution``: gradient x input ``[B, C_in, *S]`` (float32, detached); ``score``: the explained scalar
    ``[B]``; ``region``: the explained voxels ``[B, *S]``."""

    attribution: torch.Tensor
    score: torch.Tensor
    region: torch.Tensor


def input_attribution(model: nn.Module, x: torch.Tensor, target: SegmentTarget, output_key: Optional[str] = None,
                      eval_mode: bool = True) -> InputAttribution:
    """Gradient x input of ``target``'s scalar with respect to the network input (one forward, one backward).

    The model is left as found (:func:`.hooks.model_guard`: train flags and ``requires_grad`` restored, no
    ``.grad`` written); ``x`` is not modified.
    """
    check_input(model, x)
    with torch.inference_mode(False), torch.enable_grad():
        with model_guard(model, eval_mode=eval_mode):
            leaf = x.detach().clone().requires_grad_(True)
            output = main_output(run_model(model, leaf), output_key)
            region = target.region(output)
            score = target(output, region)
            grad = None
            if score.requires_grad:
                (grad,) = torch.autograd.grad(score.sum(), leaf, allow_unused=True)
    grad = torch.zeros_like(leaf) if grad is None else grad.detach()
    dtype = torch.promote_types(x.dtype, torch.float32)
    return InputAttribution((grad.to(dtype) * x.detach().to(dtype)), score.detach(), region.detach())


def channel_shares(attribution: torch.Tensor, crop: Optional[Sequence[slice]] = None) -> List[float]:
    """Per input channel, its fraction of the total absolute attribution of batch element 0 (sums to 1).

    Args:
        attribution: ``[B, C_in, *S]`` gradient x input.
        crop: the spatial slices to count (e.g. without the padding added to the image); default: all.

    Returns:
        ``|A_k|_1 / sum_j |A_j|_1`` for each channel ``k``, in float64; all 0 when the total is 0 (nothing in
        the input moves the score).
    """
    values = attribution[0] if crop is None else attribution[(0, slice(None)) + tuple(crop)]
    totals = values.detach().abs().double().sum(dim=tuple(range(1, values.ndim)))
    whole = float(totals.sum())
    if whole <= 0.0:
        return [0.0] * int(totals.numel())
    return [float(t) / whole for t in totals]


__all__ = ["InputAttribution", "channel_shares", "input_attribution"]
