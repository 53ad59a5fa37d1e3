"""MONAI bundle folders as :class:`SegModel`s, read as data: no code of the bundle runs.

A bundle folder holds ``configs/inference.json`` (or ``.yaml`` when PyYAML is installed), ``models/model.pt`` and
optionally ``configs/metadata.json``; its network is a class of ``monai.networks.nets`` (:mod:`.monai_models`).

**Safety.** MONAI's ``ConfigParser`` evaluates every ``$`` string of a config as Python, so loading a bundle
with it runs whatever the bundle's author wrote. Here the JSON is read as data: ``network_def`` must name a
class of ``monai.networks.nets`` and its arguments must be literals or ``@id`` references to literal entries
(``%file#id`` macros to JSON files inside the bundle are followed too). A needed value with a ``$`` expression
(or a nested ``_target_`` component) is refused unless ``trust_model=True``; only then ``ConfigParser`` builds
the network (and, if needed, the preprocessing) exactly as MONAI would.

**Axes.** MONAI arrays are in ITK index order ``(x, y, z)`` (``sitk.GetArrayFromImage`` order reversed); the
arrays SegHiResCAM feeds a network are in numpy order ``(z, y, x)``. ``Orientationd(axcodes="RAS")`` makes
MONAI's axis 0 point Right, 1 Anterior, 2 Superior (codes name where each axis points, as ``DICOMOrient`` does).
Reorienting with the *reversed* code (``SAR``) gives an ITK image whose numpy array has exactly MONAI's layout
(checked against MONAI's own transforms in ``Testing/test_monai_nnunet_models.py``), so a bundle's ``axcodes``
map to ``orientation=axcodes[::-1]``, and ``pixdim``/``roi_size`` (MONAI axis order = our array order after that
reorientation) to ``spacing=pixdim[::-1]`` (ITK order) and ``patch_size=roi_size``. Without ``Orientationd``
the network would see its input transposed compared with MONAI; such bundles load with that caveat recorded in
``SegModel.source``.
"""

import json
import os
from typing import Any, Dict, List, Optional, Sequence, Tuple

from torch import nn

from ...errors import ModelError
from ..base import Preprocessing, SegModel, infer_in_channels, infer_out_channels, infer_spatial_dims
from .networks import lcm, parse_model_args, make_segmodel, build_network, divisible_by
from ..weights import extract_state_dict, file_sha256, load_checkpoint, load_state_dict_into

TRUST_HINT = "pass --trust-model (trust_model=True in Python) to let MONAI evaluate it, only if you trust the bundle"
CONFIG_NAMES = ("inference.json", "inference.yaml", "inference.yml")
#: transforms that do not change voxel values or the grid of the image
NEUTRAL = {"LoadImage", "EnsureChannelFirst", "AddChannel", "EnsureType", "ToTensor", "ToNumpy", "CastToType",
           "ToDevice", "Identity", "CopyItems", "DeleteItems", "SelectItems", "SqueezeDim", "FgBgToIndices"}
#: transforms mapped onto :class:`Preprocessing` (or noted), by their array-transform name
MAPPED = {"Orientation", "Spacing", "ScaleIntensityRange", "NormalizeIntensity", "ScaleIntensity", "DivisiblePad",
          "SpatialPad", "CropForeground"}
KNOWN = NEUTRAL | MAPPED


class _NeedsTrust(Exception):
    """A value of the config that only MONAI's evaluator can produce (code, or an arbitrary component)."""


def _config_path(folder: str) -> Optional[str]:
    for name in CONFIG_NAMES:
        path = os.path.join(folder, "configs", name)
        if os.path.isfile(path):
            return path
    return None


def is_monai_bundle(spec: str) -> bool:
    return os.path.isdir(spec) and _config_path(spec) is not None


def _read_config(path: str) -> Dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as handle:
            if path.endswith(".json"):
                data = json.load(handle)
            else:
                try:
                    import yaml  # noqa: PLC0415 - optional
                except ImportError as exc:
                    raise ModelError("%s is YAML; install PyYAML (`pip install pyyaml`) to read it" % path) from exc
                data = yaml.safe_load(handle)  # safe_load: plain data only, no Python objects
    except (OSError, ValueError) as exc:
        raise ModelError("cannot read the bundle config %s: %s" % (path, exc)) from exc
    if not isinstance(data, dict):
        raise ModelError("the bundle config %s is not a mapping of ids to values" % path)
    return data


