"""Segmentation ability (ProtoSeg, He et al. 2023) of a model on an image, and its per-layer and per-unit rows.

:func:`sa_score_image` takes an image on its grid (and optionally a reference mask and a tissue mask on the same
grid), moves them into model space, runs :func:`~SegHiResCAMLib.engine.protoseg.segmentation_ability` (with the
padding the network needs left out of the prototypes and of every Dice: HD-BET does "see" brain there when the
field of view cuts through the head) and maps
the prediction and the SA map of one layer back onto the image grid (nearest neighbour: they are label maps).
:func:`layer_rows` and :func:`unit_rows` give the tables as plain numbers; the ``seghirescam sa-score`` command
(:mod:`SegHiResCAMLib.cli.sa_score`) writes them with :mod:`SegHiResCAMLib.reporting`.

Without a reference the scores are Dice overlaps with the model's own binarised prediction; the *mean SA score*
(mean per-unit score of the last two feature layers) is the ground-truth-free estimate of segmentation quality.
"""

import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Union

import numpy as np
import torch

from .. import __version__
from ..engine.protoseg import LAST_FEATURE, SAReport, segmentation_ability
from ..errors import InputError
from ..geometry import Geometry
from ..models.base import SegModel
from .explain import ProgressCallback, labels_on_image, model_input, resolve_device
from .measures import dice
from .slice_sa import sa_score_slices
from .slices import runs_in_slices
from ..imaging.model_space import ModelSpace


@dataclass
class ImageSA:
    """Segmentation ability of a model on one image.

    Attributes:
        report: the engine's report (model grid); ``report.layers`` are the rows of the tables.
        prediction: the model's label map on the image grid.
        sa_map: the SA map of ``map_layer`` on the image grid (uint8 0/1), or None.
        dice: Dice of the predicted class against the reference on the image grid (None without a reference).
    """

    report: SAReport
    prediction: np.ndarray
    space: ModelSpace
    sa_map: Optional[np.ndarray] = None
    map_layer: Optional[str] = None
    dice: Optional[float] = None
    metadata: dict = field(default_factory=dict)

    @property
    def mean_sa(self) -> float:
        return float(self.report.mean_sa[0])


def _mask_to_model(mask: Optional[np.ndarray], space: ModelSpace, what: str, device) -> Optional[torch.Tensor]:
    if mask is None:
        return None
    mask = (np.asarray(mask) != 0).astype(np.uint8)
    model = space.to_model(mask, "nearest")
    if not model.any():
        raise InputError("the %s is empty on the model grid; give a mask with voxels inside the image" % what)
    return torch.from_numpy(model.astype(bool))[None].to(device)


