"""MONAI models: networks of ``monai.networks.nets`` by name, and MONAI bundle folders, without running code.

Two specs:

- ``monai:UNet`` (``monai:SegResNet``, ``monai:DynUNet``, ``monai:SwinUNETR``, any class of
  ``monai.networks.nets``) with ``model_args`` (``--model-args JSON``) and ``weights`` (a state dict, read with
  ``weights_only=True``);
- a bundle folder (read as data by :mod:`.monai_bundle`, which says what is read and refused).

Example:
    >>> from SegHiResCAMLib.models import load_model
    >>> model = load_model("monai:UNet", model_args={"spatial_dims": 3, "in_channels": 1, "out_channels": 2,
    ...                    "channels": [4, 8], "strides": [2]})
    >>> model.preprocessing.divisible_by
    2
"""

import json
import math
import os
from typing import Any, Dict, Optional, Sequence

from torch import nn

from ...errors import ModelError, close_matches
from ..base import (Preprocessing, SegModel, default_class_names, infer_in_channels, infer_out_channels,
                   infer_spatial_dims)
from ..weights import extract_state_dict, file_sha256, load_checkpoint, load_state_dict_into

PREFIX = "monai:"


def _nets():
    try:
        import monai.networks.nets as nets  # noqa: PLC0415 - optional dependency, imported on use
    except ImportError as exc:
        raise ModelError("MONAI models need the package monai; install it with `pip install monai`") from exc
    return nets


def network_class(name: str):
    """The class ``name`` of ``monai.networks.nets`` (``"UNet"`` or ``"monai.networks.nets.UNet"``), nothing else."""
    nets = _nets()
    short = name[len("monai.networks.nets."):] if name.startswith("monai.networks.nets.") else name
    cls = getattr(nets, short, None) if short.isidentifier() else None
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        known = [n for n in dir(nets) if isinstance(getattr(nets, n), type) and issubclass(getattr(nets, n), nn.Module)]
        hint = close_matches(short, known)
        raise ModelError("%r is not a network of monai.networks.nets%s; name one of its classes, e.g. monai:UNet"
                         % (name, "; did you mean %s?" % ", ".join(hint) if hint else ""))
    return cls


def build_network(name: str, args: Dict[str, Any]) -> nn.Module:
    cls = network_class(name)
    try:
        return cls(**args)
    except Exception as exc:  # noqa: BLE001 - any failure of the constructor is a bad argument set
        raise ModelError("cannot build MONAI %s(%s): %s; give its arguments as --model-args JSON, e.g. "
                         "'{\"spatial_dims\": 3, \"in_channels\": 1, \"out_channels\": 2, ...}'"
                         % (cls.__name__, ", ".join(sorted(args)), str(exc).splitlines()[0] if str(exc) else
                            type(exc).__name__)) from exc


def lcm(values: Sequence[int]) -> int:
    out = 1
    for v in values:
        out = out * int(v) // math.gcd(out, int(v))
    return out


def _strides_factor(strides, dims: int) -> int:
    """Total down-sampling of a list of (per-axis or scalar) strides, as one multiple for every axis."""
    per_axis = [1] * dims
    for s in strides or ():
        s = list(s) if isinstance(s, (list, tuple)) else [s] * dims
        per_axis = [a * int(b) for a, b in zip(per_axis, s)]
    return lcm(per_axis)


def divisible_by(name: str, args: Dict[str, Any]) -> Optional[int]:
    """How the input size of a MONAI network must divide, from its arguments (``None`` when unknown)."""
    short = name.rsplit(".", 1)[-1]
    dims = int(args.get("spatial_dims", 3))
    if short in ("UNet", "Unet", "AttentionUnet", "DynUNet"):
        return _strides_factor(args.get("strides"), dims)
    if short in ("SegResNet", "SegResNetDS", "SegResNetVAE"):
        return 2 ** (len(args.get("blocks_down", (1, 2, 2, 4))) - 1)
    if short in ("SwinUNETR",):
        return int(args.get("patch_size", 2)) ** 5  # MONAI checks divisibility by patch_size ** 5
    if short in ("BasicUNet", "BasicUNetPlusPlus", "VNet"):
        return 16
    return None


def make_segmodel(network: nn.Module, name: str, args: Dict[str, Any], cls_name: str, meta: Dict[str, Any],
              **fields) -> SegModel:
    classes = infer_out_channels(network) or 2
    activation = meta.pop("activation", fields.pop("activation", None) or ("sigmoid" if classes == 1 else "softmax"))
    names = meta.pop("class_names", fields.pop("class_names", None))
    if names is None:
        names = ["background", "foreground"] if classes == 1 else default_class_names(classes)
    prep = meta.pop("preprocessing", fields.pop("preprocessing", None))
    if prep is None:
        prep = Preprocessing(divisible_by=divisible_by(cls_name, args) or 1)
    dims = meta.pop("spatial_dims", args.get("spatial_dims") or infer_spatial_dims(network) or 3)
    in_channels = meta.pop("in_channels", args.get("in_channels") or infer_in_channels(network) or 1)
    return SegModel(network=network, name=meta.pop("name", None) or name, spatial_dims=int(dims),
                    in_channels=int(in_channels), activation=activation, class_names=list(names),
                    preprocessing=prep, **fields, **meta)


def parse_model_args(model_args) -> Dict[str, Any]:
    if model_args is None:
        return {}
    if isinstance(model_args, str):
        try:
            model_args = json.loads(model_args)
        except ValueError as exc:
            raise ModelError("model arguments must be a JSON object, got %r" % model_args) from exc
    if not isinstance(model_args, dict):
        raise ModelError("model arguments must be a JSON object (a dict), got %s" % type(model_args).__name__)
    return dict(model_args)


def accepts(spec: str) -> bool:
    """A ``monai:Name`` spec."""
    return isinstance(spec, str) and spec.startswith(PREFIX)


def load_monai_network(spec: str, weights: Optional[str] = None, trust_model: bool = False,
                       model_args=None, **meta) -> SegModel:
    """``monai:Name`` built as ``monai.networks.nets.Name(**model_args)`` with a state dict from ``weights``.

    ``divisible_by`` follows from the arguments for UNet, AttentionUnet, DynUNet, SegResNet, SwinUNETR,
    BasicUNet and VNet; ``meta`` may give any :class:`SegModel` field (``preprocessing``, ``class_names``...).
    """
    name = spec[len(PREFIX):].strip()
    args = parse_model_args(model_args)
    network = build_network(name, args)
    if weights:
        load_state_dict_into(network, extract_state_dict(load_checkpoint(weights, trust_model), weights), weights)
    network.eval()
    source = "MONAI %s(%s)%s" % (network.__class__.__name__, json.dumps(args, sort_keys=True),
                                 " + %s" % weights if weights else " (no weights: random initialisation)")
    hashes = {os.path.abspath(weights): file_sha256(weights)} if weights else {}
    return make_segmodel(network, spec, args, name, meta, source=source, file_hashes=hashes)
