"""Faithfulness and sanity metrics for heatmaps of segmentation models (ALGORITHMS.md, "Faithfulness checks").

Everything is dimension-generic (1 to 3 spatial axes) and works on the explained target ``y^c_M`` itself.

- **Deletion / insertion** (Petsiuk, Das, Saenko, *RISE*, BMVC 2018): rank the input voxels by the heatmap,
  replace the top fraction by a baseline (Gaussian blur of the input, or its mean), record ``y^c_M`` at each step
  (deletion), or start from the baseline and put the top fraction back (insertion). The region M stays the
  *original* one at every step: ``y^c_M`` is the function the heatmap explains (the engine differentiated
  exactly that sum), so only the input may change along the curve. Re-computing M from each perturbed
  prediction would mix two effects — the logits falling, and the summation domain shrinking as the prediction
  vanishes — and a blurred input, whose predicted region is usually empty, would have no score at all.
  Curves are normalised by ``y0``, the score of the unperturbed input; the area under the normalised curve
  (trapezoid rule on the fractions in [0, 1]) is the AUC: lower deletion AUC and higher insertion AUC are more
  faithful. ``y0 <= 0`` (possible with logits) leaves the normalised values undefined (NaN); the raw AUCs, in
  score units, still rank methods on the same image and target, since every method shares ``y0`` and both end
  points. Cost: one forward pass per step and map, plus one for the baseline (batched, see ``batch_size``).
- **Energy in the segment**: the fraction of the positive heat that lies inside M (and inside M dilated by a
  max-pool of radius r voxels, i.e. a cube of side ``2r + 1``); compare it with the fraction of voxels that M
  covers, which is what a uniform map scores.
- **Sanity checks** (Adebayo et al., *Sanity checks for saliency maps*, NeurIPS 2018): re-initialise the
  weights on a deep copy of the model, cascading from the output layer down in stages, and report the Spearman
  rank correlation between the original and the randomised maps (a faithful map changes: the correlation
  falls towards 0); likewise for a randomised target (M shifted or scattered, or another class).

>>> import torch
>>> spearman(torch.tensor([1., 2., 2., 3.]), torch.tensor([10., 20., 20., 30.]))
1.0
"""

import copy
import math
import zlib
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import InputError, InternalError, LayerError, ModelError, SegHiResCAMError, close_matches
from .cam import CAMResult, check_input, compute_cams
from .hooks import model_guard
from .outputs import main_output
from .regions import ClassView, MaskRegion, Region
from .targets import SegmentTarget

BASELINES = ("blur", "mean", "zero")
MODES = ("deletion", "insertion")
RANDOM_TARGETS = ("shift", "scatter", "class")
#: inference memory per input voxel assumed by ``batch_size=None`` (HD-BET: 1.8 GiB for 128^3, ~900 B/voxel)
AUTO_BYTES_PER_VOXEL = 1024
ProgressCallback = Callable[[float, str], None]


def _spatial(t: torch.Tensor) -> Tuple[int, ...]:
    return tuple(range(1, t.ndim))


# ----------------------------------------------------------------------------------------------- baselines
def gaussian_blur(x: torch.Tensor, sigma: Union[float, Sequence[float]], truncate: float = 3.0) -> torch.Tensor:
    """Separable Gaussian blur of ``x`` ``[B, C, *S]`` (sigma in voxels, one value or one per spatial axis).

    One 1-D convolution per axis, kernel radius ``round(truncate * sigma)``, borders extended by replication.
    """
    nd = x.ndim - 2
    sigmas = [float(sigma)] * nd if isinstance(sigma, (int, float)) else [float(s) for s in sigma]
    if len(sigmas) != nd or any(s < 0 or not math.isfinite(s) for s in sigmas):
        raise InputError("sigma must be >= 0, one value or one per spatial axis (%d), got %r" % (nd, sigma))
    out = x
    for axis, s in zip(range(2, x.ndim), sigmas):
        radius = int(truncate * s + 0.5)
        if s == 0 or radius == 0:
            continue
        t = torch.arange(-radius, radius + 1, dtype=x.dtype, device=x.device)
        kernel = torch.exp(-0.5 * (t / s) ** 2)
        kernel = (kernel / kernel.sum()).view(1, 1, -1)
        moved = out.movedim(axis, -1)
        shape = moved.shape
        flat = F.pad(moved.reshape(-1, 1, shape[-1]), (radius, radius), mode="replicate")
        out = F.conv1d(flat, kernel).view(shape).movedim(-1, axis)
    return out


