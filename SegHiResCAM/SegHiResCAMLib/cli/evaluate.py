"""``seghirescam evaluate``: faithfulness and sanity metrics of every method x layer on one image
(:func:`~SegHiResCAMLib.analysis.evaluate.evaluate_image`) as JSON, a Markdown report, a figure and a table on
stdout."""

import argparse
import dataclasses
import os
import sys
from typing import List, Tuple, Union

import numpy as np

from .. import catalog
from ..engine.faithfulness import BASELINES, DEFAULT_MARGIN, MEASURED_ERROR, PRECISIONS, RANDOM_TARGETS
from ..errors import InputError
from . import common

COMMAND = "evaluate"


def _ints(text: str, flag: str) -> Tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.replace(" ", "").split(","))
    except ValueError as exc:
        raise InputError("%s must be comma-separated integers (array order, e.g. 80,80,80), got %r"
                         % (flag, text)) from exc


def _stages(text: str) -> Union[int, List[str], None]:
    text = (text or "").strip()
    if text.isdigit():
        return int(text) or None
    return [name.strip() for name in text.split(",") if name.strip()] or None


def _steps(text: str):
    """``--steps``: a whole number of equal steps (>= 1), or interior fractions ``a,b,...`` strictly between 0 and 1
    in increasing order (returned with 0 and 1 added)."""
    text = text.strip()
    if "," not in text and "." not in text:
        try:
            count = int(text)
        except ValueError:
            count = 0
        if count >= 1:
            return count
        raise InputError("--steps must be a number of steps >= 1 or interior fractions such as 0.25,0.5,0.75; "
                         "got %r" % text)
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        values = []
    if not values or any(not 0.0 < v < 1.0 for v in values) or any(b <= a for a, b in zip(values, values[1:])):
        raise InputError("--steps fractions must lie strictly between 0 and 1 in increasing order, such as "
                         "0.25,0.5,0.75 (0 and 1 are added); got %r" % text)
    return [0.0] + values + [1.0]


def add_parser(subparsers) -> None:
    """Register ``evaluate`` on the ``seghirescam`` sub-command parser."""
    methods = list(catalog.method_names())
    p = subparsers.add_parser(
        COMMAND, help="faithfulness and sanity metrics of heatmaps (one row per method x layer)",
        description="Deletion/insertion AUC, heat inside the segment and sanity checks (model and target "
                    "randomisation) for every method x layer, on one image. Cost on 3D models: one forward pass "
                    "per step, method, layer and curve (see --steps and --crop).")
    common.add_model_args(p)
    common.add_image_arg(p)
    common.add_mask_args(p, "--segment", "mask or label map whose voxels are explained (default: the model's prediction)")
    common.add_class_arg(p)
    common.add_score_arg(p)
    p.add_argument("--methods", nargs="+", default=methods, choices=methods,
                   metavar="METHOD", help="default: all (%s)" % ", ".join(methods))
    p.add_argument("--layers", nargs="+", default=["auto"], metavar="LAYER", help="default: auto")
    p.add_argument("--steps", help="deletion/insertion steps: a number of equal steps (with --exact "
                   "default 10: 0, 10, ..., 100%%) or the interior fractions to score, e.g. 0.1,0.3 (0 and 1 are "
                   "added); default without --exact: 0.125,0.375,0.625,0.875")
    p.add_argument("--exact", action="store_true",
                   help="the full computation: every perturbed input runs on the whole image (slow on 3D scans); "
                   "default: only the target's bounding box plus --margin runs (see benchmarks/results/evaluate.md)")
    p.add_argument("--margin", type=int, help="voxels of the model grid added around the target's bounding box "
                   "(default %d; ignored with --exact)" % DEFAULT_MARGIN)
    p.add_argument("--precision", default="auto", choices=list(PRECISIONS),
                   help="arithmetic of the perturbed inputs' forward passes (default auto: bfloat16 on a CPU that "
                   "computes it natively, about half the time of float32 there, else float32; float32 with --exact); "
                   "bfloat16 is used only where the model scores the unperturbed input in it within 1%% of float32")
    p.add_argument("--baseline", default="blur", choices=list(BASELINES), help="replacement of removed voxels")
    p.add_argument("--sigma", type=float, default=5.0, help="Gaussian blur sigma in model voxels (default 5)")
    p.add_argument("--dilation", type=int, default=3, help="radius of the dilated segment in model voxels (default 3)")
    p.add_argument("--batch-size", type=int, help="perturbed inputs per forward pass (default: from free memory and "
                   "the input's size, at most 2 on a CPU); the one used is recorded in the JSON")
    p.add_argument("--sanity-stages", default="3",
                   help="model randomisation: a number of stages, or comma-separated module names; 0 skips it")
    p.add_argument("--random-targets", nargs="*", default=["shift", "class"], choices=list(RANDOM_TARGETS),
                   help="randomised targets to compare with (default: shift class; none: skip)")
    p.add_argument("--no-random-reference", action="store_true", help="omit the random-order reference row")
    p.add_argument("--crop", help="evaluate on a box of Z,Y,X image voxels (bounds the cost on large scans; lifts "
                   "the model's minimum input size, e.g. HD-BET's 128^3, so that the box is not padded back)")
    p.add_argument("--crop-center",
                   help="centre of --crop, z,y,x image index (default: the segment's or the image's centre)")
    common.add_method_args(p)
    p.add_argument("--seed", type=int, default=0, help="seed of every random choice (default 0)")
    p.add_argument("--out-json", required=True, help="write every row, curve and provenance here (JSON)")
    p.add_argument("--out-md", help="write a Markdown report here")
    p.add_argument("--plot", help="write the deletion/insertion curves here (PNG)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    group = p.add_argument_group("2D models on 3D scans", "the maps are evaluated on the target's slices, each as "
                                 "a 2D image, and each row is the mean over them (docs/slice_models.md)")
    group.add_argument("--slice-axis", help="the slices: %s (default: the model card's, else axial)"
                       % ", ".join(catalog.SLICE_AXES))
    group.add_argument("--slice-context", type=int, default=0, metavar="K",
                       help="a 2.5D model: K neighbouring slices on each side as channels (default 0)")
    group.add_argument("--slice-count", type=int, metavar="N",
                       help="evaluate the N slices with the most target voxels (default 3)")


