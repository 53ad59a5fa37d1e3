"""``seghirescam layers``: the layers of a model that can be explained (with an image: their output shapes and
the layer ``auto`` picks)."""

import argparse
import os

from . import common

COMMAND = "layers"


def add_parser(subparsers) -> None:
    """Register ``layers`` on the ``seghirescam`` sub-command parser."""
    p = subparsers.add_parser(COMMAND, help="list the layers that can be explained")
    common.add_model_args(p)
    p.add_argument("--image", help="an image, to show each layer's output shape and the auto layer")
    p.add_argument("--slice-axis", help="a 2D model on a 3D image: the slices (axial, coronal, sagittal; default: the "
                   "model card's, else axial); the shapes are those of one slice")
    p.add_argument("--slice-context", type=int, default=0, metavar="K",
                   help="a 2.5D model: K neighbouring slices on each side as channels (default 0)")


def run(args: argparse.Namespace) -> int:
    """Print one line per layer; user errors raise :class:`~SegHiResCAMLib.errors.SegHiResCAMError`."""
    import torch
    from ..engine import named_layers, trace_layers
    from ..engine.layers import choose_auto_layer
    from ..errors import LayerError
    model = common.load_model(args)
    if not args.image:
        print("# %s: %d layers (pass --image for output shapes and the auto layer)" % (
            model.name, len(named_layers(model.network))))
        for name, module in named_layers(model.network).items():
            print("%s\t%s" % (name, type(module).__name__))
        return 0
    from ..analysis.slice_sa import slice_model_input
    from ..analysis.slices import runs_in_slices
    from ..imaging import files as io
    from ..imaging.model_space import prepare
    from ..models.output import resolve_divisible_by
    image, geometry = io.read_image(args.image)
    sliced = ""
    if runs_in_slices(model, geometry):  # a 2D model on a 3D image: the layers of one slice
        x, count, axis = slice_model_input(model, image, geometry, args.slice_axis, args.slice_context)
        sliced = " (per slice: %d %s slices, slice context %d)" % (count, axis, args.slice_context)
    else:
        resolve_divisible_by(model)
        x, _ = prepare(image, geometry, model.preprocessing, model.spatial_dims, model.in_channels)
        x = torch.from_numpy(x)[None]
    infos, head, out_shape = trace_layers(model.network, x, model.output_key)
    auto = model.default_layer
    if auto == "auto":
        try:
            auto = choose_auto_layer(infos, head, out_shape)
        except LayerError:
            auto = "(none found: pass --layer)"
    print("# %s on %s: model input %s, output %s%s; auto layer: %s" % (
        model.name, os.path.basename(args.image), tuple(x.shape), out_shape, sliced, auto))
    for info in infos:
        if info.explainable:
            mark = "  <- auto" if info.name == auto else ("  <- head" if info.name == head else "")
            print("%s\t%s\t%s%s" % (info.name, info.kind, "x".join(str(s) for s in info.shape[1:]), mark))
    return 0
