"""ProtoSeg definitions (literal maps, prototypes) and :class:`Scorer`, the fast exact SA scores of one layer.

The public module is the package :mod:`SegHiResCAMLib.engine.protoseg` (specification, whole networks); the counting behind the scores is in
:mod:`.count`.
"""

from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from ...errors import InputError, TargetError
from .count import UnitCounter
from .tasks import SCRATCH, OneThread, project, run_tasks

MODES = {1: "linear", 2: "bilinear", 3: "trilinear"}
EMPTY_POLICIES = ("nan", "raise")
DEAD_RELATIVE = 2.0 ** -23  # float32 epsilon: a unit this much smaller than its layer's largest prototype is dead
RESIZE = "features resized to the guide grid with F.interpolate(%s, align_corners=False)"


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

    Unit ``k`` is foreground iff ``(F_k - (c_t,k + c_b,k) / 2) sign(c_t,k - c_b,k) > 0`` (= :func:`protoseg` of
    channel k, without the float underflow of the product with ``c_t,k - c_b,k`` for tiny activations).
    """
    _check(features, guide, on_empty)
    chosen = features if units is None else features[:, list(units)]
    f = resize(chosen, guide.shape[1:])
    c_t, c_b, valid = prototypes(f, guide, tissue, eps)
    _empty(valid, on_empty)
    view = c_t.shape + (1,) * (f.ndim - 2)
    ok = valid.view((-1,) + (1,) * (f.ndim - 1))
    return ((f - ((c_t + c_b) / 2).view(view)) * (c_t - c_b).sign().view(view) > 0) & ok


def dead_units(act: torch.Tensor, c_t: torch.Tensor, c_b: torch.Tensor) -> torch.Tensor:
    """``[B, K]``: units (channels) that carry no signal on this input: constant over the layer grid, or whose
    largest magnitude is at most ``DEAD_RELATIVE`` (float32 rounding) times the layer's largest prototype magnitude
    (``c_t``, ``c_b [B, K]``: the layer's prototypes).

    Their maps are defined by the formula but made of float residue (e.g. HD-BET's decayed units, ~1e-37), and they
    contribute nothing downstream: such a unit gets a NaN score, which the mean SA score leaves out. A prototype is
    a weighted mean, so ``|c| <= max |F_k|``: only units with small or nearly equal prototypes are read again."""
    size = torch.maximum(c_t.abs(), c_b.abs())
    floor = (size.amax(1, keepdim=True) * DEAD_RELATIVE).clamp_min(torch.finfo(torch.float32).tiny)
    candidates = (size <= floor) | ((c_t - c_b).abs() <= 1e-4 * (c_t.abs() + c_b.abs()))
    dead = torch.zeros_like(candidates)
    for b, k in candidates.nonzero().tolist() if bool(candidates.any()) else ():
        low, high = torch.aminmax(act[b, k].detach())
        dead[b, k] = bool(low == high) or max(abs(float(low)), abs(float(high))) <= float(floor[b, 0])
    return dead


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
        threads: CPU threads of the scoring (default: torch's setting); every torch operation runs on one thread.
    """

    def __init__(self, guide: torch.Tensor, references: torch.Tensor, tissue: Optional[torch.Tensor] = None,
                 eps: float = 1e-6, on_empty: str = "nan", region: Optional[torch.Tensor] = None,
                 threads: Optional[int] = None):
        if references.shape[:1] + references.shape[2:] != guide.shape:
            raise InputError("references %s do not match the guide %s" % (tuple(references.shape), tuple(guide.shape)))
        if region is not None and tuple(region.shape) != tuple(guide.shape):
            raise InputError("the region %s does not match the guide %s" % (tuple(region.shape), tuple(guide.shape)))
        self.guide, self.eps, self.on_empty, self.threads = guide, eps, on_empty, threads
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
        self._plans: Dict[Tuple, Tuple[List[UnitCounter], torch.Tensor]] = {}

    def _plan(self, src, dtype):
        """Per layer grid: counters (one per batch element) and the prototype weights ``[B, 2, n]`` on that grid."""
        key = (tuple(src), dtype)
        if key not in self._plans:
            counters = [UnitCounter(src, self.refs[b].to(dtype)) for b in range(self.guide.shape[0])]
            q = torch.stack([self.w_t / self.m_t.clamp_min(self.eps).view((-1,) + (1,) * (self.w_t.ndim - 1)),
                             self.w_b / self.m_b.clamp_min(self.eps).view((-1,) + (1,) * (self.w_b.ndim - 1))], 1)
            q = q.to(dtype)
            for a, ax in enumerate(counters[0].axes):  # adjoint of the resize: <resize(F), w> = <F, adjoint(w)>
                if not ax.identity:
                    q = ax.adjoint(q, a + 2)
            self._plans[key] = (counters, q.flatten(2))
        return self._plans[key]

    def prototypes(self, act: torch.Tensor, threads: int = 1) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(c_t, c_b)`` ``[B, K]`` of an activation on its own grid (without resizing it)."""
        q, flat = self._plan(act.shape[2:], act.dtype)[1], act.flatten(2)
        cols = max(1, SCRATCH // flat.shape[1])  # fixed blocks of voxels: the same sums whatever ``threads``
        parts = run_tasks(lambda c0: torch.bmm(q[:, :, c0:c0 + cols], flat[:, :, c0:c0 + cols].transpose(1, 2)),
                          range(0, flat.shape[2], cols), threads)
        c = parts[0] if len(parts) == 1 else torch.stack(parts).sum(0)
        # a constant channel has equal prototypes (its map is empty), which rounding would break: check the few
        # channels whose prototypes are that close, and give them their value exactly
        close = (c[:, 0] - c[:, 1]).abs() <= 1e-4 * (c[:, 0].abs() + c[:, 1].abs())
        for b in range(c.shape[0]) if bool(close.any()) else ():
            channels = close[b].nonzero()[:, 0]
            low, high = torch.aminmax(flat[b].index_select(0, channels), dim=1)
            channels, low = channels[low == high], low[low == high]
            c[b, :, channels] = low[None]
        return c[:, 0], c[:, 1]

    @staticmethod
    def decision(act: torch.Tensor, c_t: torch.Tensor, c_b: torch.Tensor) -> torch.Tensor:
        """Layer decision ``D = sum_k d_k (F_k - m_k)`` on the layer grid, ``[B, *S_l]`` (map: resize(D) > 0)."""
        d = c_t - c_b
        return torch.bmm(d[:, None], act.flatten(2)).view((act.shape[0],) + act.shape[2:]) \
            - (d * (c_t + c_b) / 2).sum(1).view((-1,) + (1,) * (act.ndim - 2))

    def score(self, act: torch.Tensor, per_unit: bool = True) -> Dict[str, torch.Tensor]:
        """``{"layer": [B, R], "units": [B, K, R] and "dead": [B, K] (if per_unit), "c_t", "c_b", "decision",
        "scale"}``; NaN where undefined. ``decision`` is ``D / scale`` on the layer grid (``scale [B] > 0``).

        A *dead* unit (:func:`dead_units`: constant, or below float32 rounding of the layer's largest prototype)
        carries no signal: its score is NaN (left out of means), not a Dice of float residue."""
        threads = self.threads or (torch.get_num_threads() if act.device.type == "cpu" else 1)
        with OneThread():
            return self._score(act, per_unit, threads)

    def _score(self, act: torch.Tensor, per_unit: bool, threads: int) -> Dict[str, torch.Tensor]:
        act = act.detach()
        act = act if act.is_floating_point() else act.float()
        counters = self._plan(act.shape[2:], act.dtype)[0]
        c_t, c_b = self.prototypes(act, threads)
        d = c_t - c_b
        shift = (c_t + c_b) / 2
        # the decision D = sum_k d_k (F_k - m_k) is computed as D / scale (scale = max_k |d_k| > 0), and unit maps as
        # sign(d_k) (F_k - m_k) > 0: the same maps, without the underflow of products of two tiny numbers
        scale = d.abs().amax(1).clamp_min(torch.finfo(d.dtype).tiny)
        unit_d = d / scale[:, None]
        sizes = self.sizes.to(act.dtype)
        nan = torch.full((), float("nan"), dtype=act.dtype, device=act.device)
        ok = self.valid.view(-1, 1)
        result = {"c_t": c_t, "c_b": c_b, "scale": scale}
        if per_unit:  # the per-unit pass also gives the decision sum_k d_k (F_k - m_k)
            dead = dead_units(act, c_t, c_b)
            units, decisions = [], []
            for b in range(act.shape[0]):
                counts, projection = self._count_live(counters[b], act[b], shift[b], d[b], unit_d[b], dead[b],
                                                      threads)
                units.append(_dice(counts, sizes[b]))
                decisions.append(projection)
            result["dead"] = dead
            result["units"] = torch.where(ok[:, :, None] & ~dead[:, :, None], torch.stack(units), nan)
            decision = torch.stack(decisions)
        else:
            decision = project(act, unit_d, threads) - (unit_d * shift).sum(1).view((-1,) + (1,) * (act.ndim - 2))
        one, zero = act.new_ones(1), act.new_zeros(1)
        layer = torch.stack([_dice(counters[b].count(decision[b:b + 1], zero, one, None, threads)[0][0], sizes[b])
                             for b in range(act.shape[0])])
        result.update({"layer": torch.where(ok, layer, nan), "decision": decision})
        return result

    @staticmethod
    def _count_live(counter, act, shift, d, weights, dead, threads):
        """:meth:`UnitCounter.count` of one batch element's live units (dead ones: zero counts), and the decision
        ``sum_k weights_k (act_k - shift_k)`` over every unit. Where many units are dead (e.g. 228 of 336 in HD-BET's
        ``context5.conv1``), only the live ones are counted."""
        if int(dead.sum()) * 8 < dead.numel():
            return counter.count(act, shift, d.sign(), weights, threads)
        live, gone = (~dead).nonzero()[:, 0], dead.nonzero()[:, 0]
        rest = torch.einsum("k...,k->...", act.index_select(0, gone), weights[gone]) \
            - (weights[gone] * shift[gone]).sum()
        counts = act.new_zeros((act.shape[0], counter.rows))
        if len(live) == 0:
            return counts, rest
        part, projection = counter.count(act.index_select(0, live), shift[live], d[live].sign(), weights[live],
                                         threads)
        counts[live] = part
        return counts, projection + rest

    def layer_map(self, decision: torch.Tensor, soft: bool = False,
                  scale: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The layer's map on the guide grid from its decision: boolean, or ``sigmoid(2 D)`` (soft).

        ``decision`` and ``scale [B]`` as :meth:`score` returns them (``D = scale * decision``), or ``D`` itself."""
        up = resize(decision[:, None], self.guide.shape[1:])[:, 0]
        ok = self.valid.view((-1,) + (1,) * (up.ndim - 1))
        if soft:
            if scale is not None:
                up = up * scale.to(up.dtype).view((-1,) + (1,) * (up.ndim - 1))
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

