"""``seghirescam sa-score``: ProtoSeg segmentation-ability scores of every layer and unit
(:func:`~SegHiResCAMLib.analysis.segmentation_ability.sa_score_image`) as a per-layer and a per-unit CSV table, a
plot of SA score against depth, the SA map of one layer and a JSON record."""

import argparse
import os
import sys

from ..errors import InputError
from . import common

COMMAND = "sa-score"


def add_parser(subparsers) -> None:
    """Register ``sa-score`` on the ``seghirescam`` sub-command parser."""
    p = subparsers.add_parser(COMMAND, help="ProtoSeg segmentation-ability scores of every layer and unit",
                              description="Segmentation ability (ProtoSeg, He et al. 2023) of a model on an image: "
                                          "the runner and ``seghirescam sa-score``.")
    common.add_model_args(p)
    common.add_image_arg(p)
    common.add_mask_args(p, "--reference", "ground-truth mask (default: the model's own binarised prediction)")
    common.add_class_arg(p, "scored")
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
    common.add_slice_args(p)


def run(args: argparse.Namespace) -> int:
    """Run ``seghirescam sa-score``; user errors raise :class:`~SegHiResCAMLib.errors.SegHiResCAMError`."""
    from ..analysis.segmentation_ability import sa_score_image
    from ..engine.protoseg import LAST_FEATURE
    from ..imaging import files as io
    from ..imaging.resample import read_mask_on_grid
    from ..reporting.figures import plot_sa
    from ..reporting.tables import sa_layer_table, sa_unit_table
    from ..reporting.writers import write_csv, write_json
    if args.map_layer and not args.out_map:
        raise InputError("--map-layer needs --out-map FILE (where to write the map)")
    protect = [p for p in (args.image, args.reference, args.tissue) if p]
    units_csv = args.out_units_csv or (os.path.splitext(args.out_csv)[0] + "-units.csv")
    common.check_outputs([args.out_csv, units_csv, args.plot, args.out_map, args.json], protect)
    image, geometry, reference, notes = common.read_image_and_mask(args.image, args.reference, args.label,
                                                                   "reference", binary=True)
    tissue = None
    if args.tissue:
        tissue, more = read_mask_on_grid(args.tissue, geometry, what="tissue mask", binary=True)
        notes += more
    model = common.load_model(args)
    class_index = model.class_index(args.class_)
    layers = args.layers if args.layers in ("all", "features") else [n for n in args.layers.split(",") if n]
    progress = common.Progress(args.quiet)
    try:
        result = sa_score_image(model, image, geometry, reference=reference, class_index=class_index, layers=layers,
                                tissue=tissue, map_layer=(args.map_layer or LAST_FEATURE) if args.out_map else None,
                                device=args.device, progress=progress, **common.slice_options(args))
    finally:
        progress.close()
    layer_table = sa_layer_table(result)
    write_csv(args.out_csv, layer_table, protect)
    write_csv(units_csv, sa_unit_table(result), protect)
    if args.plot:
        plot_sa(args.plot, result, "%s on %s: SA score per layer" % (model.name, os.path.basename(args.image)), protect)
    if args.out_map:
        io.write_image(args.out_map, result.sa_map, geometry, protect=protect)
    last = result.report.layer(result.report.feature_layers[-1])
    if args.json:
        meta = dict(result.metadata)
        meta.update({"command": COMMAND, "image": os.path.abspath(args.image),
                     "reference": os.path.abspath(args.reference) if args.reference else None,
                     "class": class_index, "mean_sa": result.mean_sa, "feature_layers": result.report.feature_layers,
                     "last_feature_layer_sa": float(last.score[0]), "dice_prediction_vs_reference": result.dice,
                     "map_layer": result.map_layer, "layers": layer_table, "notes": notes,
                     "outputs": {"csv": os.path.abspath(args.out_csv), "units_csv": os.path.abspath(units_csv),
                                 "plot": os.path.abspath(args.plot) if args.plot else None,
                                 "map": os.path.abspath(args.out_map) if args.out_map else None}})
        write_json(args.json, meta, protect)
    print("mean SA score: %.4f (units of %s, against the prediction; %d dead units left out)" % (
        result.mean_sa, ", ".join(result.report.feature_layers), result.report.info["dead_feature_units"]))
    print("SA score of the last feature layer %s: %.4f (against the %s)" % (
        last.name, float(last.score[0]), result.report.info["reference"]))
    if result.dice is not None:
        print("Dice of the prediction against the reference: %.4f" % result.dice)
    print("tables: %s, %s" % (args.out_csv, units_csv))
    common.warn_model_output(model)
    for note in notes:
        print("seghirescam: note: %s" % note, file=sys.stderr)
    return 0
