"""Error-aware targets on the image grid: the model's false positives and false negatives against a reference
segmentation, and the table of their connected components (docs/algorithms.md, "Error targets").

:func:`error_region` turns a :class:`~.explain.TargetSpec` with ``error="fp"|"fn"`` and a ``reference`` (a mask
or label map on the image grid) into an engine region on the model grid; :func:`component_table` lists the
components of the error region with their volume, centroid, mean class probability and the share of each
heatmap's mass inside them. Component ranks are those of ``--component K`` (0 = largest, ties in C order of
their first voxel), so row K of the table is the component that ``--component K`` explains.
"""

from typing import List, Optional, Sequence

import numpy as np
import torch

from ..catalog import ERROR_KINDS
from ..engine.error_targets import ErrorRegion
from ..engine.regions import ClassView, connected_components
from ..engine.targets import class_logit, class_probability, predicted_mask
from ..errors import TargetError
from ..imaging.components import label_components

#: at most this many components are listed (the largest); ``components_total`` gives the count
MAX_ROWS = 100


def check_error_spec(spec) -> None:
    """An error target needs a reference and no other region (mask, voxel, whole image, empty)."""
    if spec.error is None:
        if spec.reference is not None:
            raise TargetError("a reference segmentation was given without an error target; use --target fp "
                              "(false positives) or --target fn (false negatives), or --segment to explain a mask")
        return
    if spec.error not in ERROR_KINDS:
        raise TargetError("error target must be one of %s, got %r" % (", ".join(ERROR_KINDS), spec.error))
    if spec.reference is None:
        raise TargetError("the %s target needs a reference segmentation (--reference ref.nii.gz, or reference= "
                          "in TargetSpec) to compare the prediction with" % spec.error)
    others = [name for name, used in (("segment mask", spec.mask is not None), ("voxel", spec.voxel is not None),
                                      ("whole", spec.whole), ("empty", spec.empty)) if used]
    if others:
        raise TargetError("the %s target is the model's errors against the reference; it cannot be combined with "
                          "%s: drop one of them" % (spec.error, ", ".join(others)))


def binary_mask(values, label: Optional[float], what: str) -> np.ndarray:
    """``values`` (a mask or label map on the image grid) as a 0/1 ``uint8`` mask: the voxels equal to ``label``,
    or every non-zero voxel without one; a label that does not occur is a :class:`TargetError` naming ``what``."""
    values = np.asarray(values)
    if label is not None:
        if not np.any(values == label):
            found = np.unique(values)[:20]
            raise TargetError("label %g does not occur in the %s; its values are: %s"
                              % (label, what, ", ".join("%g" % v for v in found)))
        values = values == label
    return (values != 0).astype(np.uint8)


def reference_mask(spec) -> np.ndarray:
    """The reference of ``spec`` as a 0/1 ``uint8`` mask on the image grid (``reference_label`` selects a value)."""
    return binary_mask(spec.reference, spec.reference_label, "reference")


def error_region(spec, space) -> ErrorRegion:
    """The engine region of an error target: the reference moved onto the model grid (nearest neighbour)."""
    check_error_spec(spec)
    reference = reference_mask(spec)
    if reference.shape != tuple(space.image.array_shape):
        raise TargetError("the reference has shape %s but the image %s; resample it onto the image grid first (the "
                          "command line does this for you)" % (reference.shape, tuple(space.image.array_shape)))
    model_ref = space.to_model(reference, "nearest")
    return ErrorRegion(torch.from_numpy(np.ascontiguousarray(model_ref) != 0), spec.error, spec.threshold)


def component_labels(mask: torch.Tensor) -> torch.Tensor:
    """:func:`~SegHiResCAMLib.engine.regions.connected_components` (same labels) computed by SimpleITK for 2-D
    and 3-D masks (:func:`~SegHiResCAMLib.imaging.components.label_components`): one scan instead of tens of
    seconds of label propagation on a whole scan. The labeller of ``ComponentRegion`` in the analysis layer."""
    if mask.ndim not in (2, 3):
        return connected_components(mask)
    return torch.from_numpy(label_components(mask.detach().cpu().numpy())).to(mask.device)


def ranked_components(mask: torch.Tensor) -> torch.Tensor:
    """Component labels of a boolean mask ``[*S]`` renumbered by rank: 1 = largest (0 = background), ties in the
    order of :func:`~SegHiResCAMLib.engine.regions.connected_components` (as ``ComponentRegion`` ranks them)."""
    labels = component_labels(mask)
    n = int(labels.max())
    if n == 0:
        return labels
    sizes = torch.bincount(labels.flatten(), minlength=n + 1)[1:]
    order = torch.argsort(sizes, descending=True, stable=True)
    remap = torch.zeros(n + 1, dtype=torch.long, device=labels.device)
    remap[order + 1] = torch.arange(1, n + 1, device=labels.device)
    return remap[labels]