def sa_score_image(model: SegModel, image: np.ndarray, geometry: Geometry, reference: Optional[np.ndarray] = None,
                   class_index: int = 1, layers: Union[str, Sequence[str]] = "all",
                   tissue: Optional[np.ndarray] = None, map_layer: Optional[str] = None, device: str = "auto",
                   progress: Optional[ProgressCallback] = None, slice_axis: Optional[str] = None,
                   slice_context: int = 0, slice_batch: Optional[int] = None) -> ImageSA:
    """SA scores of ``model`` on ``image`` (numpy order, on ``geometry``).

    Args:
        reference: optional ground-truth mask on the image grid (non-zero = the class); default: the prediction.
        layers: ``all`` (every layer: two forward passes), ``features`` (one pass) or layer names.
        tissue: optional mask on the image grid restricting the prototypes.
        map_layer: a layer whose SA map is returned on the image grid; ``"last-feature"``: the last feature layer.
        slice_axis, slice_context, slice_batch: a 2D model on a 3D image is scored slice by slice on the slices
            that contain the target, and the scores are averaged over them (:mod:`.slice_sa`,
            ``docs/slice_models.md``).

    Returns:
        :class:`ImageSA`; ``result.mean_sa`` is the ground-truth-free quality estimate.
    """
    report_progress = progress or (lambda f, m: None)
    started = time.perf_counter()
    if runs_in_slices(model, geometry):
        dev = resolve_device(device)
        run = sa_score_slices(model, image, geometry, reference, class_index, layers, tissue, map_layer, dev,
                              report_progress, slice_axis, slice_context, slice_batch)
        overlap = None if reference is None else dice(run.prediction == class_index, reference)
        meta = {"seghirescam_version": __version__, "torch_version": torch.__version__, "device": str(dev),
                "model": model.describe(), "protoseg": dict(run.report.info)}
        meta.update(run.metadata)
        return ImageSA(run.report, run.prediction, run.space, run.sa_map, run.map_layer, overlap, meta)
    report_progress(0.0, "preparing the image")
    x, space, dev = model_input(model, image, geometry, device)
    truth = _mask_to_model(reference, space, "reference", dev)
    tissue_t = _mask_to_model(tissue, space, "tissue mask", dev)
    wanted = [] if map_layer is None else [map_layer]
    # the padding added for the network is not part of the image: no prototypes or Dice there
    region = torch.from_numpy(space.to_model(np.ones(space.image.array_shape, np.uint8), "nearest") != 0)[None]
    result = segmentation_ability(model.network, x, class_index=class_index, reference=truth, tissue=tissue_t,
                                  layers=layers, map_layers=wanted, activation=model.activation,
                                  output_key=model.output_key, region=region.to(dev),
                                  progress=lambda f, m: report_progress(0.05 + 0.85 * f, m))
    if tuple(result.prediction.shape[1:]) != space.grid.array_shape:
        raise InputError("the model output grid %s differs from its input grid %s; sa-score needs a model whose "
                         "output is on its input grid" % (tuple(result.prediction.shape[1:]), space.grid.array_shape))
    report_progress(0.92, "mapping back to the image grid")
    prediction = labels_on_image(result.output, model, space)
    sa_map, chosen = None, None
    if map_layer is not None:
        chosen = result.feature_layers[-1] if map_layer == LAST_FEATURE else map_layer
        sa_map = space.to_image(result.maps[chosen][0].to(torch.uint8).cpu().numpy(), "nearest").astype(np.uint8)
    overlap = None if reference is None else dice(prediction == class_index, reference)
    meta = {"seghirescam_version": __version__, "torch_version": torch.__version__, "device": str(dev),
            "model": model.describe(), "model_space": space.describe(), "protoseg": dict(result.info),
            "timings": {"total_s": time.perf_counter() - started}}
    report_progress(1.0, "done")
    return ImageSA(result, prediction, space, sa_map, chosen, overlap, meta)


# ----------------------------------------------------------------------------------------------- tables
def layer_rows(result: ImageSA) -> List[Dict[str, object]]:
    """One row per scored layer (first batch element), in execution order; scores are floats (NaN = none), and
    ``best_unit`` / ``dead_units`` are empty when no unit has a score."""
    truth = result.report.info.get("reference") == "ground truth"
    rows = []
    for row in result.report.layers:
        units = row.units[0] if row.units is not None else None
        finite = units is not None and bool(torch.isfinite(units).any())
        entry = {"layer": row.name, "kind": row.kind, "depth": row.depth, "resolution": "x".join(map(str, row.shape)),
                 "channels": row.channels, "sa_score": float(row.score[0]),
                 "unit_sa_mean": float(torch.nanmean(units)) if finite else float("nan"),
                 "unit_sa_max": float(torch.max(torch.nan_to_num(units, nan=-1.0))) if finite else float("nan"),
                 "best_unit": int(torch.argmax(torch.nan_to_num(units, nan=-1.0))) if finite else "",
                 "dead_units": int(torch.isnan(units).sum()) if finite else "",
                 "feature_layer": int(row.feature)}
        if truth:
            entry["sa_score_vs_prediction"] = float(row.score_pred[0])
        rows.append(entry)
    return rows


def unit_rows(result: ImageSA) -> List[Dict[str, object]]:
    """One row per unit (channel) of every layer that has unit scores; scores are floats (NaN = dead unit)."""
    truth = result.report.info.get("reference") == "ground truth"
    rows = []
    for row in result.report.layers:
        if row.units is None:
            continue
        for unit, value in enumerate(row.units[0].tolist()):
            entry = {"layer": row.name, "depth": row.depth, "unit": unit, "sa_score": float(value)}
            if truth:
                entry["sa_score_vs_prediction"] = float(row.units_pred[0, unit])
            rows.append(entry)
    return rows
