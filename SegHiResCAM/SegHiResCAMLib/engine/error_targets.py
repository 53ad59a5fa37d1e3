"""Error-aware targets: the model's mistakes against a reference segmentation (docs/algorithms.md, "Error targets").

With a reference mask R of class ``c`` on the output grid and the model's prediction P of ``c``:

- **false positives** ``FP = P and not R``: explained with the class logit summed over FP, as for a prediction
  target ("why did the model segment this?").
- **false negatives** ``FN = R and not P``: the class logit over FN was too low; the explained scalar is its
  *negative*, ``-sum_{p in FN} z^c_p`` (:class:`SuppressionTarget`), so the positive part of the map is the
  evidence that pushed class ``c`` down there ("what suppressed it?").

Both are ordinary regions/targets of :mod:`.regions` and :mod:`.targets`: :class:`~.regions.ComponentRegion`
splits them into connected components, and every CAM method, the sliding windows and the faithfulness checks
take them unchanged.
"""

from typing import Optional

import torch

from ..catalog import ERROR_KINDS
from ..errors import TargetError
from .regions import ClassView, Region
from .targets import SegmentTarget

_WORDS = {"fp": "false positives", "fn": "false negatives"}


class ErrorRegion(Region):
    """The voxels where the prediction of the explained class disagrees with a reference mask.

    Args:
        reference: boolean (or 0/1) reference mask of the class on the output grid, ``[*S]`` or ``[B, *S]``.
        kind: ``"fp"`` (predicted, not in the reference) or ``"fn"`` (in the reference, not predicted).
        threshold: ``None`` for the model's own prediction (arg-max / ``p > 0.5``), or ``p_c > threshold``.

    An empty error region is a :class:`~SegHiResCAMLib.errors.TargetError` that says so: "no false positives"
    is an answer, not a map.
    """

    def __init__(self, reference: torch.Tensor, kind: str = "fp", threshold: Optional[float] = None):
        if kind not in ERROR_KINDS:
            raise TargetError("error kind must be one of %s, got %r" % (", ".join(ERROR_KINDS), kind))
        if not torch.is_tensor(reference):
            raise TargetError("the reference must be a tensor, got %s" % type(reference).__name__)
        if threshold is not None and not 0.0 < float(threshold) < 1.0:
            raise TargetError("threshold must lie strictly between 0 and 1, got %r" % (threshold,))
        self.reference = reference != 0
        self.kind = kind
        self.threshold = None if threshold is None else float(threshold)

    def predicted(self, view: ClassView) -> torch.Tensor:
        """The model's prediction of the class ``[B, *S]``."""
        return (view.probs > self.threshold) if self.threshold is not None else view.predicted.bool()

    def reference_on(self, view: ClassView) -> torch.Tensor:
        """The reference broadcast to ``[B, *S]`` on the output's device (checked against the output grid)."""
        spatial = tuple(view.output.shape[2:])
        ref = self.reference
        if tuple(ref.shape[-len(spatial):]) != spatial or ref.ndim not in (len(spatial), len(spatial) + 1):
            raise TargetError("the reference has shape %s but the model output grid is %s; resample it onto the "
                              "image grid first (the command line does this for you)" % (tuple(ref.shape), spatial))
        ref = ref.to(view.output.device)
        return ref.expand((view.output.shape[0],) + spatial) if ref.ndim == len(spatial) else ref

    def __call__(self, view):
        predicted = self.predicted(view).to(view.output.device)
        reference = self.reference_on(view)
        mask = predicted & ~reference if self.kind == "fp" else reference & ~predicted
        if not bool(mask.any()):
            what = ("every voxel predicted as class %d lies in the reference" if self.kind == "fp"
                    else "every reference voxel is predicted as class %d") % view.class_index
            raise TargetError("there are no %s of class %d against the reference (%s, %d predicted voxels, %d "
                              "reference voxels): nothing to explain; try the %s target, another class or reference"
                              % (_WORDS[self.kind], view.class_index, what, int(predicted.sum()),
                                 int(reference.sum()), "fn" if self.kind == "fp" else "fp"))
        return mask

    def describe(self):
        return {"region": "errors", "error": self.kind, "threshold": self.threshold,
                "reference_voxels": int(self.reference.sum())}


class SuppressionTarget(SegmentTarget):
    """The *negative* class score over a region: ``-sum_{p in M} z^c_p`` (or its mean).

    Explains what lowered class ``c`` over M (the false-negative target): with the default ReLU the map keeps the
    evidence against ``c``. Same arguments as :class:`~.targets.SegmentTarget`.
    """

    def region_sum(self, output: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return -SegmentTarget.region_sum(self, output, mask)

    def describe(self) -> dict:
        info = SegmentTarget.describe(self)
        info["sign"] = -1
        return info
