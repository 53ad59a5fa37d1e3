"""ProtoSeg: segmentation-ability (SA) maps and scores of a layer and of each of its units (channels).

He S, Feng Y, Grant PE, Ou Y. *Segmentation ability map: Interpret deep features for medical image segmentation.*
Medical Image Analysis 84:102726, 2023 (arXiv 2212.09206; reference code shengfly/ProtoSeg). docs/algorithms.md,
"ProtoSeg and the Segmentation-Ability (SA) score", is the specification. Shapes are N-D: ``[B, K, *S]``.

- Features ``F`` of a layer (or the input image) are resized to the *guide grid* (the model output's grid) with
  ``F.interpolate(mode="linear"|"bilinear"|"trilinear", align_corners=False)``: edge values are clamped, and a
  layer finer than the output is sub-sampled the same way (no anti-aliasing).
- Guide ``P``: the network's own probability of class ``c``; optional tissue mask ``T`` restricts the prototypes
  only: ``c_t = sum T P F / sum T P``, ``c_b = sum T (1-P) F / sum T (1-P)``. A weight mass below ``eps`` (an empty
  foreground or background) gives a NaN score (``on_empty="nan"``) or a :class:`TargetError` (``"raise"``).
- Map: foreground iff ``||F - c_t||^2 < ||F - c_b||^2``; soft map: 2-way softmax of the negative squared distances.
  SA score = Dice(map, reference); reference = a ground truth, else the binarised prediction; an empty reference
  gives NaN. Per layer: all channels; per unit: each channel alone.

Fast path (what makes every unit of every HD-BET layer affordable), exact up to float rounding:

1. ``||F-c_t||^2 - ||F-c_b||^2 = -2 D`` with ``D = sum_k d_k (F_k - m_k)``, ``d = c_t - c_b``, ``m = (c_t + c_b)/2``:
   the map is ``D > 0`` and the soft map ``sigmoid(2 D)``; one channel alone: ``(F_k - m_k) sign(d_k) > 0`` (the
   midpoint rule). ``D`` is linear in ``F`` and the resize is linear with weights summing to 1, so ``D`` is computed on
   the layer grid (divided by ``max_k |d_k|``, which keeps its sign and avoids underflow) and its map counted like one
   more channel. Scores are invariant to scaling the features. A *dead* unit (constant over the layer, or at most
   float32 rounding of the layer's largest prototype: HD-BET has units of ~1e-37) carries no signal: its per-unit
   score is NaN and the mean SA score leaves it out (``dead_units``).
2. Prototypes on the layer grid: ``sum_p w_p resize(F)_p = sum_q F_q resize^T(w)_q`` (per-axis adjoint matrices).
3. Per-unit Dice without materialising ``K`` resized channels (:mod:`.count`): a resized value is a
   convex combination of the layer voxels around it, so every *cell* (a block of guide voxels sharing the same few
   layer corners) whose corners all lie on one side of the midpoint is counted whole from per-cell mask totals;
   only straddling (unit, cell) pairs are evaluated voxel by voxel (large cells by sub-blocks). Where a map changes
   sign in most cells (factors of 2), every guide voxel is evaluated instead, phase by phase. The layer's ``D`` is
   counted the same way (on the guide grid, computed during the per-unit pass). ``Testing/unit/test_protoseg.py`` checks
   the equality with the literal maps, on every path.
4. Whole networks (:func:`segmentation_ability`): the first forward pass traces the layers and gives the guide;
   with ``layers="features"`` it also keeps clones of the last few convolutions (the feature layers), with
   ``layers="all"`` nothing: one more pass scores every layer inside its forward hook and drops it. A container
   returning a child's unmodified output reuses its scores; a per-channel affine normalisation
   (BatchNorm/InstanceNorm/GroupNorm with non-zero weights) of a scored layer reuses its per-unit scores, which such
   a map leaves unchanged. Scoring runs as independent blocks on torch's threads, each operation on one thread
   (:mod:`.tasks`); results do not depend on the number of threads. The measured cost on HD-BET (every unit of every
   layer, in plain forward passes) is in ``docs/sa_validation/sweep.json`` (``studies/sa_validation.py``). Dead
   units (below) are not counted where they are many.

*Feature layers* (for the mean SA score): the convolution modules (``nn.Conv*d``/``nn.ConvTranspose*d``) that run
once and finish before the head in execution order, the head (and its containers) excluded; if there are fewer
than two, the explainable leaf modules before the head. Per-unit SA is invariant to a per-channel affine map
(``InstanceNorm``/``BatchNorm``), so a convolution and the norm after it would count the same units twice. HD-BET:
``end_conv_1`` and ``end_conv_2`` (42 units each, full resolution). *Mean SA score*: the mean per-unit SA score,
against the binarised prediction, over the live units of the last two feature layers (no ground truth needed).
"""

