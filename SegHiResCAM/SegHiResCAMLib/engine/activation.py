"""Final sigmoid/softmax heads: find them, and explain the logits before them (``output: auto``).

Many published networks end in ``nn.Sigmoid``, ``nn.Softmax`` or a functional ``torch.sigmoid``/``softmax``.
The engine treats the main output as logits; probabilities taken for logits make the predicted region the
whole image (``sigmoid(p) > 0.5`` for every ``p >= 0``) and a threshold target sees ``sigmoid(sigmoid(z))``.

:func:`detect_final_activation` runs the network once (no gradients) and looks at *what produced the output
tensor*: forward hooks on every module (the innermost module whose output is the output tensor: ``Sigmoid`` /
``Softmax`` modules, including the eager proxies of TorchScript modules, which keep the class names) and a
``TorchFunctionMode`` that sees every ``sigmoid``/``softmax`` call (``torch.sigmoid``, ``F.softmax``,
``Tensor.softmax``, and the ``torch.ops.aten`` calls the TorchScript proxy replays). When nothing names the
output, the values decide: in [0, 1] and summing to 1 over the channels (softmax), or in [0, 1] (sigmoid; a
guess, reported as such).

:func:`install_output_hooks` then changes what the network returns, permanently and in place (hooks that
survive ``copy.deepcopy``):

- ``bypass``: the network returns the final op's *input*, the pre-activation logits (a forward hook on the
  module that returns its input; for a functional op, a mode that swaps the op's result for its input);
- ``probabilities``: the final op cannot be bypassed (it is inside an opaque module, or only the values told):
  the probabilities are turned back into scores whose sigmoid/softmax is the probabilities again (log-odds,
  log p), and the targets must use ``score="probabilities"``.

Example:
    >>> import torch
    >>> from torch import nn
    >>> net = nn.Sequential(nn.Conv3d(1, 1, 1), nn.Sigmoid())
    >>> found = detect_final_activation(net, torch.randn(1, 1, 4, 4, 4))
    >>> found.kind, found.evidence, found.bypass
    ('sigmoid', 'module', True)
    >>> _ = install_output_hooks(net, found)
    >>> x = torch.randn(1, 1, 4, 4, 4)
    >>> torch.equal(net(x), net[0](x))   # the network now returns the logits of its last convolution
    True
"""

import functools
import weakref
from dataclasses import asdict, dataclass
from typing import Any, List, Optional

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from .outputs import main_output, run_model

#: what a model's main output may be
OUTPUT_KINDS = ("logits", "sigmoid", "softmax")
#: module class names that produce logits for sure (the last layer of a segmentation head)
_LOGIT_MODULES = ("Conv1d", "Conv2d", "Conv3d", "ConvTranspose1d", "ConvTranspose2d", "ConvTranspose3d", "Linear")
#: attribute of the network where the installed hooks are recorded (deep-copied with it)
MARK = "_seghirescam_output"


@dataclass
class FinalActivation:
    """What the network's main output is.

    Attributes:
        kind: ``logits``, ``sigmoid`` or ``softmax``.
        evidence: ``module`` (a Sigmoid/Softmax module made it), ``function`` (a sigmoid/softmax call made it),
            ``graph`` (the TorchScript graph of an opaque module ends in one: see
            ``models/torchscript/proxy.graph_final_activation``), ``values`` (its values look like
            probabilities), ``declared`` (the user said so) or ``none``.
        where: the module name or function that made it, for messages.
        bypass: the pre-activation logits can be explained instead of the probabilities.
        channels: the output's channel count (0: unknown); a functional bypass only holds on to the inputs of
            the calls whose result has as many channels (not to every sigmoid of an attention gate).
    """

    kind: str = "logits"
    evidence: str = "none"
    where: str = ""
    bypass: bool = False
    channels: int = 0

    @property
    def explained(self) -> str:
        """``logits`` or ``probabilities``: what the explained score is computed from."""
        return "logits" if self.kind == "logits" or self.bypass else "probabilities"

    def message(self) -> Optional[str]:
        """The one line a user reads, or ``None`` for a plain logits model."""
        if self.kind == "logits":
            return None
        source = {"module": "its module %r" % self.where, "function": "a call of %s" % self.where,
                  "graph": "%s of the opaque module" % self.where,
                  "values": "its output values (%s)" % self.where, "declared": "the model card"}.get(self.evidence, "")
        if self.bypass:
            return ("the model ends in a %s (found from %s); explaining the logits before it, the region is %s"
                    % (self.kind, source, "p > 0.5" if self.kind == "sigmoid" else "the arg-max"))
        return ("the model outputs %s probabilities (found from %s) and the %s cannot be bypassed; explaining the "
                "probabilities (--score probabilities), the region is %s"
                % (self.kind, source, self.kind, "p > 0.5" if self.kind == "sigmoid" else "the arg-max"))

    def describe(self) -> dict:
        info = asdict(self)
        info["explained"] = self.explained
        return info