class _Resolver:
    """Literal values of a bundle config: ``@id`` references and ``%file#id`` macros followed, ``$`` refused."""

    def __init__(self, config: Dict[str, Any], folder: str):
        self.config, self.folder, self._active = config, os.path.realpath(folder), set()

    @staticmethod
    def _split(ref: str) -> List[str]:
        return [p for p in ref.replace("::", "#").split("#") if p != ""]

    def lookup(self, config: Any, ref: str, where: str) -> Any:
        node = config
        for part in self._split(ref):
            if isinstance(node, dict) and part in node:
                node = node[part]
            elif isinstance(node, list) and part.lstrip("-").isdigit() and -len(node) <= int(part) < len(node):
                node = node[int(part)]
            else:
                raise ModelError("the bundle config has no entry %r (referenced by %s)" % (ref, where))
        return node

    def get(self, ref: str, where: str = "the loader") -> Any:
        if ref in self._active:
            raise ModelError("the bundle config refers to %r in a cycle" % ref)
        self._active.add(ref)
        try:
            return self.value(self.lookup(self.config, ref, where), ref)
        finally:
            self._active.discard(ref)

    def node(self, raw: Any, where: str) -> Any:
        """``raw`` with whole-value ``@id`` / ``%file#id`` references followed (its inside left unresolved)."""
        for _ in range(64):
            if not (isinstance(raw, str) and raw[:1] in ("@", "%", "$")):
                return raw
            if raw[0] == "$":
                raise _NeedsTrust("%s = %r" % (where, raw))
            raw = self.lookup(self.config, raw[1:], where) if raw[0] == "@" else self._macro(raw[1:], where)
        raise ModelError("the bundle config refers to %s in a cycle" % where)

    def value(self, value: Any, where: str) -> Any:
        """A literal value: references resolved, ``$`` expressions and nested components refused."""
        if isinstance(value, str) and value[:1] == "@":
            return self.get(value[1:], where)
        value = self.node(value, where)
        if isinstance(value, list):
            return [self.value(v, "%s#%d" % (where, i)) for i, v in enumerate(value)]
        if isinstance(value, dict):
            if "_target_" in value:
                raise _NeedsTrust("%s is a nested component (_target_ %r)" % (where, value["_target_"]))
            return {k: self.value(v, "%s#%s" % (where, k)) for k, v in value.items()}
        return value

    def _macro(self, text: str, where: str) -> Any:
        path, _, ref = text.replace("::", "#").partition("#")
        if not path:
            return self.lookup(self.config, ref, where)
        full = os.path.realpath(os.path.join(self.folder, path))
        if not full.startswith(self.folder + os.sep) or not full.endswith(".json") or not os.path.isfile(full):
            raise _NeedsTrust("%s = %%%s (a macro outside the bundle's JSON files)" % (where, text))
        return self.lookup(_read_config(full), ref, where)


def _literal_args(resolver: _Resolver, raw: Dict[str, Any], where: str) -> Dict[str, Any]:
    """The arguments of a component (``_target_``, ``_desc_``... left out), every one literal."""
    return {k: resolver.value(v, "%s#%s" % (where, k)) for k, v in raw.items()
            if not (k.startswith("_") and k.endswith("_"))}


def _component(resolver: _Resolver, ref: str) -> Tuple[str, Dict[str, Any]]:
    """``(target, arguments)`` of the component entry ``ref``."""
    raw = resolver.node(resolver.lookup(resolver.config, ref, "the loader"), ref)
    if not isinstance(raw, dict) or not isinstance(raw.get("_target_"), str):
        raise ModelError("the bundle entry %r is not a component with a _target_" % ref)
    if raw.get("_mode_", "default") != "default":
        raise _NeedsTrust("%s has _mode_ %r" % (ref, raw["_mode_"]))
    return raw["_target_"], _literal_args(resolver, raw, ref)


def _compose_items(resolver: _Resolver, key: str) -> List[Tuple[str, Dict[str, Any]]]:
    """The transforms of the ``Compose`` entry ``key`` as ``(name, arguments)``, every argument literal."""
    if key not in resolver.config:
        return []
    raw = resolver.node(resolver.config[key], key)
    if not isinstance(raw, dict) or str(raw.get("_target_", "")).rsplit(".", 1)[-1] != "Compose":
        raise ModelError("the bundle's %s is not a Compose of transforms" % key)
    items = resolver.node(raw.get("transforms", []), key + "#transforms")
    out = []
    for i, item in enumerate(items if isinstance(items, list) else []):
        where = "%s#transforms#%d" % (key, i)
        item = resolver.node(item, where)
        if not isinstance(item, dict) or "_target_" not in item:
            raise ModelError("%s of the bundle is not a transform component" % where)
        if item.get("_disabled_") is not True:
            out.append((str(item["_target_"]).rsplit(".", 1)[-1], _literal_args(resolver, item, where)))
    return out


