"""Which heatmap to trust: faithfulness and sanity metrics of every method x layer on one image.

:func:`evaluate_image` is the one entry point shared by the command line, scripts and the Slicer logic. It works
in model space (the network's input grid, as :func:`~SegHiResCAMLib.analysis.explain.explain_image` does) and costs:

- one forward pass and one backward pass per target (the explained target plus each randomised target) for
  *all* methods and layers together (:func:`~SegHiResCAMLib.engine.compute_cams`);
- deletion/insertion: ``1 + maps x 2 x (steps - 1)`` gradient-free forward passes (``maps`` = methods x
  layers, plus one random-order reference); on 3D models this dominates: choose ``steps`` (and ``crop``) to fit;
- model randomisation: one forward + backward pass per stage, on a deep copy of the network.

Every row has: deletion and insertion AUC (normalised by the unperturbed score ``y0``; lower deletion and
higher insertion = more faithful), the same areas in score units, the fraction of the positive heat inside the
target segment and inside its dilation (next to the fraction of voxels they cover, which a uniform map would
score), and Spearman correlations with the maps of randomised models and targets (lower = the map depends more
on the weights / the target, as a faithful map must). Definitions: :mod:`SegHiResCAMLib.engine.faithfulness`.

From the Slicer logic (plain arrays in, plain data out; touches no MRML, so it can run in the compute thread;
``progress`` may raise :class:`~SegHiResCAMLib.errors.CancelledError` to stop it, leaving the model as found)::

    evaluation = evaluate_image(model, image, geometry, TargetSpec(class_index=1, mask=segment_array),
                                layers=["auto"], steps=8, progress=callback)
    headers, rows = evaluation.table()   # one table-node column per header, one row per method x layer

The ``seghirescam evaluate`` command (:mod:`SegHiResCAMLib.cli.evaluate`) writes it as JSON
(:mod:`.provenance`); :mod:`SegHiResCAMLib.reporting` makes its Markdown report and its figure.
"""

import platform
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from .. import __version__
from ..engine import compute_cams
from ..engine.faithfulness import (BASELINES, BOX_TOLERANCE, DEFAULT_FRACTIONS, DEFAULT_MARGIN, MEASURED_ERROR,
                                   RANDOM_TARGETS, Curve, box_share, choose_stand_in, dilate, energy_in_region,
                                   map_correlations, model_randomization, parameter_layers, perturbation_curves,
                                   random_target, region_fraction, region_on_grid, target_box)
from ..engine.methods import METHODS
from ..errors import InputError
from ..geometry import Geometry
from ..models.base import SegModel
from .check import image_domain
from .explain import TargetSpec, build_target, labels_on_image, model_input
from .slice_evaluate import evaluate_slices
from .slices import runs_in_slices

ProgressCallback = Callable[[float, str], None]

#: every method, in the order of the tables
METHOD_NAMES = tuple(METHODS)
#: the pseudo-method whose map is uniform noise: what a ranking that knows nothing scores
RANDOM_ORDER = "random-order"
#: the fixed columns of a row, with their headers (sanity columns follow, one per stage and random target)
COLUMNS = (
    ("method", "method"), ("layer", "layer"),
    ("deletion_auc", "deletion AUC (lower = better)"), ("insertion_auc", "insertion AUC (higher = better)"),
    ("energy_in_segment", "heat in segment"), ("energy_in_dilated_segment", "heat in dilated segment"),
)


@dataclass
class Evaluation:
    """The result of :func:`evaluate_image`.

    Attributes:
        rows: one dict per method x layer (plus the random-order reference): see :meth:`columns`.
        curves: ``{"method @ layer": {"deletion": Curve, "insertion": Curve}}``.
        sanity: ``{"model": [SanityStage.to_dict(), ...], "target": {kind: {"method @ layer": rho}}}``.
        metadata: target, scores, options, costs, timings, provenance.
    """

    rows: List[dict]
    curves: Dict[str, Dict[str, Curve]]
    sanity: dict
    metadata: dict = field(default_factory=dict)

    def columns(self) -> List[Tuple[str, str]]:
        """``(key, header)`` of every column of :attr:`rows`, in display order (for tables and table nodes)."""
        cols = list(COLUMNS)
        for stage in self.sanity.get("model", []):
            cols.append(("spearman_model:%s" % stage["label"], "rho, model randomised (%s)" % stage["label"]))
            cols.append(("spearman_model_in_segment:%s" % stage["label"],
                         "rho in segment, model randomised (%s)" % stage["label"]))
        for kind in self.sanity.get("target", {}):
            cols.append(("spearman_target:%s" % kind, "rho, random target (%s)" % kind))
        return cols

    def notes(self) -> List[str]:
        """What the reader should know about how the curves ran: a stand-in scored and not used, and bfloat16
        passes (the command line prints them, the Markdown report lists them)."""
        return [n for n in (self.metadata.get("stand_in_note"), (self.metadata.get("precision") or {}).get("note"))
                if n]

    def table(self) -> Tuple[List[str], List[List[object]]]:
        """Headers and rows (plain Python values, NaN for missing) for a Slicer table node or a CSV file."""
        cols = self.columns()
        return [h for _, h in cols], [[row.get(k, float("nan")) for k, _ in cols] for row in self.rows]

    def to_dict(self) -> dict:
        return {"columns": [{"key": k, "header": h} for k, h in self.columns()], "rows": self.rows,
                "curves": {key: {mode: c.to_dict() for mode, c in pair.items()} for key, pair in self.curves.items()},
                "sanity": self.sanity, "metadata": self.metadata}


