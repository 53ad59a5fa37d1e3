"""nnU-Net's sliding-window inference, computed as nnU-Net computes it (``nnunetv2/inference/
sliding_window_prediction.py`` and ``predict_from_raw_data.py``), in torch and numpy only.

- windows of the plan's patch size; along each axis ``ceil((size - patch) / (step * patch)) + 1`` windows spread
  evenly from 0 to ``size - patch`` (:func:`nnunet_steps`);
- each window's logits weighted by a Gaussian importance map: a unit impulse at the patch centre (``i // 2``)
  smoothed with sigma = patch / 8 (scipy's ``gaussian_filter``: a kernel truncated at 4 sigma, normalised to sum
  1), scaled to a maximum of 10, zeros raised to the smallest non-zero weight (:func:`nnunet_gaussian`);
- ``--tta``: the window is also run flipped along every non-empty combination of the mirror axes, flipped back,
  and the logits averaged (``_internal_maybe_mirror_and_predict``);
- the blended logits ``sum_p w_p y_p / sum_p w_p``.

nnU-Net accumulates in float16 (``predicted_logits`` and ``n_predictions`` are ``torch.half``); ``dtype``
chooses (default float32: more exact; ``torch.float16`` reproduces nnU-Net's rounding as well).
"""

import itertools
import math
from typing import Callable, List, Optional, Sequence

import numpy as np
import torch
from torch import nn

from .outputs import main_output, run_model


def nnunet_steps(size: Sequence[int], patch: Sequence[int], step: float = 0.5) -> List[List[int]]:
    """Window starts per axis, as nnU-Net's ``compute_steps_for_sliding_window`` (``size >= patch``)."""
    out = []
    for n, p in zip(size, patch):
        count = int(np.ceil((n - p) / (p * step))) + 1
        stride = (n - p) / (count - 1) if count > 1 else 99999999999
        out.append([int(np.round(stride * i)) for i in range(count)])
    return out


def _kernel_value(offset: int, sigma: float, truncate: float = 4.0) -> float:
    radius = int(truncate * sigma + 0.5)
    if abs(offset) > radius:
        return 0.0
    x = np.arange(-radius, radius + 1, dtype=np.float64)
    phi = np.exp(-0.5 / (sigma * sigma) * x ** 2)
    return float(phi[offset + radius] / phi.sum())


def nnunet_gaussian(patch: Sequence[int], sigma_scale: float = 1.0 / 8, scale: float = 10.0,
                    dtype=torch.float16) -> torch.Tensor:
    """nnU-Net's importance map ``[*patch]`` (``compute_gaussian``; float16 as nnU-Net keeps it)."""
    weights = None
    for p in patch:
        sigma = p * sigma_scale
        axis = np.array([_kernel_value(i - p // 2, sigma) for i in range(p)], dtype=np.float64)
        weights = axis if weights is None else weights[..., None] * axis
    weights = torch.from_numpy(weights / (weights.max() / scale)).to(dtype)
    zero = weights == 0
    if zero.any():
        weights[zero] = weights[~zero].min()
    return weights


def mirrored_forward(network: nn.Module, x: torch.Tensor, mirror_axes: Optional[Sequence[int]] = None,
                     output_key: Optional[str] = None) -> torch.Tensor:
    """The logits of ``x`` ``[B, C, *S]``, averaged over the flips along every combination of ``mirror_axes``
    (spatial axes, 0-based) when given."""
    out = main_output(run_model(network, x), output_key).float()
    if not mirror_axes:
        return out
    axes = [int(a) + 2 for a in mirror_axes]
    combos = [c for i in range(len(axes)) for c in itertools.combinations(axes, i + 1)]
    for dims in combos:
        out = out + torch.flip(main_output(run_model(network, torch.flip(x, dims)), output_key).float(), dims)
    return out / (len(combos) + 1)


def sliding_window_logits(network: nn.Module, x: torch.Tensor, patch: Sequence[int], step: float = 0.5,
                          gaussian: bool = True, mirror_axes: Optional[Sequence[int]] = None,
                          output_key: Optional[str] = None, dtype=torch.float32,
                          progress: Optional[Callable[[float, str], None]] = None) -> torch.Tensor:
    """nnU-Net's blended logits ``[B, C, *S]`` of ``x`` ``[B, C, *S]`` (``S >= patch``; pad first, centred).

    Args:
        network: in eval mode; called under ``torch.no_grad``.
        patch: the window, array order.
        step: the fraction of the patch between window starts (nnU-Net: 0.5).
        gaussian: Gaussian importance (nnU-Net's default), else constant.
        mirror_axes: test-time mirroring (spatial axes, 0-based), or ``None``.
        dtype: the accumulators' type (nnU-Net: ``torch.float16``).
    """
    spatial = tuple(int(s) for s in x.shape[2:])
    patch = tuple(int(p) for p in patch)
    if len(patch) != len(spatial) or any(s < p for s, p in zip(spatial, patch)):
        raise ValueError("the input %s must be at least the patch %s on every axis" % (spatial, patch))
    weights = nnunet_gaussian(patch).to(x.device) if gaussian else torch.ones(patch, device=x.device)
    starts = list(itertools.product(*nnunet_steps(spatial, patch, step)))
    total = norm = None
    report = progress or (lambda f, m: None)
    with torch.no_grad():
        for i, start in enumerate(starts):
            report(i / len(starts), "window %d/%d" % (i + 1, len(starts)))
            where = tuple(slice(s, s + p) for s, p in zip(start, patch))
            out = mirrored_forward(network, x[(slice(None), slice(None)) + where], mirror_axes, output_key)
            if total is None:
                total = torch.zeros((out.shape[0], out.shape[1]) + spatial, dtype=dtype, device=x.device)
                norm = torch.zeros(spatial, dtype=dtype, device=x.device)
            if gaussian:
                out = out * weights
            total[(slice(None), slice(None)) + where] += out
            norm[where] += weights.to(dtype)
    return torch.div(total, norm).float()


def window_count(spatial: Sequence[int], patch: Sequence[int], step: float = 0.5) -> int:
    return int(math.prod(len(s) for s in nnunet_steps(spatial, patch, step)))
