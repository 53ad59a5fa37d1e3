"""Faithfulness of the maps of a 2D model on a 3D scan: ``evaluate`` on the target's slices (docs/slice_models.md).

A 2D model explains a scan slice by slice (:mod:`.slices`), so its maps are evaluated slice by slice too:

- the slices are those of :mod:`.slices` (axis from the direction matrix, card orientation, slice context as
  channels); each slice is a 2D image on its in-plane grid, evaluated exactly as a 2D image
  (:func:`~.evaluate.evaluate_image`: deletion/insertion, heat in the segment, sanity checks);
- the target is a segment (its voxels on each slice) or the model's prediction of the class (the slices are
  predicted first, without gradients); the *evaluated slices* are the ``slice_count`` slices with the most target
  voxels (ties: the lower slice), in slice order;
- aggregation: every number of a row (method x layer) is the **mean over the evaluated slices** (NaN values left
  out); ``flat`` is true when the map is flat on any slice, ``warnings`` are joined. The curves and sanity records
  are those of the slice with the most target voxels (the curves' fractions differ between slices).

Deletion and insertion on a whole volume would remove voxels of every slice at once, which the slice-by-slice
model never sees together; per slice, the score a map is judged by is the one the model computed for that slice.
"""

import dataclasses
from typing import Callable, List, NamedTuple, Optional

import numpy as np
import torch

from ..errors import InputError, TargetError
from ..geometry import Geometry
from ..models.base import SegModel
from .slices import input_slice_index, on_slices, predict_slices, slice_setup

#: how the rows of the slices are combined (recorded in the metadata)
AGGREGATION = "mean over the evaluated slices of each slice's value (NaN values left out)"
#: evaluated slices when ``slice_count`` is not given
DEFAULT_SLICE_COUNT = 3


class SliceEvaluation(NamedTuple):
    """The fields of :class:`~.evaluate.Evaluation`."""

    rows: List[dict]
    curves: dict
    sanity: dict
    metadata: dict


def _target_masks(model: SegModel, image: np.ndarray, geometry: Geometry, spec, setup, slice_axis, slice_context,
                  labels_on_image: Callable) -> np.ndarray:
    """The target on the run's slices (reoriented, slice axis first), bool."""
    if spec.mask is not None and spec.error is None and spec.component is None:
        mask = np.asarray(spec.mask)
        mask = mask == spec.label if spec.label is not None else mask != 0
        if not mask.any():
            raise TargetError("the target segment is empty; choose a segment with voxels, or another label")
        return on_slices(setup, mask.astype(np.uint8), geometry) != 0
    if spec.mask is None and not (spec.whole or spec.empty or spec.voxel is not None or spec.error is not None
                                  or spec.component is not None):
        labels, _ = predict_slices(model, image, geometry, torch.device("cpu"), lambda f, m: None, labels_on_image,
                                   slice_axis, slice_context)
        return on_slices(setup, labels, geometry) == spec.class_index
    raise InputError("evaluating a 2D model on a 3D scan takes a segment (--segment) or the model's prediction of a "
                     "class (--class) as the target, got a %s target; choose one of those" % spec.kind())


def _mean(values: List[object]) -> object:
    numbers = [float(v) for v in values if isinstance(v, (int, float, np.floating)) and not isinstance(v, bool)]
    if len(numbers) != len(values):
        return values[0]
    finite = [v for v in numbers if not np.isnan(v)]
    return float(np.mean(finite)) if finite else float("nan")


def _combine(runs) -> List[dict]:
    rows = []
    for i, first in enumerate(runs[0].rows):
        same = [run.rows[i] for run in runs]
        row = {}
        for key, value in first.items():
            values = [r.get(key) for r in same]
            if key in ("method", "layer"):
                row[key] = value
            elif key == "flat":
                row[key] = any(bool(v) for v in values)
            elif key == "warnings":
                row[key] = list(dict.fromkeys(w for v in values for w in (v or [])))
            elif value is None:
                row[key] = None
            else:
                row[key] = _mean(values)
        rows.append(row)
    return rows


def evaluate_slices(model: SegModel, image: np.ndarray, geometry: Geometry, spec, evaluate: Callable,
                    labels_on_image: Callable, slice_axis: Optional[str] = None, slice_context: int = 0,
                    slice_count: Optional[int] = None, progress: Optional[Callable[[float, str], None]] = None,
                    **options) -> SliceEvaluation:
    """Evaluate a 2D ``model``'s maps on a 3D ``image`` slice by slice (module doc); ``evaluate`` is
    :func:`~.evaluate.evaluate_image`, called on each evaluated slice as a 2D image with ``options``."""
    report = progress or (lambda f, m: None)
    count = DEFAULT_SLICE_COUNT if slice_count is None else slice_count
    if isinstance(count, bool) or not isinstance(count, (int, np.integer)) or count < 1:
        raise InputError("the number of evaluated slices must be an integer >= 1, got %r" % (slice_count,))
    report(0.0, "preparing the slices")
    setup = slice_setup(model, image, geometry, torch.device("cpu"), slice_axis, slice_context, None)
    slicer = setup.slicer
    masks = _target_masks(model, image, geometry, spec, setup, slice_axis, slice_context, labels_on_image)
    sizes = [int(masks[k].sum()) for k in range(slicer.count)]
    ranked = sorted((k for k in range(slicer.count) if sizes[k]), key=lambda k: (-sizes[k], k))
    if not ranked:
        raise TargetError("the target has no voxel on any %s slice; choose a class the model predicts or a segment"
                          % setup.axis)
    chosen = sorted(ranked[:int(count)])
    flat_model = dataclasses.replace(model, preprocessing=slicer.prep, spatial_dims=2)  # the scan is reoriented
    runs = []
    for n, k in enumerate(chosen):
        target = dataclasses.replace(spec, mask=masks[k].astype(np.uint8), label=None) if spec.mask is not None \
            else spec
        runs.append(evaluate(flat_model, slicer.image(k), slicer.plane, target,
                             progress=lambda f, m, n=n, k=k: report((n + f) / len(chosen), "slice %d (%d/%d): %s"
                                                                    % (k, n + 1, len(chosen), m)), **options))
    largest = chosen.index(ranked[0])
    index = input_slice_index(setup)
    metadata = dict(runs[largest].metadata)
    metadata["slices"] = {"axis": setup.axis, "array_axis": setup.array_axis, "count": slicer.count,
                          "context": slicer.context, "evaluated": [index[k] for k in chosen],
                          "target_voxels": [sizes[k] for k in chosen], "curves_of": index[ranked[0]],
                          "aggregation": AGGREGATION,
                          "rows_per_slice": [run.rows for run in runs]}
    report(1.0, "done")
    return SliceEvaluation(_combine(runs), runs[largest].curves, runs[largest].sanity, metadata)


__all__ = ["AGGREGATION", "DEFAULT_SLICE_COUNT", "SliceEvaluation", "evaluate_slices"]
