"""Bounded memory without flags: estimate what a run needs before it starts, and choose windows when it would not fit.

:func:`plan_memory` runs the real computation (the CAM pass of :func:`~.explain.explain_image`, or the forward
pass of :func:`~.explain.predict_image`) once on a small crop of the model input (the *probe*, 32 voxels a side
by default) and counts the bytes of every tensor it allocates (:class:`TensorMemory`: an exact count of live
tensor storage on the CPU, ``torch.cuda.max_memory_allocated`` on a GPU). The peak per input voxel times the
whole input, plus what the command holds besides the network (the image, the model input and output, every
heatmap on the model and the image grid, the label maps), is the *estimate*. When it exceeds the *budget*
(``memory_budget``/``--memory-budget``; default half the available RAM, ``MemAvailable``, or half the free GPU
memory), the run goes through exact sliding-window CAM (:mod:`SegHiResCAMLib.engine.windows`) with the model's
``patch_size`` (the card's default ``roi_size``), or else the largest cube that fits the budget, aligned to the
network's down-sampling. The estimate, the budget and the choice go into the JSON provenance (``"memory"``) and
one line tells the user (:meth:`MemoryPlan.message`).

Measured with the counter here: HD-BET fold 0 needs 2858 bytes per voxel for a forward pass with a full backward
pass (DESIGN.md's 2.9 KB/voxel) and 617 for a gradient-free forward pass, the same at 32^3, 48^3 and 64^3.

>>> parse_memory_budget("4G"), parse_memory_budget("512 MiB"), parse_memory_budget("none")
(4294967296, 536870912, 0)
"""

import math
import re
import weakref
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch.utils._pytree import tree_flatten
from torch.utils._python_dispatch import TorchDispatchMode

from ..engine import SegmentTarget, WholeRegion, compute_cams, main_output
from ..engine.hooks import model_guard, resolve_layer
from ..engine.layers import auto_layer
from ..engine.methods import DEFAULT_METHOD
from ..engine.outputs import available_bytes as engine_available_bytes, run_model
from ..errors import InputError