import time
import weakref
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from ...errors import InputError, LayerError
from ..cam import check_input
from ..hooks import model_guard, named_layers, resolve_layer
from ..layers import LayerInfo, trace_layers
from ..outputs import main_output, run_model
from .core import (DEAD_RELATIVE, EMPTY_POLICIES, MODES, RESIZE, Scorer, dead_units, prototypes, protoseg,
                            resize, sa_scores, unit_maps)
from ..targets import class_maps, predicted_mask

__all__ = ["DEAD_RELATIVE", "EMPTY_POLICIES", "LAST_FEATURE", "MODES", "RESIZE", "LayerSA", "ProgressCallback",
           "SAReport", "Scorer", "dead_units", "protoseg", "prototypes", "resize", "sa_scores", "segmentation_ability",
           "unit_maps"]

LAST_FEATURE = "last-feature"  #: in ``map_layers``: the last feature layer, whatever its name
ProgressCallback = Callable[[float, str], None]


# ------------------------------------------------------------------------------------------- whole networks
@dataclass
class LayerSA:
    """SA scores of one layer (``name == "input"``: the image intensities).

    Attributes:
        depth: 0 for the input, then 1, 2, ... in execution order of the scored layers.
        order: completion order in the forward pass (-1 for the input).
        shape: the layer grid (spatial axes); ``channels``: its units.
        score / units: SA score of all channels ``[B]`` / of each unit ``[B, K]``, against the reference.
        score_pred / units_pred: the same against the binarised prediction (the same tensors without ground truth).
        feature: one of the feature layers of the mean SA score.
    """

    name: str
    kind: str
    depth: int
    order: int
    shape: Tuple[int, ...]
    channels: int
    score: torch.Tensor
    units: Optional[torch.Tensor]
    score_pred: torch.Tensor
    units_pred: Optional[torch.Tensor]
    feature: bool = False


@dataclass
class SAReport:
    """What :func:`segmentation_ability` found. Maps are on the guide grid, ``[B, *S]`` (bool, or float if soft)."""

    layers: List[LayerSA]
    feature_layers: List[str]
    mean_sa: torch.Tensor  # [B]
    output: torch.Tensor  # logits, detached
    guide: torch.Tensor
    reference: torch.Tensor
    prediction: torch.Tensor
    maps: Dict[str, torch.Tensor] = field(default_factory=dict)
    info: dict = field(default_factory=dict)

    def layer(self, name: str) -> LayerSA:
        for row in self.layers:
            if row.name == name:
                return row
        raise LayerError("layer %r was not scored; scored: %s" % (name, ", ".join(r.name for r in self.layers)))


class _Hooks:
    """Forward hooks ``fn(name, module, inputs, output)`` on named modules; every handle removed on exit."""

    def __init__(self, modules: Dict[str, nn.Module], fn):
        self.modules, self.fn, self.handles = modules, fn, []

    def __enter__(self) -> "_Hooks":
        try:
            for name, module in self.modules.items():
                self.handles.append(module.register_forward_hook(
                    lambda mod, inputs, output, name=name: self.fn(name, mod, inputs, output)))
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc) -> None:
        while self.handles:
            self.handles.pop().remove()


def _version(t: torch.Tensor) -> Optional[int]:
    try:
        return t._version  # bumped by in-place ops: a container may return a child's output modified in place
    except Exception:  # noqa: BLE001 - inference tensors have no version counter
        return None


