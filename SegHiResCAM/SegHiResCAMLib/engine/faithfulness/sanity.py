"""Sanity checks of heatmaps (Adebayo et al., *Sanity checks for saliency maps*, NeurIPS 2018;
docs/algorithms.md, "Faithfulness checks"; gathered with the other checks in :mod:`SegHiResCAMLib.engine.faithfulness`).

- **Model randomisation** (:func:`model_randomization`): re-initialise the weights on a deep copy of the model,
  cascading from the output layer down in stages (:func:`cascade_stages`, :func:`randomize_modules`), and report
  the Spearman rank correlation between the original and the randomised maps (a faithful map changes: the
  correlation falls towards 0).
- **Randomised target** (:func:`target_randomization`): likewise for a target whose region M is shifted or
  scattered, or another class (:func:`random_target`).
- **Rank correlation**: :func:`rankdata` (average ranks for ties), :func:`spearman`, :func:`map_correlations`.

>>> import torch
>>> spearman(torch.tensor([1., 2., 2., 3.]), torch.tensor([10., 20., 20., 30.]))
1.0
"""

import contextlib
import copy
import math
import zlib
from dataclasses import dataclass, field
from typing import Dict, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import nn

from ...errors import InputError, LayerError, close_matches
from ..cam import CAMResult, ProgressCallback, compute_cams
from ..hooks import model_guard
from ..outputs import reusing_freed_memory
from ..regions import ClassView, MaskRegion, Region
from ..targets import SegmentTarget

RANDOM_TARGETS = ("shift", "scatter", "class")
#: dtypes whose CPU ranks :func:`rankdata` takes from numpy's sort
_NUMPY_SORTABLE = (torch.float32, torch.float64, torch.float16, torch.int32, torch.int64, torch.int16, torch.int8,
                   torch.uint8, torch.bool)


# ----------------------------------------------------------------------------------------- rank correlation
def rankdata(values) -> torch.Tensor:
    """1-based ranks of the flattened ``values`` (float64); ties get the average of their ranks (NaN are never
    tied: each is its own group, after every number).

    On the CPU it runs in numpy, whose vectorised sort and indexing are several times faster than torch's on 10^6
    floats; ties get their average rank whatever their order, so any sort gives the same ranks."""
    v = torch.as_tensor(values).detach().reshape(-1)
    n = v.numel()
    if n == 0:
        return torch.zeros(0, dtype=torch.float64)
    if v.device.type == "cpu" and v.dtype in _NUMPY_SORTABLE:
        return torch.from_numpy(_rankdata_numpy(v.numpy()))
    order = torch.argsort(v)
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


def _rankdata_numpy(v: np.ndarray) -> np.ndarray:
    """:func:`rankdata` of a flat numpy array: each group of equal sorted values gets the mean of its positions."""
    n = v.size
    order = np.argsort(v)
    ordered = v[order]
    starts = np.empty(n, dtype=bool)
    starts[0] = True
    np.not_equal(ordered[1:], ordered[:-1], out=starts[1:])
    first = np.flatnonzero(starts)  # sorted position of each group's first member
    ranks = np.empty(n, dtype=np.float64)
    if first.size == n:  # no ties
        ranks[order] = np.arange(1, n + 1, dtype=np.float64)
        return ranks
    ends = np.append(first[1:], n)  # one past each group's last member
    ranks[order] = np.repeat((first + 1 + ends) / 2.0, ends - first)
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
@contextlib.contextmanager
def recording_parameter_layers(model: nn.Module) -> Iterator[List[str]]:
    """Record the modules that own parameters directly, in the order they run, during whatever forward passes the
    caller makes inside the ``with`` block (e.g. the perturbed inputs of the quick check: no extra pass).

    Yields the list, filled as the modules run (first use only); the hooks are removed on exit."""
    owners = {name: m for name, m in model.named_modules() if any(True for _ in m.parameters(recurse=False))}
    seen: List[str] = []
    handles = []
    try:
        for name, module in owners.items():
            handles.append(module.register_forward_pre_hook(
                lambda mod, inputs, name=name: seen.append(name) if name not in seen else None))
        yield seen
    finally:
        for handle in handles:
            handle.remove()


def parameter_layers(model: nn.Module, x: torch.Tensor) -> List[str]:
    """Modules that own parameters directly, in the order they run (one gradient-free forward pass)."""
    with recording_parameter_layers(model) as seen, model_guard(model), torch.no_grad():
        model(x.detach())
    return list(seen)