def _op_kind(func) -> Optional[str]:
    """``sigmoid``/``softmax`` for the torch functions, tensor methods and aten overloads that compute them."""
    name = getattr(func, "__name__", "") or ""
    base = name.split(".")[0].lstrip("_")
    if base in ("sigmoid", "expit"):
        return "sigmoid"
    if base == "softmax":
        return "softmax"
    return None


def _op_name(func) -> str:
    """``torch.sigmoid``, ``Tensor.softmax``, ``torch.nn.functional.softmax``, ``aten.sigmoid.default``..."""
    name = getattr(func, "__name__", "") or str(func)
    qual = getattr(func, "__qualname__", "") or ""
    if qual.startswith("_VariableFunctionsClass."):
        return "torch." + name
    if qual.split(".")[0] in ("TensorBase", "Tensor"):
        return "Tensor." + name
    module = getattr(func, "__module__", None)
    if module and not module.startswith("torch._ops") and "." not in name:
        return "%s.%s" % (module, name)
    return str(func)


def _module_kind(module: nn.Module) -> Optional[str]:
    name = type(module).__name__
    if name == "Sigmoid":
        return "sigmoid"
    if "Softmax" in name and "Log" not in name:
        return "softmax"
    return None


class _ActivationCalls(TorchFunctionMode):
    """Records the sigmoid/softmax calls of a forward pass: ``(kind, function name, result, input)``.

    ``keep``: hold strong references to the results and inputs (the bypass needs them until the forward ends);
    otherwise weak references to the results only (detection)."""

    def __init__(self, kinds=("sigmoid", "softmax"), keep: bool = False, channels: int = 0):
        super().__init__()
        self.kinds, self.keep, self.channels, self.calls = tuple(kinds), keep, channels, []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        kind = _op_kind(func)
        if kind in self.kinds and torch.is_tensor(out) and args and torch.is_tensor(args[0]) and (
                not self.channels or (out.ndim > 1 and out.shape[1] == self.channels)):
            name = _op_name(func)
            if self.keep:
                self.calls.append((kind, name, out, args[0]))
            else:
                self.calls.append((kind, name, weakref.ref(out), None))
        return out


def _sums_to_one(output: torch.Tensor) -> bool:
    return output.shape[1] >= 2 and bool(((output.sum(dim=1) - 1).abs() <= 1e-3).all())


def _in_unit_interval(output: torch.Tensor) -> bool:
    return bool(torch.isfinite(output).all()) and float(output.min()) >= -1e-6 and float(output.max()) <= 1 + 1e-6


