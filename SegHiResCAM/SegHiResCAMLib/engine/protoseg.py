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
   layer voxels around it, so every *cell* (a block of guide voxels sharing the same few layer corners) whose
   corners all lie on one side of the midpoint is counted whole from per-cell mask totals; only straddling
   (unit, cell) pairs are evaluated voxel by voxel, one matrix product per cell pattern (10-20 % of the cells on
   HD-BET). ``Testing/test_protoseg.py`` checks the equality with the literal maps.
4. Whole networks (:func:`segmentation_ability`): the first forward pass traces the layers, gives the guide and
   keeps clones of the last few convolutions (the feature layers); ``layers="all"`` adds one more pass in which
   every layer is scored inside its forward hook and dropped (nothing is stored). A container returning a child's
   unmodified output reuses its scores; a per-channel affine normalisation (BatchNorm/InstanceNorm/GroupNorm with
   non-zero weights) of a scored layer reuses its per-unit scores, which such a map leaves unchanged. HD-BET on the
   ROBEX atlas (73 layers, 8,364 units, 160x160x128): 2.3-3.0 forward passes in all (measured on a shared
   2-core machine; `docs/sa_validation.md`), 3.7 GiB.

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
from .cam import check_input
from .hooks import model_guard, named_layers, resolve_layer
from .layers import LayerInfo, trace_layers
from .outputs import main_output, run_model
from .targets import class_maps, predicted_mask