def baseline_input(x: torch.Tensor, kind: str = "blur", sigma: float = 5.0,
                   domain: Optional[torch.Tensor] = None) -> torch.Tensor:
    """What removed voxels are replaced with: ``blur`` (Gaussian, ``sigma`` voxels), ``mean`` (per channel, over
    the domain) or ``zero``."""
    if kind not in BASELINES:
        raise InputError("baseline must be one of %s, got %r" % (", ".join(BASELINES), kind))
    if kind == "zero":
        return torch.zeros_like(x)
    if kind == "blur":
        return gaussian_blur(x, sigma)
    weights = torch.ones(x.shape[2:], dtype=x.dtype, device=x.device) if domain is None else domain.to(x.dtype)
    dims = tuple(range(2, x.ndim))
    mean = (x * weights).sum(dim=dims, keepdim=True) / weights.sum().clamp_min(1.0)
    return mean.expand_as(x).clone()


# --------------------------------------------------------------------------------------------- the curves
def saliency_order(heat: torch.Tensor, domain: Optional[torch.Tensor] = None, seed: int = 0) -> torch.Tensor:
    """Flat indices of the domain's voxels, most salient first.

    Ties (e.g. the zeros left by ReLU) are broken by a fixed pseudo-random permutation drawn from ``seed``:
    deterministic, and free of the spatial bias of raster order (which would delete whole slabs of the volume).
    """
    flat = heat.detach().reshape(-1)
    if not bool(torch.isfinite(flat).all()):
        raise InputError("the heatmap holds NaN or infinite values; cannot rank its voxels")
    if domain is None:
        index = torch.arange(flat.numel(), device=flat.device)
    else:
        if domain.numel() != flat.numel():
            raise InputError("the domain mask has %d voxels but the heatmap %d" % (domain.numel(), flat.numel()))
        index = domain.reshape(-1).to(flat.device).nonzero().squeeze(1)
    generator = torch.Generator().manual_seed(int(seed))
    perm = torch.randperm(index.numel(), generator=generator).to(flat.device)
    order = torch.argsort(-flat[index][perm], stable=True)
    return index[perm[order]]


@dataclass
class Curve:
    """One deletion or insertion curve.

    Attributes:
        mode: ``deletion`` or ``insertion``.
        fractions: fraction of the domain's voxels removed (deletion) or inserted (insertion), from 0 to 1.
        scores: the target score ``y^c_M`` (original M) at each fraction.
        reference: ``y0``, the score of the unperturbed input (the normaliser).
    """

    mode: str
    fractions: List[float]
    scores: List[float]
    reference: float

    @property
    def normalized(self) -> List[float]:
        """``scores / y0``; NaN when ``y0 <= 0`` (normalisation undefined)."""
        if not self.reference > 0:
            return [float("nan")] * len(self.scores)
        return [s / self.reference for s in self.scores]

    @property
    def auc(self) -> float:
        """Area under the normalised curve (fractions 0..1, trapezoid rule); NaN when ``y0 <= 0``."""
        return _trapezoid(self.fractions, self.normalized)

    @property
    def auc_raw(self) -> float:
        """Area under the raw score curve, in score units."""
        return _trapezoid(self.fractions, self.scores)

    def to_dict(self) -> dict:
        return {"mode": self.mode, "fractions": list(self.fractions), "scores": list(self.scores),
                "normalized": self.normalized, "reference": self.reference, "auc": self.auc,
                "auc_raw": self.auc_raw}


