"""What the ``seghirescam`` commands share: the model options, the CAM method options (from the catalog), the
progress bar, model loading, ``--model-args`` parsing, the output check and the reading of an image with a mask.
"""

import argparse
import json
import os
import sys
from typing import Iterable, List, Optional, Sequence, Tuple

import numpy as np

from .. import catalog
from ..errors import InputError
from ..geometry import Geometry

EPILOG = """model SPEC, one of:
  hd-bet                         the bundled HD-BET brain-extraction 3D U-Net (fold 0)
  FILE.pt / FILE.ts              a TorchScript file (its layers become explainable)
  FILE.onnx                      an ONNX file (needs: pip install onnx; pip install --no-deps onnx2torch)
  FOLDER                         a MONAI bundle (configs/inference.json + models/model.pt) or an nnU-Net v2
                                 trained-model folder (dataset.json, plans.json, fold_N/checkpoint_final.pth)
  totalseg:TASK --structure NAME installed TotalSegmentator weights ($TOTALSEG_HOME_DIR or ~/.totalsegmentator)
  monai:UNet                     a MONAI network by name, --model-args '{...}' --weights STATE_DICT
  package.module:factory         (or file.py:factory) with --weights STATE_DICT [--model-args '{...}']
examples:
  seghirescam explain --model mypkg.nets:unet --weights unet.pt --image ct.nii.gz --out heat.nii.gz --class 1
  seghirescam explain ... --segment liver.nii.gz --label 1 --method seg-grad-cam --layer decoder.3
  seghirescam explain ... --weights fold0.pt --weights fold1.pt --tta --spread spread.nii.gz --json run.json
  seghirescam explain ... --target fp --reference ref.nii.gz --component 0 --json errors.json
  seghirescam layers --model mypkg.nets:unet --weights unet.pt --image ct.nii.gz
"""

#: the flag of each constructor option of a CAM method (``catalog.method(name).options``)
METHOD_OPTION_FLAGS = {
    "pool_size": dict(type=int, default=2, help="window of seg-xres-cam, in layer voxels (default 2)"),
}


def add_model_args(p: argparse.ArgumentParser) -> None:
    """Options shared by every command that loads a model."""
    p.add_argument("--model", required=True, help="model spec (see below)")
    p.add_argument("--weights", action="append", help="state-dict file for a package.module:factory model (explain: "
                   "give it again for each member of an ensemble, e.g. the folds)")
    p.add_argument("--model-args", default=None, help="JSON object of keyword arguments for the factory")
    p.add_argument("--trust-model", action="store_true",
                   help="allow weight files that hold pickled Python objects (they can run code: trusted files only)")
    p.add_argument("--device", default="auto", help="auto (default), cpu or cuda")
    p.add_argument("--threads", type=int, help="CPU threads for torch (default: torch's choice, one per core)")
    p.add_argument("--structure", help="with --model totalseg:TASK: the structure (e.g. liver) whose part of the task "
                   "is loaded; also the default --class")
    add_card_args(p)


#: the flags that override one field of a model card: (card field, flag, help); ``intensity.X`` for the fields
#: of ``intensity``. Values are JSON (``'[1,1,2]'``), or comma-separated (``1,1,2``), ``none``/``null``, or text.
CARD_FLAGS = (
    ("dims", "--card-dims", "2 or 3"),
    ("input_channels", "--card-input-channels", "input channels of the model"),
    ("channels", "--card-channels", "channel names in the model's order, e.g. T1,T1c,T2,FLAIR (for --image NAME=path)"),
    ("orientation", "--card-orientation", "RAS, LPS, ... or none (as stored)"),
    ("spacing", "--card-spacing", "model voxel size in mm, x,y,z, or none (as stored)"),
    ("resize_to", "--card-resize-to", "fixed model grid, voxels x,y,z, or none"),
    ("resize_mode", "--card-resize-mode", "nearest or linear (interpolation of --card-resize-to)"),
    ("divisible_by", "--card-divisible-by", "pad to a multiple: an integer, auto (probe the model) or none"),
    ("intensity.clip_percentiles", "--card-clip-percentiles", "clip intensities to these percentiles, e.g. 1,99"),
    ("intensity.normalize", "--card-normalize", "normalisations applied in order: minmax, zscore, zscore-nonzero, none"),
    ("intensity.ct_window", "--card-ct-window", "CT window level,width in HU (scaled to [0, 1])"),
    ("intensity.scale", "--card-scale", "multiply intensities by this after normalising"),
    ("intensity.shift", "--card-shift", "then add this"),
    ("output", "--card-output", "what the model returns: logits, sigmoid, softmax or auto (detect)"),
    ("classes", "--card-classes", "class names: '{\"1\": \"brain\"}' or 1=brain,2=tumour"),
    ("patch_size", "--card-patch-size", "default --roi-size (z,y,x model voxels)"),
    ("slice_axis", "--card-slice-axis", "axial, coronal or sagittal (for 2D models)"),
)


