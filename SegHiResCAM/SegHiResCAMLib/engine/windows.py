"""Exact sliding-window CAM for inputs larger than what fits through the network at once.

As in sliding-window inference, the volume is covered by overlapping windows of ``roi_size``, each window's
output is weighted by an importance map (constant or Gaussian) and the weighted outputs are blended into one
prediction ``Y = sum_p w_p y_p / sum_p w_p``. The explained scalar is the target evaluated on that *blended*
prediction, so its gradient with respect to window ``p``'s output is ``(w_p / sum w) * dS/dY`` — each window
is run forward and backward with exactly its share of the target's gradient (pass 2), after a gradient-free
pass that builds ``Y`` and the region M (pass 1, independent of the target, reused by :class:`WindowedCAM`).

Accumulation on the full layer grid (windows start on multiples of the layer's down-sampling factor):

- element-wise methods (``seg-hires-grad-cam``, ``layer-cam``): the per-window maps ``sum_k f(G_pk) A_pk`` are
  summed — one channel of memory;
- the other methods need global channel statistics: the importance-blended activations
  ``A = sum_p w_p A_p / sum_p w_p`` and the summed gradients ``G = sum_p G_p`` are accumulated (K channels of
  memory on the layer grid) and combined once at the end.

Only the work a target needs: a window whose share of ``dS/dY`` is zero everywhere (the region M lies outside it,
e.g. a clicked voxel on a whole CT) adds exactly nothing to any gradient, so it is not run; ``A`` does not depend
on the target, so where a Grad-CAM-style method needs it, it is accumulated once (windows outside M run forward
without a graph) and kept for every later target. ``CAMResult.options["windows_run"]`` says how many windows
ran forward and backward.

Both are exact where it can be checked: with one window the maps equal the whole-volume maps, and for a head
that is linear in the layer, the Seg-HiRes raw map is ``1[M] (Y^c - b_c)`` of the blended prediction
(docs/algorithms.md). Memory is bounded by the window (plus the accumulators), not by the network on the volume.
"""

import itertools
import math
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from .. import catalog
from ..errors import InputError, LayerError
from .cam import (CAMResult, resolve_methods, autocast_context, check_input, gradient_mean_ratio, MEAN_GRADIENT_WARNING,
                  power_of_two)
from .hooks import LayerCapture, model_guard, resolve_layer
from .methods import DEFAULT_METHOD, CAMMethod
from .outputs import main_output, run_model
from .postprocess import postprocess
from .targets import SegmentTarget, output_slabs

BLENDS = catalog.BLENDS


def importance_map(roi: Sequence[int], mode: str = "constant", sigma_scale: float = 0.125,
                   device=None, dtype=torch.float32) -> torch.Tensor:
    """Window weights ``[*roi]``: ones, or a separable Gaussian (sigma = ``sigma_scale * roi``) scaled to max 1
    and clamped away from 0 so that every voxel keeps a positive weight."""
    if mode not in BLENDS:
        raise InputError("blend mode must be one of %s, got %r" % (", ".join(BLENDS), mode))
    if mode == "constant":
        return torch.ones(tuple(roi), device=device, dtype=dtype)
    weights = None
    for size in roi:
        centre = (size - 1) / 2.0
        sigma = max(sigma_scale * size, 1e-3)
        axis = torch.exp(-0.5 * ((torch.arange(size, dtype=torch.float64) - centre) / sigma) ** 2)
        weights = axis if weights is None else weights[..., None] * axis
    weights = weights / weights.max()
    return weights.clamp_min(1e-3).to(device=device, dtype=dtype)


