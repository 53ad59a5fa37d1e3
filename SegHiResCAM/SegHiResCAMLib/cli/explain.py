"""``seghirescam explain``: a heatmap on the input image's grid (and optionally the prediction and a JSON record)."""

import argparse
import os
import sys
from functools import partial

from .. import catalog
from ..errors import InputError
from . import common

COMMAND = "explain"


def add_parser(subparsers) -> None:
    """Register ``explain`` on the ``seghirescam`` sub-command parser."""
    p = subparsers.add_parser(COMMAND, help="write a heatmap on the input image's grid", epilog=common.EPILOG,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_model_args(p)
    common.add_image_arg(p, channels=True)
    p.add_argument("--out", required=True, help="heatmap file to write (float32, same grid as --image)")
    common.add_mask_args(p, "--segment", "mask or label map whose voxels are explained (default: the model's prediction)")
    common.add_class_arg(p)
    p.add_argument("--method", default=catalog.DEFAULT_METHOD, choices=sorted(catalog.method_names()),
                   help="default: %(default)s")
    p.add_argument("--layer", default="auto", help="layer name, or auto (default; see `layers`)")
    p.add_argument("--threshold", type=float, help="EIECS threshold target: explain the voxels with p > T")
    common.add_score_arg(p)
    p.add_argument("--reduction", default="sum", choices=["sum", "mean"], help="default: sum")
    p.add_argument("--component", help="restrict the target to one connected component: largest or a rank (0=largest)")
    p.add_argument("--voxel", help="explain one voxel, 'z,y,x' index in the image (numpy order)")
    p.add_argument("--radius", type=float, default=0.0, help="radius in mm around --voxel (default 0)")
    p.add_argument("--whole", action="store_true", help="explain the class over the whole image")
    p.add_argument("--target", choices=list(catalog.ERROR_KINDS), help="explain the model's errors against "
                   "--reference: fp, the false positives (why did it segment this?); fn, the false negatives (what "
                   "suppressed the class there?); --component K picks one (0 = largest); the JSON lists them all")
    p.add_argument("--reference", help="reference segmentation (mask or label map) of the class, for --target")
    p.add_argument("--reference-label", type=float, help="label value in --reference (default: every non-zero voxel)")
    common.add_method_args(p)
    p.add_argument("--no-relu", action="store_true", help="keep negative values (signed map)")
    p.add_argument("--normalize", default="max", choices=list(catalog.NORMALIZATIONS) + [catalog.PER_SLICE],
                   help="default: max (a 2D model on a 3D scan: over the whole volume; per-slice: each slice on its own)")
    p.add_argument("--roi-size", help="run the model in overlapping windows of this size (voxels of the model grid, "
                   "'128' or 'z,y,x'): bounded memory for large scans")
    p.add_argument("--overlap", type=float, default=0.25, help="window overlap fraction (default 0.25)")
    p.add_argument("--blend", default="constant", choices=["constant", "gaussian"], help="window blending")
    p.add_argument("--amp", action="store_true", help="mixed precision forward pass: float16 on CUDA, bfloat16 on a "
                   "CPU with native bfloat16 (AVX512-BF16/AMX); maps combined in float32")
    p.add_argument("--tta", action="store_true", help="mirroring test-time augmentation: explain the scan flipped "
                   "along every combination of its axes, flip the maps back; --out is their mean")
    p.add_argument("--slice-axes", help="a 2D model on a 3D scan: explain along each of these slice axes ("
                   "comma-separated: axial,coronal,sagittal, or all); --out is their mean, the JSON their agreement")
    p.add_argument("--spread", help="with several --weights or --tta: write the voxel-wise spread map (std / mean of "
                   "the members' maps) here; the JSON records their agreement")
    p.add_argument("--per-channel", action="store_true", help="also write one gradient x input map per input "
                   "channel next to --out (<out>_channel-<name>.nii.gz) and the channel shares in --json")
    common.add_memory_arg(p)
    p.add_argument("--check", choices=["quick", "none"], default="none",
                   help="quick: a one-line verdict on the heatmap (model randomisation of the layer's downstream, a "
                   "partial deletion AUC against a random ranking; 0.9-2.9x one explain run), printed and stored "
                   "in --json as \"verdict\"")
    p.add_argument("--json", help="write provenance metadata (JSON) here")
    p.add_argument("--prediction", help="also write the model's label map here")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    common.add_slice_args(p)


def _int(text: str, flag: str) -> int:
    try:
        return int(text)
    except ValueError as exc:
        raise InputError("%s must be an integer, got %r" % (flag, text)) from exc


def _roi_size(text: str, ndim: int):
    try:
        roi = [int(v) for v in text.replace(" ", "").split(",")]
    except ValueError as exc:
        raise InputError("--roi-size must be one integer or 'z,y,x', got %r" % text) from exc
    if len(roi) == 1:
        roi = roi * ndim
    if len(roi) != ndim or min(roi) < 1:
        raise InputError("--roi-size needs 1 or %d positive integers, got %r" % (ndim, text))
    return roi


def error_reference(args: argparse.Namespace, geometry):
    """``--reference`` on the image grid (0/1, ``--reference-label`` applied) and its notes; checks ``--target``."""
    from ..imaging.resample import read_mask_on_grid
    if bool(args.target) != bool(args.reference):
        raise InputError("--target %s needs --reference ref.nii.gz (the reference segmentation of the class)"
                         % args.target if args.target else
                         "--reference is used by --target fp or --target fn; add one of them")
    if not args.reference:
        return None, []
    return read_mask_on_grid(args.reference, geometry, label=args.reference_label, what="reference", binary=True)


def run(args: argparse.Namespace) -> int:
    """Run ``seghirescam explain``; user errors raise :class:`~SegHiResCAMLib.errors.SegHiResCAMError`."""
    from ..analysis.ensemble import explain_ensemble, fold_members
    from ..analysis.explain import TargetSpec, explain_image
    from ..imaging import files as io
    from ..imaging.resample import read_mask_on_grid
    from ..imaging.channels import channel_file_name, parse_image_arg
    from ..reporting.writers import write_json
    from ..analysis.memory import parse_memory_budget
    from ..imaging.pictures import is_picture, overlay_path, write_overlay
    paths = [parse_image_arg(text)[1] for text in args.image]
    protect = paths + [path for path in (args.segment, args.reference) if path]
    overlay = overlay_path(args.out) if len(paths) == 1 and is_picture(paths[0]) else None  # a picture's overlay
    common.check_outputs([args.out, args.json, args.prediction, args.spread, overlay], protect)
    parse_memory_budget(args.memory_budget)  # a bad budget fails before reading anything
    models = common.load_models(args)
    model = models[0]
    slice_axes = None
    if args.slice_axes:
        slice_axes = catalog.SLICE_AXES if args.slice_axes.strip() == "all" else args.slice_axes.split(",")
    members = sum(len(fold_members(loaded)) for loaded in models)  # an nnU-Net fold ensemble: one per fold
    ensemble = members > 1 or args.tta or bool(slice_axes)
    if args.spread and not ensemble:
        raise InputError("--spread needs several members: give --weights once per member (2 or more), --tta or "
                         "--slice-axes")
    if args.per_channel and ensemble:
        raise InputError("--per-channel explains one model: leave out --tta and give --weights once")
    channels = common.read_channels(args, model)
    image, geometry = channels.array, channels.geometry
    image, picture_notes = common.fit_picture(paths[0], image, geometry, model)
    channel_outs = [channel_file_name(args.out, name) for name in channels.names] if args.per_channel else []
    common.check_outputs(channel_outs, protect)
    class_index = model.class_index(args.class_)
    mask, notes = read_mask_on_grid(args.segment, geometry) if args.segment else (None, [])
    reference, reference_notes = error_reference(args, geometry)
    notes = notes + reference_notes
    voxel = None
    if args.voxel:
        try:
            voxel = tuple(int(v) for v in args.voxel.replace(" ", "").split(","))
        except ValueError as exc:
            raise InputError("--voxel must be 'z,y,x' integers, got %r" % args.voxel) from exc
    component = None
    if args.component:
        component = "largest" if args.component == "largest" else _int(args.component, "--component")
    spec = TargetSpec(class_index=class_index, mask=mask, label=args.label, component=component, voxel=voxel,
                      radius_mm=args.radius, threshold=args.threshold, whole=args.whole, score=args.score,
                      reduction=args.reduction, error=args.target, reference=reference)
    roi = _roi_size(args.roi_size, geometry.ndim) if args.roi_size else None
    progress = common.Progress(args.quiet)
    try:
        run_explain = (partial(explain_ensemble, models, tta=args.tta, slice_axes=slice_axes) if ensemble
                       else partial(explain_image, model, per_channel=args.per_channel))
        result = run_explain(image, geometry, [spec], layers=args.layer, method=args.method,
                             device=args.device, relu=not args.no_relu, normalization=args.normalize,
                             progress=progress, roi_size=roi, overlap=args.overlap, blend=args.blend,
                             amp=args.amp, memory_budget=args.memory_budget, check=args.check,
                             **common.method_options(args, [args.method]),
                             **common.slice_options(args))
    finally:
        progress.close()
    common.print_memory(result.metadata)
    if result.metadata.get("verdict"):
        print("seghirescam: check: %s" % result.metadata["verdict"], file=sys.stderr)
    heat = result.heatmaps[0]
    io.write_image(args.out, heat.array, geometry, protect=protect)
    if overlay:
        write_overlay(overlay, image, heat.array, protect=protect)
        notes = notes + picture_notes + ["wrote the overlay %s" % overlay]
    if args.prediction:
        io.write_image(args.prediction, result.prediction, geometry, protect=protect)
    if args.spread:
        io.write_image(args.spread, heat.spread, geometry, protect=protect)
    for path, array in zip(channel_outs, result.channels[0].maps if result.channels else []):
        io.write_image(path, array, geometry, protect=protect)
    if result.metadata.get("model_output", {}).get("message"):
        print("seghirescam: warning: %s" % result.metadata["model_output"]["message"], file=sys.stderr)
    for warning in heat.info.get("warnings", []):
        print("seghirescam: warning: %s" % warning, file=sys.stderr)
    if heat.info.get("flat"):
        print("seghirescam: warning: the heatmap is flat (zero gradient at layer %s); try another layer or "
              "method" % heat.layer, file=sys.stderr)
    if args.json:
        meta = dict(result.metadata)
        meta.update({"command": COMMAND, "image": os.path.abspath(paths[0]), "output": os.path.abspath(args.out),
                     "segment": os.path.abspath(args.segment) if args.segment else None, "label": args.label,
                     "method": heat.method, "layer": heat.layer, "target": heat.info["target"],
                     "target_kind": spec.kind(), "cam": heat.info, "notes": notes,
                     "reference": os.path.abspath(args.reference) if args.reference else None,
                     "reference_label": args.reference_label, "spread": os.path.abspath(args.spread) if args.spread
                     else None, "components": heat.info.get("components"),
                     "mask_resampled": bool(notes)})
        if channels.channels > 1:  # the files each channel came from
            meta["channels"] = channels.describe()
        if channel_outs:
            meta["channel_maps"] = {n: os.path.abspath(p) for n, p in zip(channels.names, channel_outs)}
        write_json(args.json, meta, protect)
    for note in channels.notes() + notes:
        print("seghirescam: note: %s" % note, file=sys.stderr)
    if ensemble:
        print("seghirescam: note: agreement of the %d members' maps: %.3f (mean pairwise Pearson correlation)"
              % (heat.info["ensemble"]["members"], heat.info["ensemble"]["agreement"]), file=sys.stderr)
    table = heat.info.get("components")
    if table:
        print("seghirescam: note: %d connected component(s) of %s (%s); the table is in --json"
              % (table["components_total"], spec.kind(), "all explained" if spec.component is None
                 else "component %s explained" % spec.component), file=sys.stderr)
    return 0
