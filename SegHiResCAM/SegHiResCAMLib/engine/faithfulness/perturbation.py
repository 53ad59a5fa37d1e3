"""Deletion and insertion curves of heatmaps of segmentation models (docs/algorithms.md, "Faithfulness checks").

Part of the faithfulness checks gathered in :mod:`SegHiResCAMLib.engine.faithfulness`; dimension-generic (1 to 3 spatial axes).

**Deletion / insertion** (Petsiuk, Das, Saenko, *RISE*, BMVC 2018): rank the input voxels by the heatmap
(:func:`saliency_order`; :func:`saliency_sets` finds the top fractions by selection, without a sort), replace
the top fraction by a baseline (:func:`baseline_input`: Gaussian blur of the input, or its mean), record
``y^c_M`` at each step (deletion), or start from the baseline and put the top fraction back (insertion). The
region M stays the *original* one at every step: ``y^c_M`` is the function the heatmap explains (the engine
differentiated exactly that sum), so only the input may change along the curve.
Re-computing M from each perturbed prediction would mix two effects — the logits falling, and the summation
domain shrinking as the prediction vanishes — and a blurred input, whose predicted region is usually empty, would
have no score at all. Curves (:class:`Curve`) are normalised by ``y0``, the score of the unperturbed input; the
area under the normalised curve (trapezoid rule on the fractions in [0, 1]) is the AUC: lower deletion AUC and
higher insertion AUC are more faithful. ``y0 <= 0`` (possible with logits) leaves the normalised values undefined
(NaN); the raw AUCs, in score units, still rank methods on the same image and target, since every method shares
``y0`` and both end points. Cost: one forward pass per step and map, plus one for the baseline (batched, see
``batch_size`` of :func:`perturbation_curves`).
"""

import math
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from ...errors import InputError, InternalError, ModelError, SegHiResCAMError
from .. import cam
from ..cam import ProgressCallback, check_input
from ..hooks import model_guard
from ..outputs import available_bytes, main_output, reusing_freed_memory
from ..targets import SegmentTarget
from .shortcut import box_share

BASELINES = ("blur", "mean", "zero")
MODES = ("deletion", "insertion")
#: the largest relative difference between the target's score on a stand-in of the unperturbed input (its box alone,
#: or the whole input in bfloat16) and on the whole input in float32 for which :func:`choose_stand_in` uses it
BOX_TOLERANCE = 0.01
#: the arithmetic of the perturbed inputs' forward passes (``precision`` of :func:`perturbation_curves`); ``auto``
#: is :func:`resolve_precision`'s choice
PRECISIONS = ("auto", "float32", "bfloat16")
#: inference memory per input voxel assumed by ``batch_size=None`` (HD-BET: 1.8 GiB for 128^3, ~900 B/voxel)
AUTO_BYTES_PER_VOXEL = 1024


# ----------------------------------------------------------------------------------------------- baselines
def _blur_radius(sigma: float, truncate: float) -> int:
    return 0 if sigma == 0 else int(truncate * sigma + 0.5)


