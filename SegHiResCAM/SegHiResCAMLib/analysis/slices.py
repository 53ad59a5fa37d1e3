"""2D models on 3D scans: slice by slice along an anatomical axis (docs/slice_models.md).

A model whose card says ``dims: 2`` (or that is found to be 2D: a 3D probe input fails and a 2D one runs,
:func:`runs_in_slices`) is applied to every slice of a 3D scan perpendicular to ``slice_axis``:

- ``axial``, ``coronal``, ``sagittal`` name the physical axis the slices are perpendicular to (S-I, A-P, L-R); the
  voxel axis is the one whose direction is closest to it, through the image's direction matrix
  (:func:`slice_array_axis`), so oblique and flipped scans slice along the right voxel axis;
- each slice is a 2D image on its in-plane grid: the model's own 2D preprocessing (spacing, ``resize_to``,
  padding, intensity) is applied to it and undone on its heatmap, exactly as for a 2D image
  (:func:`SegHiResCAMLib.imaging.model_space.prepare`); a card ``orientation`` reorients the whole scan first
  (an exact permutation/flip of voxels, undone at the end);
- ``slice_context = K`` gives a 2.5D model the slice and its ``K`` neighbours on each side as ``2K + 1`` input
  channels (slice order, the first slice first; edge slices replicated);
- slices without target voxels give zeros and are not run through the CAM; prediction targets need the model's
  prediction first: a gradient-free forward pass over the slices, then the CAM only on slices where the class is
  predicted. Slices go through the network in batches of ``slice_batch`` (default: about
  :data:`SLICE_BATCH_VOXELS` model voxels per batch) to bound memory;
- the heatmap is assembled on exactly the scan's grid; by default one normalisation over the whole volume
  (``max``: divided by the largest value of all slices, so slices compare), ``per-slice`` divides each slice by
  its own maximum (the map of a 2D image, slice by slice). The label map of the prediction is assembled the same
  way.

This module knows the analysis layer's data types only by their fields (``TargetSpec``); :mod:`.explain`
dispatches to it and wraps what it returns.
"""

import dataclasses
import itertools
import time
from typing import Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple

import numpy as np
import SimpleITK as sitk
import torch

from .. import catalog
from ..engine import CAMSession, MaskRegion, PredictedRegion, SegmentTarget, WholeRegion, main_output
from ..engine.hooks import model_guard
from ..engine.layers import auto_layer
from ..engine.outputs import run_model
from ..engine.postprocess import normalize
from ..engine.error_targets import SuppressionTarget
from ..engine.targets import class_probability, predicted_mask
from ..errors import InputError, TargetError
from ..geometry import Geometry
from ..imaging.conversion import from_sitk, to_sitk
from ..imaging.model_space import ModelSpace, prepare
from ..models.base import SegModel, infer_spatial_dims
from ..models.output import probe_divisible_by, resolve_divisible_by, resolve_output
from .errors import binary_mask, component_labels, error_mask

#: the anatomical slice directions, the default first
SLICE_AXES = catalog.SLICE_AXES
#: the LPS axis each slice direction is perpendicular to (sagittal: L-R, coronal: A-P, axial: S-I)
NORMAL_AXIS = {"sagittal": 0, "coronal": 1, "axial": 2}
#: heatmap normalisations of slice-by-slice runs: the catalog's (over the whole volume) and ``per-slice``
NORMALIZATIONS = catalog.NORMALIZATIONS + (catalog.PER_SLICE,)
#: model-input voxels per batch of slices when ``slice_batch`` is not given (a 2D U-Net's gradient pass needs
#: a few KB per voxel: about 1-2 GB per batch)
SLICE_BATCH_VOXELS = 1 << 19


def slice_array_axis(geometry: Geometry, axis: str) -> int:
    """The numpy axis of a 3D image (``(z, y, x)`` order) perpendicular to the anatomical ``axis``.

    Every voxel axis is matched to one physical axis (the assignment with the largest sum of
    ``|direction cosines|``), so that an oblique scan slices along the voxel axis closest to the anatomical one
    and a flipped or permuted scan along the same anatomical direction.

    Example:
        >>> g = Geometry(size=(4, 5, 6), spacing=(1, 1, 1), origin=(0, 0, 0), direction=(0, 0, 1, 1, 0, 0, 0, 1, 0))
        >>> slice_array_axis(g, "axial"), slice_array_axis(g, "sagittal")  # index y points S, index z points L
        (1, 0)
    """
    if axis not in SLICE_AXES:
        raise InputError("slice axis %r is not one of %s; choose the direction the slices are taken in"
                         % (axis, ", ".join(SLICE_AXES)))
    if geometry.ndim != 3:
        raise InputError("slices are taken of 3D images; this image is %dD" % geometry.ndim)
    cosines = np.abs(geometry.direction_matrix)  # rows: L, P, S; columns: the index axes x, y, z
    best = max(itertools.permutations(range(3)), key=lambda p: sum(cosines[row, p[row]] for row in range(3)))
    return 2 - best[NORMAL_AXIS[axis]]


