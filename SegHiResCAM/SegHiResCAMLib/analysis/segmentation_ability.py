"""Segmentation ability (ProtoSeg, He et al. 2023) of a model on an image: the runner and ``seghirescam sa-score``.

:func:`sa_score_image` takes an image on its grid (and optionally a reference mask and a tissue mask on the same
grid), moves them into model space, runs :func:`~SegHiResCAMLib.engine.protoseg.segmentation_ability` (with the
padding the network needs left out of the prototypes and of every Dice: HD-BET does "see" brain there when the
field of view cuts through the head) and maps
the prediction and the SA map of one layer back onto the image grid (nearest neighbour: they are label maps).
The command line writes a per-layer table, a per-unit table, a plot of SA score against depth, the SA map and a
JSON file, each atomically (a temporary file beside the target, then a rename).

Without a reference the scores are Dice overlaps with the model's own binarised prediction; the *mean SA score*
(mean per-unit score of the last two feature layers) is the ground-truth-free estimate of segmentation quality.
"""

import csv
import math
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Union

import numpy as np
import torch

from .. import __version__
from ..engine.protoseg import LAST_FEATURE, SAReport, segmentation_ability
from ..errors import InputError
from ..geometry import Geometry
from ..imaging.files import atomic_write
from ..models.base import SegModel
from .explain import ProgressCallback, label_map, model_input
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
                   progress: Optional[ProgressCallback] = None) -> ImageSA:
    """SA scores of ``model`` on ``image`` (numpy order, on ``geometry``).

    Args:
        reference: optional ground-truth mask on the image grid (non-zero = the class); default: the prediction.
        layers: ``all`` (every layer: two forward passes), ``features`` (one pass) or layer names.
        tissue: optional mask on the image grid restricting the prototypes.
        map_layer: a layer whose SA map is returned on the image grid; ``"last-feature"``: the last feature layer.

    Returns:
        :class:`ImageSA`; ``result.mean_sa`` is the ground-truth-free quality estimate.
    """
    report_progress = progress or (lambda f, m: None)
    started = time.perf_counter()
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
    prediction = space.to_image(label_map(result.output, model), "nearest")
    sa_map, chosen = None, None
    if map_layer is not None:
        chosen = result.feature_layers[-1] if map_layer == LAST_FEATURE else map_layer
        sa_map = space.to_image(result.maps[chosen][0].to(torch.uint8).cpu().numpy(), "nearest").astype(np.uint8)
    dice = None
    if reference is not None:
        a, b = prediction == class_index, np.asarray(reference) != 0
        dice = float(2.0 * np.logical_and(a, b).sum() / max(1, a.sum() + b.sum()))
    meta = {"seghirescam_version": __version__, "torch_version": torch.__version__, "device": str(dev),
            "model": model.describe(), "model_space": space.describe(), "protoseg": dict(result.info),
            "timings": {"total_s": time.perf_counter() - started}}
    report_progress(1.0, "done")
    return ImageSA(result, prediction, space, sa_map, chosen, dice, meta)


# ----------------------------------------------------------------------------------------------- tables
def _fmt(value) -> str:
    value = float(value)
    return "nan" if math.isnan(value) else "%.6f" % value


def layer_rows(result: ImageSA) -> List[Dict[str, object]]:
    """One row per scored layer (first batch element), in execution order."""
    truth = result.report.info.get("reference") == "ground truth"
    rows = []
    for row in result.report.layers:
        units = row.units[0] if row.units is not None else None
        finite = units is not None and bool(torch.isfinite(units).any())
        entry = {"layer": row.name, "kind": row.kind, "depth": row.depth, "resolution": "x".join(map(str, row.shape)),
                 "channels": row.channels, "sa_score": _fmt(row.score[0]),
                 "unit_sa_mean": _fmt(torch.nanmean(units)) if finite else "nan",
                 "unit_sa_max": _fmt(torch.max(torch.nan_to_num(units, nan=-1.0))) if finite else "nan",
                 "best_unit": int(torch.argmax(torch.nan_to_num(units, nan=-1.0))) if finite else "",
                 "dead_units": int(torch.isnan(units).sum()) if finite else "",
                 "feature_layer": int(row.feature)}
        if truth:
            entry["sa_score_vs_prediction"] = _fmt(row.score_pred[0])
        rows.append(entry)
    return rows