_NORMS = (nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm, nn.GroupNorm)


def _affine(module: nn.Module) -> bool:
    """A normalisation that maps every channel by ``a x + b`` with ``a != 0`` (per-unit SA scores unchanged)."""
    if not isinstance(module, _NORMS):
        return False
    weight = getattr(module, "weight", None)
    return weight is None or bool((weight != 0).all())


def _feature_layers(model, infos: List[LayerInfo], head: Optional[str], ndim: int, count: int) -> List[str]:
    """The module docstring's rule: convolutions before the head (else explainable leaves), the last ``count``."""
    modules = named_layers(model)
    limit = next((i.order for i in infos if i.name == head), None) if head else None
    before = sorted((i for i in infos if i.explainable and len(i.shape) == ndim and (limit is None or i.order < limit)
                     and not (head and (head == i.name or head.startswith(i.name + ".")))), key=lambda i: i.order)
    convs = [i.name for i in before if isinstance(modules[i.name], nn.modules.conv._ConvNd)]
    leaves = [i.name for i in before if not any(True for _ in modules[i.name].children())]
    chosen = convs if len(convs) >= 2 else leaves
    if not chosen:
        raise LayerError("no feature layer found before the segmentation head; pass feature_layers=[...] "
                         "(see `seghirescam layers`)")
    return chosen[-count:]