class UpstreamRecorder:
    """Keeps, from one forward pass of ``model`` (e.g. the explain run's), the outputs of the largest modules that
    finish before ``layer`` (or any module under it) starts.

    Model randomisation from ``layer`` re-initialises every module from the first use of the layer to the output
    (:func:`cascade_stages`), so everything that ran before the layer computes the same values on the randomised
    copy for the same input: :func:`model_randomization` (``upstream=``) then returns these outputs instead of
    running those modules again. Use as a context manager around the forward pass; only the first pass is recorded.
    Reuse is refused (:meth:`reusable` returns ``None``) when the layer never ran or the input is another tensor; an
    output changed in place after it was kept (e.g. ``x += skip``; views share the counter) is left out, and its
    module runs again. The kept outputs hold memory until :meth:`clear`.
    """

    def __init__(self, model: nn.Module, layer: str):
        self.model, self.layer = model, layer
        self.entries: List[Tuple[str, int, torch.Tensor, int]] = []  # (module, call number, output, its version)
        self.input: Optional[Tuple[int, tuple, int]] = None
        self.stopped = self.done = False
        self._stack: List[Tuple[str, int]] = []
        self._calls: Dict[str, int] = {}
        self._handles: list = []

    def __enter__(self) -> "UpstreamRecorder":
        for name, module in self.model.named_modules():
            self._handles.append(module.register_forward_pre_hook(
                lambda mod, inputs, name=name: self._pre(name, inputs)))
            self._handles.append(module.register_forward_hook(
                lambda mod, inputs, output, name=name: self._post(name, output)))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def _pre(self, name: str, inputs) -> None:
        if self.done:
            return
        if name == "" and self.input is None:
            first = inputs[0] if inputs and isinstance(inputs[0], torch.Tensor) else None
            self.input = None if first is None else (first.data_ptr(), tuple(first.shape), first._version)
        if name == self.layer or name.startswith(self.layer + "."):
            self.stopped = True
        self._calls[name] = self._calls.get(name, 0) + 1
        self._stack.append((name, len(self.entries)))

    def _post(self, name: str, output) -> None:
        if self.done or not self._stack:
            return
        _, mark = self._stack.pop()
        if name == "":
            self.done = True
            return
        if not self.stopped and isinstance(output, torch.Tensor):
            del self.entries[mark:]  # its sub-modules' outputs: this one replaces them
            self.entries.append((name, self._calls[name], output, output._version))

    def reusable(self, layer: str, x: torch.Tensor) -> Optional[Dict[str, Dict[int, torch.Tensor]]]:
        """``{module: {call number: output}}`` for a copy randomised from ``layer`` run on ``x``, or ``None``."""
        if not (self.done and self.stopped and layer == self.layer and self.entries) or self.input != (
                x.data_ptr(), tuple(x.shape), x._version):
            return None
        kept: Dict[str, Dict[int, torch.Tensor]] = {}
        for name, call, out, version in self.entries:
            if out._version == version:  # else changed in place after it was kept (``x += skip``): run it again
                kept.setdefault(name, {})[call] = out
        return kept or None

    def clear(self) -> None:
        self.entries = []


def _replay(module: nn.Module, outputs: Dict[int, torch.Tensor]) -> None:
    """Make ``module`` (of a copy) return the kept outputs on those calls, and run as usual on the others."""
    run = module.forward
    calls = [0]

    def forward(*args, **kwargs):
        calls[0] += 1
        kept = outputs.get(calls[0])
        return kept if kept is not None else run(*args, **kwargs)

    module.forward = forward


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
                        whole: bool = True, upstream: Optional[Dict[str, Dict[int, torch.Tensor]]] = None,
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
        whole: with a ``segment``, ``False`` skips the correlation over the whole domain (``correlations`` stays
            empty): one rank correlation on the segment instead of one more on every voxel (the quick check).
        upstream: :meth:`UpstreamRecorder.reusable` of a pass of ``model`` on ``x``, recorded for the layer the
            first stage re-initialises from: that stage's copy returns those outputs instead of computing them
            again (the same values: nothing before the layer is re-initialised). Later stages run the whole copy.
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
    replayed = dict(clone.named_modules()) if upstream else {}
    for name, outputs in (upstream or {}).items():
        _replay(replayed[name], outputs)
    done: set = set()
    results = []
    with reusing_freed_memory():  # the stages repeat one pass: keep its memory between them
        try:
            for index, (label, names) in enumerate(plan):
                report(index / len(plan), "randomised model, stage %s" % label)
                randomize_modules(clone, [n for n in names if n not in done], seed)
                done.update(names)
                maps = compute_cams(clone, x, [frozen], list(layers), list(methods), **cam_options)
                stage = SanityStage(label, list(names), map_correlations(reference, maps, domain) if whole or
                                    segment is None else {})
                if segment is not None:
                    inside = segment.bool() if domain is None else segment.bool() & domain.bool()
                    stage.correlations_in_segment = map_correlations(reference, maps, inside)
                stage.warnings = sorted({w for r in maps for w in r.warnings})
                results.append(stage)
                del maps
                for name in upstream or {}:  # later stages re-initialise further down: compute everything
                    replayed[name].__dict__.pop("forward", None)
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
    "RANDOM_TARGETS", "SanityStage", "UpstreamRecorder", "cascade_stages", "fixed_target", "map_correlations", "model_randomization",
    "parameter_layers", "random_target", "randomize_modules", "rankdata", "recording_parameter_layers", "spearman",
    "target_randomization",
]
