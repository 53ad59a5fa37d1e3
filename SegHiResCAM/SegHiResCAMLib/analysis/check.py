"""``--check quick``: a one-line verdict on one heatmap, at 0.86-2.85 times the cost of one explain run.

Two checks (the quick versions of :mod:`.evaluate`'s; definitions in :mod:`SegHiResCAMLib.engine.faithfulness`):

1. **Model randomisation of the explained layer's downstream** (Adebayo et al. 2018): the parameters of every
   module from the explained layer to the output are re-initialised on a deep copy of the network, the map is
   computed again for the same target (region M fixed) and compared with the original by Spearman's rank
   correlation inside M dilated by 3 voxels (the only correlation taken: the verdict reads no other). A map that
   reflects what the network learnt changes: ``rho <= 0.5`` passes (the faithfulness study's limit). Cost: one
   CAM pass of the copy, from the layer on: what runs before the layer is not re-initialised, so the outputs the
   explain run's forward pass computed there are reused (:class:`~SegHiResCAMLib.engine.faithfulness.
   UpstreamRecorder`; not with windows, ``amp``, a reused session or the ``auto`` layer name, where the whole copy
   runs). The modules' order (which ones run from the layer on) is recorded during the deletion passes below, not
   by a forward pass of its own.
2. **A partial deletion AUC against a random ranking**: the map's hottest voxels are removed (replaced by a blurred
   input) at ``r``, the target's share of the image (kept in evaluate's range: the point at ``r`` of
   :func:`~SegHiResCAMLib.engine.faithfulness.placed_fractions`), and so are as many voxels drawn at random. The
   inputs run on the target's box (:mod:`SegHiResCAMLib.engine.faithfulness.shortcut`) where
   :func:`~SegHiResCAMLib.engine.faithfulness.choose_stand_in` allows it: the box's three passes (with the
   unperturbed box, whose score is then ``y0``) cost less than two on the whole input, and the model scores the
   unperturbed box within 1% of the whole input (``deletion.box_rejected`` records a box it scored and did not use,
   e.g. a small box in a network with instance normalisation); else on the whole input. On a CPU that computes
   bfloat16 natively they run in bfloat16 under the same test (``deletion.precision``; ``precision`` argument,
   default ``auto``). A faithful map destroys the score sooner: a
   lower AUC than the random ranking. The AUC is that of the normalised curve over ``[0, r]`` divided by ``r`` (the
   mean normalised score there, ``(1 + y_r / y0) / 2``: 1 when nothing changed, 0.5 when the score is gone). Until
   issue 18 part 4 the curve also had the fully replaced input at fraction 1; that point is shared by the map and the
   random ranking, so it moved both AUCs by the same amount and never changed which one is lower
   (``better_than_random`` is the same on either curve): it is left out, one forward pass less. Cost: 2 gradient-free
   forward passes, in one batch where free memory holds two
   (:func:`~SegHiResCAMLib.engine.faithfulness.auto_batch_size`), plus one on the unperturbed box when there is a box
   to score or the passes run in bfloat16 (on the whole input in float32, ``y0`` is the explain run's).

Cost measured against one explain run on an idle 2-core machine: ``benchmarks/results/check.md``
(``studies/benchmark/bench_check.py``). With the deletion in bfloat16 (a CPU with AMX, commit dcc915a): 1.32x on
HD-BET (96^3 crop of the ROBEX atlas), 1.73x on a MONAI UNet (128^3, the target half the input; its explain runs
take about 0.9 s, and two forward passes, a backward pass and rank statistics on 2 million voxels cost more than
the model there) and 1.33x for a small target in a large image (a 10 mm ball in the UNet's 192^3 input, whose box
the UNet scores differently: the whole input runs). In float32: 1.35-1.68x on HD-BET, 1.52x to 2.85x on that UNet
(within issue 18's "2x one explain run" in three of its ten runs since issue 18 part 4), 1.33-1.35x for the small
target; 2.71x and 4.03x before issue 18 part 4 (the fully replaced input, the order probe, the whole-image
correlation and the randomised copy's whole forward pass).

The verdict reads e.g. ``passes model randomisation (rho 0.08); deletion AUC 0.55 vs random 0.97: better than
random`` (a lower deletion AUC is better; ``no better than random`` otherwise, from the unrounded AUCs); when the
explanation carries the agreement of an ensemble or of test-time augmentation (``metadata["agreement"]``, a number
or ``{"score": ...}``), ``; fold agreement 0.86`` is appended.
"""

import time
from typing import Optional

import numpy as np
import torch

from ..engine.cam import CAMResult
from ..engine.faithfulness import (UpstreamRecorder, cascade_stages, choose_stand_in, dilate, model_randomization,
                                   perturbation_curves, placed_fractions, recording_parameter_layers, region_fraction,
                                   region_on_grid, target_box)
from ..engine.faithfulness.shortcut import DEFAULT_MARGIN
from ..engine.outputs import reusing_freed_memory
from ..engine.targets import SegmentTarget
from ..errors import InputError, LayerError
from ..imaging.model_space import ModelSpace

CHECKS = ("quick",)
#: the model-randomisation check passes when the rank correlation in the dilated segment is at most this
RHO_LIMIT = 0.5
#: radius (model voxels) of the dilated segment the correlation is taken in
DILATION = 3


def image_domain(space: ModelSpace, device: torch.device) -> torch.Tensor:
    """The model-grid voxels that hold the image (not the padding)."""
    shape = space.grid.array_shape
    domain = torch.zeros(shape, dtype=torch.bool, device=device)
    domain[tuple(slice(b, n - a) for (b, a), n in zip(space.pad, shape))] = True
    return domain


