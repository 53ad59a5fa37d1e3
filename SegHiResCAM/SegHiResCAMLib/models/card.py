"""Model cards: what a model expects, declared by its user in a small JSON file (``docs/model_card.md``).

HD-BET, MONAI bundles and nnU-Net folders carry their own preprocessing; any other model (a TorchScript file, a
``package.module:factory``) does not. A card declares it::

    {"dims": 3, "input_channels": 1, "channels": ["T1"], "orientation": "RAS", "spacing": [1.0, 1.0, 1.0],
     "resize_to": null, "resize_mode": "linear", "divisible_by": "auto",
     "intensity": {"clip_percentiles": [1, 99], "normalize": ["minmax"], "scale": 2.0, "shift": -1.0},
     "output": "auto", "classes": {"1": "brain"}, "patch_size": null, "slice_axis": "axial"}

Every field is optional; a field the card leaves out keeps the model's own setting. :func:`card_from_dict`
checks every field and raises one :class:`~SegHiResCAMLib.errors.InputError` naming the bad field and the
allowed values; :func:`apply_card` maps the card onto a :class:`~.base.SegModel` (its
:class:`~.base.Preprocessing`, ``spatial_dims``, ``in_channels``, ``class_names``, ``output``, ``roi_size``).
``<model>.card.json`` next to a model file is found by :func:`find_card`.

Example:
    >>> card = card_from_dict({"spacing": [1, 1, 2], "intensity": {"ct_window": [40, 400]}, "output": "sigmoid"})
    >>> card.spacing, card.intensity["ct_window"], card.output
    ((1.0, 1.0, 2.0), (40.0, 400.0), 'sigmoid')
    >>> card_from_dict({"output": "probabilities"})
    Traceback (most recent call last):
    ...
    SegHiResCAMLib.errors.InputError: model card field 'output': must be one of logits, sigmoid, softmax, auto; got "probabilities"
"""

import dataclasses
import json
import os
from dataclasses import dataclass
from typing import Any, Dict, Optional, Tuple, Union

from ..errors import InputError
from .base import ORIENTATIONS, OUTPUTS, Preprocessing, SegModel

#: the suffix of a card found next to a model file (``unet.pt`` -> ``unet.card.json`` or ``unet.pt.card.json``)
CARD_SUFFIX = ".card.json"
#: every field of a card, in the order of the documentation
FIELDS = ("dims", "input_channels", "channels", "orientation", "spacing", "resize_to", "resize_mode", "divisible_by",
          "intensity", "output", "classes", "patch_size", "slice_axis")
#: the fields of ``intensity``
INTENSITY_FIELDS = ("clip_percentiles", "normalize", "ct_window", "scale", "shift")
#: the names ``intensity.normalize`` takes (applied in order)
CARD_NORMALIZATIONS = ("none", "minmax", "zscore", "zscore-nonzero")
RESIZE_MODES = ("nearest", "linear")
SLICE_AXES = ("axial", "coronal", "sagittal")
CARD_ORIENTATIONS = tuple(o for o in ORIENTATIONS if o not in (None, "keep"))


def _fail(name: str, text: str, value: Any) -> InputError:
    return InputError("model card field %r: %s; got %s" % (name, text, json.dumps(value) if _jsonable(value)
                                                            else repr(value)))


def _jsonable(value) -> bool:
    try:
        json.dumps(value)
        return True
    except (TypeError, ValueError):
        return False


def _number(name, value, integer=False, positive=False):
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if ok and integer:
        ok = float(value).is_integer()
    if ok and positive:
        ok = value > 0
    if not ok:
        raise _fail(name, "must be a%s %s" % (" positive" if positive else "", "integer" if integer else "number"), value)
    return int(value) if integer else float(value)


def _numbers(name, value, integer=False, length=None, allow_scalar=False):
    if allow_scalar and isinstance(value, (int, float)) and not isinstance(value, bool):
        value = [value]
    if not isinstance(value, (list, tuple)) or not value or (length is not None and len(value) != length):
        what = "a list of %s%s" % ("%d " % length if length else "", "positive integers" if integer else "positive numbers")
        raise _fail(name, "must be %s%s" % (what, " (or one number)" if allow_scalar else ""), value)
    try:
        return tuple(_number(name, v, integer=integer, positive=True) for v in value)
    except InputError:
        raise _fail(name, "must be a list of %s" % ("positive integers" if integer else "positive numbers"), value) from None


