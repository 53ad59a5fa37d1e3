"""Per-channel voxel counts of a thresholded, linearly resized activation inside masks: ProtoSeg's fast path.

``UnitCounter(src, refs).count(act, shift, scale)[k, r]`` is the number of guide voxels of mask ``r`` where
``resize((act_k - shift_k) * scale_k) > 0`` (``resize``: ``F.interpolate(linear, align_corners=False)`` from the
layer grid ``src`` to the guide grid), exactly up to float rounding, without materialising the resized channels.
The layer is replicate-padded by one voxel, so that the clamped edges of ``align_corners=False`` become ordinary
interpolations. One of three ways, by grid:

- *Same grid*: blocks of channels x voxels: a threshold and one matrix product with the masks.
- *Phases* (an integer factor, at most ``_DENSE`` guide voxels per layer voxel, e.g. 2 x 2 x 2, and most
  cells straddling, below, in a few sampled channels): every guide voxel is evaluated, as ``phases x segments``:
  a slab of layer rows at a time, axis by axis, one ``lerp`` per phase of two shifted views; the masks are stored
  in the same layout, so the counts are one batched product.
- *Cells* (otherwise): a guide voxel is a convex combination of the layer voxels around it, so guide voxels are
  grouped into cells sharing a few corners (along each axis, those whose lower corner lies in ``span``
  consecutive padded voxels). A cell whose corners are all > 0 is counted whole from per-cell mask totals, one
  whose corners are all <= 0 not at all; the positive corners of every cell are counted with separable window
  sums of one byte per voxel. Only *straddling* (channel, cell) pairs are evaluated voxel by voxel, one
  ``[pairs, corners] @ [corners, block]`` product per cell pattern, the masks read only where a cell is partly
  inside one. An integer factor gives one pattern (edge cells are completed with virtual voxels outside every
  mask); large cells (factors of 16 and more) are refined by sub-blocks (:mod:`.blocks`).

Channels are processed a few at a time as independent tasks (:mod:`.tasks`), every temporary
cache-sized.
"""

import math
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from .blocks import SubBlocks
from .tasks import SCRATCH, scratch_buffer, nonzero, project, run_tasks

# chosen by measurements on HD-BET's grids (factors 2 to 16)
_DENSE = 8  # phases (guide voxels per layer voxel) up to which every guide voxel is evaluated
_DENSE_CHANNELS = 8  # channels evaluated together by phases (they share the reads of the masks)
_DENSE_SHARE = 0.3  # share of straddling (unit, cell) pairs from which phases are cheaper than cells
_SUB = 8  # voxels per axis of the sub-blocks of large cells (blocks.py)
_SUB_MIN = 8  # sub-blocks per cell from which they pay off


class _Partly:
    """The masks (``bits``: rows of ``masks [R, cells, block]``) that ``cells`` (boolean) are partly inside, for
    those cells only: ``masks [cells, rows x block]``, ``row [all cells]`` its row of every cell."""

    def __init__(self, masks: torch.Tensor, cells: torch.Tensor, bits: int):
        self.rows = [r for r in range(masks.shape[0]) if bits >> r & 1]
        chosen = cells.nonzero()[:, 0].to(masks.device)
        self.masks = masks[self.rows][:, chosen].transpose(0, 1).reshape(len(chosen), -1).contiguous()
        self.row = torch.zeros(len(cells), dtype=torch.long, device=masks.device)
        self.row[chosen] = torch.arange(len(chosen), device=masks.device)


def axis_matrix(n_in: int, n_out: int, dtype, device) -> torch.Tensor:
    """``U [n_in, n_out]``: 1-D linear resize with align_corners=False, as F.interpolate computes it."""
    eye = torch.eye(n_in, dtype=dtype, device=device)[:, None, :]
    return F.interpolate(eye, size=n_out, mode="linear", align_corners=False)[:, 0, :]


