"""Targets: the explained scalar ``y^c_M = sum_{p in M} Y^c_p`` (docs/algorithms.md, "The explained scalar").

A target is a callable ``target(output) -> tensor [B]``: one differentiable score per batch element, computed
from the model's main output (logits ``[B, C, *S]``). The engine back-propagates the sum over the batch; since
batch elements do not interact in eval mode, every element gets its own gradient. :meth:`SegmentTarget.region`
returns the explained voxels M (boolean ``[B, *S]``).

Class conventions:

- softmax models (``C >= 2``): class ``c`` is channel ``c``; probability = softmax over channels.
- sigmoid models with one output channel: class 1 (foreground) has logit ``z``, class 0 (background) has logit
  ``-z`` (so that ``sigmoid(-z) = 1 - sigmoid(z)``); "predicted" means ``p > 0.5``.
- multi-label sigmoid models (``C >= 2`` with ``activation="sigmoid"``): class ``c`` is channel ``c``.

Scores are ``logits`` (default, both papers) or ``probabilities``. Probabilities saturate: the derivative of a
sigmoid/softmax, ``p (1 - p)``, vanishes on confident voxels, which flattens the maps of well-trained models.
"""

from typing import Optional, Tuple

import torch

from ..errors import TargetError
from .regions import ClassView, EmptyRegion, PredictedRegion, Region, WholeRegion

SCORES = ("logits", "probabilities")
REDUCTIONS = ("sum", "mean")
ACTIVATIONS = ("auto", "softmax", "sigmoid")


def resolve_activation(activation: str, channels: int) -> str:
    """``auto`` means sigmoid for one output channel, softmax otherwise."""
    if activation not in ACTIVATIONS:
        raise TargetError("activation must be one of %s, got %r" % (", ".join(ACTIVATIONS), activation))
    if activation == "auto":
        return "sigmoid" if channels == 1 else "softmax"
    if activation == "softmax" and channels == 1:
        raise TargetError("a softmax over one output channel is constant; use activation 'sigmoid'")
    return activation


#: elements of the output handled at once by the gradient-free class maps (slabs along the first spatial axis):
#: a whole CT's softmax over every class, or its int64 arg-max, would each cost several times the output's memory
SLAB_ELEMENTS = 1 << 24