def window_starts(size: int, roi: int, overlap: float, align: int = 1) -> List[int]:
    """Start indices covering ``[0, size)`` with windows of ``roi`` overlapping by ``overlap`` (fraction),
    every start a multiple of ``align`` (``size - roi`` must then be one too)."""
    if roi >= size:
        return [0]
    step = max(align, int(roi * (1.0 - overlap)) // align * align)
    starts = list(range(0, size - roi + 1, step))
    if starts[-1] != size - roi:
        starts.append(size - roi)
    return starts


class WindowedCAM:
    """Sliding-window CAMs of one image; pass 1 (the blended prediction) is computed once and reused by every
    target explained afterwards.

    Args:
        model: the network (left exactly as found).
        x: input ``[B, C, *S]``.
        roi_size: window size (one int or one per spatial axis); windows never exceed the (padded) input.
        layers: the explained layers (fixed per instance: window starts are aligned to their down-sampling).
        overlap: fraction of overlap between neighbouring windows, in [0, 1).
        blend: ``constant`` or ``gaussian`` importance.
        output_key: dict key of the main output.
        progress: ``progress(fraction, message)``; may raise ``CancelledError`` between windows.
        importance: window weights ``[*roi]`` instead of ``blend``'s (e.g. nnU-Net's Gaussian).
        autocast: run windows under ``torch.autocast`` (:func:`.cam.autocast_context`: float16 on CUDA, bfloat16 on
            a CPU that has it); maps are accumulated in float32.
    """

    def __init__(self, model: nn.Module, x: torch.Tensor, roi_size: Union[int, Sequence[int]],
                 layers: Sequence[str], overlap: float = 0.25, blend: str = "constant",
                 output_key: Optional[str] = None, progress: Optional[Callable[[float, str], None]] = None,
                 autocast: bool = False, importance: Optional[torch.Tensor] = None):
        check_input(model, x)
        nd = x.ndim - 2
        roi = (roi_size,) * nd if isinstance(roi_size, int) else tuple(int(r) for r in roi_size)
        if len(roi) != nd or any(r < 1 for r in roi):
            raise InputError("roi size %s must give one positive size per spatial axis (%d)" % (roi_size, nd))
        if not 0.0 <= overlap < 1.0:
            raise InputError("overlap must be in [0, 1), got %r" % (overlap,))
        self.layers = [layers] if isinstance(layers, str) else list(layers)
        if not self.layers or "auto" in self.layers:
            raise LayerError("pass layer names to the windowed CAM (resolve 'auto' on one window first)")
        if autocast:
            autocast_context(x.device)  # a clear error now where mixed precision cannot run
        self.model, self.output_key, self.blend, self.autocast = model, output_key, blend, autocast
        self.overlap = overlap
        self.report = progress or (lambda f, m: None)
        self.spatial = tuple(x.shape[2:])
        self.roi = tuple(min(r, s) for r, s in zip(roi, self.spatial))
        self.x_input = x.detach()
        self.weights = importance_map(self.roi, blend, device=x.device)
        if importance is not None:  # a framework's own window weights (nnU-Net's Gaussian: engine/sliding.py)
            if tuple(importance.shape) != self.roi:
                raise InputError("importance map of shape %s for windows of %s" % (tuple(importance.shape), self.roi))
            self.weights = importance.to(device=x.device, dtype=torch.float32)
        self._prediction: Optional[torch.Tensor] = None
        self.windows: List[Tuple[int, ...]] = []
        self._layer_shapes: Dict[str, Tuple[int, ...]] = {}  # [K, *S_layer] of one window, per layer
        #: per layer, the importance-blended activations ``(sum_p w_p A_p, sum_p w_p)`` on the layer grid: they do
        #: not depend on the target, so they are accumulated once and reused by every later target
        self._blended: Dict[str, Tuple[torch.Tensor, torch.Tensor]] = {}
        self.windows_run = 0  #: windows run forward and backward by the last :meth:`explain`

    def _layout(self, align: Tuple[int, ...]) -> None:
        """Pad (at the end) so that window starts can be multiples of every layer's down-sampling ``align``."""
        padded = []
        for size, r, a in zip(self.spatial, self.roi, align):
            padded.append(r if size <= r else r + int(math.ceil((size - r) / a) * a))
        pad = []
        for size, p in zip(reversed(self.spatial), reversed(padded)):
            pad += [0, p - size]
        self.x = F.pad(self.x_input, pad) if any(pad) else self.x_input
        self.padded = tuple(padded)
        self.windows = [tuple(s) for s in itertools.product(*[
            window_starts(p, r, self.overlap, a) for p, r, a in zip(self.padded, self.roi, align)])]

    def _layer_scales(self) -> Tuple[int, ...]:
        """Down-sampling factor of the chosen layers on one window (one gradient-free forward pass)."""
        shapes = {}
        handles = []
        modules = {name: resolve_layer(self.model, name) for name in self.layers}
        try:
            for name, module in modules.items():
                handles.append(module.register_forward_hook(
                    lambda m, i, o, name=name: shapes.__setitem__(name, tuple(o.shape[1:])) if torch.is_tensor(o) else None))
            window = self.x_input[(slice(None), slice(None)) + tuple(slice(0, r) for r in self.roi)]
            with model_guard(self.model, freeze_parameters=False), torch.no_grad():
                self._forward(window)
        finally:
            for handle in handles:
                handle.remove()
        align = [1] * len(self.roi)
        for name in self.layers:
            if name not in shapes or len(shapes[name]) != len(self.roi) + 1:
                raise LayerError("layer %r did not run or does not return a [batch, channels, *spatial] tensor" % name)
            self._layer_shapes[name] = shapes[name]
            for axis, (r, l) in enumerate(zip(self.roi, shapes[name][1:])):
                if l < 1 or r % l:
                    raise LayerError("layer %r maps a window of %s to a grid of %s, not an integer down-sampling; "
                                     "choose a window size that is a multiple of the network's down-sampling"
                                     % (name, self.roi, shapes[name][1:]))
                align[axis] = align[axis] * (r // l) // math.gcd(align[axis], r // l)
        return tuple(align)

    def _slices(self, start: Tuple[int, ...]) -> Tuple[slice, ...]:
        return (slice(None), slice(None)) + tuple(slice(s, s + r) for s, r in zip(start, self.roi))

    def _forward(self, window: torch.Tensor):
        if self.autocast:
            with autocast_context(window.device):
                return main_output(run_model(self.model, window), self.output_key)
        return main_output(run_model(self.model, window), self.output_key)

    def prediction(self) -> torch.Tensor:
        """Pass 1: the blended logits ``[B, C, *S_padded]`` (float32, cached)."""
        if self._prediction is None:
            self._layout(self._layer_scales())
            total, norm = None, torch.zeros(self.padded, device=self.x.device)
            with model_guard(self.model, freeze_parameters=False), torch.no_grad():
                for i, start in enumerate(self.windows):
                    self.report(0.3 * i / len(self.windows), "prediction, window %d/%d" % (i + 1, len(self.windows)))
                    out = self._forward(self.x[self._slices(start)]).float()
                    if tuple(out.shape[2:]) != self.roi:
                        raise InputError("windowed CAM needs an output on the input grid; the model maps a %s "
                                         "window to %s" % (self.roi, tuple(out.shape[2:])))
                    if total is None:
                        total = torch.zeros((out.shape[0], out.shape[1]) + self.padded, device=self.x.device)
                    total[self._slices(start)] += out * self.weights
                    norm[self._slices(start)[2:]] += self.weights
            self._prediction = total.div_(norm)  # in place: a second copy of a CT's logits would not fit
            self._norm = norm
        return self._prediction

    def explain(self, targets: Sequence[SegmentTarget],
                method: Union[str, CAMMethod, Sequence] = DEFAULT_METHOD, relu: bool = True,
                normalization: str = "max", upsampling: str = "linear", **method_options) -> List[CAMResult]:
        """Pass 2 for ``targets`` (target-major, then layer, then method, like :func:`compute_cams`)."""
        cam_methods = resolve_methods(method, method_options)
        layers = self.layers
        Y = self.prediction()
        crop = (slice(None),) + tuple(slice(0, s) for s in self.spatial)
        regions, full_regions, scores = [], [], []
        for target in targets:
            region = target.region(Y[(slice(None),) + crop])
            full_region = torch.zeros((Y.shape[0],) + self.padded, dtype=torch.bool, device=Y.device)
            full_region[crop] = region
            regions.append(region)
            full_regions.append(full_region)
            scores.append(self._score(target, Y, full_region))
        # Windows where every target's share of dS/dY is zero contribute exactly nothing to a gradient: they are
        # not run at all, unless a Grad-CAM-style method still needs their activations for the blended A (then
        # once, without a graph: A does not depend on the target and is kept for later targets).
        need_blend = any(not m.elementwise for m in cam_methods)
        build = {name: self._new_blend(name, Y.shape[0], Y.device) for name in layers
                 if need_blend and name not in self._blended}
        acc = {(t_index, name): self._new_state(name, Y.shape[0], Y.device, cam_methods, need_blend)
               for t_index in range(len(targets)) for name in layers}
        self.windows_run = 0
        with model_guard(self.model), torch.inference_mode(False), torch.enable_grad():
            for i, start in enumerate(self.windows):
                self.report(0.3 + 0.65 * i / len(self.windows), "gradients, window %d/%d" % (i + 1, len(self.windows)))
                shares = [self._share(target, Y, full_regions[t_index], start) for t_index, target in enumerate(targets)]
                live = [t_index for t_index, share in enumerate(shares) if bool(torch.any(share != 0))]
                if not live and not build:
                    continue
                window = self.x[self._slices(start)]
                with torch.set_grad_enabled(bool(live)), LayerCapture(self.model, layers) as capture:
                    out = self._forward(window)
                acts = [capture.activations[name] for name in layers]
                for name, act in zip(layers, acts):
                    if name in build:
                        self._blend_add(build[name], name, start, act.detach().float())
                if not live:
                    continue
                self.windows_run += 1
                for n, t_index in enumerate(live):
                    share = shares[t_index]
                    scale = power_of_two(share) if self.autocast else 1.0  # no float16 underflow (cam.py)
                    grads = torch.autograd.grad(out, acts, grad_outputs=(share / scale).to(out.dtype),
                                                retain_graph=n < len(live) - 1, allow_unused=True)
                    for name, act, grad in zip(layers, acts, grads):
                        act = act.detach().float()
                        grad = torch.zeros_like(act) if grad is None else grad.detach().float() * scale
                        self._accumulate(acc[(t_index, name)], name, start, act, grad, cam_methods)
        self._blended.update(build)
        results = []
        for t_index, target in enumerate(targets):
            for name in layers:
                state = acc[(t_index, name)]
                mean_ratio = gradient_mean_ratio(state["G"]) if "G" in state else float("nan")
                for cam_method in cam_methods:
                    if cam_method.elementwise:
                        raw = state["maps"][cam_method.name]
                    else:
                        A, W = self._blended[name]
                        raw = cam_method.combine(A / W.clamp_min(1e-12), state["G"])
                    raw = raw[(slice(None),) + tuple(slice(0, int(math.ceil(s / f)))
                                                     for s, f in zip(self.spatial, self._grid(name)[0]))]
                    heat, flat = postprocess(raw, self.spatial, relu=relu, upsampling=upsampling,
                                             normalization=normalization)
                    res = CAMResult(target=target, layer=name, method=cam_method.name, raw=raw, map=heat,
                                    score=scores[t_index], region=regions[t_index], flat=flat,
                                    output=self._prediction[(slice(None),) + crop],
                                    options=dict(cam_method.options(), relu=relu, normalization=normalization,
                                                 upsampling=upsampling, windows=len(self.windows),
                                                 windows_run=self.windows_run, roi_size=list(self.roi),
                                                 blend=self.blend,
                                                 gradient_mean_ratio=mean_ratio))
                    if cam_method.uses_mean_gradient and mean_ratio < MEAN_GRADIENT_WARNING:
                        res.warnings.append("the spatial means of the gradients at layer %s cancel; %s's channel "
                                            "weights are rounding noise" % (name, cam_method.name))
                    results.append(res)
        self.report(1.0, "done")
        return results

    def _score(self, target: SegmentTarget, Y: torch.Tensor, full_region: torch.Tensor) -> torch.Tensor:
        """The explained scalar on the blended prediction ``[B]``, summed slab by slab (no autograd)."""
        with torch.no_grad():
            total = sum(target.region_sum(Y[:, :, part], full_region[:, part]) for part in output_slabs(Y))
            if target.reduction == "mean":
                total = total / target.region_size(full_region).to(total.dtype)
        return total

    def _share(self, target: SegmentTarget, Y: torch.Tensor, full_region: torch.Tensor, start) -> torch.Tensor:
        """Window ``start``'s share of ``dS/dY``: ``w_p dS/dY / sum w`` on the window.

        ``S`` is a sum of per-voxel terms (divided by ``|M|`` for ``reduction="mean"``), so ``dS/dY`` on the window
        is the gradient of the same sum over the window alone: the gradient is never held for the whole volume
        (on a CT that would be as large as the blended prediction itself)."""
        where = self._slices(start)
        Yw = Y[where].detach().requires_grad_(True)
        with torch.enable_grad():
            (gY,) = torch.autograd.grad(target.region_sum(Yw, full_region[(slice(None),) + where[2:]]).sum(), Yw)
        if target.reduction == "mean":
            gY = gY / target.region_size(full_region).to(gY.dtype).view((-1,) + (1,) * (gY.ndim - 1))
        return gY * (self.weights / self._norm[where[2:]])

    def _grid(self, name: str) -> Tuple[Tuple[int, ...], Tuple[int, ...]]:
        """Layer ``name``'s down-sampling factors and its grid over the padded input."""
        layer_roi = self._layer_shapes[name][1:]
        scale = tuple(r // l for r, l in zip(self.roi, layer_roi))
        return scale, tuple(p // f for p, f in zip(self.padded, scale))

    def _new_state(self, name: str, batch: int, device, cam_methods, need_blend: bool) -> dict:
        """Zeroed accumulators of one (target, layer): element-wise maps, and the summed gradients ``G``."""
        _, grid = self._grid(name)
        state = {"maps": {m.name: torch.zeros((batch,) + grid, device=device)
                          for m in cam_methods if m.elementwise}}
        if need_blend:
            state["G"] = torch.zeros((batch, self._layer_shapes[name][0]) + grid, device=device)
        return state

    def _new_blend(self, name: str, batch: int, device) -> Tuple[torch.Tensor, torch.Tensor]:
        _, grid = self._grid(name)
        return (torch.zeros((batch, self._layer_shapes[name][0]) + grid, device=device),
                torch.zeros(grid, device=device))

    def _where(self, name: str, start) -> Tuple[slice, ...]:
        """The slices of layer ``name``'s grid that window ``start`` covers."""
        scale, _ = self._grid(name)
        layer_roi = self._layer_shapes[name][1:]
        if any(st % f for st, f in zip(start, scale)):
            raise LayerError("the layer grid %s does not tile the window %s at start %s; use windows and an "
                             "input size that are multiples of the layer's down-sampling" % (layer_roi, self.roi, start))
        return (slice(None), slice(None)) + tuple(slice(st // f, st // f + n) for st, f, n in zip(start, scale, layer_roi))

    def _blend_add(self, blend: Tuple[torch.Tensor, torch.Tensor], name: str, start, act: torch.Tensor) -> None:
        """Add window ``start``'s importance-weighted activation to the blended ``(sum w A, sum w)``."""
        where = self._where(name, start)
        layer_roi = tuple(act.shape[2:])
        w = self.weights
        if tuple(w.shape) != layer_roi:  # window weights on the layer grid: mean over each layer voxel
            w = F.adaptive_avg_pool3d(w[None, None], layer_roi)[0, 0] if w.ndim == 3 else \
                F.adaptive_avg_pool2d(w[None, None], layer_roi)[0, 0]
        blend[0][where] += act * w
        blend[1][where[2:]] += w

    def _accumulate(self, state: dict, name: str, start, act, grad, cam_methods) -> None:
        where = self._where(name, start)
        for m in cam_methods:
            if m.elementwise:
                state["maps"][m.name][(slice(None),) + where[2:]] += m.combine(act, grad)
        if "G" in state:
            state["G"][where] += grad


def windowed_cams(model: nn.Module, x: torch.Tensor, targets: Sequence[SegmentTarget], layers: Sequence[str],
                  roi_size: Union[int, Sequence[int]], method=DEFAULT_METHOD, overlap: float = 0.25,
                  blend: str = "constant", output_key: Optional[str] = None, progress=None, **kwargs) -> List[CAMResult]:
    """One-call form of :class:`WindowedCAM` (see there)."""
    cam = WindowedCAM(model, x, roi_size, layers, overlap=overlap, blend=blend, output_key=output_key,
                      progress=progress)
    return cam.explain(targets, method, **kwargs)