class _Axis:
    """One axis of a resize: guide voxel ``i`` is ``w_lo,i F[first_i] + w_hi,i F[first_i + 1]`` (the weights of
    F.interpolate), grouped into ``cells`` of at most ``width`` voxels with ``corners`` corners each: cell ``j``
    reads padded voxels ``[j span, j span + span]`` (padded index = layer index + ``pad[0]``; clamped edges are
    replicated). An axis that is not resized is its own grid (one voxel per cell, one corner, no padding)."""

    def __init__(self, n_in: int, n_out: int, dtype, device):
        matrix = axis_matrix(n_in, n_out, dtype, device)
        cols = torch.arange(n_out, device=device)
        self.n_in, self.n_out = n_in, n_out
        self.identity = n_in == n_out and bool(torch.equal(matrix, torch.eye(n_in, dtype=dtype, device=device)))
        self.first = (matrix != 0).to(torch.uint8).argmax(0)  # the lower corner of every guide voxel
        self.next = (self.first + 1).clamp_max(n_in - 1)
        w_hi = torch.where(self.first + 1 < n_in, matrix[self.next, cols], torch.zeros((), dtype=dtype, device=device))
        self.lam = w_hi  # for the adjoint
        self.span = 1 if self.identity or n_out >= 3 * n_in else int(math.ceil(3 * n_in / n_out))
        self.corners = 1 if self.identity else self.span + 1
        self.cells = n_in if self.identity else n_in // self.span + 1  # padded lower corners 0 ... n_in
        self.pad = (0, 0) if self.identity else (1, self.cells * self.span - n_in)
        self.phases = 0  # integer factor: guide voxels = phases x segments (see ``phase_index``), else 0
        voxels = self._voxels(matrix[self.first, cols].double().tolist(), w_hi.double().tolist())
        if self.phases:
            runs: Dict[int, List[Tuple[int, int, float, float]]] = {}
            for voxel in voxels:
                runs.setdefault(voxel[1], []).append(voxel)
            segments = n_in if self.identity else n_in + 1
            self.phase_index = torch.tensor([[runs[low][p][0] for low in range(segments)]
                                             for p in range(self.phases)], device=device)  # [phases, segments]
            self.phase_lam = torch.tensor([w for _, _, _, w in runs[segments // 2]], dtype=dtype, device=device)
        members: List[List[Tuple[int, int, float, float]]] = [[] for _ in range(self.cells)]
        for voxel in voxels:
            if voxel[1] // self.span < self.cells:
                members[voxel[1] // self.span].append(voxel)
        self.width = max(len(m) for m in members)
        fine = torch.full((self.cells, self.width), n_out, dtype=torch.long)  # n_out: no guide voxel
        weights = torch.zeros((self.cells, self.width, self.corners), dtype=torch.float64)
        for j, run in enumerate(members):
            for slot, (i, low, w0, w1) in enumerate(run):
                fine[j, slot] = i
                weights[j, slot, low - j * self.span] += w0
                if w1:
                    weights[j, slot, low - j * self.span + 1] += w1
        self.fine = fine.to(device)  # [cells, width]: the guide voxel in every slot
        self.live = (weights != 0).any(2).sum(1).to(device)  # evaluated slots per cell
        table, pattern = torch.unique(weights.flatten(1), dim=0, return_inverse=True)
        self.pattern = pattern.to(device)  # [cells]: index into ``matrices``
        self.matrices = table.view(-1, self.width, self.corners).to(device=device, dtype=dtype)

    def _voxels(self, w_lo: List[float], w_hi: List[float]) -> List[Tuple[int, int, float, float]]:
        """``(guide voxel or n_out, padded lower corner, weight on it, weight on the next)`` in order.

        An integer factor repeats one pattern: the clamped edge voxels are then given the weights of their phase
        (their corners are replicated copies of the edge, so the value is the same up to rounding) and cells are
        completed with virtual voxels outside the grid (empty slots in every mask), so that all cells share one
        pattern. Otherwise the voxels are F.interpolate's own (clamped ones before the first layer voxel read
        the padding)."""
        n_in, n_out, first = self.n_in, self.n_out, self.first.tolist()
        if self.identity:
            self.phases = 1
            return [(i, i, 1.0, 0.0) for i in range(n_out)]
        factor = n_out // n_in
        inner = [i for i in range(n_out) if w_hi[i] and first[i] + 1 < n_in]  # interpolated between two voxels
        if n_out % n_in == 0 and factor >= 2 and inner and inner[-1] - inner[0] + 1 >= 2 * factor:
            ref = inner[0] + factor - 1 - (inner[0] + factor - 1) % factor  # a period of interior voxels
            out = []
            for i in range(-2 * factor, n_out + (self.cells * self.span - n_in + 2) * factor):
                shift = (i - ref) // factor
                r = i - shift * factor  # same phase, inside [ref, ref + factor)
                low = first[r] + shift + 1
                if 0 <= low < self.cells * self.span:
                    out.append((i if 0 <= i < n_out else n_out, low, w_lo[r], w_hi[r]))
            self.phases = factor
            return out
        src = [(i + 0.5) * n_in / n_out - 0.5 for i in range(n_out)]
        return [(i, 0 if src[i] < 0 and not w_hi[i] else first[i] + 1, w_lo[i], w_hi[i]) for i in range(n_out)]

    def adjoint(self, w: torch.Tensor, dim: int) -> torch.Tensor:
        """Transpose of the 1-D resize along ``dim``: each guide voxel sends ``1 - lam`` and ``lam`` to its corners."""
        shape = [1] * w.ndim
        shape[dim] = -1
        lam = self.lam.to(w.dtype).view(shape)
        out = w.new_zeros(w.shape[:dim] + (self.n_in,) + w.shape[dim + 1:])
        out.index_add_(dim, self.first, w * (1 - lam))
        return out.index_add_(dim, self.next, w * lam)

    def window_sum(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        """``out[j] = sum_{o <= span} x[j span + o]`` along ``dim`` (the padded grid -> cells)."""
        if self.identity:
            return x
        step = (slice(None),) * dim + (slice(None, None, self.span),)
        length = (self.cells - 1) * self.span + 1
        out = torch.add(x.narrow(dim, 0, length)[step], x.narrow(dim, 1, length)[step])
        for o in range(2, self.corners):
            out.add_(x.narrow(dim, o, length)[step])
        return out


class UnitCounter:
    """See the module docstring. ``refs [R, *dst]`` float: row 0 the evaluation region (all ones: every voxel),
    then the reference masks (zero outside the region)."""

    def __init__(self, src: Sequence[int], refs: torch.Tensor):
        dst, dtype, device = refs.shape[1:], refs.dtype, refs.device
        self.rows = refs.shape[0]
        self.axes = [_Axis(a, b, dtype, device) for a, b in zip(src, dst)]
        self.identity = all(ax.identity for ax in self.axes)
        if self.identity:
            self.refs = refs.reshape(self.rows, -1).contiguous()  # [R, N]
            return
        n = len(self.axes)
        self.dense = all(ax.phases for ax in self.axes) and math.prod(ax.phases for ax in self.axes) <= _DENSE
        if self.dense:  # masks per phase: [phases, R, segments]
            self.dense_padded = [ax.n_in + (0 if ax.identity else 2) for ax in self.axes]
            x = F.pad(refs, (0, 1) * n)
            for a, ax in enumerate(self.axes):
                x = x.index_select(2 * a + 1, ax.phase_index.flatten())
                x = x.reshape(x.shape[:a * 2 + 1] + tuple(ax.phase_index.shape) + x.shape[a * 2 + 2:])
            order = [2 * a + 1 for a in range(n)] + [0] + [2 * a + 2 for a in range(n)]
            self.phase_refs = x.permute(order).reshape(-1, self.rows, x[0].numel() // math.prod(
                ax.phases for ax in self.axes)).contiguous()
        x = F.pad(refs, (0, 1) * n)  # masks per cell: [R, cells, block]
        for a, ax in enumerate(self.axes):
            x = x.index_select(2 * a + 1, ax.fine.flatten())
            x = x.reshape(x.shape[:a * 2 + 1] + (ax.cells, ax.width) + x.shape[a * 2 + 2:])
        order = [0] + [2 * a + 1 for a in range(n)] + [2 * a + 2 for a in range(n)]
        self.block = math.prod(ax.width for ax in self.axes)
        masks = x.permute(order).reshape(self.rows, -1, self.block)
        self.totals = masks.sum(2)  # [R, cells]
        sizes = self.axes[0].live
        for ax in self.axes[1:]:
            sizes = (sizes[:, None] * ax.live[None, :]).reshape(-1)
        kind = torch.where(self.totals == 0, 0, torch.where(self.totals == sizes.to(dtype), 1, 2)).T.contiguous()
        self.full = (kind == 1).to(dtype)
        bits = ((kind == 2).long() << torch.arange(self.rows, device=device)).sum(1).cpu()  # masks a cell is partly in
        # padded layer grid: cell ``c`` reads the corners ``base[c] + offsets`` of a channel
        self.padded = [ax.n_in + ax.pad[0] + ax.pad[1] for ax in self.axes]
        strides = [math.prod(self.padded[a + 1:]) for a in range(n)]
        base, offsets, pid = torch.zeros((), dtype=torch.long), torch.zeros((), dtype=torch.long), 0
        for a, ax in enumerate(self.axes):
            base = (base[..., None] + torch.arange(ax.cells) * ax.span * strides[a]).reshape(-1)
            offsets = (offsets[..., None] + torch.arange(ax.corners) * strides[a]).reshape(-1)
            pid = (pid * len(ax.matrices))[..., None] + ax.pattern.cpu() if a else ax.pattern.cpu()
        self.base, self.offsets = base.to(device), offsets.to(device)
        pid, live = pid.reshape(-1), (self.totals[0] > 0).cpu()  # live: cells with a voxel in the region
        self.live = live.to(device)
        self.groups: List[Tuple[int, Optional[_Partly], torch.Tensor]] = []  # by cell pattern, then by the masks
        for p in pid[live].unique().tolist():  # the cells are partly inside (``bits``): only those are read
            for b in bits[live & (pid == p)].unique().tolist():
                cells = live & (pid == p) & (bits == b)
                self.groups.append((p, _Partly(masks, cells, b) if b else None, cells.to(device)))
        self.corners = math.prod(ax.corners for ax in self.axes)
        self._patterns: Dict[Tuple[int, torch.dtype], torch.Tensor] = {}
        self.blocks = None  # one pattern of large cells, linear along every axis: evaluated by sub-blocks
        patterns = {p for p, _, _ in self.groups}
        if len(patterns) == 1 and all(ax.identity or (ax.phases and ax.span == 1) for ax in self.axes):
            subs = [_SUB if ax.width >= 2 * _SUB and ax.width % _SUB == 0 else ax.width for ax in self.axes]
            if math.prod(ax.width // b for ax, b in zip(self.axes, subs)) >= _SUB_MIN:
                self.blocks = SubBlocks([ax.width for ax in self.axes], subs, self._pattern(patterns.pop(), dtype),
                                         masks)

    def _pattern(self, pid: int, dtype) -> torch.Tensor:
        """Weights ``[corners, block]`` of a cell pattern's voxel slots on its corners (zero: empty slots)."""
        if (pid, dtype) not in self._patterns:
            ids, rest = [], pid
            for ax in reversed(self.axes):
                ids.append(rest % len(ax.matrices))
                rest //= len(ax.matrices)
            weights = None
            for ax, p in zip(self.axes, reversed(ids)):
                wa = ax.matrices[p]
                weights = wa if weights is None else (weights[:, None, :, None] * wa[None, :, None, :]).reshape(
                    weights.shape[0] * wa.shape[0], -1)
            self._patterns[(pid, dtype)] = weights.T.to(dtype).contiguous()
        return self._patterns[(pid, dtype)]

    def count(self, act: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor,
              weights: Optional[torch.Tensor] = None, threads: int = 1) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """``act [K, *src]``, ``shift``/``scale [K]`` -> counts ``[K, R]``, and ``sum_k weights_k (act_k - shift_k)``
        (``[*src]``) if ``weights [K]`` is given. Blocks of channels (or of voxels, same grid) are independent tasks,
        run on ``threads`` threads."""
        kk, dtype = act.shape[0], act.dtype
        view = (-1,) + (1,) * (act.ndim - 1)
        shift, scale = shift.to(dtype).view(view), scale.to(dtype).view(view)
        weights = weights.to(dtype) if weights is not None else None
        if self.identity:  # blocks of voxels, every channel: the activation is read once
            flat, cols = act.reshape(kk, -1), max(1, SCRATCH // kk)
            projection = act.new_empty(flat.shape[1]) if weights is not None else None
            parts = run_tasks(lambda c0: self._same(flat, shift.view(-1, 1), scale.view(-1, 1), weights, projection,
                                                    c0, min(flat.shape[1], c0 + cols)),
                              range(0, flat.shape[1], cols), threads)
            return torch.stack(parts).sum(0), projection.view(act.shape[1:]) if weights is not None else None
        out = act.new_zeros((kk, self.rows))
        dense = self.dense and self._straddling_share(act, shift, scale) > _DENSE_SHARE
        step = max(1, min(_DENSE_CHANNELS if dense else SCRATCH // math.prod(self.padded),
                          -(-kk // (4 * threads)) if threads > 1 else kk))
        task = self._dense if dense else self._cells
        run_tasks(lambda k0: task(act, shift, scale, out, k0, min(kk, k0 + step)), range(0, kk, step), threads)
        if weights is None:
            return out, None
        return out, project(act[None], weights[None], threads)[0] - (weights * shift.view(-1)).sum()

    def _straddling_share(self, act, shift, scale) -> float:
        """The share of straddling (unit, cell) pairs in a few channels: where most cells straddle, evaluating every
        guide voxel (by phases) is cheaper than the cells."""
        channels, straddling = sorted({round(i * (act.shape[0] - 1) / 3) for i in range(4)}), 0
        for k in channels:
            signs = self._signs(self._padded(act, shift, scale, k, k + 1)).view(-1)
            straddling += int(((signs != 0) & (signs != self.corners) & self.live).sum())
        return straddling / max(1, len(channels) * int(self.live.sum()))

    def _padded(self, act, shift, scale, k0: int, k1: int, padded: Optional[List[int]] = None) -> torch.Tensor:
        """``(act - shift) * scale`` of channels ``k0:k1``, replicate-padded to ``padded`` (default: the cells')."""
        padded = padded or self.padded
        g = scratch_buffer(0, (k1 - k0) * math.prod(padded), act).view([k1 - k0] + padded)
        pads = [(padded[a] - ax.n_in) and 1 for a, ax in enumerate(self.axes)]
        inner = (slice(None),) + tuple(slice(lo, lo + ax.n_in) for lo, ax in zip(pads, self.axes))
        torch.sub(act[k0:k1], shift[k0:k1], out=g[inner]).mul_(scale[k0:k1])
        for a, (lo, ax) in enumerate(zip(pads, self.axes)):  # replicate the clamped edges
            hi = padded[a] - ax.n_in - lo
            if lo:
                g.narrow(a + 1, 0, lo).copy_(g.narrow(a + 1, lo, 1))
            if hi:
                end = g.narrow(a + 1, lo + ax.n_in, hi)
                end.copy_(g.narrow(a + 1, lo + ax.n_in - 1, 1).expand_as(end))
        return g

    def _dense(self, act, shift, scale, out, k0: int, k1: int) -> None:
        """Channels ``k0:k1`` of :meth:`count`, every guide voxel evaluated: a slab of layer rows at a time, axis by
        axis (last first), each phase a ``lerp`` of neighbouring padded voxels; then one product with the masks."""
        g, n, kc = self._padded(act, shift, scale, k0, k1, self.dense_padded), len(self.axes), k1 - k0
        phases = math.prod(ax.phases for ax in self.axes)
        plane = self.phase_refs.shape[2] // (self.dense_padded[0] - (0 if self.axes[0].identity else 1))
        rows = max(1, SCRATCH // (phases * kc * plane))
        first = self.axes[0]
        for x0 in range(0, self.phase_refs.shape[2] // plane, rows):
            x1 = min(self.phase_refs.shape[2] // plane, x0 + rows)
            t, slot = g.narrow(1, x0, x1 - x0 + (0 if first.identity else 1)), 1
            for ax in reversed(self.axes):  # the axis being resized is always dimension n
                if ax.identity:
                    t = t.unsqueeze(0)
                    continue
                lo, hi = t.narrow(n, 0, t.shape[n] - 1).unsqueeze(0), t.narrow(n, 1, t.shape[n] - 1).unsqueeze(0)
                shape = (ax.phases,) + lo.shape[1:]
                t = torch.lerp(lo, hi, ax.phase_lam.to(g.dtype).view((-1,) + (1,) * t.ndim),
                               out=scratch_buffer(slot, math.prod(shape), g).view(shape))
                slot = 3 - slot
            t = t.gt_(0).reshape(phases, kc, -1)
            masks = self.phase_refs[:, :, x0 * plane:x1 * plane].to(g.dtype)
            out[k0:k1] += torch.bmm(masks, t.transpose(1, 2)).sum(0).T

    def _cells(self, act, shift, scale, out, k0: int, k1: int) -> None:
        """Channels ``k0:k1`` of :meth:`count` on a resized grid."""
        dtype = act.dtype
        g = self._padded(act, shift, scale, k0, k1)
        signs = self._signs(g).reshape(k1 - k0, -1)
        sure = signs == self.corners
        out[k0:k1] += torch.mm(self.totals.to(dtype), sure.T.to(dtype)).T
        straddle = (signs != 0) & ~sure
        for pid, partly, cells in self.groups:  # pairs by channel, then cell: neighbouring cells share corners
            k, index = nonzero(straddle & cells)
            if len(k):
                self._straddling(g.view(-1), k, index, pid, partly, out[k0:k1])

    def _signs(self, g: torch.Tensor) -> torch.Tensor:
        """Positive corners of every cell: ``g [k, *padded]`` -> ``[k, *cells]`` (separable window sums of bytes)."""
        signs = torch.gt(g, 0, out=scratch_buffer(5, g.numel(), g, torch.bool).view(g.shape)).view(torch.uint8)
        if self.corners > 255:
            signs = signs.to(torch.int32)
        for a, ax in enumerate(self.axes):
            signs = ax.window_sum(signs, a + 1)
        return signs

    def _straddling(self, g, k, cells, pid, partly, out) -> None:
        """Count straddling (channel, cell) pairs of one cell pattern voxel by voxel, a cache-sized block at a time;
        ``partly``: the masks the cells are partly inside."""
        rows, block, volume = max(1, SCRATCH // self.block), self.block, math.prod(self.padded)
        start, offsets = (k * volume + self.base.index_select(0, cells))[:, None], self.offsets[None, :]
        if self.blocks is not None:
            rows = max(1, SCRATCH // (self.blocks.q * self.blocks.e))
            for r0 in range(0, len(k), rows):
                corners = g.take(start[r0:r0 + rows] + offsets)
                self.blocks.evaluate(corners, cells[r0:r0 + rows], k[r0:r0 + rows], out)
            return
        buffer, weights = scratch_buffer(1, block * min(rows, len(k)), g), self._pattern(pid, g.dtype)
        full = self.full.to(g.dtype).index_select(0, cells)
        if partly is not None:
            table, rows_in = partly.masks.to(g.dtype), partly.row.index_select(0, cells)
        for r0 in range(0, len(k), rows):
            r1 = min(len(k), r0 + rows)
            corners = g.take(start[r0:r1] + offsets)
            v = torch.mm(corners, weights, out=buffer[:block * (r1 - r0)].view(r1 - r0, block)).gt_(0)
            counts = v.sum(1, keepdim=True) * full[r0:r1]  # [pairs, R]
            if partly is not None:  # the masks the cells are partly inside, voxel by voxel
                inside = torch.index_select(table, 0, rows_in[r0:r1], out=scratch_buffer(
                    2, (r1 - r0) * table.shape[1], v).view(r1 - r0, -1)).view(r1 - r0, len(partly.rows), block)
                counts[:, partly.rows] = inside.mul_(v[:, None, :]).sum(2)
            out.index_add_(0, k[r0:r1], counts)

    def _same(self, flat, shift, scale, weights, projection, c0: int, c1: int) -> torch.Tensor:
        """Voxels ``c0:c1`` of every channel, on the guide grid itself: counts ``[K, R]``."""
        g = torch.sub(flat[:, c0:c1], shift, out=scratch_buffer(0, flat.shape[0] * (c1 - c0), flat).view(flat.shape[0], -1))
        if weights is not None:  # the decision, from the block while it is in the cache
            torch.mm(weights[None], g, out=projection[None, c0:c1])
        return torch.mm(self.refs[:, c0:c1].to(flat.dtype), g.mul_(scale).gt_(0).T).T
