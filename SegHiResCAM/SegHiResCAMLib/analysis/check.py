"""``--check quick``: a one-line verdict on one heatmap, at about the cost of one more explain run.

Two checks (the quick versions of :mod:`.evaluate`'s; definitions in :mod:`SegHiResCAMLib.engine.faithfulness`):

1. **Model randomisation of the explained layer's downstream** (Adebayo et al. 2018): the parameters of every
   module from the explained layer to the output are re-initialised on a deep copy of the network, the map is
   computed again for the same target (region M fixed) and compared with the original by Spearman's rank
   correlation inside M dilated by 3 voxels. A map that reflects what the network learnt changes:
   ``rho <= 0.5`` passes (the faithfulness study's limit). Cost: one CAM pass.
2. **A few-step deletion AUC against a random ranking**: the map's hottest voxels are removed (replaced by a blurred
   input) at the target's share of the image, and so are as many voxels drawn at random, on the target's box
   (:mod:`SegHiResCAMLib.engine.faithfulness.shortcut`). A faithful map destroys the score sooner: a lower AUC than
   the random ranking. Cost: 3 gradient-free forward passes on the box (the unperturbed score is the explain
   run's), the two perturbed ones in one batch.

The verdict reads e.g. ``passes model randomisation (rho 0.08); deletion AUC 0.31 vs random 0.62``; when the
explanation carries the agreement of an ensemble or of test-time augmentation (``metadata["agreement"]``, a number
or ``{"score": ...}``), ``; fold agreement 0.86`` is appended.
"""

import time
from typing import Optional

import numpy as np
import torch

from ..engine.cam import CAMResult
from ..engine.faithfulness import (cascade_stages, dilate, model_randomization, parameter_layers, perturbation_curves,
                                   placed_fractions, region_fraction, region_on_grid, target_box)
from ..engine.faithfulness.shortcut import DEFAULT_MARGIN
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
                seed: int = 0, **method_options) -> dict:
    """The two checks of the module docstring on ``result`` (one map of ``target`` on the whole input ``x``).

    Returns ``{"verdict": one line, "model_randomization": {...}, "deletion": {...}, "seconds": s}``."""
    started = time.perf_counter()
    spatial = tuple(x.shape[2:])
    region = result.region
    segment = dilate(region_on_grid(region, spatial), DILATION)[0]
    order = parameter_layers(network, x[(slice(None), slice(None)) + tuple(slice(0, min(s, 32)) for s in spatial)]) \
        if all(s >= 32 for s in spatial) else parameter_layers(network, x)
    try:
        plan = cascade_stages(order, [result.layer])
    except LayerError:  # a layer without parameters of its own (e.g. an up-sampling): the top half of the network
        plan = cascade_stages(order, 2)
    stage = model_randomization(network, x, target, [result.layer], [result.method], stages=plan[0][1][:1],
                                reference=[result], seed=seed, order=order, domain=domain, segment=segment,
                                output_key=output_key, **method_options)[0]
    key = (result.layer, result.method)
    rho_in = stage.correlations_in_segment.get(key, float("nan"))
    rho_all = stage.correlations.get(key, float("nan"))
    fraction = float(region_fraction(region, spatial, 0, domain)[0])
    steps = placed_fractions(fraction)[:2] + [1.0]
    box = target_box(region, spatial, DEFAULT_MARGIN, align) if tuple(region.shape[1:]) == spatial else None
    noise = torch.rand(spatial, generator=torch.Generator().manual_seed(int(seed) + 1)).to(x.device)
    curves = perturbation_curves(network, x, target, [result.map[0], noise], steps=steps, modes=("deletion",),
                                 domain=domain, region=region, reference_score=float(result.score[0]),
                                 output_key=output_key, seed=seed, box=box, rescore_box=False)
    mine, rand = curves[0]["deletion"], curves[1]["deletion"]
    use_raw = not (mine.reference > 0)  # y0 <= 0: the normalised AUC is undefined; the raw one still compares
    auc, auc_random = (mine.auc_raw, rand.auc_raw) if use_raw else (mine.auc, rand.auc)
    passes = rho_in <= RHO_LIMIT
    verdict = "%s model randomisation (rho %s)" % ("passes" if passes else "fails",
                                                   "n/a" if np.isnan(rho_in) else "%.2f" % rho_in)
    verdict += "; deletion AUC%s %.2f vs random %.2f" % (" (raw)" if use_raw else "", auc, auc_random)
    return {"verdict": verdict,
            "model_randomization": {"randomized": stage.randomized, "spearman_in_segment": rho_in,
                                    "spearman": rho_all, "limit": RHO_LIMIT, "passes": bool(passes)},
            "deletion": {"fractions": steps, "auc": auc, "auc_random": auc_random, "normalized": not use_raw,
                         "scores": mine.scores, "scores_random": rand.scores,
                         "box": None if box is None else [[b.start, b.stop] for b in box],
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