def gaussian_blur(x: torch.Tensor, sigma: Union[float, Sequence[float]], truncate: float = 3.0,
                  box: Optional[Sequence[slice]] = None) -> torch.Tensor:
    """Separable Gaussian blur of ``x`` ``[B, C, *S]`` (sigma in voxels, one value or one per spatial axis).

    ``box`` (one slice per spatial axis): the blurred input on that box only, ``[B, C, *box]``, computed from the
    box grown by the kernel radius: the same values as the whole input's blur cut to the box, bit for bit (each
    voxel sums the same neighbours in the same order; where the grown box meets the input's end, the replicated
    border is the input's own).

    One 1-D filter per axis, kernel radius ``round(truncate * sigma)``, borders extended by replication. Each
    filter is a sum of shifted copies of the padded input weighted by the kernel, taken in kernel order. On a CPU
    that gave the values of the 1-D convolution used before (``F.conv1d``) bit for bit on every 2D and 3D image
    tried (within 1e-7 relative on 1D ones), and faster: a one-channel convolution uses the vector units poorly.
    """
    nd = x.ndim - 2
    sigmas = [float(sigma)] * nd if isinstance(sigma, (int, float)) else [float(s) for s in sigma]
    if len(sigmas) != nd or any(s < 0 or not math.isfinite(s) for s in sigmas):
        raise InputError("sigma must be >= 0, one value or one per spatial axis (%d), got %r" % (nd, sigma))
    if box is not None:
        spans = [b.indices(n)[:2] for b, n in zip(box, x.shape[2:])]
        radii = [_blur_radius(s, truncate) for s in sigmas]
        grown = [slice(max(0, a - r), min(n, b + r)) for (a, b), r, n in zip(spans, radii, x.shape[2:])]
        inner = tuple(slice(a - g.start, b - g.start) for (a, b), g in zip(spans, grown))
        return gaussian_blur(x[(slice(None), slice(None)) + tuple(grown)], sigmas, truncate)[
            (slice(None), slice(None)) + inner]
    out = x
    for axis, s in zip(range(2, x.ndim), sigmas):
        radius = _blur_radius(s, truncate)
        if radius == 0:
            continue
        t = torch.arange(-radius, radius + 1, dtype=x.dtype, device=x.device)
        kernel = torch.exp(-0.5 * (t / s) ** 2)
        kernel = (kernel / kernel.sum()).tolist()
        pad = [0] * (2 * nd)  # F.pad's order: last axis first
        pad[2 * (x.ndim - 1 - axis)] = pad[2 * (x.ndim - 1 - axis) + 1] = radius
        padded = F.pad(out, pad, mode="replicate")
        size = out.shape[axis]
        out = padded.narrow(axis, 0, size) * kernel[0]
        for shift in range(1, 2 * radius + 1):
            out.add_(padded.narrow(axis, shift, size), alpha=kernel[shift])
        del padded
    return out


def baseline_input(x: torch.Tensor, kind: str = "blur", sigma: float = 5.0,
                   domain: Optional[torch.Tensor] = None, box: Optional[Sequence[slice]] = None) -> torch.Tensor:
    """What removed voxels are replaced with: ``blur`` (Gaussian, ``sigma`` voxels), ``mean`` (per channel, over
    the domain) or ``zero``. ``box``: only that box of it (the values of the whole baseline there), computed from
    no more of ``x`` than it needs."""
    if kind not in BASELINES:
        raise InputError("baseline must be one of %s, got %r" % (", ".join(BASELINES), kind))
    cut = (slice(None), slice(None)) + (tuple(box) if box is not None else ())
    if kind == "zero":
        return torch.zeros_like(x[cut])
    if kind == "blur":
        return gaussian_blur(x, sigma, box=box)
    weights = torch.ones(x.shape[2:], dtype=x.dtype, device=x.device) if domain is None else domain.to(x.dtype)
    dims = tuple(range(2, x.ndim))
    mean = (x * weights).sum(dim=dims, keepdim=True) / weights.sum().clamp_min(1.0)
    return mean.expand_as(x[cut]).clone()


# --------------------------------------------------------------------------------------------- the curves
def _tie_order(numel: int, domain: Optional[torch.Tensor], seed: int, device) -> Tuple[torch.Tensor, torch.Tensor]:
    """The domain's flat indices and the tie-breaking permutation of ``seed``: the same for every map of one input
    (:func:`perturbation_curves` draws it once for all its maps)."""
    if domain is None:
        index = torch.arange(numel, device=device)
    else:
        if domain.numel() != numel:
            raise InputError("the domain mask has %d voxels but the heatmap %d" % (domain.numel(), numel))
        index = domain.reshape(-1).to(device).nonzero().squeeze(1)
    generator = torch.Generator().manual_seed(int(seed))
    return index, torch.randperm(index.numel(), generator=generator).to(device)