def _choice(name, value, allowed):
    if value not in allowed:
        raise _fail(name, "must be one of %s" % ", ".join("null" if a is None else str(a) for a in allowed), value)
    return value


@dataclass
class ModelCard:
    """A checked model card (see the module docstring and ``docs/model_card.md``).

    Attributes: the card's fields, normalised (tuples, floats); ``given``: the fields the card sets (the others
    keep the model's own settings); ``source``: the file it came from, if any.
    """

    dims: Optional[int] = None
    input_channels: Optional[int] = None
    channels: Optional[Tuple[str, ...]] = None
    orientation: Optional[str] = None
    spacing: Optional[Tuple[float, ...]] = None
    resize_to: Optional[Tuple[int, ...]] = None
    resize_mode: str = "linear"
    divisible_by: Union[int, str, None] = "auto"
    intensity: Optional[Dict[str, Any]] = None
    output: str = "auto"
    classes: Optional[Dict[int, str]] = None
    patch_size: Optional[Tuple[int, ...]] = None
    slice_axis: str = "axial"
    given: Tuple[str, ...] = ()
    source: Optional[str] = None

    def describe(self) -> dict:
        """The card as JSON data (the fields it sets, and its file), for provenance."""
        out = {}
        for name in self.given:
            value = getattr(self, name)
            if name == "classes":
                value = {str(k): v for k, v in value.items()}
            elif name == "intensity":
                value = {k: list(v) if isinstance(v, tuple) else v for k, v in value.items()}
            elif isinstance(value, tuple):
                value = list(value)
            out[name] = value
        out["source"] = self.source
        return out


def _intensity(value) -> Dict[str, Any]:
    if not isinstance(value, dict):
        raise _fail("intensity", "must be an object with the fields %s" % ", ".join(INTENSITY_FIELDS), value)
    unknown = sorted(set(value) - set(INTENSITY_FIELDS))
    if unknown:
        raise _fail("intensity.%s" % unknown[0], "is not a field of intensity; its fields are %s"
                    % ", ".join(INTENSITY_FIELDS), value[unknown[0]])
    out: Dict[str, Any] = {}
    if value.get("clip_percentiles") is not None:
        clip = value["clip_percentiles"]
        if not (isinstance(clip, (list, tuple)) and len(clip) == 2
                and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in clip)
                and 0 <= clip[0] < clip[1] <= 100):
            raise _fail("intensity.clip_percentiles", "must be [low, high] with 0 <= low < high <= 100", clip)
        out["clip_percentiles"] = (float(clip[0]), float(clip[1]))
    normalize = value.get("normalize")
    if normalize is not None:
        names = [normalize] if isinstance(normalize, str) else normalize
        if not isinstance(names, (list, tuple)) or not all(isinstance(n, str) and n in CARD_NORMALIZATIONS
                                                            for n in names):
            raise _fail("intensity.normalize", "must be a list of names applied in order, each one of %s (or use "
                        "\"ct_window\": [level, width])" % ", ".join(CARD_NORMALIZATIONS), normalize)
        out["normalize"] = tuple(names)
    if value.get("ct_window") is not None:
        window = value["ct_window"]
        if not (isinstance(window, (list, tuple)) and len(window) == 2
                and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in window) and window[1] > 0):
            raise _fail("intensity.ct_window", "must be [level, width] in HU with width > 0", window)
        if out.get("normalize", ("none",)) != ("none",):
            raise _fail("intensity.normalize", "cannot be combined with ct_window (the window scales to [0, 1])",
                        normalize)
        out["ct_window"] = (float(window[0]), float(window[1]))
    for name in ("scale", "shift"):
        if value.get(name) is not None:
            v = value[name]
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise _fail("intensity.%s" % name, "must be a number", v)
            out[name] = float(v)
    return out


def _classes(value) -> Dict[int, str]:
    if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
        return dict(enumerate(value))
    if not isinstance(value, dict):
        raise _fail("classes", "must be an object {\"1\": \"name\", ...} (output channel -> name) or a list of names",
                    value)
    out = {}
    for key, name in value.items():
        try:
            index = int(key)
        except (TypeError, ValueError):
            index = -1
        if index < 0 or not isinstance(name, str) or not name:
            raise _fail("classes", "must map class indices (\"0\", \"1\", ...) to non-empty names", value)
        out[index] = name
    return out


