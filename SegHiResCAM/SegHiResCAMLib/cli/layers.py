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
    from ..imaging import files as io
    from ..imaging.model_space import prepare
    from ..models.output import resolve_divisible_by
    image, geometry = io.read_image(args.image)
    resolve_divisible_by(model)
    x, _ = prepare(image, geometry, model.preprocessing, model.spatial_dims, model.in_channels)
    infos, head, out_shape = trace_layers(model.network, torch.from_numpy(x)[None], model.output_key)
    auto = model.default_layer
    if auto == "auto":
        try:
            auto = choose_auto_layer(infos, head, out_shape)
        except LayerError:
            auto = "(none found: pass --layer)"
    print("# %s on %s: model input %s, output %s; auto layer: %s" % (
        model.name, os.path.basename(args.image), tuple(x.shape), out_shape, auto))
    for info in infos:
        if info.explainable:
            mark = "  <- auto" if info.name == auto else ("  <- head" if info.name == head else "")
            print("%s\t%s\t%s%s" % (info.name, info.kind, "x".join(str(s) for s in info.shape[1:]), mark))
    return 0
