"""Models given as ``package.module:factory`` (or ``path/to/file.py:factory``) plus a state-dict file."""

import importlib
import importlib.util
import json
import os
import sys
from typing import Any, Dict, Optional

from torch import nn

from ..errors import ModelError
from .base import Preprocessing, SegModel, default_class_names, infer_in_channels, infer_out_channels, infer_spatial_dims
from .weights import extract_state_dict, load_checkpoint, load_state_dict_into, maybe_hash


def is_factory_spec(spec: str) -> bool:
    """``a.b:make`` or ``file.py:make`` (and not a Windows drive such as ``C:\\...``)."""
    if ":" not in spec:
        return False
    left, right = spec.rsplit(":", 1)
    return bool(left) and right.isidentifier() and not (len(left) == 1 and left.isalpha())


def _import_module(left: str):
    if left.endswith(".py"):
        if not os.path.isfile(left):
            raise ModelError("model file %r does not exist" % left)
        name = "_seghirescam_user_model_%d" % abs(hash(os.path.abspath(left)))
        spec = importlib.util.spec_from_file_location(name, left)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        try:
            spec.loader.exec_module(module)
        except Exception as exc:  # noqa: BLE001 - any failure in user code
            sys.modules.pop(name, None)
            raise ModelError("importing %r failed: %s" % (left, exc)) from exc
        return module
    try:
        return importlib.import_module(left)
    except ImportError as exc:
        raise ModelError("cannot import module %r for the model factory: %s; is the package installed, or is "
                         "the folder that holds it on PYTHONPATH?" % (left, exc)) from exc


def load_factory_model(spec: str, weights: Optional[str] = None, model_args: Optional[Dict[str, Any]] = None,
                       trust_model: bool = False, name: Optional[str] = None, **meta) -> SegModel:
    """Build ``factory(**model_args)`` and load ``weights`` (a state dict, read with ``weights_only=True``).

    Args:
        spec: ``package.module:factory`` or ``path/to/file.py:factory``.
        weights: state-dict file; ``None`` keeps the factory's initialisation (random weights: useful only for
            tests, and recorded as such in the provenance).
        model_args: keyword arguments for the factory (``--model-args '{"classes": 3}'`` on the command line).
        trust_model: allow weight files that hold pickled objects.
        name: model id for provenance; defaults to the spec.
        **meta: :class:`SegModel` fields (``activation``, ``class_names``, ``preprocessing``, ``default_layer``...).
    """
    if not is_factory_spec(spec):
        raise ModelError("model spec %r is not of the form package.module:factory" % spec)
    left, attr = spec.rsplit(":", 1)
    module = _import_module(left)
    factory = getattr(module, attr, None)
    if factory is None or not callable(factory):
        raise ModelError("%r has no callable %r" % (left, attr))
    if isinstance(model_args, str):
        try:
            model_args = json.loads(model_args)
        except ValueError as exc:
            raise ModelError("model arguments must be a JSON object, got %r" % model_args) from exc
    try:
        network = factory(**(model_args or {}))
    except Exception as exc:  # noqa: BLE001 - any failure in user code
        raise ModelError("the factory %s failed: %s" % (spec, exc)) from exc
    if not isinstance(network, nn.Module):
        raise ModelError("the factory %s returned a %s, not a torch.nn.Module" % (spec, type(network).__name__))
    if weights:
        load_state_dict_into(network, extract_state_dict(load_checkpoint(weights, trust_model), weights), weights)
    network.eval()
    classes = infer_out_channels(network) or 2
    activation = meta.pop("activation", "sigmoid" if classes == 1 else "softmax")
    class_names = meta.pop("class_names", ["background", "foreground"] if classes == 1 else default_class_names(classes))
    return SegModel(
        network=network, name=name or spec, spatial_dims=meta.pop("spatial_dims", infer_spatial_dims(network) or 3),
        in_channels=meta.pop("in_channels", infer_in_channels(network) or 1), activation=activation,
        class_names=class_names, preprocessing=meta.pop("preprocessing", Preprocessing(divisible_by="auto")),
        source="factory %s%s" % (spec, " + %s" % weights if weights else " (no weights: random initialisation)"),
        file_hashes=maybe_hash(weights), **meta)