def crop_image(image: np.ndarray, geometry: Geometry, size: Sequence[int],
               center: Optional[Sequence[int]] = None) -> Tuple[np.ndarray, Geometry, Tuple[slice, ...]]:
    """A box of ``size`` voxels (array order) of ``image`` around ``center`` (default: the image centre),
    shifted to stay inside the image, with its geometry. Used to bound the cost of the perturbation passes."""
    shape = geometry.array_shape
    if len(size) != len(shape) or any(int(s) < 1 for s in size):
        raise InputError("crop size must give %d positive voxel counts (array order), got %s"
                         % (len(shape), list(size)))
    size = [min(int(s), n) for s, n in zip(size, shape)]
    center = [n // 2 for n in shape] if center is None else [int(c) for c in center]
    if len(center) != len(shape):
        raise InputError("crop centre must give %d voxel indices (array order), got %s" % (len(shape), center))
    start = [min(max(c - s // 2, 0), n - s) for c, s, n in zip(center, size, shape)]
    box = tuple(slice(a, a + s) for a, s in zip(start, size))
    offset = geometry.direction_matrix @ (np.asarray(start[::-1], dtype=float) * np.asarray(geometry.spacing))
    cropped = Geometry(size=tuple(size[::-1]), spacing=geometry.spacing,
                       origin=tuple(np.asarray(geometry.origin) + offset), direction=geometry.direction)
    return np.ascontiguousarray(np.asarray(image)[box]), cropped, box


class _Clock:
    """Progress with an estimate of the time left: the work is planned in units of one forward pass on the whole
    input per part (``cam``, ``curves``, ``stages``), and the seconds per unit are taken from the parts done."""

    def __init__(self, report: ProgressCallback):
        self.report, self.started, self.units = report, time.perf_counter(), {}
        self.done = 0.0

    def plan(self, **units: float) -> None:
        self.units.update(units)

    def at(self, part: str, fraction: float) -> float:
        names = list(self.units)
        before = sum(self.units[n] for n in names[:names.index(part)])
        done = before + self.units[part] * max(0.0, min(1.0, fraction))
        self.done = max(self.done, done / max(1e-9, sum(self.units.values())))  # a re-plan never goes backwards
        return self.done

    def __call__(self, fraction: float, message: str) -> None:
        elapsed = time.perf_counter() - self.started
        if 0.02 < fraction < 1.0 and elapsed > 1.0:
            left = elapsed * (1.0 - fraction) / fraction
            message = "%s (about %s left)" % (message, _duration(left))
        self.report(fraction, message)


def _duration(seconds: float) -> str:
    return "%d s" % seconds if seconds < 90 else "%d min" % round(seconds / 60.0)


def _execution_order(net, x: torch.Tensor) -> List[str]:
    """:func:`parameter_layers` from a small corner of ``x`` (the order does not depend on the input's size; a
    whole-scan forward pass would cost as much as one perturbed input), or from ``x`` if the corner fails."""
    corner = x[(slice(None), slice(None)) + tuple(slice(0, min(int(s), 32)) for s in x.shape[2:])]
    if tuple(corner.shape) != tuple(x.shape):
        try:
            return parameter_layers(net, corner)
        except Exception:  # noqa: BLE001 - a network that needs a larger input: use the input itself
            pass
    return parameter_layers(net, x)


def _key(method: str, layer: str) -> str:
    return "%s @ %s" % (method, layer)


def interior_steps(steps: Union[int, Sequence[float], None], exact: bool = False) -> int:
    """The interior deletion/insertion points of ``steps`` (a number of equal steps, or fractions from 0 to 1);
    without steps, the default's: 9 with ``exact`` (10 equal steps), else the shortcut's 4 (``DEFAULT_FRACTIONS``)."""
    if isinstance(steps, int):
        return steps - 1
    return len(list(steps)) - 2 if steps else (9 if exact else len(DEFAULT_FRACTIONS) - 2)


def evaluate_image(model: SegModel, image: np.ndarray, geometry: Geometry, target: Optional[TargetSpec] = None,
                   methods: Sequence[str] = METHOD_NAMES, layers: Union[str, Sequence[str]] = "auto",
                   steps: Union[int, Sequence[float], None] = None, baseline: str = "blur", sigma: float = 5.0,
                   dilation: int = 3, batch_size: Optional[int] = None,
                   sanity_stages: Union[int, Sequence[str], None] = 3,
                   random_targets: Sequence[str] = ("shift", "class"), random_reference: bool = True,
                   device: str = "auto", seed: int = 0, progress: Optional[ProgressCallback] = None,
                   exact: bool = False, margin: Optional[int] = None, precision: str = "auto",
                   slice_axis: Optional[str] = None,
                   slice_context: int = 0, slice_count: Optional[int] = None, **method_options) -> Evaluation:
    """Faithfulness and sanity metrics of every method x layer for one target on one image.

    Args:
        model: the model; its network is never modified (randomisation works on a deep copy).
        image, geometry: the scan (numpy order) and its grid.
        target: what is explained (default: the model's prediction of class 1).
        methods: CAM method names (default: all).
        layers: layer names or ``auto`` (the model's default layer).
        steps: deletion/insertion steps, or fractions (see :func:`~.engine.metrics.perturbation_curves`);
            ``None``: 10 equal steps with ``exact``, else the shortcut's fractions 0, 1/8, 3/8, 5/8, 7/8, 1
            (:data:`~SegHiResCAMLib.engine.faithfulness.DEFAULT_FRACTIONS`).
        baseline, sigma: replacement of removed voxels (``blur`` with ``sigma`` model voxels, ``mean``, ``zero``).
        dilation: radius of the dilated segment, in model voxels.
        batch_size: perturbed inputs per forward pass (``None``: from free memory and the input's size,
            :func:`~SegHiResCAMLib.engine.faithfulness.auto_batch_size`); the one used is ``cost.batch_size``.
        sanity_stages: model-randomisation stages (a number, or module names); ``None`` or 0 skips the check.
        random_targets: kinds of randomised targets (``shift``, ``scatter``, ``class``); empty skips the check.
        random_reference: add a row whose map is uniform noise (what an uninformed ranking scores).
        seed: seed of every random choice (tie-breaking, random targets, re-initialisation).
        exact: the full computation: every perturbed input runs on the whole model input. Default (``False``):
            the shortcut of :mod:`SegHiResCAMLib.engine.faithfulness.shortcut`: perturbed inputs run on the
            target's bounding box grown by ``margin`` model voxels (default
            :data:`~SegHiResCAMLib.engine.faithfulness.DEFAULT_MARGIN`), and ``steps=None`` means its four
            interior fractions. Its error against ``exact`` is measured in ``benchmarks/results/evaluate.md``.
        precision: the arithmetic of the perturbed inputs' forward passes: ``float32``, ``bfloat16``, or ``auto``
            (:func:`~SegHiResCAMLib.engine.faithfulness.resolve_precision`: bfloat16 on a CPU that computes it
            natively, else float32; always float32 with ``exact``). bfloat16 is used only where the model scores the
            unperturbed input in it within 1% of float32
            (:func:`~SegHiResCAMLib.engine.faithfulness.choose_stand_in`); the precision used is
            ``metadata["precision"]``.
        slice_axis, slice_context, slice_count: a 2D model on a 3D scan is evaluated on the ``slice_count``
            (default 3) slices with the most target voxels, each as a 2D image, and every row is the mean over them
            (:mod:`.slice_evaluate`, ``docs/slice_models.md``).
        **method_options: e.g. ``pool_size`` for ``seg-xres-cam``.

    ``progress`` messages end with an estimate of the time left (from the passes done so far).
    """
    if runs_in_slices(model, geometry):  # a 2D model on a 3D scan: its target's slices, each as a 2D image
        return Evaluation(*evaluate_slices(
            model, image, geometry, target if target is not None else TargetSpec(class_index=1), evaluate_image,
            labels_on_image, slice_axis, slice_context, slice_count, progress, methods=methods, layers=layers,
            steps=steps, baseline=baseline, sigma=sigma, dilation=dilation, batch_size=batch_size,
            sanity_stages=sanity_stages, random_targets=random_targets, random_reference=random_reference,
            device=device, seed=seed, exact=exact, margin=margin, precision=precision, **method_options))
    clock = _Clock(progress or (lambda f, m: None))
    report = clock
    for kind in random_targets:
        if kind not in RANDOM_TARGETS:
            raise InputError("random target must be one of %s, got %r" % (", ".join(RANDOM_TARGETS), kind))
    if baseline not in BASELINES:
        raise InputError("baseline must be one of %s, got %r" % (", ".join(BASELINES), baseline))
    methods = list(methods)
    started = time.perf_counter()
    timings: Dict[str, float] = {}
    report(0.0, "preparing the image")
    x, space, dev = model_input(model, image, geometry, device)
    net = model.network
    domain = image_domain(space, dev)
    names = [layers] if isinstance(layers, str) else list(layers)
    names = [model.default_layer if (n == "auto" and model.default_layer != "auto") else n for n in names]
    spec = target if target is not None else TargetSpec(class_index=1)
    cam_target = build_target(spec, space, model)
    extra = [random_target(cam_target, kind, seed, max(2, model.num_classes)) for kind in random_targets]
    n_stages = 0
    if sanity_stages:
        n_stages = sanity_stages if isinstance(sanity_stages, int) else len(list(sanity_stages))
    # progress in units of one forward pass on the whole input (a CAM pass: forward + backward ~ 3 of them)
    planned = interior_steps(steps, exact)
    n_maps = len(methods) * len(names) + (1 if random_reference else 0)
    clock.plan(cam=3.0 + len(extra), curves=2.0 + n_maps * 2 * planned, stages=3.0 * n_stages)
    t0 = time.perf_counter()
    results = compute_cams(net, x, [cam_target] + extra, names, methods, output_key=model.output_key,
                           progress=lambda f, m: report(clock.at("cam", f), "heatmaps: %s" % m), **method_options)
    timings["cam_s"] = time.perf_counter() - t0
    per = len(results) // (1 + len(extra))
    reference = results[:per]
    resolved = list(dict.fromkeys(r.layer for r in reference))
    region = reference[0].region
    y0 = float(reference[0].score[0])
    target_rho = {kind: {_key(m, l): rho for (l, m), rho in
                         map_correlations(reference, results[(k + 1) * per:(k + 2) * per], domain).items()}
                  for k, kind in enumerate(random_targets)}
    del results[per:]
    spatial = tuple(x.shape[2:])
    fraction = float(region_fraction(region, spatial, 0, domain)[0])
    fraction_dilated = float(region_fraction(region, spatial, dilation, domain)[0])
    maps = [r.map[0] for r in reference]
    labels = [(r.method, r.layer) for r in reference]
    if random_reference:
        generator = torch.Generator().manual_seed(int(seed) + 1)
        maps.append(torch.rand(spatial, generator=generator).to(dev))
        labels.append((RANDOM_ORDER, "-"))
    box = None
    measured = False  # the shortcut's own fractions (DEFAULT_FRACTIONS), whose error the benchmark measured
    if not exact:
        margin = DEFAULT_MARGIN if margin is None else margin
        if tuple(region.shape[1:]) == spatial:
            divisible = model.preprocessing.divisible_by
            box = target_box(region, spatial, margin, divisible if isinstance(divisible, int) else 1)
        measured = steps is None
        if measured:
            steps = list(DEFAULT_FRACTIONS)
    elif steps is None:
        steps = 10
    n_interior = interior_steps(steps, exact)
    passes = 1 + len(maps) * 2 * max(0, n_interior)
    stand_in = choose_stand_in(net, x, cam_target, region, box, y0, passes, model.output_key,
                               precision="float32" if exact and precision == "auto" else precision)
    box = stand_in.box
    share = box_share(box, spatial)
    clock.plan(curves=passes * share)
    t0 = time.perf_counter()
    curves = perturbation_curves(net, x, cam_target, maps, steps=steps, baseline=baseline, sigma=sigma,
                                 domain=domain, region=region, reference_score=stand_in.y0, batch_size=batch_size,
                                 output_key=model.output_key, seed=seed, box=box, rescore_box=False,
                                 precision=stand_in.precision,
                                 progress=lambda f, m: report(clock.at("curves", f), "deletion/insertion: %s" % m))
    timings["curves_s"] = time.perf_counter() - t0
    stages = []
    if sanity_stages:
        t0 = time.perf_counter()
        order = _execution_order(net, x)
        stages = [s.to_dict() for s in model_randomization(
            net, x, cam_target, resolved, methods, sanity_stages, reference=reference, seed=seed, order=order,
            domain=domain, segment=dilate(region_on_grid(region, spatial), dilation)[0], output_key=model.output_key,
            progress=lambda f, m: report(clock.at("stages", f), m), **method_options)]
        timings["sanity_s"] = time.perf_counter() - t0
    rows = []
    for index, ((method, layer), pair) in enumerate(zip(labels, curves)):
        row = {"method": method, "layer": layer, "deletion_auc": pair["deletion"].auc,
               "insertion_auc": pair["insertion"].auc, "deletion_auc_raw": pair["deletion"].auc_raw,
               "insertion_auc_raw": pair["insertion"].auc_raw}
        heat = maps[index][None]
        row["energy_in_segment"] = float(energy_in_region(heat, region, 0, domain)[0])
        row["energy_in_dilated_segment"] = float(energy_in_region(heat, region, dilation, domain)[0])
        row["segment_fraction"], row["dilated_segment_fraction"] = fraction, fraction_dilated
        for stage in stages:
            rho = {(c["layer"], c["method"]): c for c in stage["correlations"]}.get((layer, method), {})
            row["spearman_model:%s" % stage["label"]] = rho.get("spearman", float("nan"))
            row["spearman_model_in_segment:%s" % stage["label"]] = rho.get("spearman_in_segment", float("nan"))
        for kind, values in target_rho.items():
            row["spearman_target:%s" % kind] = values.get(_key(method, layer), float("nan"))
        if index < len(reference):
            row["flat"] = bool(reference[index].flat[0])
            row["gradient_mean_ratio"] = reference[index].options.get("gradient_mean_ratio")
            row["warnings"] = list(reference[index].warnings)
        rows.append(row)
    timings["total_s"] = time.perf_counter() - started
    n_maps, n_inner = len(maps), len(curves[0]["deletion"].fractions) - 2 if curves else 0
    metadata = {
        "seghirescam_version": __version__, "torch_version": torch.__version__, "python": platform.python_version(),
        "device": str(dev), "threads": torch.get_num_threads(), "model": model.describe(),
        "model_space": space.describe(), "model_input_shape": list(x.shape), "domain_voxels": int(domain.sum()),
        "target": cam_target.describe(), "target_kind": spec.kind(), "region_voxels": int(region.sum()),
        "y0": y0, "y_baseline": curves[0]["deletion"].scores[-1] if curves else None,
        "layers": resolved, "methods": methods,
        "options": {"steps": steps, "baseline": baseline, "sigma_voxels": sigma, "dilation_voxels": dilation,
                    "batch_size": batch_size, "sanity_stages": sanity_stages, "random_targets": list(random_targets),
                    "seed": seed, "method_options": dict(method_options), "exact": bool(exact), "margin": margin,
                    "precision": precision},
        "precision": {"used": stand_in.precision, "rejected": stand_in.precision_rejected, "note": None if
                      stand_in.precision == "float32" else "the perturbed inputs' forward passes ran in bfloat16 "
                      "(the model scored the unperturbed input within %g of float32; --precision float32 runs "
                      "float32)" % BOX_TOLERANCE},
        "shortcut": None if exact else {
            "box": None if box is None else [[b.start, b.stop] for b in box], "box_share": share,
            "margin_voxels": margin, "fractions": curves[0]["deletion"].fractions if curves else None,
            "y0_box": curves[0]["deletion"].reference if curves else None,
            "box_rejected": stand_in.box_rejected,
            "measured_error": dict(MEASURED_ERROR) if measured else None,
            "note": stand_in.note() or (
                "perturbed inputs ran on the target's bounding box + margin (exact where the margin covers the "
                "receptive field of a network without global operations; the model scored the unperturbed box "
                "within %g of the whole input); --exact runs the full computation" % BOX_TOLERANCE
                if box is not None else "perturbed inputs ran on the whole input (the target's box + margin, if "
                "any, was too large to save its extra pass)")},
        "stand_in_note": stand_in.note(),
        "cost": {"cam_passes": 1 + (len(stages) if stages else 0), "targets_in_first_pass": 1 + len(extra),
                 "perturbation_forwards": 1 + stand_in.scored + n_maps * 2 * n_inner,
                 "batch_size": curves[0]["deletion"].batch_size if curves else None},
        "timings": timings,
        "normalization": "AUC of score / y0 over the perturbed fraction in [0, 1] (trapezoid); NaN if y0 <= 0",
    }
    report(1.0, "done")
    return Evaluation(rows, {_key(m, l): pair for (m, l), pair in zip(labels, curves)},
                      {"model": stages, "target": target_rho}, metadata)