def run(args: argparse.Namespace) -> int:
    """Run ``seghirescam evaluate``; user errors raise :class:`~SegHiResCAMLib.errors.SegHiResCAMError`."""
    from ..analysis.evaluate import crop_image, evaluate_image, interior_steps
    from ..analysis.explain import TargetSpec
    from ..reporting.figures import plot_curves
    from ..reporting.tables import evaluation_markdown, evaluation_tsv
    from ..reporting.writers import write_json, write_text

    common.parse_model_args(args)
    protect = [args.image] + ([args.segment] if args.segment else [])
    outputs = [p for p in (args.out_json, args.out_md, args.plot) if p]
    common.check_outputs(outputs, protect)
    if len({os.path.abspath(p) for p in outputs}) != len(outputs):
        raise InputError("--out-json, --out-md and --plot must be different files")
    steps = None if args.steps is None else _steps(args.steps)
    if args.margin is not None and args.margin < 0:
        raise InputError("--margin must be >= 0 voxels, got %d" % args.margin)
    if args.batch_size is not None and args.batch_size < 1:
        raise InputError("--batch-size must be >= 1, got %d" % args.batch_size)
    image, geometry, mask, _ = common.read_image_and_mask(args.image, args.segment)
    if args.crop:
        center = _ints(args.crop_center, "--crop-center") if args.crop_center else None
        if center is None and mask is not None and np.any(mask):
            center = tuple(int(round(c)) for c in np.argwhere(mask).mean(axis=0))
        image, geometry, box = crop_image(image, geometry, _ints(args.crop, "--crop"), center)
        mask = None if mask is None else mask[box]
    model = common.load_model(args)
    if args.crop and model.preprocessing.min_size is not None:
        model = dataclasses.replace(model, preprocessing=dataclasses.replace(model.preprocessing, min_size=None))
    maps = len(args.methods) * len(args.layers) + (0 if args.no_random_reference else 1)
    interior = interior_steps(steps, args.exact)
    if not args.quiet:
        print("seghirescam: note: deletion/insertion will run %d forward passes (%d maps x 2 curves x %d interior "
              "steps + 1)%s" % (1 + maps * 2 * interior, maps, interior,
                                "" if args.exact else " on the target's bounding box + margin where that is cheaper, "
                                "and in bfloat16 where this CPU computes it natively, after one pass to see that the "
                                "model scores the unperturbed input so within 1%; --exact: the whole image in "
                                "float32"), file=sys.stderr)
        if not args.exact and steps is None:
            print("seghirescam: note: on the committed faithfulness study this shortcut kept every ranking of --exact "
                  "and its AUCs were within %.2f (deletion) and %.2f (insertion) of it "
                  "(benchmarks/results/evaluate.md)" % (MEASURED_ERROR["deletion"], MEASURED_ERROR["insertion"]),
                  file=sys.stderr)
    spec = TargetSpec(class_index=model.class_index(args.class_), mask=mask, label=args.label, score=args.score)
    progress = common.Progress(args.quiet)
    try:
        evaluation = evaluate_image(model, image, geometry, spec, methods=args.methods, layers=args.layers,
                                    steps=steps, baseline=args.baseline, sigma=args.sigma,
                                    dilation=args.dilation, batch_size=args.batch_size,
                                    sanity_stages=_stages(args.sanity_stages), random_targets=args.random_targets,
                                    random_reference=not args.no_random_reference, device=args.device,
                                    seed=args.seed, progress=progress, exact=args.exact, margin=args.margin,
                                    precision=args.precision,
                                    slice_axis=args.slice_axis, slice_context=args.slice_context,
                                    slice_count=args.slice_count,
                                    **common.method_options(args, args.methods))
    finally:
        progress.close()
    data = evaluation.to_dict()
    data["metadata"].update({"command": COMMAND, "image": os.path.abspath(args.image),
                             "segment": os.path.abspath(args.segment) if args.segment else None,
                             "crop": args.crop, "crop_center": args.crop_center})
    write_json(args.out_json, data, protect)
    if args.plot:
        plot_curves(evaluation, args.plot, "%s: %s" % (model.name, os.path.basename(args.image)))
    if args.out_md:
        plot = os.path.relpath(os.path.abspath(args.plot), os.path.dirname(os.path.abspath(args.out_md))) \
            if args.plot else None
        write_text(args.out_md, evaluation_markdown(evaluation, "Heatmap faithfulness: %s on %s"
                                                    % (model.name, os.path.basename(args.image)), plot))
    print(evaluation_tsv(evaluation))
    common.warn_model_output(model)
    for warning in sorted({w for r in evaluation.rows for w in r.get("warnings", [])}):
        print("seghirescam: warning: %s" % warning, file=sys.stderr)
    for note in evaluation.notes():
        print("seghirescam: note: %s" % note, file=sys.stderr)
    return 0