#: side of the probe crop (model voxels; raised to the network's down-sampling where that is larger)
PROBE_SIDE = 32
#: the smallest window side chosen by itself (model voxels)
MIN_WINDOW = 16
#: bytes per voxel assumed when the probe cannot run (HD-BET's forward + full backward pass: 2.9 KB)
FALLBACK_BYTES_PER_VOXEL = 3000
_UNITS = {"": 1, "b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
BUDGET_HELP = ("memory a run may use, e.g. 4G, 512M, 8GiB; auto (default): half the available RAM (half the free GPU "
               "memory on CUDA); none: never choose windows by themselves")


def parse_memory_budget(value: Union[None, int, float, str]) -> Optional[int]:
    """Bytes of a budget given as a number of bytes or a size (``4G``, ``512 MiB``, ``1.5GB``).

    Returns ``None`` for ``None``/``auto`` (the default budget, :func:`default_budget`) and ``0`` for ``none``/``off``
    (no budget: windows are never chosen automatically). Sizes are binary (``1G`` = ``2**30`` bytes)."""
    if value is None:
        return None
    if isinstance(value, bool):
        raise InputError(_budget_error(value))
    if isinstance(value, (int, float)):
        if not value > 0 or not math.isfinite(value):
            raise InputError(_budget_error(value))
        return int(value)
    text = str(value).strip().lower()
    if text == "auto":
        return None
    if text in ("none", "off", "unlimited"):
        return 0
    match = re.fullmatch(r"([0-9]*\.?[0-9]+)\s*([kmgt]?)(i?b)?", text)
    if not match or (match.group(3) and not match.group(2) and match.group(3) != "b"):
        raise InputError(_budget_error(value))
    number = float(match.group(1)) * _UNITS[match.group(2)]
    if not number >= 1:
        raise InputError(_budget_error(value))
    return int(number)


def _budget_error(value) -> str:
    return ("memory budget must be a positive size such as 4G, 512M or 8GiB (or auto, none), got %r; give it as "
            "--memory-budget 4G (or memory_budget='4G')" % (value,))


def available_bytes(device: torch.device) -> int:
    """Free GPU memory on CUDA; ``MemAvailable`` of ``/proc/meminfo`` (or psutil) on the CPU; 8 GiB if unknown."""
    free = engine_available_bytes(device)
    if free is not None:
        return free
    try:  # pragma: no cover - platforms without /proc
        import psutil
        return int(psutil.virtual_memory().available)
    except Exception:  # noqa: BLE001 - no way to know: assume a laptop's worth
        return 8 << 30


def default_budget(device: torch.device) -> Tuple[int, str]:
    """Half of :func:`available_bytes`, and where it came from (for the provenance)."""
    free = available_bytes(device)
    where = "free GPU memory" if device.type == "cuda" else "available RAM"
    return free // 2, "half the %s (%s)" % (where, format_bytes(free))


def format_bytes(count: float) -> str:
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if abs(count) >= size:
            return "%.1f %s" % (count / size, unit)
    return "%d B" % count


class TensorMemory(TorchDispatchMode):
    """Peak bytes of live tensor storage while the ``with`` block runs (every aten operation is seen, forward and
    backward; storages are counted once, however many views share them, and released when the last tensor that
    holds them is freed). Memory that existed before the block (weights, the input) is not counted.

    On a GPU, ``torch.cuda.max_memory_allocated`` gives the same number with the caching allocator's own rounding;
    :func:`measure_peak` uses it there."""

    def __init__(self):
        super().__init__()
        self.current = 0
        self.peak = 0
        self._storages: Dict[int, List[int]] = {}  # data pointer -> [tensors holding it, bytes]

    def _release(self, key: int) -> None:
        entry = self._storages.get(key)
        if entry is None:
            return
        entry[0] -= 1
        if entry[0] == 0:
            self.current -= entry[1]
            del self._storages[key]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in tree_flatten(out)[0]:
            if not isinstance(tensor, torch.Tensor) or tensor.device.type == "meta":
                continue
            storage = tensor.untyped_storage()
            key = storage.data_ptr()
            if key == 0:
                continue
            entry = self._storages.get(key)
            if entry is None:
                entry = self._storages[key] = [0, storage.nbytes()]
                self.current += entry[1]
                self.peak = max(self.peak, self.current)
            entry[0] += 1
            weakref.finalize(tensor, self._release, key)
        return out


def measure_peak(run: Callable[[], object], device: torch.device) -> int:
    """Peak bytes allocated by ``run()`` (its result is dropped before returning)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        result = run()
        del result
        torch.cuda.synchronize(device)
        return max(0, int(torch.cuda.max_memory_allocated(device)) - before)
    with TensorMemory() as counter:
        result = run()
        del result
    return counter.peak


@dataclass
class MemoryPlan:
    """What :func:`plan_memory` found and chose.

    Attributes:
        estimate_bytes: the whole command on the whole input (network + everything around it).
        budget_bytes: the budget (0: none given, never window).
        budget_source: where the budget came from.
        bytes_per_voxel: the network's peak per model-input voxel, measured on the probe.
        probe_shape: spatial shape of the probe crop (model voxels), or ``None`` where the probe failed.
        roi_size: the windows chosen (model voxels, array order), or ``None``: the whole input at once.
        window_estimate_bytes: the estimate with those windows.
    """

    estimate_bytes: int
    budget_bytes: int
    budget_source: str
    bytes_per_voxel: float
    probe_shape: Optional[Tuple[int, ...]]
    roi_size: Optional[Tuple[int, ...]] = None
    window_estimate_bytes: Optional[int] = None
    notes: List[str] = field(default_factory=list)

    @property
    def windowed(self) -> bool:
        return self.roi_size is not None

    def message(self) -> str:
        """One line for the user (the CLI prints it when windows were chosen)."""
        if not self.windowed:
            return "memory: estimate %s within the budget %s: whole input at once" % (
                format_bytes(self.estimate_bytes), format_bytes(self.budget_bytes) if self.budget_bytes else "(none)")
        return ("memory: estimate %s exceeds the budget %s (%s): running in windows of %s model voxels (about %s); "
                "set --memory-budget or --roi-size to choose" % (
                    format_bytes(self.estimate_bytes), format_bytes(self.budget_bytes), self.budget_source,
                    "x".join(str(r) for r in self.roi_size), format_bytes(self.window_estimate_bytes or 0)))

    def describe(self) -> dict:
        return {"estimate_bytes": int(self.estimate_bytes), "budget_bytes": int(self.budget_bytes),
                "budget_source": self.budget_source, "bytes_per_voxel": round(float(self.bytes_per_voxel), 1),
                "probe_shape": list(self.probe_shape) if self.probe_shape else None,
                "choice": "windows" if self.windowed else "whole input",
                "roi_size": list(self.roi_size) if self.roi_size else None,
                "window_estimate_bytes": self.window_estimate_bytes, "message": self.message(),
                "notes": list(self.notes)}


def _probe_box(spatial: Sequence[int], align: int) -> Tuple[int, ...]:
    side = max(PROBE_SIDE, align) if align > 1 else PROBE_SIDE
    side = int(math.ceil(side / align) * align) if align > 1 else side
    return tuple(min(int(s), side) for s in spatial)


def command_bytes(model_voxels: int, image_voxels: int, bytes_per_voxel: float, maps: int, classes: int,
                  image_itemsize: int = 4, kind: str = "explain") -> int:
    """The estimate of the whole command: the network's peak on the model input, plus what lives beside it.

    Beside the network: the image as read (``image_itemsize`` bytes a voxel), the model input (float32) and the
    model output (``classes`` float32 channels, kept for the label map), the label maps on both grids (one byte),
    and for ``explain`` every heatmap in float32 on the model grid and again on the image grid, plus one float32
    image-grid copy made while resampling back."""
    total = bytes_per_voxel * model_voxels
    total += image_voxels * (image_itemsize + 1) + model_voxels * (4 + 4 * classes + 1)
    if kind == "explain":
        total += maps * 4 * (model_voxels + image_voxels) + 4 * image_voxels
    return int(total)


def _window_bytes(roi_voxels: int, model_voxels: int, image_voxels: int, bytes_per_voxel: float, maps: int,
                  classes: int, image_itemsize: int, kind: str) -> int:
    """With windows the network runs on one window; the blended prediction, its weights and the accumulated maps
    (at most one activation-sized accumulator per map, counted at the input resolution) are whole-input."""
    beside = command_bytes(model_voxels, image_voxels, 0.0, maps, classes, image_itemsize, kind)
    accumulators = model_voxels * (4 * classes + 4 + (4 * maps if kind == "explain" else 0))
    return int(bytes_per_voxel * roi_voxels + beside + accumulators)


def plan_memory(network: torch.nn.Module, x: torch.Tensor, budget: Union[None, int, str] = None,
                kind: str = "explain", layers: Sequence[str] = ("auto",), methods: Sequence[str] = (),
                class_index: int = 1, targets: int = 1, classes: int = 2, image_voxels: Optional[int] = None,
                image_itemsize: int = 4, output_key: Optional[str] = None, align: int = 1,
                patch_size: Optional[Sequence[int]] = None, **method_options) -> MemoryPlan:
    """Estimate the memory of a run on ``x`` ``[1, C, *S]`` and choose windows when it exceeds ``budget``.

    Args:
        network: the model's network (left as found).
        x: the whole model input (on its device).
        budget: bytes or a size (:func:`parse_memory_budget`); ``None``: :func:`default_budget`.
        kind: ``explain`` (a CAM pass: forward, backward to the layers) or ``predict`` (gradient-free forward).
        layers, methods, class_index, targets: what ``explain`` computes (the probe runs exactly that).
        classes: output channels; image_voxels, image_itemsize: the image as read (default: the model input's).
        align: windows are multiples of this (the network's divisibility); the probe also is.
        patch_size: the model's own window (card ``patch_size``), preferred when windows are needed.

    Returns:
        A :class:`MemoryPlan`; ``roi_size`` is ``None`` when the whole input fits (or no budget is set).
    """
    budget_bytes = parse_memory_budget(budget)
    source = "memory_budget=%s" % (budget,)
    if budget_bytes is None:
        budget_bytes, source = default_budget(x.device)
    spatial = tuple(int(s) for s in x.shape[2:])
    model_voxels = int(math.prod(spatial))
    image_voxels = model_voxels if image_voxels is None else int(image_voxels)
    align = max(1, int(align))
    probe = _probe_box(spatial, align)
    crop = x[(slice(None), slice(None)) + tuple(slice(0, p) for p in probe)].detach()
    notes: List[str] = []
    names = list(layers)
    maps = max(1, targets * len(names) * max(1, len(methods)))
    try:
        if kind == "predict":
            def run():
                with model_guard(network, freeze_parameters=False), torch.no_grad():
                    return main_output(run_model(network, crop), output_key)
        else:
            names = [auto_layer(network, crop, output_key) if n == "auto" else n for n in names]
            align = _layer_alignment(network, crop, names, align)
            target = SegmentTarget(class_index, WholeRegion())

            def run():
                return compute_cams(network, crop, [target] * max(1, targets), names, list(methods) or DEFAULT_METHOD,
                                    output_key=output_key, **method_options)
        peak = measure_peak(run, x.device)
        bytes_per_voxel = peak / float(math.prod(probe))
    except Exception as exc:  # noqa: BLE001 - the probe is advisory: the run itself reports real errors
        bytes_per_voxel = float(FALLBACK_BYTES_PER_VOXEL)
        notes.append("the probe on %s voxels failed (%s): assumed %d bytes per voxel"
                     % ("x".join(map(str, probe)), str(exc).splitlines()[0][:120] if str(exc) else type(exc).__name__,
                        FALLBACK_BYTES_PER_VOXEL))
        probe = None
    estimate = command_bytes(model_voxels, image_voxels, bytes_per_voxel, maps, classes, image_itemsize, kind)
    plan = MemoryPlan(estimate, budget_bytes, source, bytes_per_voxel, probe, notes=notes)
    if not budget_bytes or estimate <= budget_bytes:
        return plan
    args = (model_voxels, image_voxels, bytes_per_voxel, maps, classes, image_itemsize, kind)
    if patch_size is not None:
        roi = tuple(min(int(p), s) for p, s in zip(patch_size, spatial))
    else:
        roi = _largest_window(spatial, align, budget_bytes, args)
    if roi == spatial:
        plan.notes.append("no window smaller than the input fits the budget either: running on the whole input")
        return plan
    plan.roi_size = roi
    plan.window_estimate_bytes = _window_bytes(int(math.prod(roi)), *args)
    if plan.window_estimate_bytes > budget_bytes:
        plan.notes.append("even the smallest window (%s) is estimated above the budget" % "x".join(map(str, roi)))
    return plan


def _layer_alignment(network, crop, names, align: int) -> int:
    """``align`` times the down-sampling of the explained layers (window sizes must be multiples of both)."""
    shapes = {}
    handles = []
    try:
        for name in names:
            def record(module, inputs, output, name=name):
                if torch.is_tensor(output):
                    shapes[name] = tuple(output.shape[2:])
            handles.append(resolve_layer(network, name).register_forward_hook(record))
        with model_guard(network, freeze_parameters=False), torch.no_grad():
            run_model(network, crop)
    finally:
        for handle in handles:
            handle.remove()
    for shape in shapes.values():
        for size, layer in zip(crop.shape[2:], shape):
            if layer >= 1 and size % layer == 0:
                factor = size // layer
                align = align * factor // math.gcd(align, factor)
    return align


def _largest_window(spatial: Tuple[int, ...], align: int, budget: int, args) -> Tuple[int, ...]:
    """The largest cube (cut to the input) whose windowed estimate fits ``budget``; at least
    :data:`MIN_WINDOW` voxels a side (rounded up to ``align``): smaller windows would cost more in overlap than
    they save."""
    side = int(math.ceil(max(MIN_WINDOW, align) / align) * align)
    best = tuple(min(side, s) for s in spatial)
    while side < max(spatial):
        side += align
        roi = tuple(min(side, s) for s in spatial)
        if roi == spatial or _window_bytes(int(math.prod(roi)), *args) > budget:
            break
        best = roi
    return best


def plan_model_run(model, x: torch.Tensor, image, budget, kind: str = "explain", layers: Sequence[str] = ("auto",),
                   methods: Union[str, Sequence[str]] = (), targets: int = 1, class_index: int = 1,
                   **method_options) -> MemoryPlan:
    """:func:`plan_memory` for a :class:`~SegHiResCAMLib.models.base.SegModel` on ``image`` (its input ``x``)."""
    divisible = model.preprocessing.divisible_by
    methods = [methods] if isinstance(methods, str) else list(methods)
    return plan_memory(model.network, x, budget, kind=kind, layers=layers, methods=methods, class_index=class_index,
                       targets=targets, classes=max(1, int(model.num_classes)), image_voxels=int(image.size),
                       image_itemsize=int(image.dtype.itemsize), output_key=model.output_key,
                       align=divisible if isinstance(divisible, int) else 1, patch_size=model.roi_size,
                       **method_options)


def windowed_prediction(network: torch.nn.Module, x: torch.Tensor, roi_size: Sequence[int],
                        output_key: Optional[str] = None, overlap: float = 0.25) -> torch.Tensor:
    """The model output on ``x`` ``[1, C, *S]`` blended from overlapping windows (what
    :class:`~SegHiResCAMLib.engine.windows.WindowedCAM` computes as its pass 1), cut back to ``S``."""
    from ..engine.windows import WindowedCAM
    first = x[(slice(None), slice(None)) + tuple(slice(0, r) for r in roi_size)]
    layer = auto_layer(network, first, output_key)
    blended = WindowedCAM(network, x, tuple(roi_size), [layer], overlap=overlap, output_key=output_key).prediction()
    return blended[(slice(None), slice(None)) + tuple(slice(0, s) for s in x.shape[2:])]


__all__ = ["BUDGET_HELP", "FALLBACK_BYTES_PER_VOXEL", "MIN_WINDOW", "MemoryPlan", "PROBE_SIDE", "TensorMemory",
           "available_bytes", "command_bytes", "default_budget", "format_bytes", "measure_peak", "parse_memory_budget",
           "plan_memory", "plan_model_run", "windowed_prediction"]