def _transforms_from_objects(compose) -> List[Tuple[str, Dict[str, Any]]]:
    """``(name, arguments)`` of instantiated MONAI transforms (the trusted path), for the mapped kinds."""
    out = []
    for t in getattr(compose, "transforms", [compose]):
        name, args = type(t).__name__, {"keys": list(getattr(t, "keys", []) or [])}
        inner = {"Orientationd": "ornt_transform", "Spacingd": "spacing_transform", "ScaleIntensityRanged": "scaler",
                 "NormalizeIntensityd": "normalizer", "DivisiblePadd": "padder", "SpatialPadd": "padder",
                 "ScaleIntensityd": "scaler"}.get(name)
        obj = getattr(t, inner, t) if inner else t
        for attr in ("axcodes", "as_closest_canonical", "pixdim", "a_min", "a_max", "b_min", "b_max", "clip",
                     "nonzero", "channel_wise", "subtrahend", "divisor", "k", "spatial_size", "minv", "maxv",
                     "factor"):
            if hasattr(obj, attr):
                value = getattr(obj, attr)
                args[attr] = value.tolist() if hasattr(value, "tolist") else value
        out.append((name, args))
    return out


def _keys(args: Dict[str, Any]) -> List[str]:
    keys = args.get("keys", [])
    return [keys] if isinstance(keys, str) else list(keys)


def map_preprocessing(transforms: Sequence[Tuple[str, Dict[str, Any]]], spatial_dims: int, in_channels: int,
                      image_key: str = "image") -> Tuple[Dict[str, Any], List[str]]:
    """:class:`Preprocessing` fields (and ``patch``-like notes) for MONAI transforms; unmappable ones refused.

    Returns ``(fields, notes)``; ``fields`` may hold ``orientation``, ``spacing`` (ITK order),
    ``normalization`` and its parameters, ``divisible_by``, ``min_size`` (array order), ``_oriented``.
    """
    fields: Dict[str, Any] = {}
    notes: List[str] = []
    pixdim = None
    for name, args in transforms:
        base = name[:-1] if name.endswith("d") and name[:-1] in KNOWN else name
        if base != name and image_key not in _keys(args):
            continue  # a dictionary transform of other keys (labels...)
        if base in NEUTRAL:
            continue
        if base == "Orientation":
            codes = "RAS" if args.get("as_closest_canonical") else str(args.get("axcodes") or "")
            labels = args.get("labels")
            if labels is not None and [list(p) for p in labels] != [["L", "R"], ["P", "A"], ["I", "S"]]:
                raise ModelError("the bundle's Orientationd uses axis labels %r; only MONAI's default (RAS) labels "
                                 "are supported" % (args.get("labels"),))
            if spatial_dims != 3 or len(codes) != 3:
                raise ModelError("the bundle reorients %dD images to %r; only 3D reorientation is supported"
                                 % (spatial_dims, codes))
            if pixdim is not None and len(set(pixdim)) > 1:
                raise ModelError("the bundle resamples to an anisotropic pixdim before reorienting; the spacing "
                                 "per axis then depends on the image and cannot be reproduced")
            fields["orientation"] = codes.upper()[::-1]  # MONAI axes (x, y, z) are our array axes reversed
            fields["_oriented"] = True
        elif base == "Spacing":
            value = args.get("pixdim")
            value = [value] * spatial_dims if isinstance(value, (int, float)) else list(value)[:spatial_dims]
            if len(value) != spatial_dims or any(float(v) <= 0 for v in value):
                raise ModelError("the bundle resamples to pixdim %r, which keeps some axes unchanged; only a full "
                                 "target spacing is supported" % (args.get("pixdim"),))
            pixdim = [float(v) for v in value]
        elif base == "ScaleIntensityRange":
            a_min, a_max = float(args["a_min"]), float(args["a_max"])
            b_min, b_max = args.get("b_min"), args.get("b_max")
            clip = bool(args.get("clip", False)) and b_min is not None and b_max is not None
            b_min = 0.0 if b_min is None else float(b_min)
            b_max = 1.0 if b_max is None else float(b_max)
            if a_min == a_max:
                raise ModelError("the bundle's ScaleIntensityRanged has a_min == a_max == %g" % a_min)
            if (b_min, b_max) == (0.0, 1.0) and clip and a_min < a_max:
                fields.update(normalization="ct", ct_window=(a_min, a_max))
            else:
                fields.update(normalization="range", intensity_range=(a_min, a_max), output_range=(b_min, b_max),
                              clip=clip)
        elif base == "NormalizeIntensity":
            if args.get("subtrahend") is not None or args.get("divisor") is not None:
                raise ModelError("the bundle's NormalizeIntensityd uses a fixed subtrahend/divisor, which is not "
                                 "supported")
            how = "zscore-nonzero" if args.get("nonzero") else "zscore"
            if args.get("channel_wise") and in_channels > 1:
                fields["channels"] = tuple(Preprocessing(normalization=how) for _ in range(in_channels))
            else:
                fields["normalization"] = how
        elif base == "ScaleIntensity":
            if (args.get("minv", 0.0), args.get("maxv", 1.0)) != (0.0, 1.0) or args.get("factor") is not None:
                raise ModelError("the bundle's ScaleIntensityd(minv=%r, maxv=%r, factor=%r) is not supported; "
                                 "only scaling to [0, 1]" % (args.get("minv"), args.get("maxv"), args.get("factor")))
            fields["normalization"] = "minmax"
        elif base == "DivisiblePad":
            k = args.get("k", 1)
            fields["divisible_by"] = lcm(k if isinstance(k, (list, tuple)) else [k])
        elif base == "SpatialPad":
            fields["min_size"] = tuple(int(s) for s in args.get("spatial_size"))
        elif base == "CropForeground":
            notes.append("CropForegroundd ignored (the network sees the whole image)")
        else:
            raise ModelError("the bundle's preprocessing transform %s cannot be reproduced by SegHiResCAM; "
                             "supported: Orientationd, Spacingd, ScaleIntensityRanged, NormalizeIntensityd, "
                             "ScaleIntensityd, DivisiblePadd, SpatialPadd and transforms that change no values"
                             % name)
    oriented = fields.get("_oriented", False)
    if pixdim is not None:  # MONAI axis order = array order after the mapped reorientation, ITK order otherwise
        fields["spacing"] = tuple(pixdim[::-1]) if oriented else tuple(pixdim)
    if "min_size" in fields and not oriented:
        fields["min_size"] = tuple(fields["min_size"][::-1])
    return fields, notes


