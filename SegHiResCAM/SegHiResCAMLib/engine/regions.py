"""Regions M: which output voxels' prediction is explained.

A region is a callable ``region(view) -> bool tensor [B, *S_out]`` evaluated on a :class:`ClassView` of the
*detached* model output: the logits ``[B, C, *S_out]``, the explained class's probability map and its predicted
mask. Regions never take part in autograd.
All of them are dimension-generic: spatial axes are ``range(2, output.ndim)`` for the output and
``range(1, mask.ndim)`` for masks.
"""

from typing import Callable, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F

from ..errors import TargetError


def _spatial(output: torch.Tensor) -> Tuple[int, ...]:
    return tuple(output.shape[2:])


class ClassView:
    """What a region may look at: detached model output and the explained class's maps.

    Attributes:
        output: logits ``[B, C, *S]``.
        probs: probability of the explained class ``[B, *S]`` (softmax or sigmoid, as the model uses).
        predicted: voxels predicted as the explained class ``[B, *S]`` (arg-max, or ``p > 0.5`` for sigmoid).
        class_index: the explained class.

    ``probs`` and ``predicted`` may be given as tensors or as zero-argument callables; a callable is evaluated
    on first use only (on a whole CT each map is hundreds of MB, and most regions need at most one of them).
    """

    def __init__(self, output: torch.Tensor, probs, predicted, class_index: int):
        self.output = output
        self.class_index = class_index
        self._probs = probs
        self._predicted = predicted

    @property
    def probs(self) -> torch.Tensor:
        if callable(self._probs):
            self._probs = self._probs()
        return self._probs

    @property
    def predicted(self) -> torch.Tensor:
        if callable(self._predicted):
            self._predicted = self._predicted()
        return self._predicted


class Region:
    """Base class: subclasses implement :meth:`__call__` and :meth:`describe`."""

    #: an empty region is the expected result (sanity-check target), not a user mistake
    allow_empty = False

    def __call__(self, view: ClassView) -> torch.Tensor:
        raise NotImplementedError

    def describe(self) -> dict:
        return {"region": type(self).__name__}


class PredictedRegion(Region):
    """Voxels the model predicts as the explained class.

    Args:
        threshold: ``None`` for the arg-max over classes (softmax models) or ``p > 0.5`` (sigmoid models);
            a number ``tau`` in (0, 1) for ``p_c > tau``.
    """

    def __init__(self, threshold: Optional[float] = None):
        if threshold is not None and not 0.0 < float(threshold) < 1.0:
            raise TargetError("threshold must lie strictly between 0 and 1, got %r" % (threshold,))
        self.threshold = None if threshold is None else float(threshold)

    def __call__(self, view):
        output = view.output
        if self.threshold is not None:
            return view.probs > self.threshold
        return view.predicted.to(output.device)

    def describe(self):
        return {"region": "prediction", "threshold": self.threshold}


class MaskRegion(Region):
    """A user mask on the model output grid: binary (non-zero voxels) or one label value of a label map.

    Args:
        mask: tensor ``[*S]`` (same for every batch element), ``[B, *S]`` or ``[B, 1, *S]``.
        label: if given, the region is ``mask == label``; otherwise ``mask != 0``.
    """

    def __init__(self, mask: torch.Tensor, label: Optional[float] = None):
        if not torch.is_tensor(mask):
            raise TargetError("the mask must be a tensor, got %s" % type(mask).__name__)
        self.mask = mask
        self.label = label

    def __call__(self, view):
        output = view.output
        spatial = _spatial(output)
        mask = self.mask
        if mask.ndim == len(spatial) + 2 and mask.shape[1] == 1:
            mask = mask[:, 0]
        if tuple(mask.shape[-len(spatial):]) != spatial or mask.ndim not in (len(spatial), len(spatial) + 1):
            raise TargetError(
                "the mask has shape %s but the model output grid is %s; resample the mask onto the image grid "
                "first (the command line does this for you)" % (tuple(self.mask.shape), spatial)
            )
        selected = (mask == self.label) if self.label is not None else (mask != 0)
        if self.label is not None and not bool(selected.any()):
            values = torch.unique(mask)
            shown = ", ".join("%g" % v for v in values[:20].tolist())
            raise TargetError("label %g does not occur in the mask; its values are: %s" % (self.label, shown))
        selected = selected.to(device=output.device)
        return selected.expand((output.shape[0],) + spatial) if selected.ndim == len(spatial) else selected

    def describe(self):
        return {"region": "mask", "label": self.label, "mask_voxels": int(torch.count_nonzero(self.mask))}


class ComponentRegion(Region):
    """One connected component of another region (26-connected in 3D, 8-connected in 2D).

    Args:
        base: the region to split (e.g. :class:`PredictedRegion` or :class:`MaskRegion`).
        which: ``"largest"``; an integer rank by size (0 = largest, 1 = second largest, ...); or a voxel index
            tuple (the component containing that voxel).
        labeller: ``mask [*S] -> labels`` with the conventions of :func:`connected_components` (the default);
            the analysis layer passes a faster one (SimpleITK) with the same labels.
    """

    def __init__(self, base: Region, which: Union[str, int, Sequence[int]] = "largest",
                 labeller: Optional[Callable[[torch.Tensor], torch.Tensor]] = None):
        if not (which == "largest" or isinstance(which, int) or isinstance(which, (tuple, list))):
            raise TargetError("component must be 'largest', a rank (0 = largest) or a voxel index, got %r" % (which,))
        self.base = base
        self.which = which
        self.labeller = labeller or connected_components

    def __call__(self, view):
        output = view.output
        mask = self.base(view)
        out = torch.zeros_like(mask)
        for b in range(mask.shape[0]):
            labels = self.labeller(mask[b])
            n = int(labels.max())
            if n == 0:
                continue
            if isinstance(self.which, (tuple, list)):
                index = tuple(int(i) for i in self.which)
                if len(index) != mask.ndim - 1:
                    raise TargetError("component voxel %s has %d coordinates; the grid has %d axes"
                                      % (index, len(index), mask.ndim - 1))
                chosen = int(labels[index])
                if chosen == 0:
                    raise TargetError("voxel %s is not inside the region; pick a voxel inside it" % (index,))
            else:
                sizes = torch.bincount(labels.flatten(), minlength=n + 1)[1:]
                order = torch.argsort(sizes, descending=True, stable=True)
                rank = 0 if self.which == "largest" else int(self.which)
                if not 0 <= rank < n:
                    raise TargetError("component rank %d requested but the region has %d components" % (rank, n))
                chosen = int(order[rank]) + 1
            out[b] = labels == chosen
        return out

    def describe(self):
        info = dict(self.base.describe())
        info["component"] = list(self.which) if isinstance(self.which, (tuple, list)) else self.which
        return info


