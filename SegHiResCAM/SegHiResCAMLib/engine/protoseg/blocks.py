"""Sub-blocks of large cells (factors of 8 and more): the voxels of a straddling cell, a few at a time.

Inside one cell the resized map is multilinear in the position, so along every axis the cell's voxels (evenly
spaced when the factor is an integer) are linear interpolations of the two outermost voxels of any run of them.
A cell of ``w`` voxels per axis is cut into sub-blocks of ``b`` (4) voxels per axis; the 2 x 2 x 2 outermost
voxels of every sub-block (the *lattice*, ``(w / b)^3 * 8`` voxels instead of ``w^3``) are evaluated from the
cell's corners, and every voxel of a sub-block from its lattice voxels with one fixed pattern. A sub-block whose
lattice voxels are all > 0 (all <= 0) is then counted whole from per-sub-block mask totals (not at all), exactly
as the cells are, and only straddling sub-blocks are evaluated voxel by voxel. Rounding differs from a direct
evaluation by a few units in the last place, as any order of the same sums does.
"""

import math
from typing import List

import torch

from .tasks import SCRATCH, scratch_buffer, nonzero

_HALVE = 8  # sub-blocks of at least this many voxels per axis are cut again


class SubBlocks:
    """Built by :class:`~.count.UnitCounter` for one cell pattern ``weights [corners, block]`` shared by
    every cell; ``masks [R, cells, block]`` (the counter's, slot order of the block)."""

    def __init__(self, widths: List[int], subs: List[int], weights: torch.Tensor, masks: torch.Tensor,
                 level: int = 0):
        dtype, rows, self.slot = masks.dtype, masks.shape[0], 10 + 3 * level  # scratch buffers of this level
        self.count = [w // b for w, b in zip(widths, subs)]  # sub-blocks per axis
        ends = [2 if b > 1 else 1 for b in subs]  # lattice voxels per sub-block and axis
        self.q, self.e, self.b = math.prod(self.count), math.prod(ends), math.prod(subs)
        strides = [math.prod(widths[a + 1:]) for a in range(len(widths))]
        lattice, voxels, sub = torch.zeros((), dtype=torch.long), torch.zeros((), dtype=torch.long), None
        for a, (q, e, b) in enumerate(zip(self.count, ends, subs)):  # slots in the cell's block, axis by axis
            first = torch.arange(q) * b * strides[a]
            lattice = lattice[..., None, None] + first.view(-1, 1) + torch.arange(e) * (b - 1) * strides[a]
            voxels = voxels[..., None, None] + first.view(-1, 1) + torch.arange(b) * strides[a]
            step = torch.arange(b, dtype=torch.float64) / max(1, b - 1)
            axis = torch.stack([1 - step, step]) if e == 2 else torch.ones(1, b, dtype=torch.float64)
            sub = axis if sub is None else (sub[:, None, :, None] * axis[None, :, None, :]).reshape(
                sub.shape[0] * e, -1)
        n = len(widths)  # lattice/voxels: [q0, e0, q1, e1, ...] -> [q..., e...]
        lattice = lattice.permute([2 * a for a in range(n)] + [2 * a + 1 for a in range(n)]).reshape(-1)
        voxels = voxels.permute([2 * a for a in range(n)] + [2 * a + 1 for a in range(n)]).reshape(self.q, self.b)
        self.lattice = weights[:, lattice.to(weights.device)].contiguous()  # [corners, q * e]
        self.pattern = sub.to(device=weights.device, dtype=weights.dtype)  # [e, b]
        inside = masks[:, :, voxels.to(masks.device)]  # [R, cells, q, b]
        totals = inside.sum(3).permute(1, 2, 0)  # [cells, q, R]
        self.totals = totals.reshape(-1, self.q * rows).contiguous()  # row: cell (2-D tables: fast rows)
        self.full = (totals == self.b).to(dtype).reshape(-1, rows).contiguous()
        mixed = ((totals > 0) & (totals < self.b)).reshape(-1, rows).contiguous()
        self.mixed_kind = mixed
        self.mixed = mixed.any(1)
        self.mixed_row = torch.cumsum(self.mixed, 0) - 1
        self.mixed_masks = inside.permute(1, 2, 0, 3).reshape(-1, rows * self.b)[self.mixed].contiguous()
        halves = [b // 2 if b >= _HALVE and b % 2 == 0 else b for b in subs]  # large sub-blocks: the same again
        self.child = SubBlocks(subs, halves, self.pattern, inside.reshape(rows, -1, self.b), level + 1) \
            if halves != subs else None

    def evaluate(self, corners: torch.Tensor, cells: torch.Tensor, channels: torch.Tensor, out: torch.Tensor) -> None:
        """Add the positive voxels of (channel, cell) pairs to ``out [K, R]``: ``corners [pairs, corners]``."""
        m, q, e = len(cells), self.q, self.e
        lattice = torch.mm(corners, self.lattice.to(corners.dtype),
                           out=scratch_buffer(self.slot, m * q * e, corners).view(m, q * e))
        signs = torch.gt(lattice, 0, out=scratch_buffer(self.slot + 1, m * q * e, corners).view(m, q * e))
        positive = torch.mm(signs.view(-1, e), signs.new_ones(e, 1)).view(m, q)  # lattice voxels > 0
        sure = positive == e
        totals = self.totals.to(corners.dtype).index_select(0, cells).view(m, q, -1)
        out.index_add_(0, channels, torch.bmm(sure.to(corners.dtype)[:, None, :], totals)[:, 0])
        pair, block = nonzero((positive > 0) & ~sure)
        child, flat = self.child, lattice.view(-1, e)
        rows = max(1, SCRATCH // (child.q * child.e if child is not None else self.b))
        for r0 in range(0, len(pair), rows):
            p, s = pair[r0:r0 + rows], block[r0:r0 + rows]
            row = cells.index_select(0, p) * q + s
            if child is not None:  # a sub-block is a cell of the next level, its lattice voxels its corners
                child.evaluate(flat.index_select(0, p * q + s), row, channels.index_select(0, p), out)
                continue
            v = torch.mm(flat.index_select(0, p * q + s), self.pattern.to(corners.dtype),
                         out=scratch_buffer(self.slot + 1, len(p) * self.b, corners).view(len(p), self.b)).gt_(0)
            counts = v.sum(1, keepdim=True) * self.full.to(v.dtype).index_select(0, row)
            mixed = self.mixed.index_select(0, row).nonzero()[:, 0]
            if len(mixed):
                rm = row.index_select(0, mixed)
                table = self.mixed_masks.to(v.dtype)
                inside = torch.index_select(table, 0, self.mixed_row.index_select(0, rm), out=scratch_buffer(
                    self.slot + 2, len(rm) * table.shape[1], v).view(len(rm), -1))
                inside = inside.view(len(rm), -1, self.b).mul_(v.index_select(0, mixed)[:, None, :]).sum(2)
                counts.index_copy_(0, mixed, torch.where(self.mixed_kind.index_select(0, rm), inside,
                                                         counts.index_select(0, mixed)))
            out.index_add_(0, channels.index_select(0, p), counts)