def _channel_names(value) -> Tuple[str, ...]:
    """The ``channels`` field: distinct non-empty names (case-insensitive), one per input channel, in order."""
    if isinstance(value, str):
        value = [value]
    if not (isinstance(value, (list, tuple)) and value and all(isinstance(v, str) and v.strip() and "=" not in v
                                                             for v in value)):
        raise _fail("channels", "must be a list of channel names in the order the model takes them, e.g. "
                    "[\"T1\", \"T1c\", \"T2\", \"FLAIR\"] (non-empty, without '=')", value)
    names = tuple(v.strip() for v in value)
    if len({n.lower() for n in names}) != len(names):
        raise _fail("channels", "must name each channel once (names are compared without case)", list(value))
    return names


def card_from_dict(data: Dict[str, Any], source: Optional[str] = None) -> ModelCard:
    """A checked :class:`ModelCard` from JSON data; one :class:`InputError` naming the first bad field."""
    if not isinstance(data, dict):
        raise InputError("a model card must be a JSON object with the fields %s; got %s"
                         % (", ".join(FIELDS), type(data).__name__))
    unknown = sorted(set(data) - set(FIELDS))
    if unknown:
        raise InputError("model card field %r is unknown; the fields are %s" % (unknown[0], ", ".join(FIELDS)))
    card = ModelCard(given=tuple(name for name in FIELDS if name in data), source=source)
    for name in card.given:
        value = data[name]
        if name == "dims":
            card.dims = _choice(name, value, (2, 3))
        elif name == "input_channels":
            card.input_channels = _number(name, value, integer=True, positive=True)
        elif name == "channels":
            card.channels = None if value is None else _channel_names(value)
        elif name == "orientation":
            if value is not None and value not in CARD_ORIENTATIONS:
                raise _fail(name, "must be null (as stored), RAS, LPS, LAS, RAI or another 3-letter code with one "
                            "of R/L, A/P, S/I per axis", value)
            card.orientation = value
        elif name in ("spacing", "resize_to"):
            card.__dict__[name] = None if value is None else _numbers(name, value, integer=name == "resize_to")
        elif name == "resize_mode":
            card.resize_mode = _choice(name, value, RESIZE_MODES)
        elif name == "divisible_by":
            if value is None or value == "auto":
                card.divisible_by = value
            else:
                try:
                    card.divisible_by = _number(name, value, integer=True, positive=True)
                except InputError:
                    raise _fail(name, "must be a positive integer, \"auto\" or null", value) from None
        elif name == "intensity":
            card.intensity = None if value is None else _intensity(value)
        elif name == "output":
            card.output = _choice(name, value, OUTPUTS[1:] + OUTPUTS[:1])
        elif name == "classes":
            card.classes = None if value is None else _classes(value)
        elif name == "patch_size":
            card.patch_size = None if value is None else _numbers(name, value, integer=True, allow_scalar=True)
        elif name == "slice_axis":
            card.slice_axis = _choice(name, value, SLICE_AXES)
    if card.channels is not None and card.input_channels is not None and len(card.channels) != card.input_channels:
        raise _fail("channels", "must name input_channels (%d) channels, in the order the model takes them"
                    % card.input_channels, list(card.channels))
    if card.dims is not None:
        for name in ("spacing", "resize_to", "patch_size"):
            value = getattr(card, name)
            allowed = (1, card.dims) if name == "patch_size" else (card.dims,)
            if value is not None and len(value) not in allowed:
                raise _fail(name, "must have %d entries (dims is %d)" % (card.dims, card.dims), list(value))
    return card


def load_card(path: str) -> ModelCard:
    """Read and check a card file (JSON)."""
    path = os.fspath(path)
    return card_from_dict(read_card_file(path), source=os.path.abspath(path))


def read_card_file(path: str) -> dict:
    """The JSON object of a card file, unchecked (one clear error for a missing, unreadable or non-JSON file)."""
    if not os.path.isfile(path):
        raise InputError("model card %r does not exist; check the path" % path)
    try:
        with open(path, encoding="utf-8") as handle:
            data = json.load(handle)
    except ValueError as exc:
        raise InputError("model card %r is not valid JSON: %s" % (path, exc)) from exc
    except OSError as exc:
        raise InputError("cannot read the model card %r: %s" % (path, exc)) from exc
    if not isinstance(data, dict):
        raise InputError("model card %r must hold a JSON object, got %s" % (path, type(data).__name__))
    return data