def segmentation_ability(model: nn.Module, x: torch.Tensor, class_index: int = 1,
                         reference: Optional[torch.Tensor] = None, tissue: Optional[torch.Tensor] = None,
                         layers: Union[str, Sequence[str]] = "features", feature_layers: Optional[Sequence[str]] = None,
                         n_feature_layers: int = 2, include_input: bool = True, per_unit: bool = True,
                         map_layers: Sequence[str] = (), soft_maps: bool = False, activation: str = "auto",
                         output_key: Optional[str] = None, eps: float = 1e-6, on_empty: str = "nan",
                         region: Optional[torch.Tensor] = None,
                         progress: Optional[ProgressCallback] = None) -> SAReport:
    """ProtoSeg SA scores of a network's layers and units on one input, and its mean SA score.

    Args:
        model: a segmentation network returning logits ``[B, C, *S]`` (or a tuple/list/dict of them).
        x: its input ``[B, C_in, *S]``.
        class_index: the explained class; the guide is the model's probability of it.
        reference: optional ground truth ``[B, *S_out]`` (bool); default: the binarised prediction.
        tissue: optional mask ``[B, *S_out]`` restricting the prototypes.
        layers: ``"features"`` (the feature layers only: ONE forward pass), ``"all"`` (every explainable layer,
            in execution order: two forward passes, each layer scored inside its hook and dropped), or names.
        feature_layers: override the feature layers of the mean SA score (default: the module docstring's rule).
        n_feature_layers: how many of the last feature layers the mean SA score averages (default 2).
        include_input: also score the input intensities (``"input"``, depth 0).
        per_unit: per-unit scores for every scored layer (the feature layers always get them).
        map_layers: layers whose SA map is returned in :attr:`SAReport.maps` (on the guide grid); the name
            ``"last-feature"`` stands for the last feature layer.
        soft_maps: return soft maps (``sigmoid(2 D)``) instead of boolean ones.
        on_empty: ``nan`` (default: NaN scores when the guide has no foreground/background or the reference is
            empty) or ``raise`` (:class:`TargetError`).
        region: optional ``[B, *S_out]`` mask of the voxels that belong to the image: the padding a network needs
            is left out of the prototypes and of every Dice (a network may well "see" brain in the padding).
        progress: ``progress(fraction, message)``; it may raise to cancel (the hooks are removed).

    The model is left as found (eval/training flags, ``requires_grad``, no hooks), also after an exception.
    """
    started = time.perf_counter()
    report = progress or (lambda fraction, message: None)
    check_input(model, x)
    if on_empty not in EMPTY_POLICIES:
        raise InputError("on_empty must be one of %s, got %r" % (", ".join(EMPTY_POLICIES), on_empty))
    if isinstance(layers, str) and layers not in ("features", "all"):
        layers = [layers]
    modules = named_layers(model)
    map_layers = list(map_layers)
    wanted = list(feature_layers or []) + ([] if isinstance(layers, str) else list(layers)) + \
        [n for n in map_layers if n != LAST_FEATURE]
    for name in wanted:
        resolve_layer(model, name)
    # pass 1: trace + output, keeping clones of the requested layers and of the last convolutions (candidates);
    # with layers="all" nothing: every layer is scored in the second pass (no copies, less memory)
    kept: Dict[str, torch.Tensor] = {}
    window = [n for n, m in modules.items() if isinstance(m, nn.modules.conv._ConvNd)] if layers != "all" else []
    pinned = set(wanted) if layers != "all" else set()
    raw: List = []

    def keep(name, module, inputs, output):
        if not torch.is_tensor(output) or not output.is_floating_point() or name in kept:
            return
        if name in pinned or (not feature_layers and name in window):
            kept[name] = output.detach().clone()
            convs = [n for n in kept if n in window and n not in pinned]
            for old in convs[:-(n_feature_layers + 1)]:
                del kept[old]

    report(0.0, "forward pass")
    t0 = time.perf_counter()
    with _Hooks({n: modules[n] for n in set(window) | pinned}, keep), \
            _Hooks({"": model}, lambda n, m, i, o: raw.append(o)):
        infos, head, _ = trace_layers(model, x, output_key)  # failures of the model: one-line ModelError
    output = main_output(raw[-1], output_key).detach()
    timings = {"forward_trace_s": time.perf_counter() - t0}
    if output.ndim != x.ndim:
        raise InputError("the model output has shape %s; ProtoSeg needs [batch, classes, *spatial]" % (tuple(output.shape),))
    _, prob = class_maps(output, class_index, activation)
    prob = prob.to(torch.promote_types(prob.dtype, torch.float32))
    prediction = predicted_mask(output, class_index, activation)
    refs = prediction[:, None]
    if reference is not None:
        reference = torch.as_tensor(reference, device=output.device).bool()
        if reference.shape != prediction.shape:
            raise InputError("the reference has shape %s; it must be on the model output grid %s"
                             % (tuple(reference.shape), tuple(prediction.shape)))
        refs = torch.stack([reference, prediction], 1)
    if tissue is not None and tuple(tissue.shape) != tuple(prediction.shape):
        raise InputError("the tissue mask has shape %s; it must be on the model output grid %s"
                         % (tuple(tissue.shape), tuple(prediction.shape)))
    if region is not None:
        region = torch.as_tensor(region, device=output.device).bool()
        if tuple(region.shape) != tuple(prediction.shape):
            raise InputError("the region has shape %s; it must be on the model output grid %s"
                             % (tuple(region.shape), tuple(prediction.shape)))
    scorer = Scorer(prob, refs, tissue, eps, on_empty, region)
    by_name = {i.name: i for i in infos}
    features = list(feature_layers) if feature_layers else _feature_layers(model, infos, head, output.ndim,
                                                                             n_feature_layers)
    map_layers = [features[-1] if n == LAST_FEATURE else n for n in map_layers]
    if layers == "all":
        names = [i.name for i in sorted(infos, key=lambda i: i.order)
                 if i.explainable and len(i.shape) == output.ndim]
    else:
        names = features + ([] if layers == "features" else list(layers))
    names = list(dict.fromkeys(names + list(map_layers) + features))
    for name in names:
        info = by_name[name]
        if not info.explainable or len(info.shape) != output.ndim:
            raise LayerError("layer %r cannot be scored: its output is %s; ProtoSeg needs a [batch, channels, *spatial] "
                             "tensor from a layer used once per forward pass" % (name, info.shape or "not a tensor"))
    rows: Dict[str, LayerSA] = {}
    maps: Dict[str, torch.Tensor] = {}
    pred_col = refs.shape[1] - 1

    def add(name, act, kind, order):
        unit = per_unit or name in features or name == "input"
        result = scorer.score(act, unit)
        rows[name] = LayerSA(name, kind, 0, order, tuple(act.shape[2:]), act.shape[1], result["layer"][:, 0],
                             result["units"][..., 0] if unit else None, result["layer"][:, pred_col],
                             result["units"][..., pred_col] if unit else None, name in features)
        if name in map_layers:
            maps[name] = scorer.layer_map(result["decision"], soft_maps, result["scale"])

    t0 = time.perf_counter()
    if include_input:
        add("input", x.detach(), "input", -1)
    for name in [n for n in names if n in kept]:
        add(name, kept.pop(name), by_name[name].kind, by_name[name].order)
        report(0.5 * len(rows) / len(names), "scored %s" % name)
    kept.clear()
    timings["score_kept_s"] = time.perf_counter() - t0
    pending = [n for n in names if n not in rows]
    if pending:  # pass 2: score each layer inside its hook, keep nothing
        report(0.5, "second forward pass: scoring %d layers" % len(pending))
        t0 = time.perf_counter()
        seen: Dict[str, Tuple] = {}

        def stream(name, module, inputs, output):
            if name in rows:  # scored from the first pass: only watched, for the reuse by its successors
                seen[name] = (weakref.ref(output), _version(output))
                return
            info = by_name[name]
            source = inputs[0] if inputs and torch.is_tensor(inputs[0]) else None
            for other, (ref, version) in seen.items():
                if version is None:
                    continue
                if ref() is output and version == _version(output):  # a container returning a child's output
                    row = rows[other]
                    rows[name] = LayerSA(name, info.kind, 0, info.order, row.shape, row.channels, row.score,
                                         row.units, row.score_pred, row.units_pred, name in features)
                    if name in map_layers:
                        again = None if other in maps else scorer.score(output, False)
                        maps[name] = maps[other] if again is None else scorer.layer_map(
                            again["decision"], soft_maps, again["scale"])
                    return
                if source is not None and ref() is source and version == _version(source) and _affine(module):
                    # per-unit maps are invariant to a per-channel affine map: only the layer score is new
                    row = rows[other]
                    result = scorer.score(output.detach(), False)
                    rows[name] = LayerSA(name, info.kind, 0, info.order, tuple(output.shape[2:]), output.shape[1],
                                         result["layer"][:, 0], row.units, result["layer"][:, pred_col],
                                         row.units_pred, name in features)
                    if name in map_layers:
                        maps[name] = scorer.layer_map(result["decision"], soft_maps, result["scale"])
                    seen[name] = (weakref.ref(output), _version(output))
                    return
            add(name, output.detach(), info.kind, info.order)
            seen[name] = (weakref.ref(output), _version(output))
            report(0.5 + 0.5 * len(rows) / (len(names) + 1), "scored %s" % name)

        watched = pending + [n for n in names if n in rows and n in modules]
        with model_guard(model), torch.no_grad(), _Hooks({n: modules[n] for n in watched}, stream):
            run_model(model, x.detach())
        timings["forward_score_s"] = time.perf_counter() - t0
    ordered = sorted(rows.values(), key=lambda r: r.order)
    for depth, row in enumerate([r for r in ordered if r.name != "input"], start=1):
        row.depth = depth
    units = [rows[n].units_pred for n in features]
    mean_sa = torch.nanmean(torch.cat(units, 1), 1) if units else prob.new_full((x.shape[0],), float("nan"))
    timings["total_s"] = time.perf_counter() - started
    info = {"resize": RESIZE % MODES[output.ndim - 2], "guide_grid": list(output.shape[2:]), "eps": eps,
            "class": class_index, "reference": "ground truth" if reference is not None else "prediction",
            "passes": 2 if pending else 1, "head": head, "feature_layers": features, "timings": timings,
            "region": None if region is None else "%d of %d voxels (the rest, e.g. padding, left out)"
            % (int(region[0].sum()), region[0].numel()),
            "mean_sa": "mean per-unit SA score (vs the prediction) over the live units of %s" % ", ".join(features),
            "dead_feature_units": int(torch.isnan(torch.cat(units, 1)[0]).sum()) if units else 0}
    return SAReport(ordered, features, mean_sa, output, prob, refs[:, 0], prediction, maps, info)