def _trapezoid(xs: Sequence[float], ys: Sequence[float]) -> float:
    return float(sum((x1 - x0) * (y0 + y1) / 2.0 for x0, x1, y0, y1 in zip(xs[:-1], xs[1:], ys[:-1], ys[1:])))


def _available_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 4 << 30  # unknown platform: assume 4 GiB


def auto_batch_size(x: torch.Tensor, bytes_per_voxel: int = AUTO_BYTES_PER_VOXEL) -> int:
    """Perturbed inputs per forward pass: half the free memory over ``bytes_per_voxel`` per input voxel,
    at most 4 on CPU (batching barely speeds CPU convolutions up) and 16 on a GPU."""
    need = max(1, x[0, 0].numel() * bytes_per_voxel)
    cap = 16 if x.device.type == "cuda" else 4
    return max(1, min(cap, int(0.5 * _available_bytes(x.device) // need)))


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


class _Scorer:
    """Scores ``y^c_M`` of batches of inputs with a fixed region, halving the batch on out-of-memory errors."""

    def __init__(self, model, target, region, output_key, batch_size, eval_mode):
        self.model, self.target, self.output_key, self.eval_mode = model, target, output_key, eval_mode
        self.region = region
        self.batch_size = batch_size
        self.forwards = 0

    def _scores(self, batch: torch.Tensor) -> torch.Tensor:
        out = _forward(self.model, batch, self.output_key)
        self.forwards += batch.shape[0]
        region = self.region.expand((batch.shape[0],) + tuple(self.region.shape[1:]))
        return self.target(out, region).detach().double().cpu()

    def __call__(self, inputs: Callable[[int], torch.Tensor], count: int,
                 report: Callable[[int], None] = lambda done: None) -> List[float]:
        scores: List[float] = []
        with model_guard(self.model, eval_mode=self.eval_mode), torch.no_grad():
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


def perturbation_curves(model: nn.Module, x: torch.Tensor, target: SegmentTarget, heatmaps: Sequence[torch.Tensor],
                        steps: Union[int, Sequence[float]] = 10, modes: Sequence[str] = MODES,
                        baseline: str = "blur", sigma: float = 5.0, domain: Optional[torch.Tensor] = None,
                        region: Optional[torch.Tensor] = None, reference_score: Optional[float] = None,
                        batch_size: Optional[int] = None, output_key: Optional[str] = None, seed: int = 0,
                        eval_mode: bool = True, progress: Optional[ProgressCallback] = None) -> List[Dict[str, Curve]]:
    """Deletion and insertion curves of several heatmaps of one input and target.

    Args:
        model: the network (left as found: eval mode and flags restored, no gradients).
        x: the input ``[1, C, *S]`` (one image).
        target: the explained target; its score is taken on the fixed ``region``.
        heatmaps: maps on the input grid, each ``[*S]`` or ``[1, *S]`` (e.g. ``CAMResult.map``).
        steps: number of equal steps (fractions ``0, 1/steps, ..., 1``) or an increasing list of fractions
            from 0 to 1. Each interior fraction costs one forward pass per map and mode.
        modes: ``deletion`` and/or ``insertion``.
        baseline: ``blur``, ``mean`` or ``zero`` (see :func:`baseline_input`); ``sigma`` in voxels for ``blur``.
        domain: boolean ``[*S]``: the voxels that may be ranked and perturbed (e.g. the image inside the model's
            padding); fractions are of these voxels. Default: all.
        region: the original M, boolean ``[1, *S_out]`` (``CAMResult.region``); default: from one forward pass.
        reference_score: ``y0`` if already known (``CAMResult.score``); default: from one forward pass.
        batch_size: perturbed inputs per forward pass; ``None`` picks one from free memory
            (:func:`auto_batch_size`); halved automatically on an out-of-memory error.
        seed: tie-breaking permutation of :func:`saliency_order`.

    Returns:
        For every heatmap, ``{mode: Curve}``. Both end points are shared by all maps (the unperturbed input and
        the fully replaced one), so the cost is ``2 + len(heatmaps) * len(modes) * (len(fractions) - 2)``
        forward passes at most.
    """
    check_input(model, x)
    if x.shape[0] != 1:
        raise InputError("deletion/insertion evaluate one image at a time; got a batch of %d" % x.shape[0])
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
    if batch_size is None:
        batch_size = auto_batch_size(x)
    elif int(batch_size) < 1:
        raise InputError("batch size must be >= 1, got %r" % (batch_size,))
    report = progress or (lambda f, m: None)
    x = x.detach()
    if region is None or reference_score is None:
        with model_guard(model, eval_mode=eval_mode), torch.no_grad():
            out = _forward(model, x, output_key)
        region = target.region(out) if region is None else region
        reference_score = float(target(out, region.to(out.device))[0]) if reference_score is None else reference_score
    region = region.to(x.device).bool()
    region = region[None] if region.ndim == len(spatial) else region
    scorer = _Scorer(model, target, region, output_key, int(batch_size), eval_mode)
    base = baseline_input(x, baseline, sigma, dom)
    replaced = base if dom is None else torch.where(dom, base, x)
    report(0.0, "score of the fully replaced input")
    y_base = scorer(lambda i: replaced, 1)[0]
    total_voxels = int(dom.sum()) if dom is not None else int(torch.tensor(spatial).prod())
    counts = [int(round(f * total_voxels)) for f in fractions]
    interior = list(range(1, len(fractions) - 1))
    orders = [saliency_order(heat, dom, seed) for heat in maps]
    jobs = [(m, mode, i) for m in range(len(maps)) for mode in modes for i in interior]

    def make(j: int) -> torch.Tensor:
        m, mode, i = jobs[j]
        mask = torch.zeros(x[0, 0].numel(), dtype=torch.bool, device=x.device)
        mask[orders[m][:counts[i]]] = True
        mask = mask.view(spatial)
        return torch.where(mask, base, x) if mode == "deletion" else torch.where(mask, x, replaced)

    scores = scorer(make, len(jobs), lambda done: report(done / max(1, len(jobs)), "perturbed input %d/%d"
                                                       % (done, len(jobs)))) if jobs else []
    results: List[Dict[str, Curve]] = []
    by_job = dict(zip(jobs, scores))
    for m in range(len(maps)):
        curves = {}
        for mode in modes:
            inner = [by_job[(m, mode, i)] for i in interior]
            ends = (reference_score, y_base) if mode == "deletion" else (y_base, reference_score)
            curves[mode] = Curve(mode, list(fractions), [ends[0]] + inner + [ends[1]], float(reference_score))
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
    if len(values) < 2 or values[0] != 0.0 or values[-1] != 1.0 or any(b <= a for a, b in zip(values, values[1:])):
        raise InputError("fractions must increase strictly from 0 to 1, got %r" % (list(steps),))
    return values


# ------------------------------------------------------------------------------------------------- energy
def dilate(mask: torch.Tensor, radius: int) -> torch.Tensor:
    """Binary dilation of ``mask`` ``[B, *S]`` (1 to 3 spatial axes) by a cube of side ``2 radius + 1``
    (max-pool, stride 1)."""
    if isinstance(radius, bool) or int(radius) != radius or radius < 0:
        raise InputError("dilation radius must be a whole number of voxels >= 0, got %r" % (radius,))
    radius = int(radius)
    if radius == 0:
        return mask.bool()
    nd = mask.ndim - 1
    pool = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}.get(nd)
    if pool is None:
        raise InputError("dilation needs 1 to 3 spatial axes, got a mask of shape %s" % (tuple(mask.shape),))
    grown = pool(mask[:, None].float(), kernel_size=2 * radius + 1, stride=1, padding=radius)
    return grown[:, 0] > 0


def region_on_grid(region: torch.Tensor, spatial: Sequence[int]) -> torch.Tensor:
    """The region ``[B, *S']`` on the heatmap grid (nearest neighbour when the output grid differs from the input's)."""
    spatial = tuple(int(s) for s in spatial)
    if tuple(region.shape[1:]) == spatial:
        return region.bool()
    return F.interpolate(region[:, None].float(), size=spatial, mode="nearest-exact")[:, 0] > 0.5


def energy_in_region(heat: torch.Tensor, region: torch.Tensor, dilation: int = 0,
                     domain: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Fraction of the positive heat that lies inside ``region`` (dilated by ``dilation`` voxels).

    Args:
        heat: maps ``[B, *S]``.
        region: boolean ``[B, *S']`` (resized to ``S`` by nearest neighbour if ``S' != S``).
        dilation: max-pool radius in voxels (see :func:`dilate`).
        domain: boolean ``[*S]``: only these voxels count (e.g. the image inside the model's padding).

    Returns:
        ``[B]`` float64 in [0, 1]; NaN where the map has no positive heat.
    """
    region = dilate(region_on_grid(region.to(heat.device), tuple(heat.shape[1:])), dilation)
    positive = torch.relu(heat.detach()).double()
    if domain is not None:
        positive = positive * domain.to(device=heat.device, dtype=positive.dtype)
    total = positive.sum(dim=_spatial(positive))
    inside = (positive * region).sum(dim=_spatial(positive))
    return torch.where(total > 0, inside / torch.where(total > 0, total, torch.ones_like(total)),
                       torch.full_like(total, float("nan")))


def region_fraction(region: torch.Tensor, spatial: Sequence[int], dilation: int = 0,
                    domain: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Fraction of the (domain's) voxels inside the (dilated) region: the energy of a uniform map, ``[B]``."""
    grid = dilate(region_on_grid(region, tuple(spatial)), dilation).double()
    weights = torch.ones(tuple(spatial), dtype=torch.float64, device=grid.device) if domain is None else \
        domain.to(device=grid.device, dtype=torch.float64)
    return (grid * weights).sum(dim=_spatial(grid)) / weights.sum().clamp_min(1.0)


# ----------------------------------------------------------------------------------------- rank correlation
def rankdata(values) -> torch.Tensor:
    """1-based ranks of the flattened ``values`` (float64); ties get the average of their ranks."""
    v = torch.as_tensor(values).detach().reshape(-1)
    n = v.numel()
    if n == 0:
        return torch.zeros(0, dtype=torch.float64)
    order = torch.argsort(v, stable=True)
    ordered = v[order]
    starts_group = torch.ones(n, dtype=torch.bool, device=v.device)
    starts_group[1:] = ordered[1:] != ordered[:-1]
    group = torch.cumsum(starts_group.long(), 0) - 1
    counts = torch.bincount(group).double()
    ends = torch.cumsum(counts, 0)  # rank of each group's last member
    average = ends - (counts - 1) / 2.0
    ranks = torch.empty(n, dtype=torch.float64, device=v.device)
    ranks[order] = average[group]
    return ranks


def spearman(a, b, domain: Optional[torch.Tensor] = None) -> float:
    """Spearman's rank correlation of two maps of the same shape (Pearson correlation of average ranks).

    Returns NaN when either map is constant (e.g. a flat, all-zero map): its ranking is undefined.
    """
    a, b = torch.as_tensor(a).detach(), torch.as_tensor(b).detach()
    if a.shape != b.shape:
        raise InputError("cannot correlate maps of shapes %s and %s" % (tuple(a.shape), tuple(b.shape)))
    a, b = a.reshape(-1), b.to(a.device).reshape(-1)
    if domain is not None:
        keep = torch.as_tensor(domain).to(a.device).reshape(-1).bool()
        a, b = a[keep], b[keep]
    ra, rb = rankdata(a), rankdata(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denominator = float(torch.sqrt((ra * ra).sum() * (rb * rb).sum()))
    return float("nan") if denominator == 0 else float((ra * rb).sum()) / denominator


def map_correlations(reference: Sequence[CAMResult], other: Sequence[CAMResult],
                     domain: Optional[torch.Tensor] = None) -> Dict[Tuple[str, str], float]:
    """Spearman correlation of the heatmaps ``map`` matched by ``(layer, method)``."""
    mine = {(r.layer, r.method): r for r in other}
    return {(r.layer, r.method): spearman(r.map[0], mine[(r.layer, r.method)].map[0], domain)
            for r in reference if (r.layer, r.method) in mine}


# ------------------------------------------------------------------------------------- randomised targets
class _DerivedRegion(Region):
    """The region M of another target, computed on the same output, then transformed (randomised targets)."""

    def __init__(self, source: SegmentTarget, kind: str, seed: int):
        self.source, self.kind, self.seed = source, kind, int(seed)

    def __call__(self, view: ClassView) -> torch.Tensor:
        mask = self.source.region(view.output)
        if self.kind == "class":
            return mask
        generator = torch.Generator().manual_seed(self.seed)
        spatial = tuple(mask.shape[1:])
        if self.kind == "shift":  # same size and shape, moved by a quarter to three quarters of each axis
            shifts = [int(torch.randint(max(1, s // 4), max(2, 3 * s // 4 + 1), (1,), generator=generator)) % s
                      for s in spatial]
            return torch.roll(mask, shifts=shifts, dims=tuple(range(1, mask.ndim)))
        out = torch.zeros_like(mask)  # scatter: as many voxels as M, uniformly at random
        for b in range(mask.shape[0]):
            count = int(mask[b].sum())
            chosen = torch.randperm(mask[b].numel(), generator=generator)[:count].to(mask.device)
            out[b].view(-1)[chosen] = True
        return out

    def describe(self) -> dict:
        return {"region": "randomised (%s) region of %s" % (self.kind, self.source.name), "seed": self.seed}


def random_target(target: SegmentTarget, kind: str = "shift", seed: int = 0,
                  num_classes: Optional[int] = None) -> SegmentTarget:
    """A randomised version of ``target`` for the sanity check, derived from its region M at evaluation time.

    Args:
        kind: ``shift`` (M moved by a random offset of 1/4 to 3/4 of each axis, circularly: same size and
            shape), ``scatter`` (as many voxels as M, drawn uniformly) or ``class`` (the same M, another class
            drawn at random).
        num_classes: the model's number of classes (needed for ``class``; 2 for a one-channel sigmoid model).
    """
    if kind not in RANDOM_TARGETS:
        raise InputError("random target must be one of %s, got %r" % (", ".join(RANDOM_TARGETS), kind))
    class_index = target.class_index
    if kind == "class":
        if not num_classes or num_classes < 2:
            raise InputError("a random-class target needs a model with at least 2 classes, got %r" % (num_classes,))
        others = [c for c in range(num_classes) if c != target.class_index]
        generator = torch.Generator().manual_seed(int(seed))
        class_index = others[int(torch.randint(len(others), (1,), generator=generator))]
    return SegmentTarget(class_index, _DerivedRegion(target, kind, seed), score=target.score,
                         reduction=target.reduction, activation=target.activation,
                         name="random-%s" % kind)


def fixed_target(target: SegmentTarget, region: torch.Tensor) -> SegmentTarget:
    """``target`` with its region frozen to ``region`` (boolean ``[B, *S_out]``): ``y^c_M`` with the original M."""
    return SegmentTarget(target.class_index, MaskRegion(region.detach().bool()), score=target.score,
                         reduction=target.reduction, activation=target.activation, name=target.name)


# ----------------------------------------------------------------------------------- model randomisation
def parameter_layers(model: nn.Module, x: torch.Tensor) -> List[str]:
    """Modules that own parameters directly, in the order they run (one gradient-free forward pass)."""
    owners = {name: m for name, m in model.named_modules() if any(True for _ in m.parameters(recurse=False))}
    seen: List[str] = []
    handles = []
    try:
        for name, module in owners.items():
            handles.append(module.register_forward_pre_hook(
                lambda mod, inputs, name=name: seen.append(name) if name not in seen else None))
        with model_guard(model), torch.no_grad():
            model(x.detach())
    finally:
        for handle in handles:
            handle.remove()
    return seen


def cascade_stages(order: Sequence[str], stages: Union[int, Sequence[str]] = 3) -> List[Tuple[str, List[str]]]:
    """Cumulative stages of a top-down re-initialisation.

    Args:
        order: parameter-owning modules in execution order (:func:`parameter_layers`).
        stages: a number of equal stages (by count of modules), or module names: stage ``k`` re-initialises
            every module that runs from the first use of ``stages[k]`` to the output (``""`` = the root: all).

    Returns:
        ``[(label, modules re-initialised), ...]`` from the top (output) down, each a superset of the previous.
    """
    order = list(order)
    if not order:
        raise InputError("the model has no parameters to randomise")
    if isinstance(stages, int) and not isinstance(stages, bool):
        if stages < 1:
            raise InputError("stages must be >= 1, got %d" % stages)
        n = len(order)
        starts = sorted({n - max(1, int(math.ceil(n * (k + 1) / stages))) for k in range(stages)}, reverse=True)
        return [("top %d/%d modules" % (n - s, n) if s else "all %d modules" % n, order[s:]) for s in starts]
    result = []
    for name in stages:
        members = [i for i, m in enumerate(order) if not name or m == name or m.startswith(name + ".")]
        if not members:
            hints = close_matches(name, order)
            raise LayerError("no parameter-owning module at or under %r%s; modules: %s" % (
                name, " (did you mean %s?)" % ", ".join(hints) if hints else "", ", ".join(order[-8:])))
        result.append((name or "all", order[min(members):]))
    result.sort(key=lambda item: len(item[1]))
    return result


def randomize_modules(model: nn.Module, names: Sequence[str], seed: int = 0) -> None:
    """Re-initialise the parameters of the named modules in place (``reset_parameters`` where the module has
    one, else a normal draw with each tensor's own standard deviation).

    Each module draws from its own generator state, seeded from ``(seed, name)``: the result does not depend on
    how modules are grouped into stages, and the caller's global random state is left untouched."""
    modules = dict(model.named_modules())
    devices = sorted({p.device.index or 0 for p in model.parameters() if p.device.type == "cuda"})
    with torch.random.fork_rng(devices=devices), torch.no_grad():
        for name in names:
            torch.manual_seed((int(seed) * 1000003 + zlib.crc32(name.encode("utf-8"))) % (2 ** 63))
            module = modules[name]
            if hasattr(module, "reset_parameters"):
                module.reset_parameters()
            else:
                for param in module.parameters(recurse=False):
                    param.normal_(0.0, float(param.std()) if param.numel() > 1 else 1.0)


@dataclass
class SanityStage:
    """One stage of the model-randomisation check."""

    label: str
    randomized: List[str]
    correlations: Dict[Tuple[str, str], float] = field(default_factory=dict)
    correlations_in_segment: Dict[Tuple[str, str], float] = field(default_factory=dict)
    warnings: List[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        inside = self.correlations_in_segment
        return {"label": self.label, "randomized": list(self.randomized),
                "correlations": [{"layer": l, "method": m, "spearman": c,
                                  "spearman_in_segment": inside.get((l, m), float("nan"))}
                                 for (l, m), c in self.correlations.items()],
                "warnings": list(self.warnings)}


def model_randomization(model: nn.Module, x: torch.Tensor, target: SegmentTarget, layers: Sequence[str],
                        methods: Sequence[str], stages: Union[int, Sequence[str]] = 3,
                        reference: Optional[Sequence[CAMResult]] = None, seed: int = 0,
                        order: Optional[Sequence[str]] = None, domain: Optional[torch.Tensor] = None,
                        segment: Optional[torch.Tensor] = None, progress: Optional[ProgressCallback] = None,
                        **cam_options) -> List[SanityStage]:
    """Cascading model-parameter randomisation (Adebayo et al. 2018) on a deep copy of ``model``.

    ``model`` itself is never modified. The target keeps the original region M (:func:`fixed_target`), so only
    the weights change between the original and the randomised maps.

    Args:
        layers, methods: explained layers (resolved names, not ``auto``) and methods.
        stages: see :func:`cascade_stages`.
        reference: the original model's results for ``target`` (from :func:`compute_cams`); computed if absent.
        order: :func:`parameter_layers` if already known (saves a forward pass).
        domain: boolean ``[*S]`` on the input grid: the voxels the correlation is taken over (default: all).
        segment: boolean ``[*S]``: also correlate inside these voxels only (e.g. the dilated target region).
            Why: methods whose maps are confined to M by construction (Seg-HiRes-Grad CAM before a 1x1 head)
            keep the shape of M under any weights, so the whole-image correlation stays high even when the
            content inside M is entirely new; the in-segment value separates the two.
        **cam_options: passed to :func:`compute_cams` (e.g. ``output_key``, ``relu``).

    Returns:
        One :class:`SanityStage` per stage, with the Spearman correlation of every ``(layer, method)`` map.
        Each stage costs one forward and one backward pass.
    """
    report = progress or (lambda f, m: None)
    if reference is None:
        reference = compute_cams(model, x, [target], list(layers), list(methods), **cam_options)
    frozen = fixed_target(target, reference[0].region)
    plan = cascade_stages(order if order is not None else parameter_layers(model, x), stages)
    clone = copy.deepcopy(model)
    done: set = set()
    results = []
    try:
        for index, (label, names) in enumerate(plan):
            report(index / len(plan), "randomised model, stage %s" % label)
            randomize_modules(clone, [n for n in names if n not in done], seed)
            done.update(names)
            maps = compute_cams(clone, x, [frozen], list(layers), list(methods), **cam_options)
            stage = SanityStage(label, list(names), map_correlations(reference, maps, domain))
            if segment is not None:
                inside = segment.bool() if domain is None else segment.bool() & domain.bool()
                stage.correlations_in_segment = map_correlations(reference, maps, inside)
            stage.warnings = sorted({w for r in maps for w in r.warnings})
            results.append(stage)
            del maps
    finally:
        del clone
    report(1.0, "done")
    return results


def target_randomization(model: nn.Module, x: torch.Tensor, target: SegmentTarget, layers: Sequence[str],
                         methods: Sequence[str], kinds: Sequence[str] = ("shift", "class"), seed: int = 0,
                         num_classes: Optional[int] = None, domain: Optional[torch.Tensor] = None,
                         **cam_options) -> Dict[str, Dict[Tuple[str, str], float]]:
    """Spearman correlation between the maps of ``target`` and of randomised targets (one forward pass, one
    backward pass per target): ``{kind: {(layer, method): rho}}``. Low values: the map depends on the target."""
    targets = [target] + [random_target(target, kind, seed, num_classes) for kind in kinds]
    results = compute_cams(model, x, targets, list(layers), list(methods), **cam_options)
    per = len(results) // len(targets)
    reference = results[:per]
    return {kind: map_correlations(reference, results[(k + 1) * per:(k + 2) * per], domain)
            for k, kind in enumerate(kinds)}


__all__ = [
    "BASELINES", "MODES", "RANDOM_TARGETS", "Curve", "SanityStage", "auto_batch_size", "baseline_input",
    "cascade_stages", "dilate", "energy_in_region", "fixed_target", "gaussian_blur", "map_correlations",
    "model_randomization", "parameter_layers", "perturbation_curves", "random_target", "randomize_modules",
    "rankdata", "region_fraction", "region_on_grid", "saliency_order", "spearman", "target_randomization",
]
