"""The CAM engine: one forward pass, gradients at the chosen layers for every target, combination, heatmaps.

>>> import torch
>>> from torch import nn
>>> from SegHiResCAMLib.engine import explain, SegmentTarget
>>> _ = torch.manual_seed(0)  # a random net may predict no voxel of class 1 (an empty target is an error)
>>> net = nn.Sequential(nn.Conv3d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv3d(4, 2, 1))
>>> x = torch.randn(1, 1, 8, 8, 8)
>>> res = explain(net, x, SegmentTarget(1), layer="1")
>>> res.map.shape, res.raw.shape
(torch.Size([1, 8, 8, 8]), torch.Size([1, 8, 8, 8]))
"""

import math
import time
from dataclasses import dataclass, field
from typing import Callable, List, Optional, Sequence, Union

import torch
from torch import nn

from ..errors import InputError, InternalError, LayerError, ModelError
from .hooks import LayerCapture, model_guard
from .layers import auto_layer
from .methods import DEFAULT_METHOD, CAMMethod, get_method
from .outputs import main_output, run_model
from .postprocess import NORMALIZATIONS, UPSAMPLING, postprocess
from .targets import SegmentTarget

#: ``progress(fraction in [0, 1], message)``; may raise :class:`~SegHiResCAMLib.errors.CancelledError`
ProgressCallback = Callable[[float, str], None]


@dataclass
class CAMResult:
    """One heatmap: a target explained at a layer by a method.

    Attributes:
        target: the explained target.
        layer: the layer's module name.
        method: the method's name.
        raw: signed map on the layer grid, ``[B, *S_layer]``, before ReLU and normalisation (float32, or
            float64 for a float64 model).
        map: heatmap on the input grid, ``[B, *S_input]`` float32, after ReLU/up-sampling/normalisation.
        score: the explained scalar ``y`` per batch element, ``[B]``.
        region: the explained voxels M on the output grid, boolean ``[B, *S_output]``.
        flat: ``[B]`` True where the map is constant (e.g. zero gradient everywhere): nothing to show.
        output: the model's main output (logits, detached), shared by all results of one call.
        options: method and post-processing options, for provenance.
    """

    target: SegmentTarget
    layer: str
    method: str
    raw: torch.Tensor
    map: torch.Tensor
    score: torch.Tensor
    region: torch.Tensor
    flat: torch.Tensor
    output: torch.Tensor
    options: dict = field(default_factory=dict)
    warnings: List[str] = field(default_factory=list)

    def describe(self) -> dict:
        """JSON-friendly provenance (no tensors)."""
        return {"method": self.method, "layer": self.layer, "target": self.target.describe(),
                "score": [float(s) for s in self.score], "region_voxels": [int(torch.count_nonzero(r)) for r in self.region],  # a bool .sum() casts to int64 first
                "flat": [bool(f) for f in self.flat], "layer_grid": list(self.raw.shape[1:]),
                "options": dict(self.options), "warnings": list(self.warnings)}


#: below this |mean G| / mean |G|, Grad-CAM-style channel weights are considered cancelled
MEAN_GRADIENT_WARNING = 1e-4


def gradient_mean_ratio(grad: torch.Tensor) -> float:
    """``sum_k |mean_q G_kq| / sum_k mean_q |G_kq|``: 0 when every channel's gradient averages out."""
    dims = tuple(range(2, grad.ndim))
    denominator = float(grad.abs().mean(dim=dims).sum())
    return 0.0 if denominator == 0 else float(grad.mean(dim=dims).abs().sum()) / denominator


def expected_in_channels(model: nn.Module) -> Optional[int]:
    """Input channels of the first convolution/linear layer, if the model has one."""
    for module in model.modules():
        channels = getattr(module, "in_channels", None)
        if isinstance(channels, int) and isinstance(module, (nn.modules.conv._ConvNd,)):
            return channels
    return None