def _permuted_values(heat: torch.Tensor, domain: Optional[torch.Tensor], seed: int,
                     tie_order: Optional[Tuple[torch.Tensor, torch.Tensor]] = None):
    """The domain's flat indices, the tie-breaking permutation and the negated heat in permuted order: the stable
    ascending order of those values is the saliency order. ``tie_order``: :func:`_tie_order`'s result, if drawn."""
    flat = heat.detach().reshape(-1)
    if not bool(torch.isfinite(flat).all()):
        raise InputError("the heatmap holds NaN or infinite values; cannot rank its voxels")
    if tie_order is None:
        index, perm = _tie_order(flat.numel(), domain, seed, flat.device)
    else:
        index, perm = (t.to(flat.device) for t in tie_order)
    return index, perm, -flat[index][perm]


def saliency_order(heat: torch.Tensor, domain: Optional[torch.Tensor] = None, seed: int = 0) -> torch.Tensor:
    """Flat indices of the domain's voxels, most salient first.

    Ties (e.g. the zeros left by ReLU) are broken by a fixed pseudo-random permutation drawn from ``seed``:
    deterministic, and free of the spatial bias of raster order (which would delete whole slabs of the volume).
    """
    index, perm, values = _permuted_values(heat, domain, seed)
    return index[perm[torch.argsort(values, stable=True)]]


def saliency_sets(heat: torch.Tensor, domain: Optional[torch.Tensor] = None, seed: int = 0,
                  counts: Sequence[int] = (), tie_order: Optional[Tuple[torch.Tensor, torch.Tensor]] = None
                  ) -> List[torch.Tensor]:
    """For each of ``counts``, the flat indices of the ``count`` most salient voxels of the domain: the same set as
    ``saliency_order(heat, domain, seed)[:count]`` (in another order), found by selection, without a sort. What a
    deletion or insertion step perturbs. ``tie_order``: ``_tie_order(heat.numel(), domain, seed, device)``, when
    several maps share it."""
    index, perm, values = _permuted_values(heat, domain, seed, tie_order)
    sets = []
    for count in (int(c) for c in counts):
        if count >= values.numel():
            sets.append(index)
            continue
        if count <= 0:
            sets.append(index[:0])
            continue
        threshold = torch.kthvalue(values, count).values
        below = (values < threshold).nonzero().squeeze(1)
        tied = (values == threshold).nonzero().squeeze(1)[:count - below.numel()]  # earliest positions first
        sets.append(index[perm[torch.cat([below, tied])]])
    return sets


@dataclass
class Curve:
    """One deletion or insertion curve.

    Attributes:
        mode: ``deletion`` or ``insertion``.
        fractions: fraction of the domain's voxels removed (deletion) or inserted (insertion), from 0 to 1 (to
            the last fraction scored, for a partial curve).
        scores: the target score ``y^c_M`` (original M) at each fraction.
        reference: ``y0``, the score of the unperturbed input (the normaliser).
        batch_size: perturbed inputs per forward pass of the run that scored it, after any halving on an
            out-of-memory error (``None``: not recorded).
    """

    mode: str
    fractions: List[float]
    scores: List[float]
    reference: float
    batch_size: Optional[int] = None

    @property
    def normalized(self) -> List[float]:
        """``scores / y0``; NaN when ``y0 <= 0`` (normalisation undefined)."""
        if not self.reference > 0:
            return [float("nan")] * len(self.scores)
        return [s / self.reference for s in self.scores]

    @property
    def auc(self) -> float:
        """Area under the normalised curve (its fractions, 0..1 or 0..last, trapezoid rule); NaN when ``y0 <= 0``."""
        return _trapezoid(self.fractions, self.normalized)

    @property
    def auc_raw(self) -> float:
        """Area under the raw score curve, in score units."""
        return _trapezoid(self.fractions, self.scores)

    def to_dict(self) -> dict:
        return {"mode": self.mode, "fractions": list(self.fractions), "scores": list(self.scores),
                "normalized": self.normalized, "reference": self.reference, "auc": self.auc,
                "auc_raw": self.auc_raw, "batch_size": self.batch_size}