def check_name(check: Optional[str]) -> Optional[str]:
    """``None`` or a name of :data:`CHECKS` (else one clear error)."""
    if check in (None, "", "none"):
        return None
    if check not in CHECKS:
        raise InputError("check must be one of %s (or none), got %r" % (", ".join(CHECKS), check))
    return check


def agreement_score(metadata: dict) -> Optional[float]:
    """The ensemble/TTA agreement recorded in an explanation's metadata, if any."""
    value = metadata.get("agreement")
    if isinstance(value, dict):
        value = value.get("score", value.get("agreement"))
    try:
        return None if value is None else float(value)
    except (TypeError, ValueError):
        return None


def quick_check(network: torch.nn.Module, x: torch.Tensor, target: SegmentTarget, result: CAMResult,
                domain: Optional[torch.Tensor] = None, output_key: Optional[str] = None, align: int = 1,
                seed: int = 0, upstream: Optional[UpstreamRecorder] = None, precision: str = "auto",
                **method_options) -> dict:
    """The two checks of the module docstring on ``result`` (one map of ``target`` on the whole input ``x``).

    ``upstream``: what the explain run's forward pass computed before ``result.layer`` (an :class:`UpstreamRecorder`
    around it); the randomised copy then runs only from the layer on (the same map as without it).
    ``precision``: of the deletion's forward passes (:func:`~SegHiResCAMLib.engine.faithfulness.choose_stand_in`).

    Returns ``{"verdict": one line, "model_randomization": {...}, "deletion": {...}, "seconds": s}``."""
    started = time.perf_counter()
    spatial = tuple(x.shape[2:])
    region = result.region
    fraction = float(region_fraction(region, spatial, 0, domain)[0])
    steps = [0.0, placed_fractions(fraction)[-2]]  # [0, r]: the partial curve (module docstring)
    box = target_box(region, spatial, DEFAULT_MARGIN, align) if tuple(region.shape[1:]) == spatial else None
    noise = torch.rand(spatial, generator=torch.Generator().manual_seed(int(seed) + 1)).to(x.device)
    with reusing_freed_memory():  # one block for both checks: the randomised pass reuses the deletion's memory
        with recording_parameter_layers(network) as order:  # the modules' order, from the passes below
            stand_in = choose_stand_in(network, x, target, region, box, float(result.score[0]), passes=2,
                                       output_key=output_key, precision=precision)
            curves = perturbation_curves(network, x, target, [result.map[0], noise], steps=steps,
                                         modes=("deletion",), domain=domain, region=region,
                                         reference_score=stand_in.y0, output_key=output_key, seed=seed,
                                         box=stand_in.box, rescore_box=False, precision=stand_in.precision)
        order = list(order)
        try:
            plan = cascade_stages(order, [result.layer])
            kept = upstream.reusable(result.layer, x) if upstream is not None else None
        except LayerError:  # a layer without parameters of its own (e.g. an up-sampling): the network's top half
            plan, kept = cascade_stages(order, 2), None
        segment = dilate(region_on_grid(region, spatial), DILATION)[0]
        stage = model_randomization(network, x, target, [result.layer], [result.method], stages=plan[0][1][:1],
                                    reference=[result], seed=seed, order=order, domain=domain, segment=segment,
                                    output_key=output_key, whole=False, upstream=kept, **method_options)[0]
    rho_in = stage.correlations_in_segment.get((result.layer, result.method), float("nan"))
    mine, rand = curves[0]["deletion"], curves[1]["deletion"]
    use_raw = not (mine.reference > 0)  # y0 <= 0: the normalised AUC is undefined; the raw one still compares
    width = steps[-1]
    auc, auc_random = (mine.auc_raw / width, rand.auc_raw / width) if use_raw else (mine.auc / width,
                                                                                    rand.auc / width)
    passes = rho_in <= RHO_LIMIT
    verdict = "%s model randomisation (rho %s)" % ("passes" if passes else "fails",
                                                   "n/a" if np.isnan(rho_in) else "%.2f" % rho_in)
    verdict += "; deletion AUC%s %.2f vs random %.2f: %s than random" % (
        " (raw)" if use_raw else "", auc, auc_random, "better" if auc < auc_random else "no better")
    return {"verdict": verdict,
            "model_randomization": {"randomized": stage.randomized, "spearman_in_segment": rho_in,
                                    "limit": RHO_LIMIT, "passes": bool(passes),
                                    "reused_upstream_modules": len(kept or {})},
            "deletion": {"fractions": steps, "auc": auc, "auc_random": auc_random, "normalized": not use_raw,
                         "scores": mine.scores, "scores_random": rand.scores,
                         "box": None if stand_in.box is None else [[b.start, b.stop] for b in stand_in.box],
                         "box_rejected": stand_in.box_rejected, "precision": stand_in.precision,
                         "precision_rejected": stand_in.precision_rejected, "y0": stand_in.y0,
                         "better_than_random": bool(auc < auc_random)},
            "seconds": time.perf_counter() - started}


def with_agreement(check: dict, metadata: dict) -> dict:
    """Append the fold/TTA agreement of ``metadata`` (when there is one) to the verdict."""
    score = agreement_score(metadata)
    if score is not None and "fold agreement" not in check["verdict"]:
        check["verdict"] += "; fold agreement %.2f" % score
        check["agreement"] = score
    return check


__all__ = ["CHECKS", "DILATION", "RHO_LIMIT", "agreement_score", "check_name", "image_domain", "quick_check",
           "with_agreement"]