def _metadata(folder: str) -> Dict[str, Any]:
    path = os.path.join(folder, "configs", "metadata.json")
    return _read_config(path) if os.path.isfile(path) else {}


def _class_names(meta: Dict[str, Any], out_channels: int) -> Tuple[Optional[List[str]], str]:
    fmt = meta.get("network_data_format", {}) or {}
    outputs = fmt.get("outputs", {}) or {}
    pred = outputs.get("pred") or next(iter(outputs.values()), {}) or {}
    image_key = next(iter((fmt.get("inputs") or {"image": {}}).keys()), "image")
    channel_def = pred.get("channel_def") or {}
    names = None
    if channel_def and len(channel_def) == out_channels:
        try:
            names = [str(channel_def[k]) for k in sorted(channel_def, key=int)]
        except ValueError:
            names = None
    return names, image_key


def _activation(resolver: _Resolver, out_channels: int) -> str:
    """``sigmoid``/``softmax`` from the bundle's ``Activationsd`` post-processing, else from the channel count."""
    try:
        items = _compose_items(resolver, "postprocessing")
    except (ModelError, _NeedsTrust):  # post-processing is optional information: fall back to the default
        items = []
    for name, args in items:
        if name.startswith("Activations"):
            if args.get("sigmoid"):
                return "sigmoid"
            if args.get("softmax"):
                return "softmax"
    return "sigmoid" if out_channels == 1 else "softmax"


def _roi_size(resolver: _Resolver) -> Optional[Tuple[int, ...]]:
    try:
        target, args = _component(resolver, "inferer")
    except (ModelError, _NeedsTrust):
        return None
    roi = args.get("roi_size")
    if "SlidingWindow" not in target or not isinstance(roi, (list, tuple)):
        return None
    return tuple(int(v) for v in roi)


def _network_args(network: nn.Module) -> Dict[str, Any]:
    """The arguments :func:`divisible_by` needs, read back from a network MONAI built (the trusted path)."""
    return {k: getattr(network, k) for k in ("spatial_dims", "strides", "blocks_down", "patch_size")
            if isinstance(getattr(network, k, None), (int, list, tuple))}