def unit_rows(result: ImageSA) -> List[Dict[str, object]]:
    truth = result.report.info.get("reference") == "ground truth"
    rows = []
    for row in result.report.layers:
        if row.units is None:
            continue
        for unit, value in enumerate(row.units[0].tolist()):
            entry = {"layer": row.name, "depth": row.depth, "unit": unit, "sa_score": _fmt(value)}
            if truth:
                entry["sa_score_vs_prediction"] = _fmt(row.units_pred[0, unit])
            rows.append(entry)
    return rows


def write_csv(path: str, rows: List[Dict[str, object]], protect: Sequence[str] = ()) -> None:
    """Write ``rows`` (dicts with the same keys) as CSV, atomically."""
    def write(tmp):
        with open(tmp, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(rows[0]) if rows else ["layer"])
            writer.writeheader()
            writer.writerows(rows)
    atomic_write(path, protect=protect, write=write)


def plot_sa(path: str, result: ImageSA, title: str, protect: Sequence[str] = ()) -> None:
    """PNG: SA score of every layer (all units) against depth, every unit as a dot, the model's Dice if known."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = result.report.layers
    depth = [r.depth for r in layers]
    fig, ax = plt.subplots(figsize=(max(8.0, 0.16 * len(layers) + 3), 5.2))
    for r in layers:
        if r.units is not None:
            values = r.units[0].cpu().numpy()
            ax.scatter(np.full(values.shape, r.depth) + np.linspace(-0.25, 0.25, len(values)), values, s=3,
                       color="0.6", alpha=0.5, linewidths=0, label="_units")
    ax.plot(depth, [float(r.score[0]) for r in layers], "-o", color="C0", ms=3.5, label="layer (all units)")
    ax.plot(depth, [float(torch.max(torch.nan_to_num(r.units[0], nan=-1))) if r.units is not None else np.nan
                    for r in layers], "--", color="C1", lw=1, label="best unit")
    feats = [r for r in layers if r.feature]
    ax.scatter([r.depth for r in feats], [float(r.score[0]) for r in feats], s=60, facecolors="none",
               edgecolors="C3", label="feature layers (mean SA %.3f)" % result.mean_sa, zorder=3)
    if result.dice is not None:
        ax.axhline(result.dice, color="C2", ls=":", label="Dice of the prediction %.3f" % result.dice)
    step = max(1, len(layers) // 40)
    ax.set_xticks(depth[::step])
    ax.set_xticklabels([r.name for r in layers][::step], rotation=90, fontsize=6)
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("layer (depth = execution order)")
    ax.set_ylabel("SA score (Dice of the ProtoSeg map)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    try:
        atomic_write(path, protect=protect, write=lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    finally:
        plt.close(fig)


# ----------------------------------------------------------------------------------------------- command line
def add_parser(subparsers) -> None:
    """Register ``sa-score`` on the ``seghirescam`` sub-command parser."""
    from ..cli.main import _add_model_args
    p = subparsers.add_parser("sa-score", help="ProtoSeg segmentation-ability scores of every layer and unit",
                              description=__doc__.split("\n\n")[0])
    _add_model_args(p)
    p.add_argument("--image", required=True, help="input image: .nii/.nii.gz/.nrrd/.mha/.mhd or a DICOM folder")
    p.add_argument("--reference", help="ground-truth mask (default: the model's own binarised prediction)")
    p.add_argument("--label", type=float, help="label value in --reference (default: every non-zero voxel)")
    p.add_argument("--class", dest="class_", default="1", help="scored class, index or name (default 1)")
    p.add_argument("--tissue", help="mask restricting the prototypes (e.g. the head, not the air)")
    p.add_argument("--layers", default="all",
                   help="all (default: every layer, two forward passes), features (one pass), or names a,b,c")
    p.add_argument("--out-csv", required=True, help="per-layer table (CSV)")
    p.add_argument("--out-units-csv", help="per-unit table (default: --out-csv with the suffix -units.csv)")
    p.add_argument("--plot", help="PNG of SA score against depth")
    p.add_argument("--map-layer", help="layer whose SA map is written to --out-map (default: the last feature layer)")
    p.add_argument("--out-map", help="SA map of --map-layer on the input grid (label map, 1 = foreground)")
    p.add_argument("--json", help="write the mean SA score, per-layer scores and provenance (JSON) here")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def _read_mask(path: str, geometry: Geometry, label: Optional[float], notes: List[str], what: str) -> np.ndarray:
    from ..imaging import files as io
    mask, mask_geometry = io.read_image(path)
    if mask.ndim != geometry.ndim:
        raise InputError("the %s %r has %d axes; give a single-component mask" % (what, path, mask.ndim))
    if not mask_geometry.same_grid(geometry):
        mask = io.resample_to_grid(mask, mask_geometry, geometry, "nearest")
        notes.append("the %s's grid differs from the image's: resampled onto the image grid (nearest)" % what)
    if label is not None:
        if not np.any(mask == label):
            raise InputError("label %g does not occur in the %s %r" % (label, what, path))
        mask = mask == label
    if not np.any(mask):
        raise InputError("the %s %r is empty on the image grid; check that it lies in the image's space" % (what, path))
    return (mask != 0).astype(np.uint8)


def run(args) -> int:
    """The ``sa-score`` command (errors are raised as :class:`SegHiResCAMError` for ``cli.main`` to print)."""
    from ..imaging import files as io
    from ..cli.main import _Progress, _load_model, _write_json
    if args.map_layer and not args.out_map:
        raise InputError("--map-layer needs --out-map FILE (where to write the map)")
    protect = [p for p in (args.image, args.reference, args.tissue) if p]
    units_csv = args.out_units_csv or (os.path.splitext(args.out_csv)[0] + "-units.csv")
    for out in (args.out_csv, units_csv, args.plot, args.out_map, args.json):
        if out:
            io.check_not_protected(os.path.abspath(out), protect)
    image, geometry = io.read_image(args.image)
    notes: List[str] = []
    reference = _read_mask(args.reference, geometry, args.label, notes, "reference") if args.reference else None
    tissue = _read_mask(args.tissue, geometry, None, notes, "tissue mask") if args.tissue else None
    model = _load_model(args)
    class_index = model.class_index(args.class_)
    layers = args.layers if args.layers in ("all", "features") else [n for n in args.layers.split(",") if n]
    progress = _Progress(args.quiet)
    try:
        result = sa_score_image(model, image, geometry, reference=reference, class_index=class_index, layers=layers,
                                tissue=tissue, map_layer=(args.map_layer or LAST_FEATURE) if args.out_map else None,
                                device=args.device, progress=progress)
    finally:
        progress.close()
    write_csv(args.out_csv, layer_rows(result), protect)
    write_csv(units_csv, unit_rows(result), protect)
    if args.plot:
        plot_sa(args.plot, result, "%s on %s: SA score per layer" % (model.name, os.path.basename(args.image)), protect)
    if args.out_map:
        io.write_image(args.out_map, result.sa_map, geometry, protect=protect)
    last = result.report.layer(result.report.feature_layers[-1])
    if args.json:
        meta = dict(result.metadata)
        meta.update({"command": "sa-score", "image": os.path.abspath(args.image),
                     "reference": os.path.abspath(args.reference) if args.reference else None,
                     "class": class_index, "mean_sa": result.mean_sa, "feature_layers": result.report.feature_layers,
                     "last_feature_layer_sa": float(last.score[0]), "dice_prediction_vs_reference": result.dice,
                     "map_layer": result.map_layer, "layers": layer_rows(result), "notes": notes,
                     "outputs": {"csv": os.path.abspath(args.out_csv), "units_csv": os.path.abspath(units_csv),
                                 "plot": os.path.abspath(args.plot) if args.plot else None,
                                 "map": os.path.abspath(args.out_map) if args.out_map else None}})
        _write_json(args.json, meta, protect)
    print("mean SA score: %.4f (units of %s, against the prediction; %d dead units left out)" % (
        result.mean_sa, ", ".join(result.report.feature_layers), result.report.info["dead_feature_units"]))
    print("SA score of the last feature layer %s: %.4f (against the %s)" % (
        last.name, float(last.score[0]), result.report.info["reference"]))
    if result.dice is not None:
        print("Dice of the prediction against the reference: %.4f" % result.dice)
    print("tables: %s, %s" % (args.out_csv, units_csv))
    for note in notes:
        print("seghirescam: note: %s" % note, file=sys.stderr)
    return 0