def output_slabs(output: torch.Tensor, elements: Optional[int] = None):
    """Slices along the first spatial axis of ``output`` ``[B, C, *S]`` holding about ``elements`` each
    (default :data:`SLAB_ELEMENTS`)."""
    elements = SLAB_ELEMENTS if elements is None else elements
    n = output.shape[2]
    per_index = max(1, output.numel() // max(n, 1))
    step = max(1, elements // per_index)
    return [slice(i, min(n, i + step)) for i in range(0, n, step)]


def class_logit(output: torch.Tensor, class_index: int, activation: str = "auto") -> torch.Tensor:
    """The logit map ``[B, *S]`` of one class, differentiable (a view for softmax and multi-label models).

    Args:
        output: logits ``[B, C, *S]``.
        class_index: the class (see the module docstring for one-channel sigmoid models).
        activation: ``auto``, ``softmax`` or ``sigmoid``.
    """
    if output.ndim < 3:
        raise TargetError("the model output must be [batch, classes, *spatial], got shape %s" % (tuple(output.shape),))
    channels = output.shape[1]
    act = resolve_activation(activation, channels)
    if act == "sigmoid" and channels == 1:
        if class_index not in (0, 1):
            raise TargetError("the model has one sigmoid output channel: class must be 1 (foreground) or 0 "
                              "(background), got %r" % (class_index,))
        return output[:, 0] if class_index == 1 else -output[:, 0]
    if not 0 <= class_index < channels:
        raise TargetError("class %r does not exist: the model outputs %d classes (0..%d)"
                          % (class_index, channels, channels - 1))
    return output[:, class_index]


def class_maps(output: torch.Tensor, class_index: int, activation: str = "auto") -> Tuple[torch.Tensor, torch.Tensor]:
    """Logit and probability maps ``[B, *S]`` of one class, differentiable.

    Args:
        output: logits ``[B, C, *S]``.
        class_index: the class (see the module docstring for one-channel sigmoid models).
        activation: ``auto``, ``softmax`` or ``sigmoid``.
    """
    logit = class_logit(output, class_index, activation)
    if resolve_activation(activation, output.shape[1]) == "sigmoid":
        return logit, torch.sigmoid(logit)
    return logit, torch.softmax(output, dim=1)[:, class_index]


def class_probability(output: torch.Tensor, class_index: int, activation: str = "auto") -> torch.Tensor:
    """The probability map ``[B, *S]`` of one class, without autograd, slab by slab: equal to
    ``class_maps(output, ...)[1]`` up to float32 rounding (a few ulps: torch's softmax kernel rounds a slab's
    vectorised tail differently), without the softmax of every class in memory at once."""
    logit = class_logit(output, class_index, activation)  # validates
    with torch.no_grad():
        if resolve_activation(activation, output.shape[1]) == "sigmoid":
            return torch.sigmoid(logit.detach())
        probs = torch.empty_like(logit, memory_format=torch.contiguous_format)
        for part in output_slabs(output):
            probs[:, part] = torch.softmax(output[:, :, part].detach(), dim=1)[:, class_index]
        return probs


def predicted_mask(output: torch.Tensor, class_index: int, activation: str = "auto") -> torch.Tensor:
    """Voxels predicted as ``class_index`` (boolean ``[B, *S]``): arg-max for softmax, ``p > 0.5`` for sigmoid.

    Computed slab by slab without autograd (an int64 arg-max of a whole CT would cost twice a float32 map)."""
    act = resolve_activation(activation, output.shape[1])
    if act != "softmax":
        return class_probability(output, class_index, activation) > 0.5
    class_logit(output, class_index, activation)  # validates the class
    mask = torch.empty((output.shape[0],) + tuple(output.shape[2:]), dtype=torch.bool, device=output.device)
    with torch.no_grad():
        for part in output_slabs(output):
            mask[:, part] = is_argmax(output[:, :, part], class_index)
    return mask


def is_argmax(output: torch.Tensor, class_index: int) -> torch.Tensor:
    """``output.argmax(dim=1) == class_index`` (boolean ``[B, *S]``), the first maximum winning ties as in arg-max,
    by one comparison per other class: arg-max over a short channel axis is a strided reduction that took 0.39 s
    on a 2 x 128^3 output here, the comparisons 1 ms. NaN outputs take arg-max itself (it ranks NaN highest)."""
    mine = output[:, class_index]
    if bool(torch.isnan(output).any()):
        return output.argmax(dim=1) == class_index
    mask = torch.ones_like(mine, dtype=torch.bool)
    for other in range(output.shape[1]):
        if other != class_index:  # an earlier class wins a tie, a later one does not
            mask &= (mine > output[:, other]) if other < class_index else (mine >= output[:, other])
    return mask


class SegmentTarget:
    """The score of class ``c`` summed (or averaged) over a region M of the output.

    Args:
        class_index: explained class (see the module docstring).
        region: a :mod:`~SegHiResCAMLib.engine.regions` region; default: the voxels predicted as ``c``.
        score: ``logits`` (default) or ``probabilities``.
        reduction: ``sum`` (default, the papers) or ``mean`` over M.
        activation: ``auto``, ``softmax`` or ``sigmoid``; how the model turns logits into probabilities.
        name: label used in metadata and file names.

    Example:
        >>> import torch
        >>> logits = torch.zeros(1, 2, 2, 2)
        >>> logits[0, 1, 0, 1] = 2.0          # only voxel (0, 1) is predicted as class 1
        >>> SegmentTarget(1)(logits)
        tensor([2.])
    """

    def __init__(self, class_index: int, region: Optional[Region] = None, score: str = "logits",
                 reduction: str = "sum", activation: str = "auto", name: Optional[str] = None):
        if score not in SCORES:
            raise TargetError("score must be one of %s, got %r" % (", ".join(SCORES), score))
        if reduction not in REDUCTIONS:
            raise TargetError("reduction must be one of %s, got %r" % (", ".join(REDUCTIONS), reduction))
        if activation not in ACTIVATIONS:
            raise TargetError("activation must be one of %s, got %r" % (", ".join(ACTIVATIONS), activation))
        if isinstance(class_index, bool) or not isinstance(class_index, int):
            raise TargetError("class must be an integer, got %r" % (class_index,))
        self.class_index = class_index
        self.region_spec = region if region is not None else PredictedRegion()
        self.score = score
        self.reduction = reduction
        self.activation = activation
        self.name = name or "class%d" % class_index

    def region(self, output: torch.Tensor) -> torch.Tensor:
        """The explained voxels M, boolean ``[B, *S]``, computed on the detached output."""
        with torch.no_grad():
            out = output.detach()
            index, activation = self.class_index, self.activation
            class_logit(out, index, activation)  # validates the class before any region looks at it
            view = ClassView(out, lambda: class_probability(out, index, activation),
                             lambda: predicted_mask(out, index, activation), index)
            mask = self.region_spec(view).bool()
        if mask.shape != (out.shape[0],) + tuple(out.shape[2:]):
            raise TargetError("internal: region shape %s does not match output %s" % (tuple(mask.shape), tuple(out.shape)))
        if not self.region_spec.allow_empty:
            empty = [b for b in range(mask.shape[0]) if not bool(mask[b].any())]
            if empty:
                raise TargetError(
                    "the target region is empty%s (%s); choose another class, segment or voxel, or lower the "
                    "threshold" % ("" if mask.shape[0] == 1 else " for batch element(s) %s" % empty,
                                   self.describe_short())
                )
        return mask

    def __call__(self, output: torch.Tensor, region: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Differentiable score ``[B]``; ``region`` may pass a precomputed :meth:`region`."""
        mask = self.region(output) if region is None else region
        total = self.region_sum(output, mask)
        if self.reduction == "mean":
            total = total / self.region_size(mask).to(total.dtype)
        return total

    def region_sum(self, output: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """``sum_{p in M} score_c(p)`` ``[B]``, differentiable: a sum of per-voxel terms, so its gradient on any
        block of voxels is the same whether it is evaluated on the whole output or on that block alone (the
        sliding-window CAM relies on this). The probability is only computed for ``score="probabilities"``."""
        if self.score == "logits":
            values = class_logit(output, self.class_index, self.activation)
        else:
            values = class_maps(output, self.class_index, self.activation)[1]
        dims = tuple(range(1, values.ndim))
        if mask.dtype != torch.bool:
            mask = mask != 0
        return torch.where(mask, values, values.new_zeros(())).sum(dim=dims)

    def region_size(self, mask: torch.Tensor) -> torch.Tensor:
        """The divisor of ``reduction="mean"``: the number of voxels in M (at least 1) per batch element."""
        # per batch element, count_nonzero without ``dim``: a bool ``sum`` (and ``count_nonzero(dim=...)``, which
        # is one) first casts the whole mask to int64, 8 bytes a voxel: 640 MiB on a CT
        counts = [torch.count_nonzero(m) for m in mask] if mask.ndim > 1 else [torch.count_nonzero(mask)]
        return torch.stack(counts).clamp_min(1)

    def describe_short(self) -> str:
        info = self.region_spec.describe()
        return "class %d, %s" % (self.class_index, info.get("region"))

    def describe(self) -> dict:
        """JSON-friendly description for provenance metadata."""
        info = {"name": self.name, "class": self.class_index, "score": self.score, "reduction": self.reduction,
                "activation": self.activation}
        info.update(self.region_spec.describe())
        return info


def threshold_target(class_index: int, threshold: float = 0.5, score: str = "probabilities",
                     activation: str = "auto") -> SegmentTarget:
    """The EIECS 2021 target: keep the output voxels whose class probability exceeds ``threshold`` and explain
    the sum of their values (probabilities by default, or logits), combined afterwards like Grad-CAM."""
    return SegmentTarget(class_index, PredictedRegion(threshold), score=score, activation=activation,
                         name="class%d-p>%g" % (class_index, threshold))


def whole_image_target(class_index: int, **kwargs) -> SegmentTarget:
    """Score of class ``c`` over the whole output."""
    return SegmentTarget(class_index, WholeRegion(), name="class%d-whole" % class_index, **kwargs)


def empty_target(class_index: int, **kwargs) -> SegmentTarget:
    """Sanity check: explains nothing; every method must return an all-zero map."""
    return SegmentTarget(class_index, EmptyRegion(), name="class%d-empty" % class_index, **kwargs)
