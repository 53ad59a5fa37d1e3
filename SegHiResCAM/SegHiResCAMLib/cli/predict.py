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
    p.add_argument("--image", required=True)
    p.add_argument("--out", required=True, help="label map file to write")
    p.add_argument("--json", help="write provenance metadata (JSON) here")
    p.add_argument("--quiet", action="store_true")


def run(args: argparse.Namespace) -> int:
    """Run ``seghirescam predict``; user errors raise :class:`~SegHiResCAMLib.errors.SegHiResCAMError`."""
    from ..analysis.explain import predict_image
    from ..imaging import files as io
    from ..reporting.writers import write_json
    common.check_outputs([args.out], [args.image])
    image, geometry = io.read_image(args.image)
    model = common.load_model(args)
    progress = common.Progress(args.quiet)
    try:
        labels, meta = predict_image(model, image, geometry, device=args.device, progress=progress)
    finally:
        progress.close()
    io.write_image(args.out, labels, geometry, protect=[args.image])
    if meta.get("model_output", {}).get("message"):
        print("seghirescam: warning: %s" % meta["model_output"]["message"], file=sys.stderr)
    if args.json:
        meta.update({"command": COMMAND, "image": os.path.abspath(args.image), "output": os.path.abspath(args.out)})
        write_json(args.json, meta, [args.image])
    return 0
