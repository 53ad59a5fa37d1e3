"""Loading models: every kind of model file becomes a :class:`~.base.SegModel` (eager network + metadata).

``load_model(spec, ...)`` tries the kinds of :data:`.registry.KINDS` in order (see the README's model list):
``hd-bet``, ``monai:Name``, a MONAI bundle folder, an nnU-Net v2 folder, a TorchScript or ONNX file, and
``package.module:factory`` / ``file.py:factory`` with ``weights=`` a state dict.
"""

from .base import Preprocessing, SegModel
from .registry import KINDS, ModelKind, kind_names, load_model

__all__ = ["Preprocessing", "SegModel", "load_model", "KINDS", "ModelKind", "kind_names"]
