"""The ``seghirescam`` command line: ``explain``, ``predict``, ``layers``.

Errors made by the user print one line on stderr and exit with status 2; internal failures exit with 1
(set ``SEGHIRESCAM_DEBUG=1`` for a traceback). Outputs are written atomically and never over an input.
"""

import argparse
import json
import os
import sys
import time
from typing import List, Optional

import numpy as np

from .. import __version__
from ..errors import CancelledError, InputError, SegHiResCAMError

EPILOG = """model SPEC, one of:
  hd-bet                         the bundled HD-BET brain-extraction 3D U-Net (fold 0)
  FILE.pt / FILE.ts              a TorchScript file (its layers become explainable)
  FILE.onnx                      an ONNX file (needs: pip install onnx; pip install --no-deps onnx2torch)
  FOLDER                         a MONAI bundle (configs/inference.json + models/model.pt) or an nnU-Net v2
                                 trained-model folder (dataset.json, plans.json, fold_N/checkpoint_final.pth)
  monai:UNet                     a MONAI network by name, --model-args '{...}' --weights STATE_DICT
  package.module:factory         (or file.py:factory) with --weights STATE_DICT [--model-args '{...}']
examples:
  seghirescam explain --model mypkg.nets:unet --weights unet.pt --image ct.nii.gz --out heat.nii.gz --class 1
  seghirescam explain ... --segment liver.nii.gz --label 1 --method seg-grad-cam --layer decoder.3
  seghirescam layers --model mypkg.nets:unet --weights unet.pt --image ct.nii.gz
"""


def _add_model_args(p: argparse.ArgumentParser) -> None:
    """Options shared by every command that loads a model."""
    p.add_argument("--model", required=True, help="model spec (see below)")
    p.add_argument("--weights", help="state-dict file for a package.module:factory model")
    p.add_argument("--model-args", default=None, help="JSON object of keyword arguments for the factory")
    p.add_argument("--trust-model", action="store_true",
                   help="allow weight files that hold pickled Python objects (they can run code: trusted files only)")
    p.add_argument("--device", default="auto", help="auto (default), cpu or cuda")
    p.add_argument("--threads", type=int, help="CPU threads for torch (default: torch's choice, one per core)")