class VoxelRegion(Region):
    """A single voxel, or a ball of ``radius`` around it (radius in voxels, or in mm when ``spacing`` is given).

    Args:
        index: voxel index in array order (e.g. ``(z, y, x)``) on the output grid.
        radius: ball radius; 0 is the voxel alone.
        spacing: voxel size per axis in array order, to measure the radius in mm.
    """

    def __init__(self, index: Sequence[int], radius: float = 0.0, spacing: Optional[Sequence[float]] = None):
        self.index = tuple(int(i) for i in index)
        if radius < 0:
            raise TargetError("radius must be >= 0, got %r" % (radius,))
        self.radius = float(radius)
        self.spacing = None if spacing is None else tuple(float(s) for s in spacing)

    def __call__(self, view):
        output = view.output
        spatial = _spatial(output)
        if len(self.index) != len(spatial) or any(not 0 <= i < s for i, s in zip(self.index, spatial)):
            raise TargetError("voxel %s lies outside the output grid %s" % (self.index, spatial))
        spacing = self.spacing or (1.0,) * len(spatial)
        grids = torch.meshgrid(*[torch.arange(s, device=output.device, dtype=torch.float64) for s in spatial],
                               indexing="ij")
        dist2 = sum(((g - i) * sp) ** 2 for g, i, sp in zip(grids, self.index, spacing))
        ball = dist2 <= self.radius ** 2 + 1e-9
        return ball.expand((output.shape[0],) + spatial)

    def describe(self):
        return {"region": "voxel", "index": list(self.index), "radius": self.radius,
                "radius_unit": "mm" if self.spacing else "voxel"}


class WholeRegion(Region):
    """Every output voxel."""

    def __call__(self, view):
        output = view.output
        return torch.ones((output.shape[0],) + _spatial(output), dtype=torch.bool, device=output.device)

    def describe(self):
        return {"region": "whole"}


class EmptyRegion(Region):
    """No voxel at all: the sanity-check target, whose map must be exactly zero."""

    allow_empty = True

    def __call__(self, view):
        output = view.output
        return torch.zeros((output.shape[0],) + _spatial(output), dtype=torch.bool, device=output.device)

    def describe(self):
        return {"region": "empty"}


def connected_components(mask: torch.Tensor) -> torch.Tensor:
    """Label the connected components of a boolean N-D mask (full connectivity: 8 in 2D, 26 in 3D).

    Labels are consecutive integers 1..n in order of each component's first voxel (C order); background is 0.
    Pure torch: label propagation by max-pooling, accelerated by pointer jumping (each voxel's label is the
    flat index of a voxel of the same component, so ``label = label[label]`` shortcuts long paths).
    """
    if mask.ndim not in (1, 2, 3):
        raise TargetError("connected components need a 1-D to 3-D mask, got %d-D" % mask.ndim)
    fg = mask.bool()
    if not bool(fg.any()):
        return torch.zeros(mask.shape, dtype=torch.long, device=mask.device)
    numel = fg.numel()
    # labels: flat index + 1 for foreground voxels, 0 elsewhere (float64 keeps indices exact for pooling)
    labels = torch.where(fg, torch.arange(1, numel + 1, device=mask.device, dtype=torch.float64).view(fg.shape),
                         torch.zeros((), dtype=torch.float64, device=mask.device))
    pool = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}[fg.ndim]
    while True:
        grown = pool(labels[None, None], kernel_size=3, stride=1, padding=1)[0, 0]
        grown = torch.where(fg, grown, torch.zeros_like(grown))
        # pointer jumping: adopt the label of the voxel our label points to (same component, label >= ours)
        flat = grown.flatten()
        idx = (flat.long() - 1).clamp_min(0)
        jumped = torch.where(flat > 0, torch.maximum(flat, flat[idx]), flat).view(fg.shape)
        if torch.equal(jumped, labels):
            break
        labels = jumped
    _, inverse = torch.unique(labels.flatten(), return_inverse=True)
    # unique sorts ascending, so background (0) becomes 0 when present; without background shift by one
    inverse = inverse.view(fg.shape)
    if bool(fg.all()):
        inverse = inverse + 1
    # renumber in order of first occurrence
    n = int(inverse.max())
    firsts = torch.full((n + 1,), numel, dtype=torch.long, device=mask.device)
    positions = torch.arange(numel, device=mask.device)
    firsts.scatter_reduce_(0, inverse.flatten(), positions, reduce="amin")
    order = torch.argsort(firsts[1:])
    remap = torch.zeros(n + 1, dtype=torch.long, device=mask.device)
    remap[order + 1] = torch.arange(1, n + 1, device=mask.device)
    return remap[inverse]