MODES = {1: "linear", 2: "bilinear", 3: "trilinear"}
EMPTY_POLICIES = ("nan", "raise")
LAST_FEATURE = "last-feature"  #: in ``map_layers``: the last feature layer, whatever its name
RESIZE = "features resized to the guide grid with F.interpolate(%s, align_corners=False)"
_CACHE = 1 << 20  # elements of one small temporary (4 MiB of float32), to stay close to the processor's cache
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
    """One axis of a resize: guide voxel ``i`` is ``(1 - lam_i) F[first_i] + lam_i F[first_i + 1]``.

    *Cells*: runs of at most ``width`` consecutive guide voxels whose lower corners lie in ``span`` consecutive
    layer voxels; a cell depends on ``span + 1`` corners (1 on an axis that is not resized) through a
    ``[width, corners]`` weight matrix, its *pattern* (edge cells differ from interior ones). Factors below 3 group
    several layer voxels per cell, so that a cell holds enough guide voxels to be worth a matrix product.
    """

    def __init__(self, n_in: int, n_out: int, dtype, device):
        matrix = _axis_matrix(n_in, n_out, dtype, device)
        self.identity = n_in == n_out and bool(torch.equal(matrix, torch.eye(n_in, dtype=dtype, device=device)))
        self.n_in = n_in
        self.first = (matrix != 0).to(torch.uint8).argmax(0)  # the lower corner of every guide voxel
        self.next = (self.first + 1).clamp_max(n_in - 1)
        self.lam = torch.where(self.first + 1 < n_in, matrix[self.next, torch.arange(n_out, device=device)],
                               torch.zeros((), dtype=dtype, device=device))
        factor = n_out / n_in
        span = 1 if self.identity or factor < 1 or factor >= 3 else int(-(-3 // factor))
        self.width = width = 1 if self.identity else span * max(1, -(-n_out // n_in))
        corners = 1 if self.identity else span + 1
        cells, lows, lams, i = [], self.first.tolist(), self.lam.tolist(), 0
        while i < n_out:
            k = i
            while k < n_out and lows[k] < lows[i] + span and k - i < width:
                k += 1
            cells.append((i, k))
            i = k
        self.cells = len(cells)
        fine = torch.full((self.cells, width), n_out, dtype=torch.long)  # n_out: a zero padding slot
        weights = torch.zeros((self.cells, width, corners), dtype=torch.float64)
        index = torch.zeros((self.cells, corners), dtype=torch.long)
        for c, (start, stop) in enumerate(cells):
            low = lows[start]
            fine[c, :stop - start] = torch.arange(start, stop)
            index[c] = torch.arange(low, low + corners).clamp_max(n_in - 1)
            for slot, v in enumerate(range(start, stop)):
                weights[c, slot, lows[v] - low] += 1.0 - lams[v]
                if corners > 1:
                    weights[c, slot, lows[v] - low + 1] += lams[v]
        self.fine = fine.to(device)
        valid = (fine < n_out).to(torch.float64)
        used = (weights != 0).any(1)
        self.index = index.to(device)  # [cells, corners]: corner voxels of every cell
        self.index_used = torch.where(used, index, index[:, :1]).to(device)  # the same, unused corners -> the first
        table, pattern = torch.unique(torch.cat([weights.flatten(1), valid], 1), dim=0, return_inverse=True)
        self.pattern = pattern.to(device)
        self.matrices = table[:, :width * corners].reshape(-1, width, corners).to(device=device, dtype=dtype)
        self.valid = table[:, width * corners:].to(device=device, dtype=dtype)
        self.corners = corners

    def adjoint(self, w: torch.Tensor, dim: int) -> torch.Tensor:
        """Transpose of the 1-D resize along ``dim``: each guide voxel sends ``1 - lam`` and ``lam`` to its corners."""
        shape = [1] * w.ndim
        shape[dim] = -1
        lam = self.lam.to(w.dtype).view(shape)
        out = w.new_zeros(w.shape[:dim] + (self.n_in,) + w.shape[dim + 1:])
        out.index_add_(dim, self.first, w * (1 - lam))
        return out.index_add_(dim, self.next, w * lam)


class _Counter:
    """Counts, per channel ``k``, the guide voxels where ``resize((F_k - shift_k) scale_k) > 0``, inside each mask.

    Same grid: a threshold and a matrix product, block by block. Otherwise by cells: a resized value is a convex
    combination of its cell's corners, so a cell whose corners are all > 0 (all <= 0) is counted whole from
    per-cell mask totals; only the straddling (channel, cell) pairs are evaluated voxel by voxel, grouped by cell
    pattern (one ``[block, corners] @ [corners, pairs]`` product each), and the masks are read only where a cell
    is partly inside one. On HD-BET about 10-20 % of the cells straddle.
    """

    def __init__(self, src: Sequence[int], refs: torch.Tensor):
        """``refs [R, *dst]`` float: row 0 the evaluation region (all ones: every voxel), then the reference masks
        (zero outside the region)."""
        dst, dtype, device = refs.shape[1:], refs.dtype, refs.device
        self.axes = [_Axis(a, b, dtype, device) for a, b in zip(src, dst)]
        self.identity = all(ax.identity for ax in self.axes)
        if self.identity:
            self.refs = refs.reshape(refs.shape[0], -1).T.contiguous()  # [N, R]
            return
        n = len(self.axes)
        x = F.pad(refs, (0, 1) * n)  # masks per cell: [R, block, cells]
        for a, ax in enumerate(self.axes):
            x = x.index_select(2 * a + 1, ax.fine.flatten())
            x = x.reshape(x.shape[:a * 2 + 1] + (ax.cells, ax.width) + x.shape[a * 2 + 2:])
        order = [0] + [2 * a + 2 for a in range(n)] + [2 * a + 1 for a in range(n)]  # [R, block, cells]
        self.block = 1
        for ax in self.axes:
            self.block *= ax.width
        self.masks = x.permute(order).reshape(refs.shape[0], self.block, -1).transpose(1, 2).contiguous()
        self.totals = self.masks.sum(2).T.contiguous()  # [cells, R]; masks: [R, cells, block]
        sizes = torch.tensor([1.0], dtype=dtype, device=device).expand(1, *dst)
        sizes = (F.pad(sizes, (0, 1) * n) != 0).to(dtype)  # guide voxels per cell (padding slots excluded)
        for a, ax in enumerate(self.axes):
            sizes = sizes.index_select(a + 1, ax.fine.flatten()).reshape(
                sizes.shape[:a + 1] + (ax.cells, ax.width) + sizes.shape[a + 2:]).sum(a + 2)
        full = self.totals == sizes.reshape(-1, 1)
        self.kind = torch.where(self.totals == 0, 0, torch.where(full, 1, 2))  # empty / full / mixed
        strides = [1] * n
        for a in range(n - 2, -1, -1):
            strides[a] = strides[a + 1] * src[a + 1]
        idx, pid = 0, 0
        for a, ax in enumerate(self.axes):  # corner indices [cells, corners] (axis 0 most significant)
            shape = [1] * n
            shape[a] = ax.cells
            corner = ax.index.view(shape + [1] * a + [ax.corners]) * strides[a]
            idx = idx.unsqueeze(-1) + corner if a else corner
            pid = pid * ax.matrices.shape[0] + ax.pattern.view(shape)
        grid = tuple(ax.cells for ax in self.axes)
        self.corners = idx.expand(grid + tuple(ax.corners for ax in self.axes)).reshape(
            len(self.totals), -1).T.contiguous()  # [corners, cells]
        self.pid = pid.expand(grid).reshape(-1)
        self._patterns: Dict[int, Tuple[torch.Tensor, torch.Tensor]] = {}

    def _pattern(self, pid: int) -> Tuple[torch.Tensor, torch.Tensor]:
        """Weights ``[block, corners]`` of a cell pattern's voxels on its corners, and its valid slots ``[block]``."""
        if pid not in self._patterns:
            ids, rest = [], pid
            for ax in reversed(self.axes):
                ids.append(rest % ax.matrices.shape[0])
                rest //= ax.matrices.shape[0]
            weights, valid = None, None
            for ax, p in zip(self.axes, reversed(ids)):
                wa, va = ax.matrices[p], ax.valid[p]
                weights = wa if weights is None else (weights[:, None, :, None] * wa[None, :, None, :]).reshape(
                    weights.shape[0] * wa.shape[0], -1)
                valid = va if valid is None else (valid[:, None] * va[None, :]).reshape(-1)
            self._patterns[pid] = (weights, valid)
        return self._patterns[pid]

    def count(self, act: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """``act [K, *src]``, ``shift``/``scale [K]`` -> counts ``[K, R]``."""
        kk = act.shape[0]
        flat = act.reshape(kk, -1)
        if self.identity:
            refs = self.refs.to(act.dtype)
            out = act.new_zeros((kk, refs.shape[1]))
            rows, cols = min(kk, 8), max(1, _CACHE // min(kk, 8))
            for k0 in range(0, kk, rows):
                sh, sc = shift[k0:k0 + rows, None], scale[k0:k0 + rows, None]
                for c0 in range(0, flat.shape[1], cols):
                    g = (flat[k0:k0 + rows, c0:c0 + cols] - sh).mul_(sc).gt_(0)
                    out[k0:k0 + rows] += g @ refs[c0:c0 + cols]
            return out
        view = (-1,) + (1,) * (act.ndim - 1)
        g = (act - shift.view(view)) * scale.view(view)
        low, high = g, g
        for a, ax in enumerate(self.axes):  # bounds of every cell over its used corners, one axis at a time
            if not ax.identity:
                shape = low.shape[:a + 1] + (ax.cells, ax.corners) + low.shape[a + 2:]
                gathered = low.index_select(a + 1, ax.index_used.flatten()).view(shape)
                if high is not low:
                    high = high.index_select(a + 1, ax.index_used.flatten()).view(shape).amax(a + 2)
                else:
                    high = gathered.amax(a + 2)
                low = gathered.amin(a + 2)
        sure = low.reshape(kk, -1) > 0
        out = sure.to(act.dtype) @ self.totals.to(act.dtype)
        k, cell = ((high.reshape(kk, -1) > 0) & ~sure & (self.kind[:, 0] > 0)).nonzero(as_tuple=True)
        if not len(k):
            return out
        flat_g = g.reshape(kk, -1)
        pid = self.pid[cell]
        order = torch.argsort(pid * len(self.totals) + cell)  # by pattern, then by cell
        k, cell, pid = k[order], cell[order], pid[order]
        values, sizes = torch.unique_consecutive(pid, return_counts=True)
        rows, start = max(1, _CACHE // self.block), 0
        buffer = act.new_empty(self.block * min(rows, len(k)))
        masks = self.masks.to(act.dtype)
        for value, size in zip(values.tolist(), sizes.tolist()):
            weights, valid = self._pattern(value)
            weights, valid = weights.to(act.dtype), valid.to(act.dtype)
            for r0 in range(start, start + size, rows):
                kc, cc = k[r0:min(r0 + rows, start + size)], cell[r0:min(r0 + rows, start + size)]
                corners = flat_g[kc[None, :], self.corners[:, cc]]  # [corners, m]
                v = torch.matmul(weights, corners, out=buffer[:self.block * len(kc)].view(self.block, len(kc)))
                v.gt_(0)
                kind = self.kind[cc]  # row 0: the evaluation region, then the reference masks
                counts = (valid @ v)[:, None] * (kind == 1)
                mixed = (kind == 2).any(1).nonzero()[:, 0]
                if len(mixed):
                    cm, vm = cc[mixed], v[:, mixed]
                    cells, inverse = torch.unique_consecutive(cm, return_inverse=True)
                    if 4 * len(cells) <= len(mixed):  # few cells: one product per mask, then pick each pair's cell
                        inside = torch.stack([(m.index_select(0, cells) @ vm).gather(0, inverse[None])[0]
                                              for m in masks], 1)
                    else:
                        inside = torch.stack([(vm.T * m.index_select(0, cm)).sum(1) for m in masks], 1)
                    counts[mixed] = torch.where(kind[mixed] == 2, inside, counts[mixed])
                out.index_add_(0, kc, counts)
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
        region: optional ``[B, *S]`` mask of the voxels that belong to the image (e.g. not the padding added for
            the network): maps are evaluated and prototypes taken there only.
    """

    def __init__(self, guide: torch.Tensor, references: torch.Tensor, tissue: Optional[torch.Tensor] = None,
                 eps: float = 1e-6, on_empty: str = "nan", region: Optional[torch.Tensor] = None):
        if references.shape[:1] + references.shape[2:] != guide.shape:
            raise InputError("references %s do not match the guide %s" % (tuple(references.shape), tuple(guide.shape)))
        if region is not None and tuple(region.shape) != tuple(guide.shape):
            raise InputError("the region %s does not match the guide %s" % (tuple(region.shape), tuple(guide.shape)))
        self.guide, self.eps, self.on_empty = guide, eps, on_empty
        if region is not None:
            tissue = region if tissue is None else tissue.bool() & region.bool()
        self.w_t, self.w_b = _weights(guide, tissue)
        self.m_t, self.m_b = self.w_t.flatten(1).sum(1), self.w_b.flatten(1).sum(1)
        self.valid = (self.m_t >= eps) & (self.m_b >= eps)
        _empty(self.valid, on_empty)
        dtype = guide.dtype if guide.is_floating_point() else torch.float32
        ones = torch.ones_like(references[:, :1], dtype=dtype) if region is None else region[:, None].to(dtype)
        self.refs = torch.cat([ones, references.to(dtype) * ones], 1)  # [B, 1 + R, *S]: region, references
        self.sizes = self.refs[:, 1:].flatten(2).sum(2)  # [B, R]
        if on_empty == "raise" and not bool((self.sizes > 0).all()):
            raise TargetError("the reference mask is empty: the SA score (a Dice) is undefined; give a reference with "
                              "voxels, choose a class the model predicts, or pass on_empty='nan'")
        self._plans: Dict[Tuple, Tuple[List[_Counter], torch.Tensor, torch.Tensor]] = {}

    def _plan(self, src, dtype):
        """Per layer grid: counters (one per batch element) and the prototype weights on that grid."""
        key = (tuple(src), dtype)
        if key not in self._plans:
            counters = [_Counter(src, self.refs[b].to(dtype)) for b in range(self.guide.shape[0])]
            q_t, q_b = self.w_t.to(dtype), self.w_b.to(dtype)
            for a, ax in enumerate(counters[0].axes):  # adjoint of the resize: <resize(F), w> = <F, adjoint(w)>
                if not ax.identity:
                    q_t, q_b = ax.adjoint(q_t, a + 1), ax.adjoint(q_b, a + 1)
            self._plans[key] = (counters, q_t.flatten(1), q_b.flatten(1))
        return self._plans[key]

    def prototypes(self, act: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(c_t, c_b)`` ``[B, K]`` of an activation on its own grid (without resizing it)."""
        _, q_t, q_b = self._plan(act.shape[2:], act.dtype)
        c_t = torch.einsum("bkn,bn->bk", act.flatten(2), q_t) / self.m_t.to(act.dtype).clamp_min(self.eps)[:, None]
        c_b = torch.einsum("bkn,bn->bk", act.flatten(2), q_b) / self.m_b.to(act.dtype).clamp_min(self.eps)[:, None]
        return c_t, c_b

    @staticmethod
    def decision(act: torch.Tensor, c_t: torch.Tensor, c_b: torch.Tensor) -> torch.Tensor:
        """Layer decision ``D = sum_k d_k (F_k - m_k)`` on the layer grid, ``[B, *S_l]`` (map: resize(D) > 0)."""
        d = c_t - c_b
        return torch.einsum("bkn,bk->bn", act.flatten(2), d).view((act.shape[0],) + act.shape[2:]) \
            - (d * (c_t + c_b) / 2).sum(1).view((-1,) + (1,) * (act.ndim - 2))

    def score(self, act: torch.Tensor, per_unit: bool = True) -> Dict[str, torch.Tensor]:
        """``{"layer": [B, R], "units": [B, K, R] (if per_unit), "c_t", "c_b", "decision"}``; NaN where undefined."""
        act = act.detach()
        act = act if act.is_floating_point() else act.float()
        counters, _, _ = self._plan(act.shape[2:], act.dtype)
        c_t, c_b = self.prototypes(act)
        decision = self.decision(act, c_t, c_b)
        one, zero = act.new_ones(1), act.new_zeros(1)
        sizes = self.sizes.to(act.dtype)
        layer = torch.stack([_dice(counters[b].count(decision[b:b + 1], zero, one)[0], sizes[b])
                             for b in range(act.shape[0])])
        nan = torch.full((), float("nan"), dtype=act.dtype, device=act.device)
        ok = self.valid.view(-1, 1)
        result = {"layer": torch.where(ok, layer, nan), "c_t": c_t, "c_b": c_b, "decision": decision}
        if per_unit:
            units = [_dice(counters[b].count(act[b], (c_t[b] + c_b[b]) / 2, c_t[b] - c_b[b]), sizes[b])
                     for b in range(act.shape[0])]
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


class _OneThread:
    """Score on one thread, then restore torch's setting. Scoring is many small memory-bound operations: a second
    thread gains little on an idle machine, and on a busy one each parallel operation waits for both threads
    (measured on 2 shared cores: 7-18x slower with 2 threads than with 1)."""

    def __enter__(self):
        self.threads = torch.get_num_threads()
        torch.set_num_threads(1)

    def __exit__(self, *exc):
        torch.set_num_threads(self.threads)


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
    # pass 1: trace + output, keeping clones of the requested layers and of the last convolutions (candidates)
    kept: Dict[str, torch.Tensor] = {}
    window = [n for n, m in modules.items() if isinstance(m, nn.modules.conv._ConvNd)]
    pinned = set(wanted)
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
        with _OneThread():
            result = scorer.score(act, unit)
        rows[name] = LayerSA(name, kind, 0, order, tuple(act.shape[2:]), act.shape[1], result["layer"][:, 0],
                             result["units"][..., 0] if unit else None, result["layer"][:, pred_col],
                             result["units"][..., pred_col] if unit else None, name in features)
        if name in map_layers:
            maps[name] = scorer.layer_map(result["decision"], soft_maps)

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
                        maps[name] = maps[other] if other in maps else scorer.layer_map(
                            scorer.score(output, False)["decision"], soft_maps)
                    return
                if source is not None and ref() is source and version == _version(source) and _affine(module):
                    # per-unit maps are invariant to a per-channel affine map: only the layer score is new
                    row = rows[other]
                    with _OneThread():
                        result = scorer.score(output.detach(), False)
                    rows[name] = LayerSA(name, info.kind, 0, info.order, tuple(output.shape[2:]), output.shape[1],
                                         result["layer"][:, 0], row.units, result["layer"][:, pred_col],
                                         row.units_pred, name in features)
                    if name in map_layers:
                        maps[name] = scorer.layer_map(result["decision"], soft_maps)
                    seen[name] = (weakref.ref(output), _version(output))
                    return
            add(name, output.detach(), info.kind, info.order)
            seen[name] = (weakref.ref(output), _version(output))
            report(0.5 + 0.5 * len(rows) / (len(names) + 1), "scored %s" % name)

        with model_guard(model), torch.no_grad(), _Hooks({n: modules[n] for n in pending}, stream):
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
            "mean_sa": "mean per-unit SA score (vs the prediction) over the units of %s" % ", ".join(features)}
    return SAReport(ordered, features, mean_sa, output, prob, refs[:, 0], prediction, maps, info)

