"""A 2D model on a 3D scan, slice by slice, for the layer list and the ProtoSeg scores (docs/slice_models.md).

:func:`slice_model_input` gives the model input of one slice (what ``seghirescam layers`` traces: each layer's
output shape per slice). :func:`sa_score_slices` scores the model the way a 2D model is scored on a 2D image,
on every slice that contains the target, and aggregates:

- the slices are those of :mod:`.slices` (axis from the direction matrix, card preprocessing per slice, slice
  context as channels, batches of ``slice_batch`` slices);
- the *target slices* are the slices whose reference (the ground truth when given, else the model's binarised
  prediction of the class) has at least one voxel on the slice's model grid, inside the image (not the padding);
  the other slices are predicted (for the label map) but not scored;
- on each target slice, ProtoSeg runs exactly as on that slice alone as a 2D image: its own prototypes, its own
  Dice (:func:`~SegHiResCAMLib.engine.protoseg.segmentation_ability`);
- aggregation: every layer score, every per-unit score and the mean SA score is the **mean over the target slices**
  of the slice's value, NaN values (a dead unit, an empty prediction on a slice scored against the ground truth)
  left out; a unit dead on every target slice stays NaN. The per-slice mean SA scores are kept in the metadata.

The SA map of ``map_layer`` is assembled on the scan's grid from the slices' maps (nearest neighbour); slices
that are not scored get 0.
"""

import time
from typing import Callable, List, NamedTuple, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from ..engine.hooks import model_guard
from ..engine.outputs import main_output, run_model
from ..engine.protoseg import LAST_FEATURE, LayerSA, SAReport, segmentation_ability
from ..engine.targets import predicted_mask
from ..errors import TargetError
from ..geometry import Geometry
from ..imaging.model_space import ModelSpace
from ..models.base import SegModel
from .explain import labels_on_image
from .slices import input_slice_index, on_slices, slice_setup

#: how the scores of the slices are combined (recorded in the metadata)
AGGREGATION = "mean over the target slices of each slice's score (NaN values left out)"


class SliceSA(NamedTuple):
    """What :func:`sa_score_slices` returns: the fields of :class:`~.segmentation_ability.ImageSA` but ``dice``."""

    report: SAReport
    prediction: np.ndarray
    space: ModelSpace
    sa_map: Optional[np.ndarray]
    map_layer: Optional[str]
    metadata: dict