def add_card_args(p: argparse.ArgumentParser) -> None:
    """``--model-card`` and one ``--card-*`` flag per card field (docs/model_card.md), overriding the card."""
    group = p.add_argument_group("model card", "what the model expects (docs/model_card.md); <model>.card.json next "
                                 "to a model file is used by itself; each --card-* flag overrides one field")
    group.add_argument("--model-card", help="model card (JSON) of the model")
    for _, flag, text in CARD_FLAGS:
        group.add_argument(flag, help=text)


def _card_value(text: str):
    """A flag's text as card data: JSON, ``none``/``null``, comma-separated numbers or names, or the text."""
    if text.strip().lower() in ("none", "null"):
        return None
    try:
        return json.loads(text)
    except ValueError:
        pass
    parts = [part.strip() for part in text.split(",")]
    if all("=" in part for part in parts):  # 1=brain,2=tumour
        return dict(part.split("=", 1) for part in parts)
    values = []
    for part in parts:
        try:
            values.append(json.loads(part))
        except ValueError:
            values.append(part)
    return values if len(values) > 1 or "," in text else values[0]


def card_overrides(args: argparse.Namespace) -> dict:
    """The card fields given as ``--card-*`` flags (``intensity`` as a dict of its given fields)."""
    out: dict = {}
    for name, flag, _ in CARD_FLAGS:
        text = getattr(args, flag[2:].replace("-", "_"), None)
        if text is None:
            continue
        value = _card_value(text)
        if name == "intensity.normalize" and isinstance(value, str):
            value = [value]
        if name.startswith("intensity."):
            out.setdefault("intensity", {})[name.split(".", 1)[1]] = value
        else:
            out[name] = value
    return out


def model_card(args: argparse.Namespace):
    """The card of ``--model-card`` (or ``<model>.card.json`` next to the model) with the ``--card-*`` flags
    applied; ``False`` where there is none (no card file, no flag)."""
    from ..models.card import card_from_dict, find_card, read_card_file
    path = getattr(args, "model_card", None) or find_card(args.model)
    data: dict = read_card_file(path) if path else {}
    overrides = card_overrides(args)
    if not path and not overrides:
        return False
    if "intensity" in overrides:  # the flags change fields of the card's intensity, not the whole block
        base = dict(data.get("intensity")) if isinstance(data.get("intensity"), dict) else {}
        if "ct_window" in overrides["intensity"] and "normalize" not in overrides["intensity"]:
            base.pop("normalize", None)  # a CT window replaces the card's normalisation
        if "normalize" in overrides["intensity"] and "ct_window" not in overrides["intensity"]:
            base.pop("ct_window", None)
        overrides["intensity"] = dict(base, **overrides["intensity"])
    data = dict(data, **overrides)
    card = card_from_dict(data, source=os.path.abspath(path) if path else None)
    if overrides:
        card.source = "%s + %s" % (card.source or "no card file", " ".join(
            flag for name, flag, _ in CARD_FLAGS if getattr(args, flag[2:].replace("-", "_"), None) is not None))
    return card


IMAGE_HELP = "input image: .nii/.nii.gz/.nrrd/.mha/.mhd, a DICOM folder, or a .png/.jpg picture (2D models)"


