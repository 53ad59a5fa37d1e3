"""ProtoSeg: segmentation-ability (SA) maps and scores of a layer and of each of its units (channels).

He S, Feng Y, Grant PE, Ou Y. *Segmentation ability map: Interpret deep features for medical image segmentation.*
Medical Image Analysis 84:102726, 2023 (arXiv 2212.09206; reference code shengfly/ProtoSeg). ALGORITHMS.md,
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
   the map is ``D > 0`` and the soft map ``sigmoid(2 D)``; one channel alone: ``(F_k - m_k) d_k > 0`` (the midpoint
   rule). ``D`` is linear in ``F`` and the resize is linear with weights summing to 1, so ``D`` is computed on the
   layer grid and resized once.
2. Prototypes on the layer grid: ``sum_p w_p resize(F)_p = sum_q F_q resize^T(w)_q`` (per-axis adjoint matrices).
3. Per-unit Dice without materialising ``K`` resized channels: a resized value is a convex combination of the
   ``2^n`` layer voxels around it, so every *cell* (guide voxels sharing those corners) whose corners lie on one
   side of the midpoint is counted whole; only straddling cells are evaluated voxel by voxel (one matrix product
   per cell pattern). See ``Testing/test_protoseg.py`` for the equality with the brute-force maps.

*Feature layers* (for the mean SA score): the convolution modules (``nn.Conv*d``/``nn.ConvTranspose*d``) that run
once and finish before the head in execution order, the head (and its containers) excluded; if there are fewer
than two, the explainable leaf modules before the head. Per-unit SA is invariant to a per-channel affine map
(``InstanceNorm``/``BatchNorm``), so a convolution and the norm after it would count the same units twice. HD-BET:
``end_conv_1`` and ``end_conv_2`` (42 units each, full resolution). *Mean SA score*: the mean per-unit SA score,
against the binarised prediction, over the units of the last two feature layers (no ground truth needed).
"""

import time
import weakref
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import InputError, LayerError, TargetError
from .cam import _run_model, check_input
from .hooks import model_guard, named_layers, resolve_layer
from .layers import LayerInfo, trace_layers
from .outputs import main_output
from .targets import class_maps, predicted_mask

MODES = {1: "linear", 2: "bilinear", 3: "trilinear"}
EMPTY_POLICIES = ("nan", "raise")
RESIZE = "features resized to the guide grid with F.interpolate(%s, align_corners=False)"
_BLOCK = 1 << 23  # elements of one temporary block (32 MiB of float32)
ProgressCallback = Callable[[float, str], None]