def slice_model_input(model: SegModel, image: np.ndarray, geometry: Geometry, slice_axis: Optional[str] = None,
                      slice_context: int = 0) -> Tuple[torch.Tensor, int, str]:
    """The model input ``[1, C, *S_slice]`` of the middle slice of a 3D ``image`` (on the CPU), the number of
    slices and the slice axis."""
    setup = slice_setup(model, image, geometry, torch.device("cpu"), slice_axis, slice_context, 1)
    x, _ = setup.slicer.inputs([setup.slicer.count // 2])
    return x, setup.slicer.count, setup.axis


def _no_grad(model: SegModel, x: torch.Tensor) -> torch.Tensor:
    with model_guard(model.network, freeze_parameters=False), torch.no_grad():
        return main_output(run_model(model.network, x), model.output_key)


def _per_slice_masks(setup, mask: Optional[np.ndarray], geometry: Geometry) -> Optional[List[np.ndarray]]:
    """A mask on the scan's grid on the model grid of every slice (bool), or ``None``."""
    if mask is None:
        return None
    moved = on_slices(setup, (np.asarray(mask) != 0).astype(np.uint8), geometry)
    return [setup.space.to_model(moved[k], "nearest") != 0 for k in range(setup.slicer.count)]


def _nanmean(values: torch.Tensor) -> torch.Tensor:
    """The mean over dim 0 without NaN values (NaN where all are NaN), float64 for the sum."""
    values = values.double()
    finite = ~torch.isnan(values)
    count = finite.sum(0)
    total = torch.where(finite, values, torch.zeros_like(values)).sum(0)
    return torch.where(count > 0, total / count.clamp_min(1), torch.full_like(total, float("nan"))).float()


def _aggregate(rows: List[List[LayerSA]]) -> List[LayerSA]:
    """One row per layer: the mean over the slices (rows[batch][layer], batch elements along dim 0)."""
    out = []
    for i, first in enumerate(rows[0]):
        same = [batch[i] for batch in rows]

        def mean(field):
            parts = [getattr(r, field) for r in same]
            return None if parts[0] is None else _nanmean(torch.cat([p.cpu() for p in parts], 0))[None]

        out.append(LayerSA(first.name, first.kind, first.depth, first.order, first.shape, first.channels,
                           mean("score"), mean("units"), mean("score_pred"), mean("units_pred"), first.feature))
    return out


def sa_score_slices(model: SegModel, image: np.ndarray, geometry: Geometry, reference: Optional[np.ndarray],
                    class_index: int, layers: Union[str, Sequence[str]], tissue: Optional[np.ndarray],
                    map_layer: Optional[str], device: torch.device, progress: Callable[[float, str], None],
                    slice_axis: Optional[str] = None, slice_context: int = 0,
                    slice_batch: Optional[int] = None) -> SliceSA:
    """ProtoSeg scores of a 2D ``model`` on a 3D ``image`` over the slices that contain the target (module doc)."""
    started = time.perf_counter()
    progress(0.0, "preparing the slices")
    setup = slice_setup(model, image, geometry, device, slice_axis, slice_context, slice_batch)
    slicer, space = setup.slicer, setup.space
    truth = _per_slice_masks(setup, reference, geometry)
    tissue_k = _per_slice_masks(setup, tissue, geometry)
    region = space.to_model(np.ones(space.image.array_shape, np.uint8), "nearest") != 0
    labels = np.zeros(setup.reorient.grid.array_shape, dtype=np.uint8 if model.num_classes < 256 else np.uint16)
    labels_moved = slicer.moved(labels)
    predicted = []
    for ks in [list(range(i, min(i + setup.batch, slicer.count))) for i in range(0, slicer.count, setup.batch)]:
        progress(0.05 + 0.2 * ks[0] / slicer.count, "predicting the slices")
        x, _ = slicer.inputs(ks)
        output = _no_grad(model, x)
        hits = predicted_mask(output, class_index, model.activation).cpu().numpy()
        for b, k in enumerate(ks):
            labels_moved[k] = labels_on_image(output[b:b + 1], model, space)
            predicted.append(bool((hits[b] & region).any()))
    wanted = [bool((truth[k] & region).any()) for k in range(slicer.count)] if truth is not None else predicted
    ks_all = [k for k in range(slicer.count) if wanted[k]]
    if not ks_all:
        raise TargetError("the %s holds no voxel of class %d on any %s slice (on the model grid); %s"
                          % ("reference" if truth is not None else "model's prediction", class_index, setup.axis,
                             "give a reference with voxels inside the image" if truth is not None else
                             "choose a class the model predicts, or give a --reference"))
    rows, mean_sa, info, features = [], [], None, None
    sa_volume = np.zeros(setup.reorient.grid.array_shape, np.uint8) if map_layer is not None else None
    chosen = None
    batches = [ks_all[i:i + setup.batch] for i in range(0, len(ks_all), setup.batch)]
    for n, ks in enumerate(batches):
        x, _ = slicer.inputs(ks)

        def stack(masks):
            return None if masks is None else torch.from_numpy(np.stack([masks[k] for k in ks])).to(device)

        result = segmentation_ability(
            model.network, x, class_index=class_index, reference=stack(truth), tissue=stack(tissue_k), layers=layers,
            map_layers=[] if map_layer is None else [map_layer], activation=model.activation,
            output_key=model.output_key, region=torch.from_numpy(np.stack([region] * len(ks))).to(device),
            progress=lambda f, m, n=n: progress(0.25 + 0.7 * (n + f) / len(batches), "slice batch %d/%d: %s"
                                                % (n + 1, len(batches), m)))
        if tuple(result.prediction.shape[1:]) != space.grid.array_shape:
            raise TargetError("the model output grid %s differs from its input grid %s; sa-score needs a model whose "
                              "output is on its input grid" % (tuple(result.prediction.shape[1:]),
                                                               space.grid.array_shape))
        rows.append(result.layers)
        mean_sa.append(result.mean_sa.cpu())
        info, features = info or dict(result.info), result.feature_layers
        if map_layer is not None:
            chosen = result.feature_layers[-1] if map_layer == LAST_FEATURE else map_layer
            maps = result.maps[chosen].to(torch.uint8).cpu().numpy()
            moved = slicer.moved(sa_volume)
            for b, k in enumerate(ks):
                moved[k] = space.to_image(maps[b], "nearest").astype(np.uint8)
    layers_out = _aggregate(rows)
    per_slice = torch.cat(mean_sa).double()
    units = [r.units_pred for r in layers_out if r.name in features]
    info.update(
        mean_sa="mean over the target slices of each slice's mean per-unit SA score (vs the prediction) over the "
                "live units of %s" % ", ".join(features),
        dead_feature_units=int(torch.isnan(torch.cat(units, 1)[0]).sum()) if units else 0,
        region="the image's voxels of each slice (the padding left out)")
    info["slices"] = {"axis": setup.axis, "array_axis": setup.array_axis, "count": slicer.count,
                      "context": slicer.context, "batch": setup.batch, "scored": len(ks_all),
                      "aggregation": AGGREGATION}
    empty = torch.empty(0)  # the guide, output and masks differ per slice: a volume report keeps none of them
    report = SAReport(layers_out, features, _nanmean(per_slice)[None], empty, empty, empty, empty, {}, info)
    index = input_slice_index(setup)
    meta_slices = dict(info["slices"], target_slices=[index[k] for k in ks_all],
                       mean_sa_per_slice=[float(v) for v in per_slice],
                       reoriented=setup.reorient.code if setup.reorient.index is not None else None)
    metadata = {"model_space": dict(space.describe(), slices=True), "slices": meta_slices,
                "timings": {"total_s": time.perf_counter() - started}}
    progress(1.0, "done")
    sa_map = None if sa_volume is None else setup.reorient.back(sa_volume)
    return SliceSA(report, setup.reorient.back(labels), space, sa_map, chosen, metadata)


__all__ = ["AGGREGATION", "SliceSA", "sa_score_slices", "slice_model_input"]