def add_slice_args(p: argparse.ArgumentParser) -> None:
    """The options of a 2D model on a 3D scan (docs/slice_models.md)."""
    group = p.add_argument_group("2D models on 3D scans", "a 2D model runs slice by slice (docs/slice_models.md)")
    group.add_argument("--slice-axis", help="the slices: %s (default: the model card's, else axial)"
                       % ", ".join(catalog.SLICE_AXES))
    group.add_argument("--slice-context", type=int, default=0, metavar="K", help="a 2.5D model gets each slice "
                       "with K neighbouring slices on each side as 2K+1 channels, edge slices repeated (default 0)")
    group.add_argument("--slice-batch", type=int, metavar="N", help="slices per forward pass (default: about "
                       "0.5 million model voxels per batch)")


def slice_options(args: argparse.Namespace) -> dict:
    """The ``slice_*`` keyword arguments of ``explain_image``/``predict_image`` from :func:`add_slice_args`."""
    return {"slice_axis": args.slice_axis, "slice_context": args.slice_context, "slice_batch": args.slice_batch}


def fit_picture(path: str, image: np.ndarray, geometry: Geometry, model) -> Tuple[np.ndarray, List[str]]:
    """The ``--image`` read from ``path`` for ``model``: a colour PNG/JPEG fitted to its input channels
    (:func:`~SegHiResCAMLib.imaging.pictures.picture_channels`), and notes for the user."""
    from ..imaging.pictures import is_picture, picture_channels
    if not is_picture(path):
        return image, []
    image, note = picture_channels(image, geometry, model.in_channels)
    return image, [note] if note else []


def add_memory_arg(p: argparse.ArgumentParser) -> None:
    """``--memory-budget``: above it, windows are chosen by themselves (:mod:`..analysis.memory`)."""
    from ..analysis.memory import BUDGET_HELP
    p.add_argument("--memory-budget", default="auto", help=BUDGET_HELP)


def print_memory(meta: dict) -> None:
    """The one line saying that windows were chosen to stay within the memory budget (if they were)."""
    memory = meta.get("memory") or {}
    if memory.get("choice") == "windows" and memory.get("message"):
        print("seghirescam: note: %s" % memory["message"], file=sys.stderr)


def add_image_arg(p: argparse.ArgumentParser, help: str = IMAGE_HELP, channels: bool = False) -> None:
    """``--image``, required; with ``channels`` repeatable (one per input channel, ``NAME=path`` binds by name)."""
    if channels:
        p.add_argument("--image", required=True, action="append", help=help + "; repeat it for a model with several "
                       "input channels (or give one 4D file), NAME=path binds an image to the card's channel NAME; "
                       "the first image's grid is the output's (docs/model_card.md)")
    else:
        p.add_argument("--image", required=True, help=help)


def read_channels(args: argparse.Namespace, model):
    """The ``--image`` images as one image on the first one's grid, in the model card's channel order
    (:func:`~SegHiResCAMLib.imaging.channels.read_channel_images`); one image of one channel is read as is."""
    from ..imaging.channels import image_channels, read_channel_images
    images = [args.image] if isinstance(args.image, str) else args.image
    expected = image_channels(model.in_channels, getattr(args, "slice_context", 0) or 0)  # 2.5D: per slice
    return read_channel_images(images, (model.card or {}).get("channels"),
                               expected if len(images) > 1 else None)  # one file: checked as before


def add_mask_args(p: argparse.ArgumentParser, flag: str, help: str) -> None:
    """A mask or label map (``--segment``/``--reference``) and ``--label``, the value of its voxels to use."""
    p.add_argument(flag, help=help)
    p.add_argument("--label", type=float, help="label value in %s (default: every non-zero voxel)" % flag)


def add_class_arg(p: argparse.ArgumentParser, verb: str = "explained") -> None:
    """``--class``: index or name, default 1."""
    p.add_argument("--class", dest="class_", default="1", help="%s class, index or name (default 1)" % verb)


def add_score_arg(p: argparse.ArgumentParser) -> None:
    """``--score``: what the explained scalar is computed from."""
    p.add_argument("--score", default="logits", choices=list(catalog.SCORES), help="default: logits")


def add_method_args(p: argparse.ArgumentParser) -> None:
    """One flag per constructor option of the catalog's CAM methods (e.g. ``--pool-size``)."""
    names = dict.fromkeys(option for info in catalog.METHODS for option in info.options)
    for name in names:
        p.add_argument("--" + name.replace("_", "-"), **METHOD_OPTION_FLAGS[name])


def method_options(args: argparse.Namespace, methods: Iterable[str]) -> dict:
    """The constructor options the chosen ``methods`` take, with their values from the command line."""
    return {option: getattr(args, option) for name in methods for option in catalog.method(name).options}


