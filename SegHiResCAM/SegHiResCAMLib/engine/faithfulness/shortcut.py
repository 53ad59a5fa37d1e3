"""The shortcuts that make deletion/insertion affordable on whole 3D scans (docs/algorithms.md, "Faithfulness
checks"; used by :func:`~.perturbation.perturbation_curves` and ``seghirescam evaluate`` without ``--exact``).

- **Crop to the target** (:func:`target_box`): the score ``y^c_M`` sums the output over M only, and an output
  voxel depends only on the input inside its receptive field. The perturbed inputs are therefore run on the
  bounding box of M grown by ``margin`` voxels (aligned to the network's down-sampling, so pooling grids stay the
  same); voxels outside the box are still ranked and counted (the fractions are of the whole domain) but
  perturbing them cannot change the score. Exact when ``margin`` covers the receptive field of a network without
  global operations; otherwise (instance normalisation, a margin smaller than the receptive field) an
  approximation whose error ``benchmarks/results/evaluate.md`` measures against the full computation.
- **Fewer steps** (:data:`DEFAULT_FRACTIONS`): four interior points at the midpoints of the intervals of four equal
  steps, 1/8, 3/8, 5/8 and 7/8 (the composite midpoint rule), instead of the full computation's equal steps. It
  was chosen by that principle, not searched for on the committed faithfulness study, and it keeps every ranking
  of the study (``benchmarks/results/evaluate.md``; of the 63 rules of 1 to 3 interior points of the study's 8-step
  grid, searched there, three do). The rule before (two points inside the target's share ``r`` of the domain,
  :func:`placed_fractions`, now used by the quick check's one point) cost half the passes and changed the MNI152
  scan's ranking.
- **bfloat16 passes** (:func:`~.perturbation.resolve_precision`, :func:`~.perturbation.choose_stand_in`): on a CPU
  that computes bfloat16 natively the perturbed inputs run in it, about half the time of float32 there, where the
  model scores the unperturbed input in it within 1% of float32.
"""

import math
from typing import List, Optional, Sequence, Tuple

import torch

from ...errors import InputError

#: margin (model voxels) around the target's bounding box in the shortcut (``seghirescam evaluate --margin``)
DEFAULT_MARGIN = 16
#: evaluate's deletion/insertion fractions without ``--exact`` (the composite midpoint rule of four equal steps)
DEFAULT_FRACTIONS = (0.0, 0.125, 0.375, 0.625, 0.875, 1.0)
#: the largest |AUC(shortcut) - AUC(full computation)| of :data:`DEFAULT_FRACTIONS` on the committed faithfulness
#: study, rounded up to 0.01 (``benchmarks/results/evaluate.md``; a test keeps the two equal): what a reader of the
#: shortcut's AUCs should allow for before ranking close maps
MEASURED_ERROR = {"deletion": 0.02, "insertion": 0.16}


def target_box(region: torch.Tensor, spatial: Sequence[int], margin: int = DEFAULT_MARGIN,
               align: int = 1) -> Optional[Tuple[slice, ...]]:
    """The bounding box of ``region`` (boolean ``[*S]`` or ``[1, *S]``) grown by ``margin`` voxels on every side,
    with start and size multiples of ``align`` (cut at the input's end, which the model input's padding already
    aligns). ``None`` when the box is the whole input (nothing to save) or the region is empty."""
    if isinstance(margin, bool) or int(margin) != margin or margin < 0:
        raise InputError("crop margin must be a whole number of voxels >= 0, got %r" % (margin,))
    spatial = tuple(int(s) for s in spatial)
    mask = region.detach().bool().reshape((-1,) + spatial).any(0)
    if not bool(mask.any()):
        return None
    align = max(1, int(align))
    box = []
    for axis, size in enumerate(spatial):
        other = tuple(a for a in range(len(spatial)) if a != axis)
        hits = mask.any(dim=other).nonzero().squeeze(1) if other else mask.nonzero().squeeze(1)
        lo = max(0, int(hits.min()) - int(margin))
        hi = min(size, int(hits.max()) + 1 + int(margin))
        lo = lo // align * align
        length = int(math.ceil((hi - lo) / align) * align)
        box.append(slice(lo, min(size, lo + length)))  # cut at the input's end: aligned where the input is
    if all(s.start == 0 and s.stop == n for s, n in zip(box, spatial)):
        return None
    return tuple(box)


def box_share(box: Optional[Sequence[slice]], spatial: Sequence[int]) -> float:
    """The part of an input of spatial shape ``spatial`` that ``box`` covers (1 for ``None``, the whole input)."""
    if box is None:
        return 1.0
    return float(math.prod(len(range(*b.indices(int(n)))) for b, n in zip(box, spatial))) / float(
        math.prod(int(n) for n in spatial))


def placed_fractions(region_fraction: float) -> List[float]:
    """``[0, r / 2, r, 1]`` with ``r`` the fraction of the domain covered by the target, kept within [0.04, 0.5]
    (a point at 0 would repeat an end point; above one half the two points would leave most of the curve to a
    straight line): evaluate's fractions before :data:`DEFAULT_FRACTIONS`; the quick check scores its point ``r``."""
    if not math.isfinite(float(region_fraction)):
        raise InputError("the region fraction must be a number in [0, 1], got %r" % (region_fraction,))
    r = min(0.5, max(0.04, float(region_fraction)))
    return [0.0, round(r / 2.0, 6), round(r, 6), 1.0]


__all__ = ["DEFAULT_FRACTIONS", "DEFAULT_MARGIN", "MEASURED_ERROR", "box_share", "placed_fractions", "target_box"]
