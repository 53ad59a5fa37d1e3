"""Capturing layer activations for gradient computation, leaving the model exactly as found.

Two context managers do all the hooking in SegHiResCAM:

- :func:`model_guard` switches the model to eval mode and stops parameters from requiring gradients for the
  duration of one forward pass, and restores both in ``finally`` (also when the forward raises). Freezing the
  parameters means autograd records nothing *before* the explained layer, so memory is spent only on the part
  of the network between the layer and the output (this is what makes a CAM on a full 3D U-Net affordable).
- :class:`LayerCapture` registers forward hooks on the chosen layers and removes every handle in ``finally``.

Why the hook hands a *copy* downstream: the captured activation ``A`` must keep the values the layer produced.
A later ``ReLU(inplace=True)`` (common in U-Nets) would otherwise overwrite ``A`` in place, or make autograd
fail. The hook keeps ``A`` (a leaf that requires grad, or the original tensor when an earlier captured layer
already put it in the graph) and returns ``A.clone()``, whose gradient equals the gradient with respect to
``A``. The values seen downstream are bit-identical to an unhooked forward.
"""

import contextlib
from typing import Dict, Iterator, List, Sequence

import torch
from torch import nn

from ..errors import LayerError, close_matches


def named_layers(model: nn.Module) -> Dict[str, nn.Module]:
    """All sub-modules of ``model`` by their dotted name (the root itself excluded)."""
    return {name: module for name, module in model.named_modules() if name}


def resolve_layer(model: nn.Module, name: str) -> nn.Module:
    """Return the sub-module called ``name``; a clear :class:`LayerError` listing close names otherwise."""
    layers = named_layers(model)
    if name in layers:
        return layers[name]
    hints = close_matches(name, layers)
    hint = (" (did you mean %s?)" % ", ".join(hints)) if hints else ""
    some = ", ".join(list(layers)[:12]) + (", ..." if len(layers) > 12 else "")
    raise LayerError(
        "unknown layer %r%s; valid layers: %s (run `seghirescam layers` for the full list)" % (name, hint, some)
    )


@contextlib.contextmanager
def model_guard(model: nn.Module, eval_mode: bool = True, freeze_parameters: bool = True) -> Iterator[None]:
    """Temporarily put ``model`` in eval mode and stop its parameters from requiring gradients.

    Every module's ``training`` flag and every parameter's ``requires_grad`` flag is restored in ``finally``.
    ``.grad`` is never touched (gradients are taken with :func:`torch.autograd.grad`).
    """
    training = [(module, module.training) for module in model.modules()]
    requires = [(param, param.requires_grad) for param in model.parameters()]
    try:
        if eval_mode:
            model.eval()
        if freeze_parameters:
            for param, _ in requires:
                param.requires_grad_(False)
        yield
    finally:
        for param, flag in requires:
            param.requires_grad_(flag)
        for module, flag in training:
            module.training = flag


class LayerCapture:
    """Forward hooks that capture the activations of named layers during exactly one forward pass.

    Use as a context manager; handles are removed on exit, whatever happened::

        with model_guard(model), LayerCapture(model, ["decoder.block3"]) as cap:
            out = model(x)
        grads = torch.autograd.grad(score, [cap.activations["decoder.block3"]])

    Args:
        model: the network.
        names: dotted module names (see :func:`named_layers`).

    Raises:
        LayerError: unknown name; a layer whose output is not a tensor; a layer that runs more than once in
            one forward pass (a shared module such as a re-used ``ReLU``: its activation is ambiguous).
    """

    def __init__(self, model: nn.Module, names: Sequence[str]):
        self.names: List[str] = list(dict.fromkeys(names))
        self.modules = {name: resolve_layer(model, name) for name in self.names}
        self.activations: Dict[str, torch.Tensor] = {}
        self.calls: Dict[str, int] = {name: 0 for name in self.names}
        self._handles: List[torch.utils.hooks.RemovableHandle] = []

    def _make_hook(self, name: str):
        def hook(module, inputs, output):
            self.calls[name] += 1
            if self.calls[name] > 1:
                raise LayerError(
                    "layer %r runs more than once in one forward pass (a shared module); "
                    "choose a layer that is used once, e.g. its parent block" % name
                )
            if not torch.is_tensor(output) or output.ndim < 3:
                kind = type(output).__name__ if not torch.is_tensor(output) else "%d-D tensor" % output.ndim
                raise LayerError(
                    "layer %r returns a %s; explainable layers return a [batch, channels, *spatial] tensor"
                    % (name, kind)
                )
            if not output.is_floating_point():
                raise LayerError("layer %r returns a non-floating-point tensor" % name)
            act = output if output.requires_grad else output.detach().requires_grad_(True)
            self.activations[name] = act
            return act.clone()

        return hook

    def __enter__(self) -> "LayerCapture":
        try:
            for name in self.names:
                self._handles.append(self.modules[name].register_forward_hook(self._make_hook(name)))
        except BaseException:
            self.release()
            raise
        return self

    def release(self) -> None:
        """Remove every hook this capture registered (idempotent)."""
        while self._handles:
            self._handles.pop().remove()

    def __exit__(self, *exc) -> None:
        self.release()

    def missing(self) -> List[str]:
        """Names of requested layers that did not run during the forward pass."""
        return [name for name in self.names if name not in self.activations]


def count_hooks(model: nn.Module) -> int:
    """Number of forward/backward hooks registered on ``model`` and its sub-modules (for hygiene checks)."""
    total = 0
    for module in model.modules():
        for attr in ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks",
                     "_forward_hooks_with_kwargs", "_forward_pre_hooks_with_kwargs"):
            hooks = getattr(module, attr, None)
            if hooks and attr.endswith("with_kwargs"):
                continue  # bookkeeping dicts keyed like _forward_hooks; counted there
            total += len(hooks) if hooks else 0
    return total