def component_table(output: torch.Tensor, target, region: ErrorRegion, space,
                    heatmaps: Sequence[np.ndarray], component=None) -> dict:
    """The connected components of an error region (batch element 0), largest first.

    Args:
        output: the model output ``[B, C, *S]`` (model grid).
        target: the engine target (its class and activation).
        region: the :class:`ErrorRegion` (all components, whatever ``--component`` chose).
        space: the :class:`~SegHiResCAMLib.imaging.model_space.ModelSpace` of the run.
        heatmaps: the maps on the image grid; the mass of each inside every component is listed.
        component: the explained component (``TargetSpec.component``: a rank, ``"largest"``) or ``None`` (all).

    Returns:
        ``{"error", "class", "components_total", "voxel_volume_mm3", "components": [row, ...]}``; a row holds
        ``index`` (the ``--component`` rank), ``voxels`` and ``volume_mm3`` (image grid), ``model_voxels``,
        ``explained`` (part of the explained region), ``centroid_index`` (image voxel, numpy order) and ``centroid_lps`` (mm), ``mean_probability`` of the class
        (model grid) and ``mass_inside`` / ``mass_outside``: per heatmap, its sum inside the component and
        outside it as fractions of the map's total sum (``None`` for an all-zero map).
    """
    with torch.no_grad():
        out = output.detach()
        index, activation = target.class_index, target.activation
        class_logit(out, index, activation)
        view = ClassView(out, lambda: class_probability(out, index, activation),
                         lambda: predicted_mask(out, index, activation), index)
        mask = region(view)[0]
        labels = ranked_components(mask.cpu())
        probs = view.probs[0].float().cpu()
    n = int(labels.max())
    shown = min(n, MAX_ROWS)
    flat = labels.flatten().numpy()
    model_voxels = np.bincount(flat, minlength=n + 1)
    mean_prob = np.bincount(flat, weights=probs.flatten().double().numpy(), minlength=n + 1) / np.maximum(model_voxels, 1)
    image_labels = space.to_image(np.where(flat <= shown, flat, 0).reshape(labels.shape).astype(np.int32), "nearest")
    image_flat = image_labels.ravel()
    voxels = np.bincount(image_flat, minlength=shown + 1)[:shown + 1]
    geometry = space.image
    voxel_mm3 = float(np.prod(geometry.spacing))
    coords = np.indices(image_labels.shape).reshape(image_labels.ndim, -1)
    centroids = [np.bincount(image_flat, weights=c, minlength=shown + 1)[:shown + 1] / np.maximum(voxels, 1)
                 for c in coords]
    masses = []
    for heat in heatmaps:
        heat = np.asarray(heat, dtype=np.float64).ravel()
        total = float(heat.sum())
        inside = np.bincount(image_flat, weights=heat, minlength=shown + 1)[:shown + 1]
        masses.append((total, inside))
    chosen = 0 if component == "largest" else component
    rows: List[dict] = []
    for k in range(1, shown + 1):
        centroid: Optional[List[float]] = None
        lps: Optional[List[float]] = None
        if voxels[k]:
            centroid = [round(float(c[k]), 3) for c in centroids]
            point = geometry.ijk_to_lps() @ np.append(np.asarray(centroid[::-1], dtype=float), 1.0)
            lps = [round(float(v), 3) for v in point[:-1]]
        inside = [None if total == 0 else float(values[k] / total) for total, values in masses]
        rows.append({"index": k - 1, "explained": chosen is None or chosen == k - 1, "voxels": int(voxels[k]), "volume_mm3": float(voxels[k]) * voxel_mm3,
                     "model_voxels": int(model_voxels[k]), "centroid_index": centroid, "centroid_lps": lps,
                     "mean_probability": float(mean_prob[k]), "mass_inside": inside,
                     "mass_outside": [None if v is None else 1.0 - v for v in inside]})
    return {"error": region.kind, "class": target.class_index, "components_total": n,
            "voxel_volume_mm3": voxel_mm3, "components": rows}


def error_words(kind: str) -> str:
    """``false positives`` / ``false negatives``."""
    return {"fp": "false positives", "fn": "false negatives"}[kind]