def _bundle_macros(value: Any, folder: str) -> Any:
    """``%relative/file.json#id`` -> ``%<folder>/relative/file.json#id`` (MONAI reads macros from the working
    directory; the bundle's own files are meant)."""
    if isinstance(value, str) and value.startswith("%") and not value.startswith("%#"):
        path = value[1:].replace("::", "#").partition("#")[0]
        return value if os.path.isabs(path) else "%" + os.path.join(folder, value[1:])
    if isinstance(value, list):
        return [_bundle_macros(v, folder) for v in value]
    if isinstance(value, dict):
        return {k: _bundle_macros(v, folder) for k, v in value.items()}
    return value


def _trusted_parser(config: Dict[str, Any], folder: str):
    """MONAI's own parser over the config (it evaluates ``$`` expressions: only with ``trust_model``)."""
    try:
        from monai.bundle import ConfigParser  # noqa: PLC0415
    except ImportError as exc:
        raise ModelError("loading this bundle needs monai.bundle; install monai") from exc
    parser = ConfigParser(_bundle_macros(config, folder))
    parser["bundle_root"] = folder
    return parser


def load_monai_bundle(spec: str, weights: Optional[str] = None, trust_model: bool = False,
                      model_args=None, **meta) -> SegModel:
    """A MONAI bundle folder as a :class:`SegModel` (see the module docstring for what is read and refused)."""
    if parse_model_args(model_args):
        raise ModelError("a MONAI bundle takes no --model-args; its configs/inference.json defines the network")
    folder = os.path.abspath(spec)
    config_path = _config_path(folder)
    config = _read_config(config_path)
    resolver = _Resolver(config, folder)
    key = "network_def" if "network_def" in config else "network"
    parser = None
    try:
        target, args = _component(resolver, key)
        network = build_network(target, args)
    except _NeedsTrust as exc:
        if not trust_model:
            raise ModelError("the bundle config would execute code (%s) to build the network; %s"
                             % (exc, TRUST_HINT)) from None
        parser = _trusted_parser(config, folder)
        network = parser.get_parsed_content(key)
        if not isinstance(network, nn.Module):
            raise ModelError("the bundle's %s is a %s, not a torch.nn.Module" % (key, type(network).__name__))
        target, args = type(network).__name__, _network_args(network)
    path = os.path.abspath(weights) if weights else os.path.join(folder, "models", "model.pt")
    if not os.path.isfile(path):
        raise ModelError("the bundle has no weights %s; download them (python -m monai.bundle download) or pass "
                         "--weights FILE" % path)
    load_state_dict_into(network, extract_state_dict(load_checkpoint(path, trust_model), path), path)
    network.eval()
    out_channels = infer_out_channels(network) or 2
    in_channels = int(args.get("in_channels") or infer_in_channels(network) or 1)
    dims = int(args.get("spatial_dims") or infer_spatial_dims(network) or 3)
    metadata = _metadata(folder)
    names, image_key = _class_names(metadata, out_channels)
    try:
        transforms = _compose_items(resolver, "preprocessing")
    except _NeedsTrust as exc:
        if not trust_model:
            raise ModelError("the bundle config would execute code (%s) to build its preprocessing; %s"
                             % (exc, TRUST_HINT)) from None
        parser = parser or _trusted_parser(config, folder)
        transforms = _transforms_from_objects(parser.get_parsed_content("preprocessing"))
    fields, notes = map_preprocessing(transforms, dims, in_channels, image_key)
    oriented = fields.pop("_oriented", False)
    roi = _roi_size(resolver)
    patch = None if roi is None else (tuple(roi) if oriented else tuple(roi[::-1]))
    k = lcm([fields.pop("divisible_by", 1), divisible_by(target, args) or 1])
    if patch is not None and "min_size" not in fields:
        fields["min_size"] = patch  # MONAI's sliding window pads smaller images to roi_size (both ends, as here)
    if not oriented and dims == 3:
        notes.append("no Orientationd: the network sees (z, y, x) arrays where MONAI gives (x, y, z)")
    version = metadata.get("version", "unknown")
    source = "MONAI bundle %s (version %s), network %s, weights %s%s" % (
        folder, version, type(network).__name__, path, "; " + "; ".join(notes) if notes else "")
    hashes = {path: file_sha256(path)}
    if config_path:
        hashes[config_path] = file_sha256(config_path)
    # MONAI pads symmetrically (DivisiblePadd, SlidingWindowInferer), hence pad_side="both"
    prep = Preprocessing(divisible_by=k, pad_side="both", **fields)
    return make_segmodel(network, "monai-bundle:%s" % os.path.basename(folder), args, target, meta, source=source,
                     file_hashes=hashes, preprocessing=prep, class_names=names,
                     activation=_activation(resolver, out_channels), patch_size=patch)