def runs_in_slices(model: SegModel, geometry: Geometry) -> bool:
    """Whether ``model`` runs slice by slice on an image of ``geometry``: a 2D model on a 3D image.

    A model without a declared ``dims`` (card) whose network shows no 3D convolution is probed once: when no 3D
    input runs (:func:`~SegHiResCAMLib.models.output.probe_divisible_by`) but a 2D slice does, the model is 2D
    (``model.spatial_dims`` becomes 2; ``model.resolved["dims"]`` records it)."""
    if geometry.ndim != 3:
        return False
    if model.spatial_dims == 2:
        return True
    if "dims" in (model.card or {}) or infer_spatial_dims(model.network) == 3:
        return False
    if "dims" in model.resolved:
        return model.resolved["dims"]["used"] == 2
    if model.preprocessing.divisible_by == "auto":
        resolve_divisible_by(model)
    if model.resolved.get("divisible_by", {}).get("probed") is not None or probe_divisible_by(model) is not None:
        model.resolved["dims"] = {"declared": None, "probed": 3, "used": 3}
        return False
    flat = dataclasses.replace(model, spatial_dims=2, resolved={})
    k = probe_divisible_by(flat)
    model.resolved["dims"] = {"declared": None, "probed": 2 if k else None, "used": 2 if k else 3}
    if not k:
        return False
    model.spatial_dims = 2
    if model.resolved.get("divisible_by", {}).get("declared") == "auto":  # the 3D probe found nothing: use the 2D one
        model.preprocessing = dataclasses.replace(model.preprocessing, divisible_by=k)
        model.resolved["divisible_by"] = {"declared": "auto", "probed": k, "used": k}
    return True


class SliceHeatmap(NamedTuple):
    """One assembled heatmap: the fields of :class:`~SegHiResCAMLib.analysis.explain.Heatmap`."""

    array: np.ndarray
    layer: str
    method: str
    target: object
    info: dict


class SliceRun(NamedTuple):
    """What :func:`explain_slices` returns: the fields of :class:`~SegHiResCAMLib.analysis.explain.ImageExplanation`."""

    heatmaps: List[SliceHeatmap]
    prediction: np.ndarray
    space: ModelSpace
    metadata: dict


class _Reorientation:
    """The card's ``orientation`` applied to the whole scan (``sitk.DICOMOrient``: a permutation and flips of
    voxels, no interpolation), and its exact inverse through the original index of every reoriented voxel."""

    def __init__(self, image: np.ndarray, geometry: Geometry, code: Optional[str]):
        self.geometry, self.code = geometry, code
        if code in (None, "keep"):
            self.image, self.grid, self.index = image, geometry, None
            return
        self.image, self.grid = from_sitk(sitk.DICOMOrient(to_sitk(image, geometry), code))
        flat = np.arange(int(np.prod(geometry.array_shape)), dtype=np.int64).reshape(geometry.array_shape)
        self.index = from_sitk(sitk.DICOMOrient(to_sitk(flat, geometry), code))[0]

    def back(self, array: np.ndarray) -> np.ndarray:
        """An array on the reoriented grid -> the same values on the input grid (exact)."""
        if self.index is None:
            return array
        out = np.empty(self.geometry.array_shape, dtype=array.dtype)
        out.reshape(-1)[self.index.reshape(-1)] = array.reshape(-1)
        return out