def find_card(spec: str) -> Optional[str]:
    """``<model>.card.json`` next to a model file or folder (``unet.pt`` -> ``unet.card.json``, else
    ``unet.pt.card.json``; ``nets.py:make`` -> ``nets.card.json``), if there is one."""
    try:
        path = os.fspath(spec)
    except TypeError:
        return None
    if not isinstance(path, str) or not path:
        return None
    if not os.path.exists(path) and ":" in path:
        path = path.rsplit(":", 1)[0]
    if not os.path.exists(path):
        return None
    path = path.rstrip("/\\")
    for candidate in (os.path.splitext(path)[0] + CARD_SUFFIX, path + CARD_SUFFIX):
        if os.path.isfile(candidate):
            return candidate
    return None


def as_card(value) -> Optional[ModelCard]:
    """A :class:`ModelCard` from a card, a path or JSON data (``None`` stays ``None``)."""
    if value is None or isinstance(value, ModelCard):
        return value
    if isinstance(value, dict):
        return card_from_dict(value)
    if isinstance(value, (str, os.PathLike)):
        return load_card(value)
    raise InputError("model_card must be a ModelCard, a path to a card file or a dict, got %s" % type(value).__name__)


def card_preprocessing(card: ModelCard, prep: Preprocessing) -> Preprocessing:
    """``prep`` with the card's fields in place of the model's own (the fields the card leaves out are kept)."""
    changes: Dict[str, Any] = {field: getattr(card, field) for field in ("orientation", "spacing", "resize_to",
                                                                       "resize_mode") if field in card.given}
    if "divisible_by" in card.given:
        changes["divisible_by"] = 1 if card.divisible_by is None else card.divisible_by
    if "intensity" in card.given:
        intensity = card.intensity or {}
        names = list(intensity.get("normalize", ("none",)))
        changes.update(channels=None, intensity_range=None, mean_std=None,
                       clip_percentiles=intensity.get("clip_percentiles"),
                       scale=intensity.get("scale", 1.0), shift=intensity.get("shift", 0.0))
        if "ct_window" in intensity:
            level, width = intensity["ct_window"]
            changes.update(normalization="ct", ct_window=(level - width / 2.0, level + width / 2.0), then=())
        else:
            changes.update(normalization=names[0], then=tuple(names[1:]))
    return dataclasses.replace(prep, **changes)


def apply_card(model: SegModel, card: ModelCard) -> SegModel:
    """A copy of ``model`` (same network) that follows ``card``; the card is recorded in ``model.card``."""
    changes: Dict[str, Any] = {"preprocessing": card_preprocessing(card, model.preprocessing),
                               "card": card.describe(), "resolved": dict(model.resolved)}
    changes.update({model_field: getattr(card, field) for field, model_field in
                    (("dims", "spatial_dims"), ("input_channels", "in_channels"), ("output", "output"))
                    if field in card.given})
    if card.channels and "input_channels" not in card.given:  # the names say how many channels there are
        changes["in_channels"] = len(card.channels)
    channels = changes.get("in_channels", model.in_channels)
    if "intensity" in card.given and channels > 1:  # each channel (T1, T2, ...) is scaled on its own
        scheme = changes["preprocessing"]
        changes["preprocessing"] = dataclasses.replace(scheme, channels=(scheme,) * channels)
    if card.classes:
        size = max(max(card.classes) + 1, model.num_classes)
        names = list(model.class_names) + ["class%d" % i for i in range(model.num_classes, size)]
        for index, name in card.classes.items():
            names[index] = name
        changes["class_names"] = names
    if "patch_size" in card.given:
        patch = card.patch_size
        dims = changes.get("spatial_dims", model.spatial_dims)
        changes["roi_size"] = None if patch is None else (patch * dims if len(patch) == 1 else patch)
    return dataclasses.replace(model, **changes)


__all__ = ["CARD_SUFFIX", "FIELDS", "INTENSITY_FIELDS", "ModelCard", "apply_card", "as_card", "card_from_dict",
           "card_preprocessing", "find_card", "load_card"]
