"""Loading models: every kind of model file becomes a :class:`~.base.SegModel` (eager network + metadata).

``load_model(spec, ...)`` dispatches on the spec (see DESIGN.md "Contracts"):

- ``package.module:factory`` or ``file.py:factory`` with ``weights=`` a state dict;
- further kinds (``hd-bet``, TorchScript/ONNX files, MONAI bundles, nnU-Net folders) register in ``LOADERS``.
"""

from typing import Callable, List, Optional, Tuple

from ..errors import ModelError
from .base import Preprocessing, SegModel
from .factory import is_factory_spec, load_factory_model

#: (name, accepts(spec) -> bool, load(spec, **options) -> SegModel), tried in order
LOADERS: List[Tuple[str, Callable[[str], bool], Callable[..., SegModel]]] = []


def register_loader(name: str, accepts: Callable[[str], bool], load: Callable[..., SegModel]) -> None:
    """Add a model kind (used by the model modules themselves)."""
    LOADERS.append((name, accepts, load))


def load_model(spec: str, weights: Optional[str] = None, trust_model: bool = False, **options) -> SegModel:
    """Load a model from a spec string; see the module docstring for the accepted kinds."""
    if not spec:
        raise ModelError("no model given; pass a model spec (e.g. package.module:factory --weights FILE)")
    for _, accepts, load in LOADERS:
        if accepts(spec):
            return load(spec, weights=weights, trust_model=trust_model, **options)
    if is_factory_spec(spec):
        return load_factory_model(spec, weights=weights, trust_model=trust_model, **options)
    kinds = ", ".join([name for name, _, _ in LOADERS] + ["package.module:factory --weights FILE"])
    raise ModelError("unknown model %r; give one of: %s" % (spec, kinds))


# model kinds register themselves on import (after LOADERS exists)
from . import hdbet, monai_models, nnunet, torchscript  # noqa: E402,F401

__all__ = ["Preprocessing", "SegModel", "load_model", "register_loader", "LOADERS"]