def check_input(model: nn.Module, x: torch.Tensor) -> None:
    """Fail early, with a remedy, on inputs the model cannot take."""
    if not torch.is_tensor(x):
        raise InputError("the input must be a torch tensor [batch, channels, *spatial], got %s" % type(x).__name__)
    if x.ndim not in (4, 5):
        raise InputError("the input must be [batch, channels, H, W] (2D) or [batch, channels, D, H, W] (3D); got "
                         "shape %s" % (tuple(x.shape),))
    if not x.is_floating_point():
        raise InputError("the input must be floating point, got %s; convert it with x.float()" % x.dtype)
    if min(x.shape) == 0:
        raise InputError("the input has an empty axis: shape %s" % (tuple(x.shape),))
    if not bool(torch.isfinite(x).all()):
        raise InputError("the input holds NaN or infinite values; replace them (e.g. torch.nan_to_num) first")
    channels = expected_in_channels(model)
    if channels is not None and x.shape[1] != channels:
        raise InputError("the model expects %d input channel(s) but the input has %d; give an image with %d "
                         "channel(s)" % (channels, x.shape[1], channels))


def resolve_methods(method, options) -> List[CAMMethod]:
    """One method, or several sharing the same gradients; options go to the methods that take them."""
    names = [method] if isinstance(method, (str, CAMMethod)) else list(method)
    if not names:
        raise InputError("no method given")
    if len(names) == 1:
        return [get_method(names[0], **options)]
    import inspect
    built, used = [], set()
    for name in names:
        cls = type(name) if isinstance(name, CAMMethod) else None
        if cls is None:
            get_method(name)  # validates the name with a clear message
            from .methods import METHODS
            cls = METHODS[name]
        accepted = set(inspect.signature(cls.__init__).parameters) - {"self"}
        mine = {k: v for k, v in options.items() if k in accepted}
        used |= set(mine)
        built.append(name if isinstance(name, CAMMethod) else get_method(name, **mine))
    unused = set(options) - used
    if unused:
        raise InputError("no chosen method takes the option(s) %s" % sorted(unused))
    return built


def cpu_bfloat16() -> bool:
    """Whether this CPU computes bfloat16 natively (AVX512-BF16 or AMX, through oneDNN)."""
    try:
        return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def power_of_two(seed: torch.Tensor) -> float:
    """The power of two nearest below ``max |seed|`` (1 if zero or not finite).

    A backward pass through a float16 graph (``--amp`` on CUDA) is seeded with ``seed / power_of_two(seed)`` and its
    gradients multiplied back in float32: a small seed (a mean over millions of voxels, 1/|M|; confident
    probabilities, p(1-p)) would otherwise underflow float16 (below 6e-8) and give an empty map. Scaling by a power
    of two is exact."""
    top = float(seed.detach().abs().max()) if seed.numel() else 0.0
    if not math.isfinite(top) or top == 0.0:
        return 1.0
    return 2.0 ** math.floor(math.log2(top))


