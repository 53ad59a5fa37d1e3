"""The ``auto`` settings of a model, resolved before its first run: ``divisible_by`` and ``output``.

- :func:`resolve_divisible_by`: the smallest multiple (1, 2, 4, ... 64) the network accepts, from a cheap probe:
  an input of ``3 k`` voxels per axis (an odd multiple of ``k``, so that a network needing ``2 k`` fails) that
  must come back with its own spatial size.
- :func:`resolve_output`: whether the network ends in a sigmoid/softmax
  (:func:`SegHiResCAMLib.engine.activation.detect_final_activation`), and then hooks that make it return the
  logits before it, or scores for its probabilities (:func:`~SegHiResCAMLib.engine.activation.install_output_hooks`).

Both record what they found in ``model.resolved`` (provenance) and are done once per model.
"""

import dataclasses
import math
from typing import Optional

import torch

from ..engine.activation import FinalActivation, detect_final_activation, install_output_hooks, installed
from ..engine.hooks import model_guard
from ..engine.outputs import main_output, run_model
from ..errors import ModelError
from .base import SegModel
from .torchscript.proxy import ScriptProxy, graph_final_activation

#: the multiples :func:`probe_divisible_by` tries, in order
DIVISORS = (1, 2, 4, 8, 16, 32, 64)
#: the edge of the crop of the real input that :func:`resolve_output` probes
PROBE_EDGE = 32


def _probe_runs(model: SegModel, shape) -> bool:
    param = next(model.network.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
    generator = torch.Generator().manual_seed(0)
    x = torch.randn((1, model.in_channels) + tuple(shape), generator=generator).to(device=device, dtype=dtype)
    try:
        with model_guard(model.network, freeze_parameters=False), torch.no_grad():
            out = main_output(run_model(model.network, x), model.output_key)
    except ModelError:
        return False
    return tuple(out.shape[2:]) == tuple(shape)


def probe_divisible_by(model: SegModel) -> Optional[int]:
    """The smallest of :data:`DIVISORS` whose probe runs (``None`` when none does: the model may need a
    minimum size, or change the size of its input)."""
    minimum = model.preprocessing.min_size or (1,) * model.spatial_dims
    for k in DIVISORS:
        shape = tuple(max(3 * k, int(math.ceil(m / k)) * k) for m in minimum)
        if _probe_runs(model, shape):
            return k
    return None


def resolve_divisible_by(model: SegModel) -> int:
    """Replace ``divisible_by="auto"`` in ``model.preprocessing`` by the probed multiple (1 where no probe
    runs: the model then gets its input as it is, and a failure says why)."""
    prep = model.preprocessing
    if prep.divisible_by != "auto":
        return prep.divisible_by
    found = probe_divisible_by(model)
    model.preprocessing = dataclasses.replace(prep, divisible_by=found or 1)
    model.resolved["divisible_by"] = {"declared": "auto", "probed": found, "used": found or 1}
    return found or 1


def _probe_crop(x: torch.Tensor, model: SegModel) -> torch.Tensor:
    k = model.preprocessing.divisible_by if isinstance(model.preprocessing.divisible_by, int) else 1
    minimum = model.preprocessing.min_size or (1,) * (x.ndim - 2)
    edge = tuple(max(int(math.ceil(PROBE_EDGE / k)) * k, int(m)) for m in minimum)
    return x[(slice(None), slice(None)) + tuple(slice(0, min(s, e)) for s, e in zip(x.shape[2:], edge))]


def _opaque_script_activation(network) -> Optional[FinalActivation]:
    """A sigmoid/softmax at the end of the TorchScript graph of an opaque proxy (its inside runs as one call:
    no hook sees the op, and it cannot be bypassed)."""
    if not isinstance(network, ScriptProxy) or network._ts_mode not in ("opaque", "leaf"):
        return None
    found = graph_final_activation(network._ts_script)
    if found is None:
        return None
    return FinalActivation(found[0], "graph", "%s at the end of the TorchScript graph" % found[1], bypass=False)


def resolve_output(model: SegModel, x: torch.Tensor) -> FinalActivation:
    """What ``model.network`` returns on inputs like ``x`` (its model-space input), and the hooks that make it
    return logits when it ends in a sigmoid/softmax (see the module docstring). ``model.activation`` becomes the
    detected activation. Done once per network: later calls return the first answer."""
    done = installed(model.network)
    if done is not None:
        found = FinalActivation(**{f.name: done[f.name] for f in dataclasses.fields(FinalActivation)})
    elif "output" in model.resolved:
        info = model.resolved["output"]
        found = FinalActivation(**{f.name: info[f.name] for f in dataclasses.fields(FinalActivation)})
    elif model.output == "logits":
        found = FinalActivation("logits", "declared")
    else:
        crop = _probe_crop(x, model)
        try:
            found = detect_final_activation(model.network, crop, model.output_key)
        except ModelError:
            if crop.shape == x.shape:
                raise
            found = detect_final_activation(model.network, x, model.output_key)
        if found.evidence in ("values", "none"):
            found = _opaque_script_activation(model.network) or found
        if model.output != "auto" and found.kind != model.output:
            found = FinalActivation(model.output, "declared", "", bypass=False)
        install_output_hooks(model.network, found)
    if found.kind in ("sigmoid", "softmax"):
        model.activation = found.kind
    model.resolved["output"] = dict(found.describe(), declared=model.output, message=found.message())
    return found