class Progress:
    """tqdm progress bar on stderr driven by the engine's ``progress(fraction, message)`` callback."""

    def __init__(self, quiet: bool):
        self.bar = None
        if not quiet:
            try:
                from tqdm import tqdm
                self.bar = tqdm(total=100, file=sys.stderr, unit="%", leave=False, disable=None,
                                bar_format="{desc:<32.32} {bar} {percentage:3.0f}% {elapsed}<{remaining}")
            except ImportError:  # pragma: no cover - tqdm is a dependency
                self.bar = None

    def __call__(self, fraction: float, message: str) -> None:
        if self.bar is not None:
            self.bar.set_description_str(message)
            self.bar.update(max(0, int(round(100 * fraction)) - self.bar.n))

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def weights_file(args: argparse.Namespace) -> Optional[str]:
    """The one ``--weights`` file (``None`` without one) of a command that loads one model."""
    given = args.weights if isinstance(args.weights, list) else [args.weights] if args.weights else []
    if len(given) > 1:
        raise InputError("--weights was given %d times; only `seghirescam explain` takes several (an ensemble): "
                         "give one weights file" % len(given))
    return given[0] if given else None


def load_model(args: argparse.Namespace, weights: Optional[str] = None):
    """The model of ``--model`` / ``--weights`` / ``--model-args`` / ``--trust-model`` (``weights``: this file
    instead of ``--weights``, which may then be given once at most)."""
    from ..models import load_model as load
    options = {"model_args": json.loads(args.model_args)} if args.model_args else {}
    if getattr(args, "structure", None):
        if not str(args.model).startswith("totalseg:"):
            raise InputError("--structure %r needs a TotalSegmentator model (--model totalseg:TASK), got --model %r"
                             % (args.structure, args.model))
        options["structure"] = args.structure
        if getattr(args, "class_", None) == "1":  # the default: explain the structure
            args.class_ = args.structure
    return load(args.model, weights=weights or weights_file(args), trust_model=args.trust_model,
                model_card=model_card(args), **options)


def load_models(args: argparse.Namespace) -> list:
    """One model per ``--weights`` file (an ensemble; one model without ``--weights``)."""
    given = args.weights if isinstance(args.weights, list) else [args.weights] if args.weights else []
    return [load_model(args, path) for path in given] if len(given) > 1 else [load_model(args)]


def warn_model_output(model) -> None:
    """The one warning line about a final sigmoid/softmax the model was found to end in (if it does)."""
    message = model.resolved.get("output", {}).get("message")
    if message:
        print("seghirescam: warning: %s" % message, file=sys.stderr)


def parse_model_args(args: argparse.Namespace) -> None:
    """Check that ``--model-args`` (when given) is a JSON object."""
    if getattr(args, "model_args", None):
        try:
            value = json.loads(args.model_args)
        except ValueError as exc:
            raise InputError("--model-args must be a JSON object, e.g. '{\"classes\": 3}'; got %r"
                             % args.model_args) from exc
        if not isinstance(value, dict):
            raise InputError("--model-args must be a JSON object, got %r" % args.model_args)


def check_outputs(outputs: Sequence[Optional[str]], protect: Sequence[str]) -> None:
    """Refuse, before any work, outputs that would overwrite an input (``None`` entries are skipped)."""
    from ..imaging.files import check_not_protected
    for out in outputs:
        if out:
            check_not_protected(os.path.abspath(out), protect)


def read_image_and_mask(image_path: str, mask_path: Optional[str] = None, label: Optional[float] = None,
                        what: str = "segment", binary: bool = False
                        ) -> Tuple[np.ndarray, Geometry, Optional[np.ndarray], List[str]]:
    """The image, its grid, and the mask on that grid (``None`` without ``mask_path``) with the notes for the
    user (see :func:`~SegHiResCAMLib.imaging.resample.read_mask_on_grid`)."""
    from ..imaging.files import read_image
    from ..imaging.resample import read_mask_on_grid
    image, geometry = read_image(image_path)
    if not mask_path:
        return image, geometry, None, []
    mask, notes = read_mask_on_grid(mask_path, geometry, label=label, what=what, binary=binary)
    return image, geometry, mask, notes