def build_parser() -> argparse.ArgumentParser:
    from ..engine.methods import METHODS, DEFAULT_METHOD
    parser = argparse.ArgumentParser(prog="seghirescam", description="Class-activation heatmaps that explain "
                                     "2D/3D medical segmentation models.", epilog=EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version="seghirescam %s" % __version__)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("explain", help="write a heatmap on the input image's grid", epilog=EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_model_args(p)
    p.add_argument("--image", required=True, help="input image: .nii/.nii.gz/.nrrd/.mha/.mhd or a DICOM folder")
    p.add_argument("--out", required=True, help="heatmap file to write (float32, same grid as --image)")
    p.add_argument("--segment", help="mask or label map whose voxels are explained (default: the model's prediction)")
    p.add_argument("--label", type=float, help="label value in --segment (default: every non-zero voxel)")
    p.add_argument("--class", dest="class_", default="1", help="explained class, index or name (default 1)")
    p.add_argument("--method", default=DEFAULT_METHOD, choices=sorted(METHODS), help="default: %(default)s")
    p.add_argument("--layer", default="auto", help="layer name, or auto (default; see `layers`)")
    p.add_argument("--threshold", type=float, help="EIECS threshold target: explain the voxels with p > T")
    p.add_argument("--score", default="logits", choices=["logits", "probabilities"], help="default: logits")
    p.add_argument("--reduction", default="sum", choices=["sum", "mean"], help="default: sum")
    p.add_argument("--component", help="restrict the target to one connected component: largest or a rank (0=largest)")
    p.add_argument("--voxel", help="explain one voxel, 'z,y,x' index in the image (numpy order)")
    p.add_argument("--radius", type=float, default=0.0, help="radius in mm around --voxel (default 0)")
    p.add_argument("--whole", action="store_true", help="explain the class over the whole image")
    p.add_argument("--pool-size", type=int, default=2, help="window of seg-xres-cam, in layer voxels (default 2)")
    p.add_argument("--no-relu", action="store_true", help="keep negative values (signed map)")
    p.add_argument("--normalize", default="max", choices=["max", "minmax", "none"], help="default: max")
    p.add_argument("--roi-size", help="run the model in overlapping windows of this size (voxels of the model grid, "
                   "'128' or 'z,y,x'): bounded memory for large scans")
    p.add_argument("--overlap", type=float, default=0.25, help="window overlap fraction (default 0.25)")
    p.add_argument("--blend", default="constant", choices=["constant", "gaussian"], help="window blending")
    p.add_argument("--amp", action="store_true", help="mixed precision forward pass: float16 on CUDA, bfloat16 on a "
                   "CPU with native bfloat16 (AVX512-BF16/AMX); maps combined in float32")
    p.add_argument("--json", help="write provenance metadata (JSON) here")
    p.add_argument("--prediction", help="also write the model's label map here")
    p.add_argument("--quiet", action="store_true", help="no progress bar")

    p = sub.add_parser("predict", help="write the model's segmentation (label map) on the input grid")
    _add_model_args(p)
    p.add_argument("--image", required=True)
    p.add_argument("--out", required=True, help="label map file to write")
    p.add_argument("--json", help="write provenance metadata (JSON) here")
    p.add_argument("--quiet", action="store_true")

    p = sub.add_parser("demo", help="explain the bundled HD-BET model on the bundled ROBEX atlas scan")
    p.add_argument("--out", required=True, help="folder for the results")
    p.add_argument("--device", default="auto", help="auto (default), cpu or cuda")
    p.add_argument("--quiet", action="store_true")

    p = sub.add_parser("layers", help="list the layers that can be explained")
    _add_model_args(p)
    p.add_argument("--image", help="an image, to show each layer's output shape and the auto layer")

    from ..analysis import evaluate
    from ..analysis import segmentation_ability as sa_score
    evaluate.add_parser(sub)
    sa_score.add_parser(sub)
    return parser


class _Progress:
    """tqdm progress bar on stderr driven by the engine's ``progress(fraction, message)`` callback."""

    def __init__(self, quiet: bool):
        self.bar = None
        if not quiet:
            try:
                from tqdm import tqdm
                self.bar = tqdm(total=100, file=sys.stderr, unit="%", leave=False, disable=None,
                                bar_format="{desc:<32.32} {bar} {percentage:3.0f}% {elapsed}")
            except ImportError:  # pragma: no cover - tqdm is a dependency
                self.bar = None

    def __call__(self, fraction: float, message: str) -> None:
        if self.bar is not None:
            self.bar.set_description_str(message)
            self.bar.update(max(0, int(round(100 * fraction)) - self.bar.n))

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _load_model(args):
    from ..models import load_model
    return load_model(args.model, weights=args.weights, trust_model=args.trust_model,
                      **({"model_args": json.loads(args.model_args)} if args.model_args else {}))


def _parse_model_args(args) -> None:
    if getattr(args, "model_args", None):
        try:
            value = json.loads(args.model_args)
        except ValueError as exc:
            raise InputError("--model-args must be a JSON object, e.g. '{\"classes\": 3}'; got %r" % args.model_args) from exc
        if not isinstance(value, dict):
            raise InputError("--model-args must be a JSON object, got %r" % args.model_args)


def _write_json(path: str, data: dict, protect: List[str]) -> None:
    from ..imaging.files import atomic_write  # same refusal rule as images

    def write(tmp):
        with open(tmp, "w") as handle:
            json.dump(data, handle, indent=2, default=_json_default)
    atomic_write(path, write, protect)


def _json_default(value):
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating,)):
        return float(value)
    if isinstance(value, np.ndarray):
        return value.tolist()
    return str(value)


def _cmd_explain(args) -> int:
    from ..imaging import files as io
    from ..analysis.explain import TargetSpec, explain_image
    protect = [args.image] + ([args.segment] if args.segment else [])
    for out in [args.out, args.json, args.prediction]:
        if out:
            io.check_not_protected(os.path.abspath(out), protect)
    image, geometry = io.read_image(args.image)
    model = _load_model(args)
    class_index = model.class_index(args.class_)
    notes = []
    mask = None
    if args.segment:
        mask, mask_geometry = io.read_image(args.segment)
        if mask.ndim != geometry.ndim:
            raise InputError("the segment %r has %d axes (or several components); give a single-component label "
                             "map" % (args.segment, mask.ndim))
        if not mask_geometry.same_grid(geometry):
            mask = io.resample_to_grid(mask, mask_geometry, geometry, "nearest")
            notes.append("the segment's grid differs from the image's: resampled onto the image grid "
                         "(nearest neighbour)")
            if not np.any(mask):
                raise InputError("the segment %r does not overlap the image (empty after resampling onto the "
                                 "image grid); check that both are in the same space" % args.segment)
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
                      reduction=args.reduction)
    options = {"pool_size": args.pool_size} if args.method == "seg-xres-cam" else {}
    roi = None
    if args.roi_size:
        try:
            roi = [int(v) for v in args.roi_size.replace(" ", "").split(",")]
        except ValueError as exc:
            raise InputError("--roi-size must be one integer or 'z,y,x', got %r" % args.roi_size) from exc
        if len(roi) == 1:
            roi = roi * geometry.ndim
        if len(roi) != geometry.ndim or min(roi) < 1:
            raise InputError("--roi-size needs 1 or %d positive integers, got %r" % (geometry.ndim, args.roi_size))
    progress = _Progress(args.quiet)
    try:
        result = explain_image(model, image, geometry, [spec], layers=args.layer, method=args.method,
                               device=args.device, relu=not args.no_relu, normalization=args.normalize,
                               progress=progress, roi_size=roi, overlap=args.overlap, blend=args.blend,
                               amp=args.amp, **options)
    finally:
        progress.close()
    heat = result.heatmaps[0]
    io.write_image(args.out, heat.array, geometry, protect=protect)
    if args.prediction:
        io.write_image(args.prediction, result.prediction, geometry, protect=protect)
    for warning in heat.info.get("warnings", []):
        print("seghirescam: warning: %s" % warning, file=sys.stderr)
    if heat.info.get("flat"):
        print("seghirescam: warning: the heatmap is flat (zero gradient at layer %s); try another layer or "
              "method" % heat.layer, file=sys.stderr)
    if args.json:
        meta = dict(result.metadata)
        meta.update({"command": "explain", "image": os.path.abspath(args.image), "output": os.path.abspath(args.out),
                     "segment": os.path.abspath(args.segment) if args.segment else None, "label": args.label,
                     "method": heat.method, "layer": heat.layer, "target": heat.info["target"],
                     "target_kind": spec.kind(), "cam": heat.info, "notes": notes,
                     "mask_resampled": bool(notes)})
        _write_json(args.json, meta, protect)
    for note in notes:
        print("seghirescam: note: %s" % note, file=sys.stderr)
    return 0