def detect_final_activation(network: nn.Module, x: torch.Tensor, output_key: Optional[str] = None) -> FinalActivation:
    """What produces the main output of ``network`` on ``x`` (one forward pass without gradients; any input
    the network accepts will do, a small crop is enough). See the module docstring."""
    producers: List[tuple] = []

    def record(name, module, args, output):
        if torch.is_tensor(output):
            producers.append((name, module, weakref.ref(output)))

    handles = [module.register_forward_hook(functools.partial(record, name))
               for name, module in network.named_modules() if name]
    calls = _ActivationCalls()
    was_training = network.training
    network.eval()
    try:
        with torch.no_grad(), calls:
            raw = run_model(network, x)
    finally:
        for handle in handles:
            handle.remove()
        network.train(was_training)
    final = main_output(raw, output_key)
    innermost = next(((name, module) for name, module, ref in producers if ref() is final), None)
    function = next(((kind, name) for kind, name, ref, _ in reversed(calls.calls) if ref() is final), None)
    output = final.detach().float()
    found = None
    channels = int(output.shape[1]) if output.ndim > 1 else 0
    if innermost is not None and _module_kind(innermost[1]):
        found = FinalActivation(_module_kind(innermost[1]), "module", innermost[0], bypass=True, channels=channels)
    elif function is not None:
        found = FinalActivation(function[0], "function", function[1], bypass=True, channels=channels)
    if found is not None:
        if found.kind == "softmax" and not _sums_to_one(output):  # a softmax over another axis: not a head
            return FinalActivation("logits", "none", found.where)
        return found
    if innermost is not None and type(innermost[1]).__name__ in _LOGIT_MODULES:
        return FinalActivation("logits", "module", innermost[0])
    if _in_unit_interval(output):
        if _sums_to_one(output):
            return FinalActivation("softmax", "values", "in [0, 1], summing to 1 over the channels")
        if not bool((output == output.flatten()[0]).all()):
            return FinalActivation("sigmoid", "values", "all in [0, 1]: a guess; declare --card-output to be sure")
    return FinalActivation("logits", "none", innermost[0] if innermost else "")


# ------------------------------------------------------------------------------------------- hooks
def _return_input(module, args, output):
    """Forward hook: the module's input instead of its output (the logits before a final activation)."""
    return args[0]


def _swap(value, calls):
    if torch.is_tensor(value):
        for _, _, result, source in reversed(calls):
            if result is value:
                return source
        return value
    if isinstance(value, tuple):
        return tuple(_swap(v, calls) for v in value)
    if isinstance(value, list):
        return [_swap(v, calls) for v in value]
    if isinstance(value, dict):
        return {k: _swap(v, calls) for k, v in value.items()}
    return value


def _enter_calls(kind, channels, module, args):
    mode = _ActivationCalls((kind,), keep=True, channels=channels)
    mode.__enter__()
    module.__dict__.setdefault("_seghirescam_calls", []).append(mode)


def _exit_calls(module, args, output):
    mode = module.__dict__["_seghirescam_calls"].pop()
    mode.__exit__(None, None, None)
    calls, mode.calls = mode.calls, []
    return _swap(output, calls)


def _as_scores(kind, module, args, output):
    """Forward hook: probabilities back to scores whose sigmoid/softmax they are (log-odds, log p)."""
    def convert(value):
        if not torch.is_tensor(value) or not value.is_floating_point():
            return value
        if kind == "sigmoid":
            p = value.clamp(1e-7, 1 - 1e-7)
            return torch.log(p) - torch.log1p(-p)
        return torch.log(value.clamp_min(1e-30))
    if isinstance(output, (tuple, list)):
        return type(output)(convert(v) for v in output)
    if isinstance(output, dict):
        return {k: convert(v) for k, v in output.items()}
    return convert(output)


def install_output_hooks(network: nn.Module, found: FinalActivation) -> List[Any]:
    """Make ``network`` return logits (or scores, see the module docstring) for ``found``; once per network
    (a second call returns ``[]``). Returns the hook handles."""
    if found.kind == "logits" or MARK in network.__dict__:
        return []
    network.__dict__[MARK] = found.describe()
    if found.bypass and found.evidence == "module":
        return [network.get_submodule(found.where).register_forward_hook(_return_input)]
    if found.bypass and found.evidence == "function":
        return [network.register_forward_pre_hook(functools.partial(_enter_calls, found.kind, found.channels)),
                network.register_forward_hook(_exit_calls, always_call=True)]
    return [network.register_forward_hook(functools.partial(_as_scores, found.kind))]


def installed(network: nn.Module) -> Optional[dict]:
    """The description of the hooks :func:`install_output_hooks` put on ``network``, if any."""
    return network.__dict__.get(MARK)
