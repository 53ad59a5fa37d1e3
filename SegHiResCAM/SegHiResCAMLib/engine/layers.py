"""Which layers a model has, their output shapes, and the ``auto`` layer.

``auto`` (documented in the README): the last layer that finishes *before the segmentation head* and whose
output lies on the model output's grid — the penultimate, full-resolution decoder features of an
encoder-decoder network. If no layer before the head has the output's resolution, the last spatial layer
before the head is used. The head is the first layer whose output tensor *is* the model's main output.
Layers that run more than once per forward pass (shared modules) and containers of the head are never chosen.
Models can override this with a known-good default (e.g. the bundled HD-BET model).
"""

import weakref
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import nn

from ..errors import LayerError
from .hooks import model_guard, named_layers
from .outputs import main_output, run_model


@dataclass
class LayerInfo:
    """One sub-module seen during a forward pass."""

    name: str
    kind: str
    shape: Optional[Tuple[int, ...]]  # output shape, None if the output is not a tensor
    calls: int
    order: int  # completion order in the forward pass (-1: did not run)

    @property
    def explainable(self) -> bool:
        """A single-use layer whose output is ``[B, K, *spatial]`` with 1 to 3 spatial axes."""
        return self.calls == 1 and self.shape is not None and 3 <= len(self.shape) <= 5


_AUTO_CACHE: "weakref.WeakKeyDictionary[nn.Module, Dict[Any, str]]" = weakref.WeakKeyDictionary()


def trace_layers(model: nn.Module, x: torch.Tensor,
                 output_key: Optional[str] = None) -> Tuple[List[LayerInfo], Optional[str], Tuple[int, ...]]:
    """Run one gradient-free forward pass and record every sub-module's output shape and call count.

    Returns:
        ``(layers, head, output_shape)``: the layers in definition order, the name of the head layer (or
        ``None``), and the shape of the model's main output.
    """
    layers = named_layers(model)
    seen: Dict[str, dict] = {name: {"calls": 0, "shape": None, "order": -1, "ptr": None, "ref": None}
                             for name in layers}
    counter = [0]
    handles = []

    def make_hook(name):
        def hook(module, inputs, output):
            rec = seen[name]
            rec["calls"] += 1
            rec["order"] = counter[0]
            counter[0] += 1
            if torch.is_tensor(output):
                rec["shape"] = tuple(output.shape)
                rec["ptr"] = (output.data_ptr(), tuple(output.shape))
                rec["ref"] = weakref.ref(output)
        return hook

    try:
        for name, module in layers.items():
            handles.append(module.register_forward_hook(make_hook(name)))
        with model_guard(model), torch.no_grad():
            raw = run_model(model, x.detach())
    finally:
        for handle in handles:
            handle.remove()
    out = main_output(raw, output_key)
    target = (out.data_ptr(), tuple(out.shape))
    finished = sorted((rec["order"], name) for name, rec in seen.items() if rec["order"] >= 0)
    # a freed intermediate of the output's shape may have left its address to the output: a match whose tensor
    # is still alive comes first; a dead one only when none is alive (the output is a view of the head's tensor)
    matches = [name for _, name in finished if seen[name]["ptr"] == target]
    alive = [name for name in matches if seen[name]["ref"] is not None and seen[name]["ref"]() is not None]
    head = (alive or matches or [None])[0]
    infos = [LayerInfo(name, type(module).__name__, seen[name]["shape"], seen[name]["calls"], seen[name]["order"])
             for name, module in layers.items()]
    return infos, head, tuple(out.shape)


def choose_auto_layer(infos: List[LayerInfo], head: Optional[str], output_shape: Tuple[int, ...]) -> str:
    """Apply the ``auto`` rule (module docstring) to a trace."""
    by_name = {info.name: info for info in infos}
    limit = by_name[head].order if head else max((i.order for i in infos), default=-1) + 1
    candidates = [
        info for info in infos
        if info.explainable and info.order < limit and len(info.shape) == len(output_shape)
        and not (head and (head == info.name or head.startswith(info.name + ".")))
    ]
    if not candidates:
        raise LayerError("no explainable layer found before the segmentation head; pass a layer name "
                         "(see `seghirescam layers`)")
    spatial = tuple(output_shape[2:])
    full = [info for info in candidates if tuple(info.shape[2:]) == spatial]
    pool = full or candidates
    return max(pool, key=lambda info: info.order).name


def auto_layer(model: nn.Module, x: torch.Tensor, output_key: Optional[str] = None) -> str:
    """The ``auto`` layer for ``model`` on inputs shaped like ``x`` (cached per model and input shape)."""
    key = (tuple(x.shape[1:]), output_key)
    cache = _AUTO_CACHE.setdefault(model, {})
    if key not in cache:
        infos, head, out_shape = trace_layers(model, x, output_key)
        cache[key] = choose_auto_layer(infos, head, out_shape)
    return cache[key]