class _Slicer:
    """The slices of a (reoriented) scan along one voxel axis, as 2D model inputs. Every slice has the same
    in-plane grid, so one :class:`ModelSpace` maps all of them (their intensity steps differ, not their grids)."""

    def __init__(self, model: SegModel, image: np.ndarray, grid: Geometry, array_axis: int, context: int,
                 device: torch.device):
        self.model, self.context, self.device, self.array_axis = model, int(context), device, array_axis
        self.volume = np.moveaxis(image, array_axis, 0)  # a view: (slice, rows, columns[, channels])
        self.count = self.volume.shape[0]
        inplane = [a for a in range(3) if a != array_axis]  # numpy axes of a slice, in order
        self.plane = Geometry(size=tuple(grid.array_shape[a] for a in inplane[::-1]),
                              spacing=tuple(grid.spacing[2 - a] for a in inplane[::-1]), origin=(0.0, 0.0),
                              direction=(1.0, 0.0, 0.0, 1.0))
        self.prep = dataclasses.replace(model.preprocessing, orientation=None)
        param = next(model.network.parameters(), None)
        self.dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32

    def moved(self, array: np.ndarray) -> np.ndarray:
        """A view of an array on the (reoriented) scan grid with the slice axis first."""
        return np.moveaxis(array, self.array_axis, 0)

    def image(self, k: int) -> np.ndarray:
        """Slice ``k`` with its context as a 2D image: ``(rows, columns)``, or channels last (slice-major)."""
        if self.context == 0:
            return self.volume[k]
        parts = [self.volume[min(max(j, 0), self.count - 1)] for j in range(k - self.context, k + self.context + 1)]
        return np.concatenate([p[..., None] if p.ndim == 2 else p for p in parts], axis=-1)

    def check_channels(self) -> None:
        per_slice = 1 if self.volume.ndim == 3 else self.volume.shape[-1]
        given, wanted = per_slice * (2 * self.context + 1), self.model.in_channels
        if given != wanted:
            hint = ""
            if wanted % per_slice == 0 and (wanted // per_slice) % 2 == 1 and wanted != per_slice:
                hint = "; a 2.5D model that takes neighbouring slices as channels needs slice context %d" % (
                    (wanted // per_slice - 1) // 2)
            raise InputError("the 2D model takes %d input channel(s) but each slice gives %d (%d image channel(s) x "
                             "%d slice(s), slice context %d)%s" % (wanted, given, per_slice, 2 * self.context + 1,
                                                                   self.context, hint))

    def inputs(self, ks: Sequence[int]) -> Tuple[torch.Tensor, ModelSpace]:
        """The batch ``[len(ks), C, *S_model]`` of slices ``ks`` on the device, and the slices' model space."""
        arrays, space = [], None
        for k in ks:
            x, space = prepare(self.image(k), self.plane, self.prep, 2, self.model.in_channels)
            arrays.append(x)
        return torch.from_numpy(np.stack(arrays)).to(device=self.device, dtype=self.dtype), space


def on_slices(setup: "SliceSetup", array: np.ndarray, geometry: Geometry) -> np.ndarray:
    """An array on the scan's grid (e.g. a mask) as the run sees it: reoriented like the scan, slice axis first."""
    return setup.slicer.moved(_Reorientation(np.asarray(array), geometry, setup.reorient.code).image)


def input_slice_index(setup: "SliceSetup") -> Dict[int, int]:
    """Slice ``k`` of the run -> its index along ``setup.array_axis`` of the input (a card orientation may reverse
    the slice order)."""
    volume = np.zeros(setup.reorient.grid.array_shape, np.int32)
    moved = setup.slicer.moved(volume)
    for k in range(setup.slicer.count):
        moved[k] = k
    back = np.moveaxis(setup.reorient.back(volume), setup.array_axis, 0)
    return {int(back[j].flat[0]): j for j in range(back.shape[0])}


def _batches(items: Sequence[int], size: int) -> List[List[int]]:
    items = list(items)
    return [items[i:i + size] for i in range(0, len(items), size)]


def resolve_slice_axis(model: SegModel, slice_axis: Optional[str]) -> str:
    """``slice_axis``, else the model card's, else ``axial``; one clear error for another name."""
    axis = slice_axis or (model.card or {}).get("slice_axis") or SLICE_AXES[0]
    if axis not in SLICE_AXES:
        raise InputError("slice axis %r is not one of %s; choose the direction the slices are taken in"
                         % (axis, ", ".join(SLICE_AXES)))
    return axis


def _check_options(context, batch) -> None:
    if isinstance(context, bool) or not isinstance(context, (int, np.integer)) or context < 0:
        raise InputError("slice context must be an integer >= 0 (neighbouring slices on each side), got %r"
                         % (context,))
    if batch is not None and (isinstance(batch, bool) or not isinstance(batch, (int, np.integer)) or batch < 1):
        raise InputError("slice batch must be an integer >= 1 (slices per forward pass), got %r" % (batch,))


class SliceSetup(NamedTuple):
    """A prepared slice-by-slice run (:func:`slice_setup`): the scan reoriented and cut into model inputs."""

    reorient: _Reorientation
    slicer: _Slicer
    axis: str
    array_axis: int
    batch: int
    space: ModelSpace


def slice_setup(model: SegModel, image: np.ndarray, geometry: Geometry, device: torch.device, slice_axis, context,
                batch) -> SliceSetup:
    """Check the options, reorient the scan as the card says, cut it along ``slice_axis`` and resolve the model's
    output on the middle slice; ``batch`` ``None``: about :data:`SLICE_BATCH_VOXELS` model voxels per batch."""
    _check_options(context, batch)
    axis = resolve_slice_axis(model, slice_axis)
    image = np.asarray(image)
    if image.shape != geometry.array_shape and image.shape[:-1] != geometry.array_shape:
        raise InputError("image shape %s does not match its geometry %s" % (image.shape, geometry.array_shape))
    array_axis = slice_array_axis(geometry, axis)
    model.network.to(device)
    resolve_divisible_by(model)
    reorient = _Reorientation(image, geometry, model.preprocessing.orientation)
    slicer = _Slicer(model, reorient.image, reorient.grid, slice_array_axis(reorient.grid, axis), context, device)
    slicer.check_channels()
    x, space = slicer.inputs([slicer.count // 2])
    resolve_output(model, x)
    size = batch or max(1, SLICE_BATCH_VOXELS // max(1, x[0].numel()))
    return SliceSetup(reorient, slicer, axis, array_axis, int(size), space)


def _forward(model: SegModel, x: torch.Tensor) -> torch.Tensor:
    with model_guard(model.network, freeze_parameters=False), torch.no_grad():
        return main_output(run_model(model.network, x), model.output_key)


def _labels_into(labels: np.ndarray, output: torch.Tensor, ks, space: ModelSpace, model, labels_on_image) -> None:
    for b, k in enumerate(ks):
        labels[k] = labels_on_image(output[b:b + 1], model, space)


def _predicted(spec) -> bool:
    """A target whose region is the model's prediction on each slice (found by the gradient-free pass)."""
    return not (spec.empty or spec.whole or spec.voxel is not None or spec.mask is not None
                or spec.component is not None or spec.error is not None)


def _ball(geometry: Geometry, voxel, radius: float) -> np.ndarray:
    shape = geometry.array_shape
    index = tuple(int(i) for i in voxel)
    if len(index) != 3 or any(not 0 <= i < s for i, s in zip(index, shape)):
        raise TargetError("voxel %s lies outside the image (shape %s, numpy order)" % (index, shape))
    grids = np.ogrid[tuple(slice(0, s) for s in shape)]
    dist2 = sum(((g - i) * sp) ** 2 for g, i, sp in zip(grids, index, geometry.spacing[::-1]))
    return dist2 <= radius ** 2 + 1e-9


def _component(mask: np.ndarray, which) -> np.ndarray:
    """One 3D connected component (26-connected) of ``mask``: ``largest`` or a rank by size."""
    labels = component_labels(torch.from_numpy(np.ascontiguousarray(mask, dtype=bool)))
    n = int(labels.max())
    if n == 0:
        raise TargetError("the target region is empty; choose another class, segment or voxel")
    rank = 0 if which == "largest" else int(which)
    if not 0 <= rank < n:
        raise TargetError("component rank %d requested but the region has %d components" % (rank, n))
    sizes = torch.bincount(labels.flatten(), minlength=n + 1)[1:]
    return (labels == int(torch.argsort(sizes, descending=True, stable=True)[rank]) + 1).numpy()


def _image_mask(spec, geometry: Geometry, labels: Optional[np.ndarray]) -> Optional[np.ndarray]:
    """The target voxels on the input grid (``None`` for whole-image, empty and prediction targets)."""
    if spec.empty or spec.whole:
        return None
    if spec.voxel is not None:
        mask = _ball(geometry, spec.voxel, spec.radius_mm)
    elif spec.mask is not None:
        mask = binary_mask(spec.mask, spec.label, "mask")
        if not np.any(mask):
            raise TargetError("the target segment is empty; choose a segment with voxels, or another label")
    elif spec.error is not None:  # the prediction's errors against the reference
        if spec.threshold is not None:
            raise InputError("error targets of a thresholded prediction are not available for a 2D model on a 3D "
                             "scan; use the arg-max prediction")
        mask = error_mask(spec, labels)
    elif spec.component is not None:
        if spec.threshold is not None:
            raise InputError("a connected component of a thresholded prediction is not available for a 2D model on "
                             "a 3D scan; use the arg-max prediction or a segment")
        mask = labels == spec.class_index
    else:
        return None
    if spec.component is not None:
        mask = _component(mask != 0, spec.component)
    return mask != 0


class _Heat:
    """One heatmap being assembled: the unnormalised maps of the slices run, on the (reoriented) scan grid."""

    def __init__(self, shape, normalization: str):
        self.volume = np.zeros(shape, dtype=np.float32)
        self.normalization = normalization
        self.peak, self.low, self.high = 0.0, np.inf, -np.inf
        self.first: Optional[dict] = None
        self.scores: List[float] = []
        self.region_voxels = 0
        self.flat_slices = 0
        self.warnings: List[str] = []

    def add(self, moved_volume: np.ndarray, ks, res, space: ModelSpace) -> None:
        maps = res.map.float()
        if self.normalization == catalog.PER_SLICE:
            maps, _ = normalize(maps, "max")
        else:
            self.peak = max(self.peak, float(maps.abs().max()))
            self.low, self.high = min(self.low, float(maps.min())), max(self.high, float(maps.max()))
        for b, k in enumerate(ks):
            moved_volume[k] = space.to_image(maps[b].cpu().numpy(), "linear")
        if self.first is None:
            self.first = res.describe()
        self.scores.extend(float(s) for s in res.score)
        self.region_voxels += int(res.region.sum())
        self.flat_slices += int(res.flat.sum())
        self.warnings.extend(w for w in res.warnings if w not in self.warnings)

    def finish(self, run_slices: Sequence[int], moved_volume: np.ndarray, reduction: str) -> bool:
        """Normalise over the whole volume (the per-slice maps are done); returns whether the map is flat."""
        if self.normalization == catalog.PER_SLICE:
            return self.flat_slices == len(run_slices)
        if self.normalization == "minmax" and self.high > self.low:
            for k in run_slices:
                moved_volume[k] = (moved_volume[k] - np.float32(self.low)) / np.float32(self.high - self.low)
            return False
        if self.peak == 0 or self.normalization == "minmax":
            self.volume[...] = 0.0
            return True
        if self.normalization == "max":
            self.volume /= np.float32(self.peak)
        elif reduction == "mean" and self.region_voxels:  # the mean over M of the whole volume, not of each slice
            self.volume /= np.float32(self.region_voxels)
        return False


def explain_slices(model: SegModel, image: np.ndarray, geometry: Geometry, targets: Sequence, layers, method,
                   device: torch.device, relu: bool, normalization: str, progress: Callable[[float, str], None],
                   labels_on_image: Callable, explained_score: Callable, slice_axis: Optional[str] = None,
                   slice_context: int = 0, slice_batch: Optional[int] = None, amp: bool = False,
                   **method_options) -> SliceRun:
    """Explain ``targets`` of a 2D ``model`` on a 3D ``image`` slice by slice (see the module docstring).

    Args: as :func:`~SegHiResCAMLib.analysis.explain.explain_image`, with ``device`` resolved, ``normalization``
    one of :data:`NORMALIZATIONS`, ``labels_on_image(output, model, space)`` (a slice's label map on its image
    grid) and ``explained_score(model, score)`` of
    :mod:`.explain`, ``slice_axis`` (default: the card's, else axial), ``slice_context`` (neighbouring slices on
    each side given as channels) and ``slice_batch`` (slices per forward pass).

    The region of a target is found per slice, in model space, as for a 2D image: the prediction (or
    ``p > threshold``) of each slice, a segment or voxel ball (3D, in mm) mapped onto each slice's model grid, a
    3D connected component of either. ``reduction="mean"`` divides by the voxels of M in the whole volume.
    """
    if normalization not in NORMALIZATIONS:
        raise InputError("normalisation must be one of %s, got %r" % (", ".join(NORMALIZATIONS), normalization))
    started = time.perf_counter()
    progress(0.0, "preparing the slices")
    run = slice_setup(model, image, geometry, device, slice_axis, slice_context, slice_batch)
    slicer, reorient, space = run.slicer, run.reorient, run.space
    names = [layers] if isinstance(layers, str) else list(layers)
    names = [model.default_layer if (n == "auto" and model.default_layer != "auto") else n for n in names]
    if "auto" in names:
        chosen = auto_layer(model.network, slicer.inputs([slicer.count // 2])[0], model.output_key)
        names = [chosen if n == "auto" else n for n in names]
    names = list(dict.fromkeys(names))
    labels = np.zeros(reorient.grid.array_shape, dtype=np.uint8 if model.num_classes < 256 else np.uint16)
    labels_moved = slicer.moved(labels)
    labelled = set()
    hits: Dict[int, List[int]] = {i: [] for i, spec in enumerate(targets) if _predicted(spec)}
    counts = {"forward_no_grad": 0, "cam": 0}
    if hits or any(spec.component is not None or spec.error is not None for spec in targets):  # the prediction first
        for ks in _batches(range(slicer.count), run.batch):
            progress(0.05 + 0.2 * ks[0] / slicer.count, "predicting the slices")
            x, _ = slicer.inputs(ks)
            output = _forward(model, x)
            counts["forward_no_grad"] += len(ks)
            _labels_into(labels_moved, output, ks, space, model, labels_on_image)
            labelled.update(ks)
            for i in hits:
                spec = targets[i]
                region = (class_probability(output, spec.class_index, model.activation) > spec.threshold
                          if spec.threshold is not None else predicted_mask(output, spec.class_index, model.activation))
                hits[i].extend(k for b, k in enumerate(ks) if bool(region[b].any()))
    heatmaps: List[SliceHeatmap] = []
    slices_run = []
    for i, spec in enumerate(targets):
        needs_labels = spec.component is not None or spec.error is not None
        mask = _image_mask(spec, geometry, reorient.back(labels) if needs_labels else None)
        model_masks: Dict[int, np.ndarray] = {}
        if mask is not None:
            mask_moved = slicer.moved(_Reorientation(mask.astype(np.uint8), geometry, reorient.code).image)
            for k in range(slicer.count):
                if mask_moved[k].any():
                    on_model = space.to_model(mask_moved[k], "nearest")
                    if on_model.any():
                        model_masks[k] = on_model != 0
            ks_all = sorted(model_masks)
            if not ks_all:
                raise TargetError("the target segment vanishes on the model grid of every slice (it is smaller than "
                                  "one model voxel); use a larger segment or a voxel target with a radius")
        elif spec.whole:
            ks_all = list(range(slicer.count))
        elif spec.empty:
            ks_all = []
        else:
            ks_all = sorted(hits[i])
            if not ks_all:
                raise TargetError("the model predicts no voxel of class %d on any %s slice; choose another class, a "
                                  "segment or lower the threshold" % (spec.class_index, run.axis))
        slices_run.append(len(ks_all))
        heats: Dict[Tuple[str, str], _Heat] = {}
        name = spec.name or "%s-%s" % (model.class_names[spec.class_index] if 0 <= spec.class_index < model.num_classes
                                       else "class%d" % spec.class_index, spec.kind().replace(" ", "-"))
        for ks in _batches(ks_all, run.batch):
            progress(0.25 + 0.65 * (i + ks[0] / max(1, slicer.count)) / len(targets), "gradients for %s" % name)
            if mask is not None:
                region = MaskRegion(torch.from_numpy(np.stack([model_masks[k] for k in ks])))
            else:
                region = WholeRegion() if spec.whole else PredictedRegion(spec.threshold)
            kind = SuppressionTarget if spec.error == "fn" else SegmentTarget  # fn: what suppressed the class
            target = kind(spec.class_index, region, score=explained_score(model, spec.score),
                          reduction="sum", activation=model.activation, name=name)
            x, _ = slicer.inputs(ks)
            session = CAMSession(model.network, x, names, output_key=model.output_key, autocast=amp)
            counts["cam"] += len(ks)
            results = session.explain([target], method, relu=relu, normalization="none", keep_graph=False,
                                      **method_options)
            for res in results:
                key = (res.layer, res.method)
                if key not in heats:
                    heats[key] = _Heat(reorient.grid.array_shape, normalization)
                heats[key].add(slicer.moved(heats[key].volume), ks, res, space)
            todo = [b for b, k in enumerate(ks) if k not in labelled]
            if todo:
                _labels_into(labels_moved, results[0].output[todo], [ks[b] for b in todo], space, model,
                             labels_on_image)
                labelled.update(ks)
        if not heats:  # nothing to explain (the empty target): zero maps
            for layer in names:
                for m in ([method] if isinstance(method, str) else list(method)):
                    heats[(layer, m if isinstance(m, str) else m.name)] = _Heat(reorient.grid.array_shape, normalization)
        for (layer, method_name), heat in heats.items():
            flat = heat.finish(ks_all, slicer.moved(heat.volume), spec.reduction)
            info = dict(heat.first or {"method": method_name, "layer": layer, "target": {"name": name,
                        "class": spec.class_index, "region": "empty"}, "options": {}})
            total = float(np.sum(heat.scores)) if heat.scores else 0.0
            info.update(score=[total / heat.region_voxels if spec.reduction == "mean" and heat.region_voxels else total],
                        region_voxels=[heat.region_voxels], flat=bool(flat), warnings=list(heat.warnings),
                        slices={"axis": run.axis, "run": len(ks_all), "count": slicer.count,
                                "normalization": normalization})
            if isinstance(info.get("target"), dict):
                info["target"] = dict(info["target"], reduction=spec.reduction)
            heatmaps.append(SliceHeatmap(reorient.back(heat.volume), layer, method_name, spec, info))
    rest = [k for k in range(slicer.count) if k not in labelled]
    for ks in _batches(rest, run.batch):  # the label map of the slices without target voxels
        x, _ = slicer.inputs(ks)
        _labels_into(labels_moved, _forward(model, x), ks, space, model, labels_on_image)
        counts["forward_no_grad"] += len(ks)
    progress(1.0, "done")
    metadata = _metadata(model, run, device, started, counts, slices_run, normalization)
    return SliceRun(heatmaps, reorient.back(labels), space, metadata)


def _metadata(model: SegModel, run: SliceSetup, device, started: float, counts: dict, slices_run, normalization) -> dict:
    from .. import __version__
    import platform
    return {"seghirescam_version": __version__, "torch_version": torch.__version__,
            "python": platform.python_version(), "device": str(device), "model": model.describe(),
            "model_space": dict(run.space.describe(), slices=True),
            "timings": {"total_s": time.perf_counter() - started},
            "model_output": dict(model.resolved.get("output", {})),
            "slices": {"axis": run.axis, "array_axis": run.array_axis, "count": run.slicer.count,
                       "context": run.slicer.context, "batch": run.batch, "normalization": normalization,
                       "slices_run": slices_run, "cam_slices": counts["cam"],
                       "forward_slices": counts["forward_no_grad"],
                       "reoriented": run.reorient.code if run.reorient.index is not None else None}}


def predict_slices(model: SegModel, image: np.ndarray, geometry: Geometry, device: torch.device,
                   progress: Callable[[float, str], None], labels_on_image: Callable,
                   slice_axis: Optional[str] = None,
                   slice_context: int = 0, slice_batch: Optional[int] = None) -> Tuple[np.ndarray, dict]:
    """The label map of a 2D ``model`` on a 3D ``image``, slice by slice (no gradients), and metadata."""
    started = time.perf_counter()
    progress(0.0, "preparing the slices")
    run = slice_setup(model, image, geometry, device, slice_axis, slice_context, slice_batch)
    slicer = run.slicer
    labels = np.zeros(run.reorient.grid.array_shape, dtype=np.uint8 if model.num_classes < 256 else np.uint16)
    for ks in _batches(range(slicer.count), run.batch):
        progress(0.05 + 0.9 * ks[0] / slicer.count, "predicting the slices")
        x, _ = slicer.inputs(ks)
        _labels_into(slicer.moved(labels), _forward(model, x), ks, run.space, model, labels_on_image)
    progress(1.0, "done")
    meta = _metadata(model, run, device, started, {"cam": 0, "forward_no_grad": slicer.count}, [], None)
    return run.reorient.back(labels), meta


__all__ = ["NORMALIZATIONS", "SLICE_AXES", "SLICE_BATCH_VOXELS", "SliceHeatmap", "SliceRun", "SliceSetup",
           "explain_slices", "input_slice_index", "on_slices", "predict_slices", "resolve_slice_axis",
           "runs_in_slices", "slice_array_axis", "slice_setup"]
