"""How reliable is the map itself: ensembles of models, mirroring test-time augmentation (TTA) and, for a 2D model
on a 3D scan, the slice axes.

:func:`explain_ensemble` explains the same targets with every *member* (each model of a list, e.g. the folds of
an nnU-Net or several weight files of one architecture, times each mirroring of the scan, times each slice axis of
a 2D model) and returns, per
heatmap, the voxel-wise mean map, the spread map and the agreement score (docs/algorithms.md, "Ensembles and
TTA: mean, spread and agreement"):

- mean ``m = (1/n) sum_i h_i`` on the image grid;
- spread ``s = std_i(h_i) / (|m| + eps)`` with the population standard deviation and
  ``eps = SPREAD_EPSILON * max|m|`` (0 where every member's map is 0);
- agreement: the mean over member pairs of the Pearson correlation of their maps over the voxels where at least
  one member's map is non-zero (1 for identical maps).

A mirrored member sees the scan flipped along image array axes (and its targets flipped with it); its map is
flipped back before it is combined. Each member explains its own target region (its own prediction, or its own
errors against the reference).
"""

import dataclasses
import itertools
import re
from dataclasses import replace
from typing import List, Optional, Sequence, Tuple, Union

import numpy as np

from .. import catalog
from ..errors import InputError
from ..geometry import Geometry
from ..imaging.channels import image_channels, stack_channels
from ..models.base import SegModel
from ..models.card import apply_card, as_card
from ..models.nnunet.loader import FoldEnsemble
from .explain import Heatmap, ImageExplanation, ProgressCallback, TargetSpec, explain_image
from .slices import runs_in_slices

#: ``eps`` of the spread map, relative to the largest absolute value of the mean map
SPREAD_EPSILON = 0.01


def mirror_flips(ndim: int, tta: Union[bool, Sequence[int], None]) -> List[Tuple[int, ...]]:
    """The mirrorings of TTA: ``()`` (no flip) first, then every non-empty subset of the axes (``True``: all
    ``ndim`` image array axes, as nnU-Net mirrors; a sequence: those axes); ``False``/``None``: ``[()]``."""
    if not tta:
        return [()]
    axes = list(range(ndim)) if tta is True else sorted({int(a) for a in tta})
    if any(not 0 <= a < ndim for a in axes):
        raise InputError("TTA axes must lie in 0..%d (image array axes, numpy order), got %s" % (ndim - 1, list(tta)))
    return [combo for k in range(len(axes) + 1) for combo in itertools.combinations(axes, k)]


def flip_target(spec: TargetSpec, axes: Tuple[int, ...], shape: Sequence[int]) -> TargetSpec:
    """``spec`` as it reads on the scan flipped along ``axes`` (its masks flipped, its voxel mirrored)."""
    if not axes:
        return spec
    changes = {}
    for name in ("mask", "reference"):
        value = getattr(spec, name)
        if value is not None:
            changes[name] = np.ascontiguousarray(np.flip(np.asarray(value), axes))
    if spec.voxel is not None:
        changes["voxel"] = tuple(shape[a] - 1 - int(v) if a in axes else int(v) for a, v in enumerate(spec.voxel))
    return replace(spec, **changes)


def pearson(a: np.ndarray, b: np.ndarray) -> float:
    """Pearson correlation of two arrays; 1 when both are constant and equal, 0 when one of them is constant."""
    a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    da, db = a - a.mean(), b - b.mean()
    denominator = float(np.sqrt((da * da).sum() * (db * db).sum()))
    if denominator == 0.0:
        return 1.0 if np.array_equal(a, b) else 0.0
    return float(np.clip((da * db).sum() / denominator, -1.0, 1.0))


def combine_maps(maps: Sequence[np.ndarray]) -> Tuple[np.ndarray, np.ndarray, float, List[float]]:
    """Mean map, spread map, agreement and the pairwise correlations (member order ``(0,1), (0,2), ...``) of the
    members' maps of one heatmap (see the module docstring)."""
    stack = np.stack([np.asarray(m, np.float64) for m in maps])
    mean = stack.mean(axis=0)
    std = stack.std(axis=0)
    eps = SPREAD_EPSILON * float(np.abs(mean).max(initial=0.0))
    spread = np.where(std > 0, std / (np.abs(mean) + eps if eps > 0 else 1.0), 0.0)
    support = np.any(stack != 0, axis=0)
    if not support.any():
        support = np.ones(mean.shape, bool)
    pairs = [pearson(stack[i][support], stack[j][support]) for i, j in itertools.combinations(range(len(stack)), 2)]
    agreement = float(np.mean(pairs)) if pairs else 1.0
    return mean.astype(np.float32), spread.astype(np.float32), agreement, pairs


