"""The table of model kinds: which loader takes which spec, tried in order.

Every kind is listed here, explicitly: nothing registers itself by being imported. Adding a kind is one module
with an ``accepts(spec) -> bool`` and a ``load(spec, weights=..., trust_model=..., **options) -> SegModel``,
and one row below.

Example:
    >>> from SegHiResCAMLib.models.registry import kind_names
    >>> kind_names()[:2]
    ['hd-bet', 'monai-network']
"""

from typing import Callable, List, NamedTuple, Optional

from ..errors import ModelError
from . import factory, hdbet
from .base import SegModel
from .card import apply_card, as_card, find_card
from .monai import bundle as monai_bundle
from .monai import networks as monai_networks
from .nnunet import loader as nnunet
from .nnunet import totalseg
from .torchscript import loader as torchscript
from .weights import zero_subnormal_parameters


class ModelKind(NamedTuple):
    """One row of :data:`KINDS`: a name for messages, a cheap test on the spec, and the loader."""

    name: str
    accepts: Callable[[str], bool]
    load: Callable[..., SegModel]


#: every model kind, tried in this order; the factory spec (``package.module:factory``) comes last because a
#: MONAI name (``monai:UNet``) has the same shape
KINDS: List[ModelKind] = [
    ModelKind("hd-bet", hdbet.accepts, hdbet.load),
    ModelKind("monai-network", monai_networks.accepts, monai_networks.load_monai_network),
    ModelKind("monai-bundle", monai_bundle.is_monai_bundle, monai_bundle.load_monai_bundle),
    ModelKind("nnunet", nnunet.is_nnunet_folder, nnunet.load_nnunet),
    ModelKind("totalsegmentator", totalseg.accepts, totalseg.load),
    ModelKind("torchscript", torchscript.accepts_torchscript_spec, torchscript.load_torchscript),
    ModelKind("onnx", torchscript.is_onnx_file, torchscript.load_onnx),
    ModelKind("factory", factory.is_factory_spec, factory.load_factory_model),
]


#: kinds whose loaders build a network that returns logits (HD-BET's softmax is switched off, nnU-Net and MONAI
#: bundles apply their activation in post-processing): their ``output`` is ``logits``, not probed (a card may say
#: otherwise)
LOGIT_KINDS = ("hd-bet", "monai-bundle", "nnunet", "totalsegmentator")


def kind_names() -> List[str]:
    """The names of the model kinds, in the order they are tried."""
    return [kind.name for kind in KINDS]


def load_model(spec: str, weights: Optional[str] = None, trust_model: bool = False, model_card=None,
               **options) -> SegModel:
    """Load a model from a spec string with the first kind of :data:`KINDS` that accepts it.

    Args:
        spec: ``hd-bet``, a TorchScript/ONNX file, a MONAI bundle folder or ``monai:Name``, an nnU-Net v2
            trained-model folder, ``totalseg:TASK`` (installed TotalSegmentator weights), or ``package.module:factory`` / ``file.py:factory``.
        weights: a state-dict file for the kinds that take one.
        trust_model: allow files that can run code (pickled objects, MONAI ``$`` expressions).
        model_card: a :class:`~.card.ModelCard`, a card file or its JSON data (``docs/model_card.md``); ``None``
            uses ``<model>.card.json`` next to the model file when there is one (:func:`~.card.find_card`);
            ``False``: no card.
        options: kind-specific options (``fold``, ``configuration``, ``model_args``, ``structure``, ...).

    Returns:
        a :class:`~.base.SegModel`; its subnormal weights are zero (:func:`~.weights.zero_subnormal_parameters`;
        how many is ``model.resolved["subnormal_parameters_zeroed"]``, in every result's provenance).
    """
    if not spec:
        raise ModelError("no model given; pass a model spec (e.g. package.module:factory --weights FILE)")
    if model_card is None:
        model_card = find_card(spec)
    card = as_card(model_card) if model_card is not False else None  # checked before the (slow) load
    for kind in KINDS:
        if kind.accepts(spec):
            model = kind.load(spec, weights=weights, trust_model=trust_model, **options)
            if kind.name in LOGIT_KINDS and model.output == "auto":
                model.output = "logits"
            zeroed = zero_subnormal_parameters(model.network)  # same outputs, much faster on many CPUs
            if zeroed:
                model.resolved["subnormal_parameters_zeroed"] = zeroed
            return apply_card(model, card) if card is not None else model
    hint = ", ".join(kind_names()[:-1] + ["package.module:factory --weights FILE"])
    raise ModelError("unknown model %r; give one of: %s" % (spec, hint))