def resize(features: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """``[B, K, *S] -> [B, K, *size]``, linear/bilinear/trilinear with ``align_corners=False`` (as is if equal)."""
    size = tuple(int(s) for s in size)
    if tuple(features.shape[2:]) == size:
        return features
    return F.interpolate(features, size=size, mode=MODES[len(size)], align_corners=False)


def _check(features: torch.Tensor, guide: torch.Tensor, on_empty: str = "nan") -> None:
    if on_empty not in EMPTY_POLICIES:
        raise InputError("on_empty must be one of %s, got %r" % (", ".join(EMPTY_POLICIES), on_empty))
    if not (torch.is_tensor(features) and torch.is_tensor(guide)) or features.ndim != guide.ndim + 1 \
            or not 1 <= guide.ndim - 1 <= 3 or features.shape[0] != guide.shape[0]:
        raise InputError("ProtoSeg needs features [B, K, *S] and a guide [B, *S_guide] with 1 to 3 spatial axes and "
                         "the same batch; got %s and %s" % (tuple(getattr(features, "shape", ())),
                                                            tuple(getattr(guide, "shape", ()))))


def _weights(guide, tissue):
    """Foreground and background prototype weights ``T P`` and ``T (1 - P)``, ``[B, *S]``."""
    guide = guide.float() if not guide.is_floating_point() else guide
    w_t, w_b = guide, 1.0 - guide
    if tissue is not None:
        tissue = tissue.to(guide.dtype).expand_as(guide)
        w_t, w_b = w_t * tissue, w_b * tissue
    return w_t, w_b


def _empty(valid: torch.Tensor, on_empty: str, what: str = "") -> None:
    if on_empty == "raise" and not bool(valid.all()):
        bad = [b for b in range(valid.shape[0]) if not bool(valid[b])]
        raise TargetError("the guide has an empty foreground or background%s (batch element(s) %s): the SA score is "
                          "undefined; choose a class the model predicts, or pass on_empty='nan'" % (what, bad))


def prototypes(features: torch.Tensor, guide: torch.Tensor, tissue: Optional[torch.Tensor] = None,
               eps: float = 1e-6) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Soft prototypes ``(c_t, c_b, valid)``: ``[B, K]``, ``[B, K]``, ``[B]`` (features resized to the guide grid).

    ``valid`` is False where the foreground or background weight mass is below ``eps`` (prototype undefined).
    """
    _check(features, guide)
    f = resize(features, guide.shape[1:])
    w_t, w_b = _weights(guide, tissue)
    m_t, m_b = w_t.flatten(1).sum(1), w_b.flatten(1).sum(1)
    c_t = torch.einsum("bkn,bn->bk", f.flatten(2), w_t.flatten(1).to(f.dtype)) / m_t.clamp_min(eps)[:, None]
    c_b = torch.einsum("bkn,bn->bk", f.flatten(2), w_b.flatten(1).to(f.dtype)) / m_b.clamp_min(eps)[:, None]
    return c_t, c_b, (m_t >= eps) & (m_b >= eps)


def protoseg(features: torch.Tensor, guide: torch.Tensor, tissue: Optional[torch.Tensor] = None, soft: bool = False,
             eps: float = 1e-6, on_empty: str = "nan") -> torch.Tensor:
    """The ProtoSeg map of He et al., computed literally (resized features, squared distances): the reference.

    Returns:
        ``[B, *S_guide]``: boolean (hard) or the foreground probability (soft). An undefined prototype gives an
        all-False hard map / an all-NaN soft map (``on_empty="nan"``) or a :class:`TargetError`.
    """
    _check(features, guide, on_empty)
    f = resize(features, guide.shape[1:])
    c_t, c_b, valid = prototypes(f, guide, tissue, eps)
    _empty(valid, on_empty)
    view = c_t.shape + (1,) * (f.ndim - 2)
    d_t = ((f - c_t.view(view)) ** 2).sum(1)
    d_b = ((f - c_b.view(view)) ** 2).sum(1)
    ok = valid.view((-1,) + (1,) * (f.ndim - 2))
    if soft:
        prob = torch.softmax(torch.stack([-d_b, -d_t], 1), 1)[:, 1]
        return torch.where(ok, prob, torch.full_like(prob, float("nan")))
    return (d_t < d_b) & ok


def unit_maps(features: torch.Tensor, guide: torch.Tensor, tissue: Optional[torch.Tensor] = None,
              units: Optional[Sequence[int]] = None, eps: float = 1e-6, on_empty: str = "nan") -> torch.Tensor:
    """Per-unit hard maps by the one-channel midpoint rule, all requested units at once: ``[B, K', *S_guide]``.

    Unit ``k`` is foreground iff ``(F_k - (c_t,k + c_b,k) / 2) (c_t,k - c_b,k) > 0`` (= :func:`protoseg` of channel k).
    """
    _check(features, guide, on_empty)
    chosen = features if units is None else features[:, list(units)]
    f = resize(chosen, guide.shape[1:])
    c_t, c_b, valid = prototypes(f, guide, tissue, eps)
    _empty(valid, on_empty)
    view = c_t.shape + (1,) * (f.ndim - 2)
    ok = valid.view((-1,) + (1,) * (f.ndim - 1))
    return ((f - ((c_t + c_b) / 2).view(view)) * (c_t - c_b).view(view) > 0) & ok


def _axis_matrix(n_in: int, n_out: int, dtype, device) -> torch.Tensor:
    """``U [n_in, n_out]``: 1-D linear resize with align_corners=False, as F.interpolate computes it."""
    eye = torch.eye(n_in, dtype=dtype, device=device)[:, None, :]
    return F.interpolate(eye, size=n_out, mode="linear", align_corners=False)[:, 0, :]


class _Axis:
    """Cells of one axis: guide voxels sharing the same two layer corners, in blocks of at most ``width``."""

    def __init__(self, n_in: int, n_out: int, dtype, device):
        self.matrix = _axis_matrix(n_in, n_out, dtype, device)
        self.identity = n_in == n_out and bool(torch.equal(self.matrix, torch.eye(n_in, dtype=dtype, device=device)))
        first = (self.matrix != 0).to(torch.uint8).argmax(0)  # lower corner of every guide voxel
        nxt = (first + 1).clamp_max(n_in - 1)
        lam = torch.where(first + 1 < n_in, self.matrix[nxt, torch.arange(n_out, device=device)],
                          torch.zeros((), dtype=dtype, device=device))
        self.width = width = max(1, -(-n_out // n_in))
        spans, corners, lows, i = [], [], first.tolist(), 0
        while i < n_out:
            k = i
            while k < n_out and lows[k] == lows[i] and k - i < width:
                k += 1
            spans.append((i, k))
            corners.append(lows[i])
            i = k
        fine = torch.full((len(spans), width), n_out, dtype=torch.long)  # n_out: a zero padding slot
        for v, (start, stop) in enumerate(spans):
            fine[v, :stop - start] = torch.arange(start, stop)
        self.fine = fine.to(device)
        valid = self.fine < n_out
        lam_cells = torch.where(valid, torch.cat([lam, lam.new_zeros(1)])[self.fine], lam.new_zeros(()))
        self.lo = torch.tensor(corners, dtype=torch.long, device=device)
        self.hi = (self.lo + 1).clamp_max(n_in - 1)
        self.hi_used = torch.where((lam_cells > 0).any(1), self.hi, self.lo)  # corners that carry weight
        table, self.pattern = torch.unique(torch.cat([lam_cells, valid.to(dtype)], 1), dim=0, return_inverse=True)
        self.lams, self.valid = table[:, :width], table[:, width:]  # per pattern: weights of ``hi``, valid slots
        self.cells = len(spans)
        self.n_in, self.first, self.next, self.lam = n_in, first, nxt, lam

    def adjoint(self, w: torch.Tensor, dim: int) -> torch.Tensor:
        """Transpose of the 1-D resize along ``dim``: each guide voxel sends ``1 - lam`` and ``lam`` to its corners."""
        shape = [1] * w.ndim
        shape[dim] = -1
        lam = self.lam.to(w.dtype).view(shape)
        out = w.new_zeros(w.shape[:dim] + (self.n_in,) + w.shape[dim + 1:])
        out.index_add_(dim, self.first, w * (1 - lam))
        return out.index_add_(dim, self.next, w * lam)


class _Resize:
    """Resize plan from a layer grid to the guide grid: the adjoint (prototypes) and the cells (counting)."""

    def __init__(self, src: Sequence[int], dst: Sequence[int], dtype, device):
        self.src, self.dst = tuple(src), tuple(dst)
        self.axes = [_Axis(a, b, dtype, device) for a, b in zip(self.src, self.dst)]
        self.block = 1
        for ax in self.axes:
            self.block *= ax.width

    def adjoint(self, w: torch.Tensor) -> torch.Tensor:
        """``resize^T``: ``[B, *dst] -> [B, *src]``, so that ``<resize(F), w> = <F, adjoint(w)>``."""
        for a, ax in enumerate(self.axes):
            if not ax.identity:
                w = ax.adjoint(w, a + 1)
        return w

    def cells(self, refs: torch.Tensor) -> torch.Tensor:
        """Masks ``[R, *dst]`` rearranged per cell: ``[cells, block, R]`` (padding slots are 0)."""
        x = F.pad(refs, (0, 1) * len(self.dst))
        for a, ax in enumerate(self.axes):
            x = x.index_select(2 * a + 1, ax.fine.flatten())
            x = x.reshape(x.shape[:a * 2 + 1] + (ax.cells, ax.width) + x.shape[a * 2 + 2:])
        n = len(self.axes)
        order = [2 * a + 1 for a in range(n)] + [2 * a + 2 for a in range(n)] + [0]
        return x.permute(order).reshape(-1, self.block, refs.shape[0]).contiguous()

    def _patterns(self, pid: int) -> List[int]:
        ids = []
        for ax in reversed(self.axes):
            ids.append(pid % ax.lams.shape[0])
            pid //= ax.lams.shape[0]
        return ids[::-1]

    def values(self, corners: torch.Tensor, pid: int) -> torch.Tensor:
        """Resized values ``[..., block, m]`` of ``m`` cells of pattern ``pid`` from corners ``[..., 2^n, m]``.

        Cells are the last (contiguous) axis, so that each of the ``n`` lerps runs over long rows.
        """
        n, lead = len(self.axes), corners.shape[:-2]
        v = corners.reshape(lead + (2,) * n + corners.shape[-1:])
        for a, p in reversed(list(enumerate(self._patterns(pid)))):  # last axis first
            d = len(lead) + a
            lam = self.axes[a].lams[p].to(v.dtype).view((-1,) + (1,) * (n - a))
            v = torch.lerp(v.select(d, 0).unsqueeze(d), v.select(d, 1).unsqueeze(d), lam)
        return v.reshape(lead + (self.block, corners.shape[-1]))

    def valid(self, pid: int) -> torch.Tensor:
        """``[block]``: 1 for the slots of a pattern that are guide voxels, 0 for padding."""
        out = None
        for ax, p in zip(self.axes, self._patterns(pid)):
            out = ax.valid[p] if out is None else (out[:, None] * ax.valid[p][None, :]).reshape(-1)
        return out


class _Counter:
    """Counts, per channel, the guide voxels where the resized decision ``g`` is > 0, inside each mask of ``refs``.

    Three regimes: the same grid (a threshold and a matrix-vector product); large cells (a factor >= 3: only the
    cells whose corners straddle 0 are evaluated, and the reference masks only where a cell is partly inside);
    small cells (every cell is evaluated, one pattern at a time: cheaper than finding the straddling ones).
    """

    SPARSE_BLOCK = 27

    def __init__(self, plan: _Resize, refs: torch.Tensor):
        self.plan = plan
        self.identity = all(ax.identity for ax in plan.axes)
        if self.identity:
            self.refs = refs.reshape(refs.shape[0], -1)  # [R, N]
            return
        cells = plan.cells(refs)  # [cells, block, R]
        strides = [1] * len(plan.src)
        for a in range(len(plan.src) - 2, -1, -1):
            strides[a] = strides[a + 1] * plan.src[a + 1]
        idx, pid, n = 0, 0, len(plan.axes)
        for a, ax in enumerate(plan.axes):  # broadcast over the cell grid, corner bits last
            shape = [1] * n
            shape[a] = ax.cells
            corner = torch.stack([ax.lo, ax.hi], 1).view(shape + [1] * a + [2]) * strides[a]
            idx = idx.unsqueeze(-1) + corner if a else corner
            pid = pid * ax.lams.shape[0] + ax.pattern.view(shape)
        grid = tuple(ax.cells for ax in plan.axes)
        idx = idx.expand(grid + (2,) * n).reshape(-1, 2 ** n)
        pid = pid.expand(grid).reshape(-1)
        self.sparse = plan.block >= self.SPARSE_BLOCK
        if self.sparse:
            self.corners, self.pid, self.refs = idx, pid, cells
            self.totals = cells.sum(1)  # [cells, R]; refs[0] is all ones: the voxel count
            full = self.totals == self.totals[:, :1]
            self.kind = torch.where(self.totals == 0, 0, torch.where(full, 1, 2))  # empty / full / mixed
        else:  # per pattern: corner indices [2^n, m] and masks [R, block * m] in the layout of values()
            self.groups = []
            for value in torch.unique(pid).tolist():
                sel = (pid == value).nonzero()[:, 0]
                masks = cells[sel].permute(2, 1, 0).reshape(cells.shape[2], -1).contiguous()
                self.groups.append((value, idx[sel].T.contiguous(), masks))

    def count(self, g: torch.Tensor) -> torch.Tensor:
        """``g [K, *src]`` -> ``[K, R]``."""
        flat = g.reshape(g.shape[0], -1)
        if self.identity:
            refs = self.refs.to(g.dtype)
            return torch.cat([torch.stack([torch.mv(part, r) for r in refs], 1) for part in
                              (p.gt(0).to(g.dtype) for p in flat.split(max(1, _BLOCK // flat.shape[1])))])
        if not self.sparse:
            out = g.new_zeros((g.shape[0], self.groups[0][2].shape[0]))
            for value, idx, masks in self.groups:
                masks, rows = masks.to(g.dtype), max(1, _BLOCK // masks.shape[1])
                for k0 in range(0, g.shape[0], rows):
                    part = flat[k0:k0 + rows]
                    v = self.plan.values(part[:, idx], value).gt_(0).reshape(part.shape[0], -1)
                    out[k0:k0 + rows] += torch.stack([torch.mv(v, m) for m in masks], 1)
            return out
        low, high = g, g
        for a, ax in enumerate(self.plan.axes):
            if not ax.identity:
                low = torch.minimum(low.index_select(a + 1, ax.lo), low.index_select(a + 1, ax.hi_used))
                high = torch.maximum(high.index_select(a + 1, ax.lo), high.index_select(a + 1, ax.hi_used))
        sure = low.reshape(g.shape[0], -1) > 0
        out = sure.to(g.dtype) @ self.totals.to(g.dtype)
        k, cell = ((high.reshape(g.shape[0], -1) > 0) & ~sure & (self.kind[:, 0] > 0)).nonzero(as_tuple=True)
        if not len(k):
            return out
        pid = self.pid[cell]
        order = torch.argsort(pid, stable=True)
        k, cell, pid = k[order], cell[order], pid[order]
        values, sizes = torch.unique_consecutive(pid, return_counts=True)
        rows, start = max(1, _BLOCK // self.plan.block), 0
        for value, size in zip(values.tolist(), sizes.tolist()):
            valid = self.plan.valid(value).to(g.dtype)
            for r0 in range(start, start + size, rows):
                kk, cc = k[r0:min(r0 + rows, start + size)], cell[r0:min(r0 + rows, start + size)]
                v = self.plan.values(flat[kk[None, :], self.corners[cc].T], value).gt_(0)  # [block, m]
                counts = v.new_zeros((len(kk), self.refs.shape[2]))
                counts[:, 0] = valid @ v
                kind = self.kind[cc, 1:]
                counts[:, 1:] = counts[:, :1] * (kind == 1)
                mixed = (kind == 2).any(1).nonzero()[:, 0]
                if len(mixed):
                    inside = torch.einsum("bm,mbr->mr", v[:, mixed], self.refs[cc[mixed], :, 1:].to(g.dtype))
                    counts[mixed, 1:] = torch.where(kind[mixed] == 2, inside, counts[mixed, 1:])
                out.index_add_(0, kk, counts)
            start += size
        return out


def _dice(counts: torch.Tensor, sizes: torch.Tensor) -> torch.Tensor:
    """``counts [..., R]`` (column 0: map size) and reference sizes ``[R-1]`` -> Dice ``[..., R-1]`` (NaN: empty ref)."""
    dice = 2 * counts[..., 1:] / (counts[..., :1] + sizes).clamp_min(1)
    return torch.where(sizes > 0, dice, torch.full_like(dice, float("nan")))


class Scorer:
    """SA scores of activations of any grid against one guide and one or more references, plans cached per grid.

    Args:
        guide: ``[B, *S]`` foreground probability on the guide grid.
        references: ``[B, R, *S]`` boolean masks (e.g. ground truth, prediction); Dice is taken against each.
        tissue: optional ``[B, *S]`` mask restricting the prototypes.
    """

    def __init__(self, guide: torch.Tensor, references: torch.Tensor, tissue: Optional[torch.Tensor] = None,
                 eps: float = 1e-6, on_empty: str = "nan"):
        if references.shape[:1] + references.shape[2:] != guide.shape:
            raise InputError("references %s do not match the guide %s" % (tuple(references.shape), tuple(guide.shape)))
        self.guide, self.eps, self.on_empty = guide, eps, on_empty
        self.w_t, self.w_b = _weights(guide, tissue)
        self.m_t, self.m_b = self.w_t.flatten(1).sum(1), self.w_b.flatten(1).sum(1)
        self.valid = (self.m_t >= eps) & (self.m_b >= eps)
        _empty(self.valid, on_empty)
        ones = torch.ones_like(references[:, :1], dtype=guide.dtype if guide.is_floating_point() else torch.float32)
        self.refs = torch.cat([ones, references.to(ones.dtype)], 1)  # [B, 1 + R, *S]
        self.sizes = self.refs[:, 1:].flatten(2).sum(2)  # [B, R]
        self._plans: Dict[Tuple, Tuple[_Resize, List[_Counter]]] = {}

    def _plan(self, src, dtype):
        key = (tuple(src), dtype)
        if key not in self._plans:
            plan = _Resize(src, self.guide.shape[1:], dtype, self.guide.device)
            self._plans[key] = (plan, [_Counter(plan, self.refs[b].to(dtype)) for b in range(self.guide.shape[0])])
        return self._plans[key]

    def prototypes(self, act: torch.Tensor):
        """``(c_t, c_b)`` ``[B, K]`` of an activation on its own grid (adjoint of the resize)."""
        plan, _ = self._plan(act.shape[2:], act.dtype)
        q_t, q_b = plan.adjoint(self.w_t.to(act.dtype)), plan.adjoint(self.w_b.to(act.dtype))
        c_t = torch.einsum("bkn,bn->bk", act.flatten(2), q_t.flatten(1)) / self.m_t.clamp_min(self.eps)[:, None]
        c_b = torch.einsum("bkn,bn->bk", act.flatten(2), q_b.flatten(1)) / self.m_b.clamp_min(self.eps)[:, None]
        return c_t, c_b

    def decision(self, act: torch.Tensor, c_t: torch.Tensor, c_b: torch.Tensor) -> torch.Tensor:
        """Layer decision ``D = sum_k d_k (F_k - m_k)`` on the layer grid, ``[B, *S_l]`` (map: resize(D) > 0)."""
        d = c_t - c_b
        return torch.einsum("bkn,bk->bn", act.flatten(2), d).view((act.shape[0],) + act.shape[2:]) \
            - (d * (c_t + c_b) / 2).sum(1).view((-1,) + (1,) * (act.ndim - 2))

    def score(self, act: torch.Tensor, per_unit: bool = True) -> Dict[str, torch.Tensor]:
        """``{"layer": [B, R], "units": [B, K, R] (if per_unit), "c_t", "c_b", "decision"}``; NaN where undefined."""
        act = act.detach()
        act = act if act.is_floating_point() else act.float()
        plan, counters = self._plan(act.shape[2:], act.dtype)
        c_t, c_b = self.prototypes(act)
        decision = self.decision(act, c_t, c_b)
        nan = torch.full((), float("nan"), dtype=act.dtype, device=act.device)
        ok = self.valid.view(-1, 1)
        layer = torch.stack([_dice(counters[b].count(decision[b:b + 1])[0], self.sizes[b].to(act.dtype))
                             for b in range(act.shape[0])])
        result = {"layer": torch.where(ok, layer, nan), "c_t": c_t, "c_b": c_b, "decision": decision}
        if per_unit:
            units = []
            for b in range(act.shape[0]):
                counts = torch.zeros((act.shape[1], self.refs.shape[1]), dtype=act.dtype, device=act.device)
                step = max(1, _BLOCK // max(1, act[0, 0].numel()))
                for k0 in range(0, act.shape[1], step):
                    mid = ((c_t[b, k0:k0 + step] + c_b[b, k0:k0 + step]) / 2).view((-1,) + (1,) * (act.ndim - 2))
                    d = (c_t[b, k0:k0 + step] - c_b[b, k0:k0 + step]).view(mid.shape)
                    counts[k0:k0 + step] = counters[b].count((act[b, k0:k0 + step] - mid) * d)
                units.append(_dice(counts, self.sizes[b].to(act.dtype)))
            result["units"] = torch.where(ok[:, :, None], torch.stack(units), nan)
        return result

    def layer_map(self, decision: torch.Tensor, soft: bool = False) -> torch.Tensor:
        """The layer's map on the guide grid from its decision: boolean, or ``sigmoid(2 D)`` (soft)."""
        up = resize(decision[:, None], self.guide.shape[1:])[:, 0]
        ok = self.valid.view((-1,) + (1,) * (up.ndim - 1))
        if soft:
            return torch.where(ok, torch.sigmoid(2 * up), torch.full_like(up, float("nan")))
        return (up > 0) & ok


def sa_scores(features: torch.Tensor, guide: torch.Tensor, reference: torch.Tensor,
              tissue: Optional[torch.Tensor] = None, per_unit: bool = True, eps: float = 1e-6,
              on_empty: str = "nan") -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """SA scores of one layer: ``(layer [B], units [B, K] or None)``; Dice against ``reference [B, *S_guide]``."""
    _check(features, guide, on_empty)
    if reference.shape != guide.shape:
        raise InputError("the reference %s must be on the guide grid %s" % (tuple(reference.shape), tuple(guide.shape)))
    result = Scorer(guide, reference[:, None].bool(), tissue, eps, on_empty).score(features, per_unit)
    return result["layer"][:, 0], (result["units"][..., 0] if per_unit else None)