def _trapezoid(xs: Sequence[float], ys: Sequence[float]) -> float:
    return float(sum((x1 - x0) * (y0 + y1) / 2.0 for x0, x1, y0, y1 in zip(xs[:-1], xs[1:], ys[:-1], ys[1:])))


def auto_batch_size(x: torch.Tensor, bytes_per_voxel: int = AUTO_BYTES_PER_VOXEL) -> int:
    """Perturbed inputs (each like ``x[:1]``) per forward pass: half the free memory over ``bytes_per_voxel`` per
    input voxel, at most 2 on a CPU and 16 on a GPU.

    On a CPU a pair ran 1.03-1.19x faster per input than one at a time (from HD-BET on a whole brain MRI to a
    MONAI UNet on 128^3); three or four gained at most 0.02 more and often lost, and hold more memory
    (``benchmarks/results/batch.md``, made by ``studies/benchmark/bench_batch.py``). A batched input's scores can
    differ from its scores alone in the last bits (the convolutions divide the work differently), so evaluate
    records the batch it used."""
    voxels = max(1, x[0, 0].numel())
    free = available_bytes(x.device) or 4 << 30  # a platform that does not say: assume 4 GiB
    fits = int(0.5 * free // (voxels * bytes_per_voxel))
    cap = 16 if x.device.type == "cuda" else 2
    return max(1, min(cap, fits))


class _OutOfMemory(InternalError):
    """A forward pass ran out of memory (the scorer then halves its batch)."""


def _forward(model: nn.Module, batch: torch.Tensor, output_key: Optional[str]) -> torch.Tensor:
    """The main output of ``model`` on ``batch``; failures become one clear project error."""
    try:
        return main_output(model(batch), output_key)
    except SegHiResCAMError:
        raise
    except Exception as exc:  # noqa: BLE001 - turned into one clear error below
        text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        if isinstance(exc, getattr(torch.cuda, "OutOfMemoryError", ())) or "out of memory" in text.lower():
            raise _OutOfMemory("out of memory for an input of shape %s; use a smaller image or crop, a smaller "
                               "--batch-size, or another device" % (tuple(batch.shape),)) from exc
        raise ModelError("the model failed on an input of shape %s: %s" % (tuple(batch.shape), text)) from exc


def resolve_precision(precision: str, device: Union[str, torch.device]) -> str:
    """``float32`` or ``bfloat16``: the arithmetic of perturbed inputs' forward passes on ``device``.

    ``auto`` is ``bfloat16`` on a CPU that computes it natively (:func:`~SegHiResCAMLib.engine.cam.cpu_bfloat16`:
    AVX512-BF16 or AMX, through oneDNN; on the AMX CPU of ``benchmarks/results/precision.md`` one HD-BET pass on a
    whole brain MRI took 0.46 of its float32 time on 2 cores), else ``float32`` (a GPU, and any other CPU, where
    bfloat16 is emulated and slower). ``bfloat16`` runs the passes under
    :func:`torch.autocast`: convolutions and matrix products in bfloat16, normalisations and sums in float32."""
    if precision not in PRECISIONS:
        raise InputError("precision must be one of %s, got %r" % (", ".join(PRECISIONS), precision))
    kind = torch.device(device).type
    if precision == "auto":
        return "bfloat16" if kind == "cpu" and cam.cpu_bfloat16() else "float32"
    if precision == "bfloat16" and kind not in ("cpu", "cuda"):
        raise InputError("bfloat16 forward passes run on a CPU or a CUDA GPU, not on %s; use --precision float32"
                         % kind)
    return precision


class _Scorer:
    """Scores ``y^c_M`` of batches of inputs with a fixed region, halving the batch on out-of-memory errors."""

    def __init__(self, model, target, region, output_key, batch_size, eval_mode, precision="float32"):
        self.model, self.target, self.output_key, self.eval_mode = model, target, output_key, eval_mode
        self.region = region
        self.batch_size = batch_size
        self.precision = precision
        self.forwards = 0

    def _scores(self, batch: torch.Tensor) -> torch.Tensor:
        with torch.autocast(batch.device.type, dtype=torch.bfloat16, enabled=self.precision == "bfloat16"):
            out = _forward(self.model, batch, self.output_key)
        self.forwards += batch.shape[0]
        region = self.region.expand((batch.shape[0],) + tuple(self.region.shape[1:]))
        return self.target(out, region).detach().double().cpu()

    def __call__(self, inputs: Callable[[int], torch.Tensor], count: int,
                 report: Callable[[int], None] = lambda done: None) -> List[float]:
        scores: List[float] = []
        with model_guard(self.model, eval_mode=self.eval_mode), torch.no_grad(), reusing_freed_memory():
            while len(scores) < count:
                size = min(self.batch_size, count - len(scores))
                batch = torch.cat([inputs(len(scores) + i) for i in range(size)])
                try:
                    values = self._scores(batch)
                except _OutOfMemory:
                    if size == 1:
                        raise
                    self.batch_size = max(1, size // 2)
                    continue
                finally:
                    del batch
                scores.extend(float(v) for v in values)
                report(len(scores))
        return scores


@dataclass
class StandIn:
    """What :func:`choose_stand_in` lets the perturbed inputs run on, and the unperturbed score ``y0`` their curves
    start from (taken on that stand-in, so a curve's points share one arithmetic and one input size).

    Attributes:
        box: the target's box (:func:`.shortcut.target_box`), or ``None``: the whole input.
        precision: ``float32`` or ``bfloat16``.
        y0: the unperturbed score on the stand-in (the whole input's float32 score when nothing stands in).
        box_rejected, precision_rejected: a stand-in that was scored and not used, ``{"y0_stand_in", "y0",
            "tolerance", ...}`` (the box's also holds ``box`` and the precision it was scored in), else ``None``.
    """

    box: Optional[Tuple[slice, ...]]
    precision: str
    y0: float
    box_rejected: Optional[dict] = None
    precision_rejected: Optional[dict] = None
    scored: int = 0  #: forward passes taken to decide (0 to 2)

    def note(self) -> Optional[str]:
        """One line for the reader about the stand-ins scored and not used, else ``None``."""
        lines = []
        if self.box_rejected:
            lines.append("the model scored the target's box alone %.6g and the whole input %.6g, more than %g apart "
                         "(a network with global operations, e.g. instance normalisation): the perturbed inputs ran "
                         "on the whole input" % (self.box_rejected["y0_stand_in"], self.box_rejected["y0"],
                                                 self.box_rejected["tolerance"]))
        if self.precision_rejected:
            lines.append("the model scored the input %.6g in bfloat16 and %.6g in float32, more than %g apart: the "
                         "perturbed inputs ran in float32" % (self.precision_rejected["y0_stand_in"],
                                                              self.precision_rejected["y0"],
                                                              self.precision_rejected["tolerance"]))
        return "; ".join(lines) or None


def choose_stand_in(model: nn.Module, x: torch.Tensor, target: SegmentTarget, region: torch.Tensor,
                    box: Optional[Sequence[slice]], reference_score: float, passes: int,
                    output_key: Optional[str] = None, eval_mode: bool = True, tolerance: float = BOX_TOLERANCE,
                    precision: str = "float32") -> StandIn:
    """What ``passes`` perturbed inputs of the whole input ``x`` should run on: the target's ``box``
    (:func:`.shortcut.target_box`) and/or ``precision`` ``bfloat16`` (:func:`resolve_precision`) instead of the
    whole input in float32, and the unperturbed score their curves then start from.

    A stand-in is used only when the model scores the unperturbed input on it like the whole input in float32:
    ``|y_stand_in - y0| <= tolerance * |y0|``, ``y0`` being ``reference_score`` (one forward pass on the stand-in).
    The box stands in for the whole input only where the margin covers the receptive field of a network without
    global operations; instance normalisation, for one, normalises a small box by its own statistics, and HD-BET
    scored a 10 mm ball +15411 on a whole MRI and -12861 on its 64^3 box
    (``benchmarks/results/check-click-mni152.json``). bfloat16 keeps about 3 significant digits per product; HD-BET's
    score on a whole brain MRI moved by 0.13% (``benchmarks/results/precision.md``). The box is tried only where it
    is cheaper: its ``passes`` plus the one that scores it cost less than the whole input's (``(passes + 1) * share <
    passes``, ``share`` the box's part of the input). Order: the box in ``precision``; if it is rejected and
    ``precision`` is bfloat16, the whole input in bfloat16; else the whole input in float32, from
    ``reference_score``.
    """
    precision = resolve_precision(precision, x.device)
    spatial = tuple(x.shape[2:])
    box = None if box is None else tuple(box)
    if box is not None and (passes + 1) * box_share(box, spatial) >= passes:
        box = None
    y0 = float(reference_score)
    chosen = StandIn(None, "float32", y0)
    if box is None and precision == "float32":
        return chosen
    region = region.to(x.device).bool()
    region = region[None] if region.ndim == len(spatial) else region

    def score(cut: Optional[Tuple[slice, ...]]) -> float:
        cut = cut or tuple(slice(None) for _ in spatial)
        chosen.scored += 1
        scorer = _Scorer(model, target, region[(slice(None),) + cut], output_key, 1, eval_mode, precision)
        return scorer(lambda i: x[(slice(None), slice(None)) + cut].detach(), 1)[0]

    def record(y: float) -> dict:
        return {"y0_stand_in": y, "y0": y0, "tolerance": tolerance}

    for cut in ([box] if box is not None else []) + ([None] if precision != "float32" else []):
        y = score(cut)
        if abs(y - y0) <= tolerance * abs(y0):
            chosen.box, chosen.precision, chosen.y0 = cut, precision, y
            return chosen
        if cut is not None:
            chosen.box_rejected = dict(record(y), box=[[b.start, b.stop] for b in cut], precision=precision)
        else:
            chosen.precision_rejected = record(y)
    return chosen


def perturbation_curves(model: nn.Module, x: torch.Tensor, target: SegmentTarget, heatmaps: Sequence[torch.Tensor],
                        steps: Union[int, Sequence[float]] = 10, modes: Sequence[str] = MODES,
                        baseline: str = "blur", sigma: float = 5.0, domain: Optional[torch.Tensor] = None,
                        region: Optional[torch.Tensor] = None, reference_score: Optional[float] = None,
                        batch_size: Optional[int] = None, output_key: Optional[str] = None, seed: int = 0,
                        eval_mode: bool = True, progress: Optional[ProgressCallback] = None,
                        box: Optional[Sequence[slice]] = None, rescore_box: bool = True,
                        precision: str = "float32") -> List[Dict[str, Curve]]:
    """Deletion and insertion curves of several heatmaps of one input and target.

    Args:
        model: the network (left as found: eval mode and flags restored, no gradients).
        x: the input ``[1, C, *S]`` (one image).
        target: the explained target; its score is taken on the fixed ``region``.
        heatmaps: maps on the input grid, each ``[*S]`` or ``[1, *S]`` (e.g. ``CAMResult.map``).
        steps: number of equal steps (fractions ``0, 1/steps, ..., 1``) or an increasing list of fractions
            from 0 to 1. Each interior fraction costs one forward pass per map and mode. A list that ends below 1
            gives a partial curve over ``[0, steps[-1]]``: its last point is scored like an interior one, and a
            deletion-only call then needs no pass on the fully replaced input (the quick check's curve).
        modes: ``deletion`` and/or ``insertion``.
        baseline: ``blur``, ``mean`` or ``zero`` (see :func:`baseline_input`); ``sigma`` in voxels for ``blur``.
        domain: boolean ``[*S]``: the voxels that may be ranked and perturbed (e.g. the image inside the model's
            padding); fractions are of these voxels. Default: all.
        region: the original M, boolean ``[1, *S_out]`` (``CAMResult.region``); default: from one forward pass.
        reference_score: ``y0`` if already known (``CAMResult.score``); default: from one forward pass.
        batch_size: perturbed inputs per forward pass; ``None`` picks one from free memory
            (:func:`auto_batch_size`); halved automatically on an out-of-memory error.
        seed: tie-breaking permutation of :func:`saliency_order`.
        box: run every scored input on this box of the input grid only (:func:`.shortcut.target_box`: the
            region M and its receptive field); ranks, fractions and the baseline still come from the whole input,
            and the score of the unperturbed box is taken again (one more forward pass) as ``y0``. Needs a model
            whose output lies on the input grid. ``rescore_box=False`` keeps the given ``reference_score`` (one
            forward pass less; the curve then starts from the whole input's score).
        precision: ``float32`` (default) or ``bfloat16`` (or ``auto``, :func:`resolve_precision`): the arithmetic of
            the scored inputs' forward passes; ``reference_score`` should then be the unperturbed input's score in
            it (:func:`choose_stand_in` gives both).

    Returns:
        For every heatmap, ``{mode: Curve}``. Both end points are shared by all maps (the unperturbed input and
        the fully replaced one), so the cost is ``2 + len(heatmaps) * len(modes) * (len(fractions) - 2)``
        forward passes at most (a partial deletion curve: ``len(heatmaps) * (len(fractions) - 1)``, plus one
        with a ``box`` and ``rescore_box``, or in bfloat16 without a ``reference_score``).
    """
    check_input(model, x)
    if x.shape[0] != 1:
        raise InputError("deletion/insertion evaluate one image at a time; got a batch of %d" % x.shape[0])
    precision = resolve_precision(precision, x.device)
    fractions = _fractions(steps)
    modes = list(modes)
    if not modes or any(m not in MODES for m in modes):
        raise InputError("modes must be a non-empty subset of %s, got %r" % (MODES, modes))
    spatial = tuple(x.shape[2:])
    maps = []
    for heat in heatmaps:
        heat = heat.detach()
        heat = heat[0] if heat.ndim == len(spatial) + 1 else heat
        if tuple(heat.shape) != spatial:
            raise InputError("a heatmap of shape %s does not lie on the input grid %s" % (tuple(heat.shape), spatial))
        maps.append(heat)
    dom = None if domain is None else domain.to(device=x.device, dtype=torch.bool).reshape(spatial)
    if dom is not None and not bool(dom.any()):
        raise InputError("the domain mask is empty: no voxel can be perturbed")
    if batch_size is not None and int(batch_size) < 1:
        raise InputError("batch size must be >= 1, got %r" % (batch_size,))
    report = progress or (lambda f, m: None)
    x = x.detach()
    rescore = reference_score is None and precision != "float32"  # y0 in the curve's own arithmetic
    if region is None or (reference_score is None and not rescore):
        with model_guard(model, eval_mode=eval_mode), torch.no_grad():
            out = _forward(model, x, output_key)
        region = target.region(out) if region is None else region
        reference_score = float(target(out, region.to(out.device))[0]) if reference_score is None else reference_score
    region = region.to(x.device).bool()
    region = region[None] if region.ndim == len(spatial) else region
    cut = (slice(None), slice(None))
    if box is not None:
        box = tuple(box)
        if len(box) != len(spatial) or tuple(region.shape[1:]) != spatial:
            raise InputError("a crop box needs one slice per spatial axis (%d) and a model output on the input "
                             "grid %s (the region is %s)" % (len(spatial), spatial, tuple(region.shape[1:])))
        cut = cut + box
        region = region[(slice(None),) + box]
        if bool(region.sum() == 0):
            raise InputError("the crop box holds none of the region's voxels")
    x_cut = x[cut]
    base_cut = baseline_input(x, baseline, sigma, dom, box)  # the baseline of the scored box only
    replaced_cut = base_cut if dom is None else torch.where(dom[cut[2:]], base_cut, x_cut)
    batch_size = auto_batch_size(x_cut) if batch_size is None else int(batch_size)  # the box's inputs are batched
    scorer = _Scorer(model, target, region, output_key, batch_size, eval_mode, precision)
    if (box is not None and rescore_box) or rescore:
        report(0.0, "score of the unperturbed %s" % ("box" if box is not None else "input"))
        reference_score = scorer(lambda i: x_cut, 1)[0]
    whole = fractions[-1] == 1.0  # else a partial curve: its last point is a perturbed input like the others
    y_base = float("nan")
    if whole or "insertion" in modes:
        report(0.0, "score of the fully replaced input")
        y_base = scorer(lambda i: replaced_cut, 1)[0]
    total_voxels = int(dom.sum()) if dom is not None else int(torch.tensor(spatial).prod())
    counts = [int(round(f * total_voxels)) for f in fractions]
    interior = list(range(1, len(fractions) - 1 if whole else len(fractions)))
    ties = _tie_order(maps[0].numel(), dom, seed, maps[0].device) if maps else None  # drawn once for all maps
    chosen = [dict(zip(interior, saliency_sets(heat, dom, seed, [counts[i] for i in interior], ties)))
              for heat in maps]
    jobs = [(m, mode, i) for m in range(len(maps)) for mode in modes for i in interior]

    def make(j: int) -> torch.Tensor:
        m, mode, i = jobs[j]
        mask = torch.zeros(x[0, 0].numel(), dtype=torch.bool, device=x.device)
        mask[chosen[m][i]] = True
        mask = mask.view(spatial)[cut[2:]]
        return torch.where(mask, base_cut, x_cut) if mode == "deletion" else torch.where(mask, x_cut, replaced_cut)

    scores = scorer(make, len(jobs), lambda done: report(done / max(1, len(jobs)), "perturbed input %d/%d"
                                                       % (done, len(jobs)))) if jobs else []
    results: List[Dict[str, Curve]] = []
    by_job = dict(zip(jobs, scores))
    for m in range(len(maps)):
        curves = {}
        for mode in modes:
            inner = [by_job[(m, mode, i)] for i in interior]
            ends = (reference_score, y_base) if mode == "deletion" else (y_base, reference_score)
            curves[mode] = Curve(mode, list(fractions), [ends[0]] + inner + ([ends[1]] if whole else []),
                                 float(reference_score), scorer.batch_size)
        results.append(curves)
    report(1.0, "done (%d forward passes, batch %d)" % (scorer.forwards, scorer.batch_size))
    return results


def _fractions(steps) -> List[float]:
    if isinstance(steps, bool):
        raise InputError("steps must be an integer >= 1 or a list of fractions, got %r" % (steps,))
    if isinstance(steps, int):
        if steps < 1:
            raise InputError("steps must be >= 1, got %d" % steps)
        return [i / steps for i in range(steps + 1)]
    values = [float(f) for f in steps]
    if len(values) < 2 or values[0] != 0.0 or values[-1] > 1.0 or any(b <= a for a, b in zip(values, values[1:])):
        raise InputError("fractions must increase strictly from 0 to at most 1, got %r" % (list(steps),))
    return values


__all__ = ["AUTO_BYTES_PER_VOXEL", "BASELINES", "BOX_TOLERANCE", "MODES", "PRECISIONS", "Curve", "StandIn",
           "auto_batch_size", "baseline_input", "choose_stand_in", "gaussian_blur", "perturbation_curves",
           "resolve_precision", "saliency_order", "saliency_sets"]