def _int(text: str, flag: str) -> int:
    try:
        return int(text)
    except ValueError as exc:
        raise InputError("%s must be an integer, got %r" % (flag, text)) from exc


def _cmd_predict(args) -> int:
    from ..imaging import files as io
    from ..analysis.explain import predict_image
    io.check_not_protected(os.path.abspath(args.out), [args.image])
    image, geometry = io.read_image(args.image)
    model = _load_model(args)
    progress = _Progress(args.quiet)
    try:
        labels, meta = predict_image(model, image, geometry, device=args.device, progress=progress)
    finally:
        progress.close()
    io.write_image(args.out, labels, geometry, protect=[args.image])
    if args.json:
        meta.update({"command": "predict", "image": os.path.abspath(args.image), "output": os.path.abspath(args.out)})
        _write_json(args.json, meta, [args.image])
    return 0


def _cmd_layers(args) -> int:
    import torch
    from ..engine import named_layers, trace_layers
    from ..engine.layers import choose_auto_layer
    from ..errors import LayerError
    model = _load_model(args)
    if not args.image:
        print("# %s: %d layers (pass --image for output shapes and the auto layer)" % (
            model.name, len(named_layers(model.network))))
        for name, module in named_layers(model.network).items():
            print("%s\t%s" % (name, type(module).__name__))
        return 0
    from ..imaging import files as io
    from ..imaging.model_space import prepare
    image, geometry = io.read_image(args.image)
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


def _cmd_demo(args) -> int:
    from ..reporting.demo import run_demo
    progress = _Progress(args.quiet)
    try:
        data = run_demo(args.out, device=args.device, progress=progress)
    finally:
        progress.close()
    print("Dice vs atlas mask: %.4f" % data["dice"])
    for row in data["heatmaps"]:
        print("%-20s %-10s heat inside/outside brain %.2f  %s" % (row["method"], row["layer"], row["ratio"],
                                                                row["figure"]))
    print("report: %s" % os.path.join(args.out, "report.md"))
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.command:
        parser.print_help(sys.stderr)
        return 2
    started = time.perf_counter()
    try:
        _parse_model_args(args)
        if getattr(args, "threads", None) is not None:
            if args.threads < 1:
                raise InputError("--threads must be >= 1, got %d" % args.threads)
            import torch
            torch.set_num_threads(args.threads)
        from ..analysis import evaluate
        from ..analysis import segmentation_ability as sa_score
        commands = {"explain": _cmd_explain, "predict": _cmd_predict, "layers": _cmd_layers, "demo": _cmd_demo,
                    "evaluate": evaluate.run, "sa-score": sa_score.run}
        return commands[args.command](args)
    except CancelledError:
        print("seghirescam: cancelled; nothing was written", file=sys.stderr)
        return CancelledError.exit_code
    except SegHiResCAMError as exc:
        print("seghirescam: error: %s" % exc, file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("seghirescam: cancelled; nothing was written", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - the last line of defence: one line, exit 1
        if os.environ.get("SEGHIRESCAM_DEBUG"):
            raise
        print("seghirescam: internal error after %.1f s: %s: %s (set SEGHIRESCAM_DEBUG=1 for a traceback)"
              % (time.perf_counter() - started, type(exc).__name__, exc), file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