def error_tables(output: torch.Tensor, cam_targets: Sequence, specs: Sequence, space, heatmaps: Sequence) -> None:
    """Put the :func:`component_table` of every error target into its heatmaps' ``info["components"]`` (the
    masses of each heatmap; heatmaps are target-major, as :func:`~.explain.explain_image` returns them)."""
    per_target = len(heatmaps) // max(len(cam_targets), 1)
    for i, (target, spec) in enumerate(zip(cam_targets, specs)):
        if getattr(spec, "error", None) is None:
            continue
        region = target.region_spec
        region = getattr(region, "base", region)  # the whole error region, not only the chosen component
        own = heatmaps[i * per_target:(i + 1) * per_target]
        table = component_table(output, target, region, space, [h.array for h in own], spec.component)
        for j, heat in enumerate(own):
            rows = [dict(row, mass_inside=row["mass_inside"][j], mass_outside=row["mass_outside"][j])
                    for row in table["components"]]
            heat.info["components"] = dict(table, components=rows)


def error_mask(spec, labels: np.ndarray) -> np.ndarray:
    """The error region of ``spec`` on the image grid from the model's label map ``labels`` (same grid): the 2D
    model on a 3D scan, whose prediction is assembled slice by slice (:mod:`.slices`)."""
    check_error_spec(spec)
    reference = reference_mask(spec) != 0
    if reference.shape != labels.shape:
        raise TargetError("the reference has shape %s but the image %s; resample it onto the image grid first (the "
                          "command line does this for you)" % (reference.shape, labels.shape))
    predicted = labels == spec.class_index
    mask = predicted & ~reference if spec.error == "fp" else reference & ~predicted
    if not mask.any():
        raise TargetError("there are no %s of class %d against the reference (%d predicted voxels, %d reference "
                          "voxels): nothing to explain; try the %s target, another class or reference"
                          % (error_words(spec.error), spec.class_index, int(predicted.sum()), int(reference.sum()),
                             "fn" if spec.error == "fp" else "fp"))
    return mask


def image_component_table(mask: np.ndarray, geometry, heatmaps: Sequence[np.ndarray], kind: str, class_index: int,
                          component=None) -> dict:
    """:func:`component_table` of an error mask on the image grid (ranked there, as the slice path ranks
    ``--component``); ``mean_probability`` is ``None`` (a slice-by-slice run keeps no probability volume)."""
    labels = ranked_components(torch.from_numpy(np.ascontiguousarray(mask, dtype=bool))).numpy()
    n = int(labels.max())
    shown = min(n, MAX_ROWS)
    flat = np.where(labels <= shown, labels, 0).ravel()
    voxels = np.bincount(flat, minlength=shown + 1)
    coords = np.indices(labels.shape).reshape(labels.ndim, -1)
    centroids = [np.bincount(flat, weights=c, minlength=shown + 1) / np.maximum(voxels, 1) for c in coords]
    masses = [(float(np.sum(h, dtype=np.float64)), np.bincount(flat, weights=np.asarray(h, np.float64).ravel(),
                                                                minlength=shown + 1)) for h in heatmaps]
    voxel_mm3 = float(np.prod(geometry.spacing))
    chosen = 0 if component == "largest" else component
    rows = []
    for k in range(1, shown + 1):
        centroid = [round(float(c[k]), 3) for c in centroids]
        point = geometry.ijk_to_lps() @ np.append(np.asarray(centroid[::-1], dtype=float), 1.0)
        inside = [None if total == 0 else float(values[k] / total) for total, values in masses]
        rows.append({"index": k - 1, "explained": chosen is None or chosen == k - 1, "voxels": int(voxels[k]),
                     "volume_mm3": float(voxels[k]) * voxel_mm3, "model_voxels": None, "centroid_index": centroid,
                     "centroid_lps": [round(float(v), 3) for v in point[:-1]], "mean_probability": None,
                     "mass_inside": inside, "mass_outside": [None if v is None else 1.0 - v for v in inside]})
    return {"error": kind, "class": class_index, "components_total": n, "voxel_volume_mm3": voxel_mm3,
            "components": rows}


def slice_error_tables(heatmaps: Sequence, specs: Sequence, labels: np.ndarray, geometry) -> None:
    """The component tables of the error targets of a slice-by-slice run (``info["components"]``)."""
    per_target = len(heatmaps) // max(len(specs), 1)
    for i, spec in enumerate(specs):
        if getattr(spec, "error", None) is None:
            continue
        own = heatmaps[i * per_target:(i + 1) * per_target]
        table = image_component_table(error_mask(spec, labels), geometry, [h.array for h in own], spec.error,
                                      spec.class_index, spec.component)
        for j, heat in enumerate(own):
            rows = [dict(row, mass_inside=row["mass_inside"][j], mass_outside=row["mass_outside"][j])
                    for row in table["components"]]
            heat.info["components"] = dict(table, components=rows)
