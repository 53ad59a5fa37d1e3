"""``seghirescam predict``: the model's segmentation (label map) on the input image's grid."""

import argparse
import os
import sys

from . import common

COMMAND = "predict"


def add_parser(subparsers) -> None:
    """Register ``predict`` on the ``seghirescam`` sub-command parser."""
    p = subparsers.add_parser(COMMAND, help="write the model's segmentation (label map) on the input grid")
    common.add_model_args(p)
    common.add_image_arg(p, channels=True)
    p.add_argument("--out", required=True, help="label map file to write")
    common.add_memory_arg(p)
    p.add_argument("--json", help="write provenance metadata (JSON) here")
    p.add_argument("--tta", action="store_true",
                   help="nnU-Net models: test-time mirroring as nnUNetv2_predict does by default (8x slower in 3D)")
    p.add_argument("--quiet", action="store_true")
    common.add_slice_args(p)


def run(args: argparse.Namespace) -> int:
    """Run ``seghirescam predict``; user errors raise :class:`~SegHiResCAMLib.errors.SegHiResCAMError`."""
    from ..analysis.explain import predict_image
    from ..imaging import files as io
    from ..reporting.writers import write_json
    from ..analysis.memory import parse_memory_budget
    from ..imaging.channels import parse_image_arg
    protect = [parse_image_arg(text)[1] for text in args.image]
    common.check_outputs([args.out], protect)
    parse_memory_budget(args.memory_budget)
    model = common.load_model(args)
    channels = common.read_channels(args, model)
    image, geometry = channels.array, channels.geometry
    image, notes = common.fit_picture(protect[0], image, geometry, model)
    progress = common.Progress(args.quiet)
    try:
        labels, meta = predict_image(model, image, geometry, device=args.device, progress=progress, tta=args.tta,
                                     memory_budget=args.memory_budget, **common.slice_options(args))
    finally:
        progress.close()
    common.print_memory(meta)
    io.write_image(args.out, labels, geometry, protect=protect)
    if meta.get("model_output", {}).get("message"):
        print("seghirescam: warning: %s" % meta["model_output"]["message"], file=sys.stderr)
    if args.json:
        meta.update({"command": COMMAND, "image": os.path.abspath(protect[0]), "output": os.path.abspath(args.out)})
        if channels.channels > 1:
            meta["channels"] = channels.describe()
        write_json(args.json, meta, protect)
    for note in notes:
        print("seghirescam: note: %s" % note, file=sys.stderr)
    return 0