def explain_ensemble(models: Union[SegModel, Sequence[SegModel]], image: np.ndarray, geometry: Geometry,
                     targets: Sequence[TargetSpec], tta: Union[bool, Sequence[int], None] = False,
                     slice_axes: Optional[Sequence[str]] = None, progress: Optional[ProgressCallback] = None,
                     **explain_options) -> ImageExplanation:
    """Explain ``targets`` with every member (model x mirroring) and combine the maps.

    Args:
        models: one :class:`~SegHiResCAMLib.models.base.SegModel` or several (folds, weight files); an nnU-Net
            fold ensemble (``fold="auto"``/``"0,1,..."``: one network averaging the folds' logits) counts as one
            member per fold (:func:`fold_members`), whose layer names drop the ensemble's ``folds.K.`` prefix.
        image, geometry, targets: as :func:`~.explain.explain_image` (one or several input channels).
        tta: ``True`` mirrors along every image axis (all combinations, ``2^ndim`` runs per model), a sequence
            of axes mirrors along those, ``False`` none.
        slice_axes: a 2D model on a 3D scan: explain along each of these slice axes (``axial``, ``coronal``,
            ``sagittal``; :mod:`.slices`); the agreement is then between slice axes (and models, mirrorings).
        progress: ``progress(fraction, message)`` over all members.
        **explain_options: passed to :func:`~.explain.explain_image` (layers, method, device, ...).

    Returns:
        An :class:`~.explain.ImageExplanation` whose heatmaps hold the mean maps, with ``Heatmap.spread`` the
        spread map and ``info["ensemble"]`` the agreement and pairwise correlations; ``metadata["agreement"]`` is
        the agreement of the first heatmap and ``metadata["ensemble"]`` describes the members. The prediction is
        the voxel-wise majority of the members' label maps (ties: the lower label).
    """
    given = [models] if isinstance(models, SegModel) else list(models)
    if not given:
        raise InputError("an ensemble needs at least one model")
    models = [member for model in given for member in fold_members(model)]
    if len(models) > len(given) and explain_options.get("layers") is not None:  # a fold's own layer names
        layers = explain_options["layers"]
        explain_options["layers"] = (fold_layer(layers) if isinstance(layers, str)
                                     else [fold_layer(name) for name in layers])
    if explain_options.get("per_channel"):
        raise InputError("per-channel maps explain one model: leave out tta and give one model")
    card = explain_options.pop("model_card", None)
    if card is not None:
        models = [apply_card(model, as_card(card)) for model in models]
    # one array on the grid (channels last): the mirrorings flip the spatial axes only
    image = stack_channels(image, geometry, (models[0].card or {}).get("channels"),
                           image_channels(models[0].in_channels, explain_options.get("slice_context", 0))).array
    flips = mirror_flips(geometry.ndim, tta)
    axes = check_slice_axes(models, geometry, slice_axes, explain_options)
    members = [(m, flip, axis) for m in range(len(models)) for flip in flips for axis in axes]
    report = progress or (lambda f, m: None)
    runs = []
    for k, (m, flip, axis) in enumerate(members):
        def member_progress(f, message, k=k):
            report((k + f) / len(members), "member %d/%d: %s" % (k + 1, len(members), message))
        shown = np.ascontiguousarray(np.flip(image, flip)) if flip else image
        specs = [flip_target(t, flip, geometry.array_shape) for t in targets]
        options = dict(explain_options, **({"slice_axis": axis} if axis else {}))
        if k:  # the quick check (check="quick") runs on the first member; the agreement is added below
            options.pop("check", None)
        result = explain_image(models[m], shown, geometry, specs, progress=member_progress, **options)
        for heat in result.heatmaps:
            heat.array = np.ascontiguousarray(np.flip(heat.array, flip)) if flip else heat.array
        result.prediction = np.ascontiguousarray(np.flip(result.prediction, flip)) if flip else result.prediction
        runs.append(result)
    first = runs[0]
    heatmaps = []
    for i, heat in enumerate(first.heatmaps):
        mean, spread, agreement, pairs = combine_maps([run.heatmaps[i].array for run in runs])
        info = dict(heat.info)
        info["ensemble"] = {"members": len(members), "agreement": agreement, "pairwise": pairs,
                            "spread_epsilon": SPREAD_EPSILON,
                            "flat_members": sum(bool(run.heatmaps[i].info.get("flat")) for run in runs)}
        heatmaps.append(Heatmap(mean, heat.layer, heat.method, targets[i // max(1, len(first.heatmaps) // len(targets))],
                                info, spread=spread))
    metadata = dict(first.metadata)
    metadata["agreement"] = heatmaps[0].info["ensemble"]["agreement"] if heatmaps else None
    metadata["ensemble"] = {
        "members": [dict({"model": models[m].name, "model_index": m, "flip_axes": list(flip)},
                         **({"slice_axis": axis} if axis else {})) for m, flip, axis in members],
        "kind": member_kinds(len(models), flips, axes),
        "models": [model.describe() for model in models], "tta": [list(f) for f in flips],
        "agreement": metadata["agreement"], "spread": "std / (|mean| + %g * max|mean|)" % SPREAD_EPSILON,
        "agreement_definition": "mean pairwise Pearson correlation over voxels where a member's map is non-zero",
        "timings": [run.metadata.get("timings", {}) for run in runs]}
    if "check" in metadata:
        from .check import with_agreement
        metadata["check"] = with_agreement(dict(metadata["check"]), metadata)
        metadata["verdict"] = metadata["check"]["verdict"]
    return ImageExplanation(heatmaps, majority([run.prediction for run in runs]), first.space, metadata)


def member_kinds(models: int, flips: Sequence[Tuple[int, ...]], axes: Sequence[Optional[str]]) -> List[str]:
    """What the members differ in: ``models``, ``mirrorings`` and/or ``slice axes`` (``metadata["ensemble"]["kind"]``:
    what the agreement is an agreement between)."""
    kinds = [("models", models > 1), ("mirrorings", len(flips) > 1), ("slice axes", any(a for a in axes))]
    return [name for name, varies in kinds if varies]


def fold_members(model: SegModel) -> List[SegModel]:
    """The folds of an nnU-Net fold ensemble (:class:`~SegHiResCAMLib.models.nnunet.loader.FoldEnsemble`) as one
    model each (same preprocessing and inference recipe); any other model as itself."""
    if not isinstance(model.network, FoldEnsemble):
        return [model]
    tail = model.name.rsplit("folds_", 1)
    ids = tail[1].split("+") if len(tail) == 2 else []
    if len(ids) != len(model.network.folds):
        ids = [str(k) for k in range(len(model.network.folds))]
    return [dataclasses.replace(model, network=network, name="%s/fold_%s" % (tail[0].rstrip("/") if len(tail) == 2
                                                                              else model.name, fold),
                                resolved=dict(model.resolved))
            for fold, network in zip(ids, model.network.folds)]


def fold_layer(name: str) -> str:
    """A layer name of a fold ensemble (``folds.K.decoder...``) as the layer of one fold (``decoder...``)."""
    return re.sub(r"^folds\.\d+\.", "", name)


def check_slice_axes(models: Sequence[SegModel], geometry: Geometry, slice_axes: Optional[Sequence[str]],
                     options: dict) -> List[Optional[str]]:
    """The slice axes of the members (``[None]``: the run's own); two or more distinct known axes, for 2D models on
    a 3D scan only, and not together with ``slice_axis``."""
    if not slice_axes:
        return [None]
    axes = list(dict.fromkeys(str(a).strip() for a in slice_axes))
    unknown = [a for a in axes if a not in catalog.SLICE_AXES]
    if unknown or len(axes) < 2:
        raise InputError("slice axes must be two or more of %s, got %s" % (", ".join(catalog.SLICE_AXES),
                                                                           ", ".join(map(str, slice_axes))))
    if options.get("slice_axis"):
        raise InputError("give either slice_axis (one axis) or slice_axes (an agreement between axes), not both")
    if not all(runs_in_slices(model, geometry) for model in models):
        raise InputError("slice axes are for a 2D model on a 3D scan, which runs slice by slice; this model sees "
                         "the whole %dD image: use tta or several models instead" % geometry.ndim)
    return axes


def majority(labels: Sequence[np.ndarray]) -> np.ndarray:
    """The voxel-wise most frequent label (ties: the lower label)."""
    if len(labels) == 1:
        return labels[0]
    stack = np.stack(labels)
    values = np.unique(stack)
    counts = np.stack([(stack == v).sum(axis=0) for v in values])
    return values[counts.argmax(axis=0)].astype(stack.dtype)