def autocast_context(device: torch.device):
    """The mixed precision of ``--amp``: float16 on CUDA; bfloat16 on a CPU that computes it natively (there it
    roughly halves the time of 3D convolutions; bfloat16 keeps float32's range, so no gradient underflows).
    Maps are always combined and accumulated in float32."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.float16)
    if device.type == "cpu":
        if not cpu_bfloat16():
            raise InputError("mixed precision on the CPU needs native bfloat16 (AVX512-BF16 or AMX), which this CPU "
                             "lacks: it would be slower, not faster; run without --amp")
        return torch.autocast("cpu", dtype=torch.bfloat16)
    raise InputError("mixed precision runs on CUDA or on a CPU with bfloat16; the input is on %s" % device)


class CAMSession:
    """One forward pass whose captured layers and autograd graph are kept, so that every further target on the
    same image, model and layers costs only a backward pass (e.g. a radiologist clicking through segments).

    The graph between the layers and the output is held in memory until :meth:`release` (or the session is
    dropped); :func:`compute_cams` is the one-shot form that releases it after the last target.

    Args:
        model, x, layers, output_key, eval_mode, progress: as in :func:`compute_cams`.
        autocast: run the forward pass under ``torch.autocast`` (:func:`autocast_context`: float16 on CUDA,
            bfloat16 on a CPU with native bfloat16); activations and gradients are combined in float32.
    """

    def __init__(self, model: nn.Module, x: torch.Tensor, layers: Union[str, Sequence[str]] = "auto",
                 output_key: Optional[str] = None, eval_mode: bool = True,
                 progress: Optional[ProgressCallback] = None, autocast: bool = False):
        started = time.perf_counter()
        check_input(model, x)
        self.report = progress or (lambda fraction, message: None)
        names = [layers] if isinstance(layers, str) else list(layers)
        if not names:
            raise LayerError("no layer given: pass a layer name or 'auto'")
        if "auto" in names:
            self.report(0.0, "choosing the layer")
            chosen = auto_layer(model, x, output_key)
            names = [chosen if name == "auto" else name for name in names]
        self.names = list(dict.fromkeys(names))
        self.spatial = tuple(x.shape[2:])
        self.autocast = autocast
        self.report(0.05, "forward pass")
        with torch.inference_mode(False), torch.enable_grad():
            with model_guard(model, eval_mode=eval_mode), LayerCapture(model, self.names) as capture:
                if autocast:
                    with autocast_context(x.device):
                        raw_output = run_model(model, x.detach())
                else:
                    raw_output = run_model(model, x.detach())
        missing = capture.missing()
        if missing:
            raise LayerError("layer(s) %s did not run during the forward pass; choose layers on the path from the "
                             "input to the output" % ", ".join(missing))
        output = main_output(raw_output, output_key)
        if autocast:
            output = output.float()  # targets (softmax, sums over M) in float32
        if output.ndim != x.ndim:
            raise ModelError("the model output has shape %s; a segmentation model returns [batch, classes, "
                             "*spatial] with as many spatial axes as its input %s"
                             % (tuple(output.shape), tuple(x.shape)))
        self.output: Optional[torch.Tensor] = output
        self.activations: Optional[List[torch.Tensor]] = [capture.activations[name] for name in self.names]
        self.forward_seconds = time.perf_counter() - started

    def release(self) -> None:
        """Drop the graph and the captured activations."""
        self.output = None
        self.activations = None

    def explain(self, targets: Sequence[SegmentTarget],
                method: Union[str, CAMMethod, Sequence[Union[str, CAMMethod]]] = DEFAULT_METHOD,
                relu: bool = True, normalization: str = "max", upsampling: str = "linear",
                keep_graph: bool = True, **method_options) -> List[CAMResult]:
        """Maps for ``targets`` (one backward pass each); see :func:`compute_cams` for the arguments.

        ``keep_graph=False`` frees the graph after the last target (the session is then released)."""
        if self.output is None:
            raise InternalError("this CAM session was released; start a new one")
        started = time.perf_counter()
        cam_methods = resolve_methods(method, method_options)
        if normalization not in NORMALIZATIONS:
            raise InputError("normalisation must be one of %s, got %r" % (", ".join(NORMALIZATIONS), normalization))
        if upsampling not in UPSAMPLING:
            raise InputError("upsampling must be one of %s, got %r" % (", ".join(UPSAMPLING), upsampling))
        targets = list(targets)
        if not targets:
            raise InputError("no target given: pass at least one SegmentTarget")
        output, activations = self.output, self.activations
        results: List[CAMResult] = []
        with torch.inference_mode(False), torch.enable_grad():
            for t_index, target in enumerate(targets):
                self.report(0.1 + 0.85 * t_index / len(targets), "gradients for %s" % target.name)
                region = target.region(output)
                score = target(output, region)
                retain = keep_graph or t_index < len(targets) - 1
                if score.requires_grad and self.autocast:  # seed the half-precision graph at a safe scale
                    (seed,) = torch.autograd.grad(score.sum(), output, retain_graph=True)
                    scale = power_of_two(seed)
                    grads = torch.autograd.grad(output, activations, grad_outputs=seed / scale, retain_graph=retain,
                                                allow_unused=True)
                    grads = tuple(None if g is None else g.float() * scale for g in grads)
                elif score.requires_grad:
                    grads = torch.autograd.grad(score.sum(), activations, retain_graph=retain, allow_unused=True)
                else:  # the output does not depend on any captured layer
                    grads = (None,) * len(activations)
                for name, act, grad in zip(self.names, activations, grads):
                    results.extend(self._combine(target, name, act, grad, cam_methods, score, region, relu,
                                                 normalization, upsampling))
        if not keep_graph:
            self.release()
        elapsed = time.perf_counter() - started
        for res in results:
            res.options["seconds"] = elapsed
            res.options["forward_seconds"] = self.forward_seconds
        self.report(1.0, "done")
        return results

    def _combine(self, target, name, act, grad, cam_methods, score, region, relu, normalization, upsampling):
        act = act.detach()
        grad = torch.zeros_like(act) if grad is None else grad.detach()
        dtype = torch.promote_types(act.dtype, torch.float32)  # float64 models keep float64 raw maps
        act, grad = act.to(dtype), grad.to(dtype)
        mean_ratio = gradient_mean_ratio(grad)
        out = []
        for cam_method in cam_methods:
            raw = cam_method.combine(act, grad)
            heat, flat = postprocess(raw, self.spatial, relu=relu, upsampling=upsampling, normalization=normalization)
            res = CAMResult(target=target, layer=name, method=cam_method.name, raw=raw, map=heat,
                            score=score.detach(), region=region, flat=flat, output=self.output.detach(),
                            options=dict(cam_method.options(), relu=relu, normalization=normalization,
                                         upsampling=upsampling, gradient_mean_ratio=mean_ratio))
            if cam_method.uses_mean_gradient and mean_ratio < MEAN_GRADIENT_WARNING:
                res.warnings.append(
                    "the spatial means of the gradients at layer %s cancel (|mean G| / mean |G| = %.1e), so %s's "
                    "channel weights are rounding noise (typical before instance/batch normalisation); use "
                    "seg-hires-grad-cam or another layer" % (name, mean_ratio, cam_method.name))
            out.append(res)
        return out


def compute_cams(model: nn.Module, x: torch.Tensor, targets: Sequence[SegmentTarget],
                 layers: Union[str, Sequence[str]] = "auto",
                 method: Union[str, CAMMethod, Sequence[Union[str, CAMMethod]]] = DEFAULT_METHOD,
                 relu: bool = True, normalization: str = "max", upsampling: str = "linear",
                 output_key: Optional[str] = None, eval_mode: bool = True,
                 progress: Optional[ProgressCallback] = None, autocast: bool = False,
                 **method_options) -> List[CAMResult]:
    """Explain several targets at several layers from a single forward pass.

    Args:
        model: any ``nn.Module`` returning logits ``[B, C, *S]`` (or a tuple/list/dict of them).
        x: input ``[B, C_in, *S]`` with 2 or 3 spatial axes; never modified, never made to require grad.
        targets: :class:`SegmentTarget` objects (see :mod:`.targets`).
        layers: a module name, a list of names, or ``"auto"`` (see :mod:`.layers`).
        method: a name from :data:`~SegHiResCAMLib.engine.methods.METHODS` or a method instance, or a list of
            them: every method then combines the same activations and gradients (no extra backward pass).
        relu: apply ReLU to the raw map before up-sampling (default True, as in the papers).
        normalization: ``max`` (default), ``minmax`` or ``none``.
        upsampling: ``linear`` (bilinear/trilinear, ``align_corners=False``) or ``nearest``.
        output_key: the dict key of the main output, for models that return dicts.
        eval_mode: run the model in eval mode (restored afterwards).
        progress: optional callback ``progress(fraction, message)``.
        autocast: mixed precision for the forward pass (float16 on CUDA, bfloat16 on a CPU that has it; maps are
            combined in float32).
        **method_options: passed to the method, e.g. ``pool_size=2`` for ``seg-xres-cam``.

    Returns:
        One :class:`CAMResult` per (target, layer, method), in that nesting order.

    The model is left exactly as found: hooks removed, ``training`` and ``requires_grad`` flags restored, no
    ``.grad`` filled — also when an exception is raised. Only the part of the network between the layers and
    the output gets an autograd graph (parameters are frozen during the forward pass), and gradients are taken
    with respect to the captured activations only.
    """
    cam_methods = resolve_methods(method, method_options)  # validate before the expensive forward pass
    if normalization not in NORMALIZATIONS:
        raise InputError("normalisation must be one of %s, got %r" % (", ".join(NORMALIZATIONS), normalization))
    if upsampling not in UPSAMPLING:
        raise InputError("upsampling must be one of %s, got %r" % (", ".join(UPSAMPLING), upsampling))
    if not list(targets):
        raise InputError("no target given: pass at least one SegmentTarget")
    session = CAMSession(model, x, layers, output_key=output_key, eval_mode=eval_mode, progress=progress,
                         autocast=autocast)
    return session.explain(targets, cam_methods, relu=relu, normalization=normalization, upsampling=upsampling,
                           keep_graph=False)


def explain(model: nn.Module, x: torch.Tensor, target: Optional[SegmentTarget] = None, layer: str = "auto",
            method: Union[str, CAMMethod] = DEFAULT_METHOD, **kwargs) -> CAMResult:
    """Explain one target at one layer (see :func:`compute_cams` for the arguments).

    ``target`` defaults to the voxels the model predicts as class 1.
    """
    if target is None:
        target = SegmentTarget(1)
    return compute_cams(model, x, [target], [layer], method, **kwargs)[0]
