"""Known-truth study: which CAM method, layer and target kind point at the voxels that truly caused a 3D
segmentation, on a synthetic task whose evidence is known by construction (issue #18, part 1).

Regenerate everything under ``docs/known_truth/`` with one command (from the repository root, after
``make install``; ``summary.json`` records the wall time)::

    .venv/bin/python studies/known_truth.py

**The task** (:func:`make_case`, volumes of 32^3 voxels, Gaussian noise of SD 0.15): bright spheres (+1,
radius 2.7-4 voxels) and dark cubes (-1, side 4 voxels). A sphere is to be segmented *only* when a dark cube (the
cue) lies 6.7-8.7 voxels from its centre. A sphere with no cube within 14.7 voxels is background: a distractor
that looks exactly like the target. A cube with no sphere within 14.7 voxels is a distractor that looks exactly
like the cue and changes nothing. The evidence of the segmented sphere T is therefore T itself and its cue C.
Each scored case holds one target with its cue, one distractor sphere and one distractor cube. (The sizes are
those of a 48^3 design scaled by 32/48, :func:`geometry_params`; 32^3 keeps the training within minutes on a
shared 2-core machine.)

**The models** (:data:`MODELS`): MONAI's ``BasicUNet`` (a plain U-Net: two convolutions per level, max-pooling,
transposed convolutions, instance norm) and MONAI's ``UNet`` with two residual units per level and strided
convolutions; both trained on the CPU from freshly generated volumes (seeded), their weights kept in
``studies/known_truth_weights/`` (0.9 and 1.2 MB, committed with the settings they were trained with, so a rerun
skips the training; ``--retrain`` trains again: about 7 and 6 minutes on one busy core). :func:`rule_check`
shows that they learned the rule: Dice on the scored cases, the fraction of the target still segmented when the
cue is removed, and the Dice between the predictions with and without the distractors.

**The scores**, per case x model x method x layer x target kind (:func:`truth_scores`, on the image grid; the
evidence E = T u C):

- ``mass_evidence`` / ``mass_target`` / ``mass_cue`` / ``mass_distractors``: the fraction of the map's positive
  heat inside E, T, C and the two distractors (relevance mass accuracy, Arras, Osman, Samek, *CLEVR-XAI*,
  Information Fusion 2022); a uniform map scores the fraction of voxels they cover (rows of method ``uniform``).
- ``pointing_game``: 1 when the map's maximum lies in E dilated by one voxel, else 0 (Zhang et al., *Top-down
  neural attention by excitation backprop*, IJCV 2018; the tolerance here is one voxel); ``pointing_game_cue``:
  the same for C alone among the voxels outside T (is the cue the second place the map points at?).
- ``spearman_evidence``: Spearman's rank correlation between the map and the binary evidence map over the volume.
- ``deletion_auc`` / ``insertion_auc`` / ``spearman_model_randomised`` / ``spearman_target_shift`` /
  ``spearman_target_class``: the scores of :func:`SegHiResCAMLib.analysis.evaluate.evaluate_image` (the
  faithfulness study's, ``exact=True``: every perturbed input runs on the whole volume), for the ``prediction``
  target; with a random-order row and an **oracle** row whose map
  is the evidence E itself (what deletion and insertion give the true explanation).

A flat map (no positive heat) has NaN mass and Spearman and scores 0 in the pointing game; the summary tables
count NaN as 0 (a map that shows nothing found nothing). Outputs: ``scores.csv`` (tidy: one row per case,
model, method, layer, target, metric, value: Quantus-style long format), ``summary.json``, ``summary.md`` (the
tables of ``docs/known_truth.md``), ``known_truth.png`` and ``case0-<model>.png``.
"""

import argparse
import csv
import json
import math
import os
import sys
import time
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, os.path.join(ROOT, "SegHiResCAM"))  # run from a checkout without install

from SegHiResCAMLib import __version__, catalog  # noqa: E402
from SegHiResCAMLib.analysis.evaluate import RANDOM_ORDER, evaluate_image  # noqa: E402
from SegHiResCAMLib.analysis.explain import TargetSpec, build_target, explain_image, model_input  # noqa: E402
from SegHiResCAMLib.engine.faithfulness import dilate, perturbation_curves, spearman  # noqa: E402
from SegHiResCAMLib.engine.layers import auto_layer  # noqa: E402
from SegHiResCAMLib.geometry import Geometry  # noqa: E402
from SegHiResCAMLib.models.base import Preprocessing, SegModel  # noqa: E402

SIZE = 32
NOISE = 0.15
SEED = 18
ORACLE = "oracle (evidence)"
DEFAULT_OUT = os.path.join(ROOT, "docs", "known_truth")
DEFAULT_WEIGHTS = os.path.join(HERE, "known_truth_weights")

#: the two architectures: MONAI class, arguments, the scored layers (role -> module name; ``auto`` is the
#: project's default layer rule, resolved by the engine), training steps and batch size
MODELS = {
    "basic-unet": {
        "cls": "BasicUNet", "args": {"spatial_dims": 3, "in_channels": 1, "out_channels": 2,
                                     "features": (4, 8, 16, 32, 32, 4)},
        "layers": {"encoder": "down_2", "bottleneck": "down_4", "decoder": "upcat_2", "auto": "auto"},
        "steps": 500, "batch": 2, "lr": 3e-3, "divisible_by": 16},
    "residual-unet": {
        "cls": "UNet", "args": {"spatial_dims": 3, "in_channels": 1, "out_channels": 2, "channels": (8, 16, 32, 64),
                                "strides": (2, 2, 2), "num_res_units": 2},
        "layers": {"encoder": "model.1.submodule.0", "bottleneck": "model.1.submodule.1.submodule.1.submodule",
                   "decoder": "model.1.submodule.2", "auto": "auto"},
        "steps": 800, "batch": 2, "lr": 3e-3, "divisible_by": 8},
}
#: a toy configuration for the smoke test (seconds): same code path, tiny networks and volumes
TOY_MODELS = {
    "basic-unet": dict(MODELS["basic-unet"], args=dict(MODELS["basic-unet"]["args"], features=(3, 4, 4, 4, 4, 3)),
                       steps=2, batch=1),
    "residual-unet": dict(MODELS["residual-unet"], args=dict(MODELS["residual-unet"]["args"], channels=(3, 4, 4, 4),
                                                             num_res_units=1), steps=2, batch=1),
}
#: what is explained: name -> TargetSpec arguments (``segment`` gets the true target mask, ``voxel`` its centre)
TOY_SIZE = 32
TARGET_KINDS = ("prediction", "segment", "voxel", "threshold")


def log(started, message):
    print("[%6.0f s] %s" % (time.perf_counter() - started, message), file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------------ the task
def ball(shape, centre, radius):
    """Boolean sphere of ``radius`` voxels around ``centre`` (array order)."""
    grid = np.ogrid[tuple(slice(0, n) for n in shape)]
    return sum((g - c) ** 2 for g, c in zip(grid, centre)) <= radius ** 2


def box(shape, centre, side):
    """Boolean axis-aligned cube of ``side`` voxels centred on ``centre``."""
    out = np.zeros(shape, bool)
    lo = [int(round(c - side / 2.0)) for c in centre]
    out[tuple(slice(max(a, 0), max(a + int(side), 0)) for a in lo)] = True
    return out


def geometry_params(size):
    """Object sizes and distances scaled from the 48^3 design (radius 4-6, cube side 6, cue distance 10-13,
    distractors at least 22 voxels from any object of the other kind)."""
    s = size / 48.0
    return {"radius": (4.0 * s, 6.0 * s), "side": max(2, int(round(6 * s))), "pair": (10.0 * s, 13.0 * s),
            "alone": 22.0 * s, "margin": 7.0 * s}


class Case:
    """One volume: the image, the label, the object masks, and the image without its cues (``no_cue``) and
    without its distractors (``no_distractors``)."""

    def __init__(self, image, label, targets, cues, lone_spheres, lone_cubes, centres, no_cue, no_distractors):
        self.image, self.label = image, label
        self.targets, self.cues, self.lone_spheres, self.lone_cubes = targets, cues, lone_spheres, lone_cubes
        self.centres, self.no_cue, self.no_distractors = centres, no_cue, no_distractors

    @property
    def evidence(self):
        """What caused the label: the targets and their cues."""
        return self.targets | self.cues

    @property
    def distractors(self):
        return self.lone_spheres | self.lone_cubes


def _sample_objects(rng, size, pairs, lone_spheres, lone_cubes, tries=2000):
    """Centres and sizes: ``[(kind, centre, size_param)]`` where kind is target/cue/sphere/cube."""
    p = geometry_params(size)
    lo, hi = p["margin"], size - 1 - p["margin"]

    def separated(objects, centre, radius):
        return all(np.linalg.norm(np.subtract(centre, c)) >= radius + r + 2 for _, c, r in objects)

    for _ in range(tries):
        objects = []
        ok = True
        for _ in range(pairs):
            radius = rng.uniform(*p["radius"])
            for _ in range(200):
                centre = rng.uniform(lo, hi, 3)
                direction = rng.normal(size=3)
                direction /= np.linalg.norm(direction)
                cue = centre + direction * rng.uniform(*p["pair"])
                if np.all(cue >= lo) and np.all(cue <= hi) and separated(objects, centre, radius) \
                        and separated(objects, cue, p["side"] * 0.87):
                    objects += [("target", centre, radius), ("cue", cue, p["side"] * 0.87)]
                    break
            else:
                ok = False
        for kind, count in (("sphere", lone_spheres), ("cube", lone_cubes)):
            other = ("cue", "cube") if kind == "sphere" else ("target", "sphere")
            for _ in range(count):
                for _ in range(200):
                    centre = rng.uniform(lo, hi, 3)
                    radius = rng.uniform(*p["radius"]) if kind == "sphere" else p["side"] * 0.87
                    far = all(np.linalg.norm(centre - c) >= p["alone"] for k, c, _ in objects if k in other)
                    if far and separated(objects, centre, radius):
                        objects.append((kind, centre, radius))
                        break
                else:
                    ok = False
        if ok:
            return objects
    raise RuntimeError("could not place %d pairs, %d spheres, %d cubes in %d^3" % (pairs, lone_spheres, lone_cubes, size))


def make_case(rng, size=SIZE, pairs=1, lone_spheres=1, lone_cubes=1, noise=NOISE):
    """A volume of the task (see the module docstring); every random choice from ``rng``."""
    shape = (size,) * 3
    p = geometry_params(size)
    objects = _sample_objects(rng, size, pairs, lone_spheres, lone_cubes)
    background = (rng.normal(size=shape) * noise).astype(np.float32)
    masks = {k: np.zeros(shape, bool) for k in ("target", "cue", "sphere", "cube")}
    for kind, centre, radius in objects:
        shape_mask = ball(shape, centre, radius) if kind in ("target", "sphere") else box(shape, centre, p["side"])
        masks[kind] |= shape_mask

    def paint(kinds):
        image = background.copy()
        for kind in kinds:
            image[masks[kind]] += 1.0 if kind in ("target", "sphere") else -1.0
        return image

    centres = {kind: [tuple(float(v) for v in c) for k, c, _ in objects if k == kind]
               for kind in ("target", "cue", "sphere", "cube")}
    return Case(paint(("target", "cue", "sphere", "cube")), masks["target"].astype(np.uint8), masks["target"],
                masks["cue"], masks["sphere"], masks["cube"], centres, paint(("target", "sphere", "cube")),
                paint(("target", "cue")))


def training_case(rng, size=SIZE):
    """A training volume: 0-1 target pairs, 0-2 distractor spheres, 0-1 distractor cubes."""
    return make_case(rng, size, pairs=int(rng.integers(0, 2) if rng.random() < 0.3 else 1),
                     lone_spheres=int(rng.integers(0, 3)), lone_cubes=int(rng.integers(0, 2)))


def test_cases(n, size=SIZE, seed=SEED + 1000):
    """The scored cases: one target with its cue, one distractor sphere, one distractor cube each."""
    rng = np.random.default_rng(seed)
    return [make_case(rng, size) for _ in range(n)]


# ------------------------------------------------------------------------------------------------ the models
def build_network(config):
    import monai.networks.nets as nets  # noqa: PLC0415 - the study's dependency, as in `make install`
    args = {k: (list(v) if isinstance(v, tuple) else v) for k, v in config["args"].items()}
    return getattr(nets, config["cls"])(**args)


def _loss(logits, label):
    ce = torch.nn.functional.cross_entropy(logits, label)
    prob = torch.softmax(logits, 1)[:, 1]
    fg = (label == 1).float()
    dice = 1 - (2 * (prob * fg).sum() + 1) / (prob.sum() + fg.sum() + 1)
    return ce + dice


def train(config, size=SIZE, seed=SEED, started=None, name=""):
    """Train a network of ``config`` on freshly generated volumes (Adam, cross-entropy + soft Dice)."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    net = build_network(config)
    opt = torch.optim.Adam(net.parameters(), lr=config["lr"])
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(1, config["steps"]))
    net.train()
    losses = []
    for step in range(config["steps"]):
        cases = [training_case(rng, size) for _ in range(config["batch"])]
        x = torch.from_numpy(np.stack([c.image for c in cases]))[:, None]
        y = torch.from_numpy(np.stack([c.label for c in cases]).astype(np.int64))
        loss = _loss(net(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
        if started is not None and (step + 1) % 100 == 0:
            log(started, "%s: step %d/%d, loss %.3f" % (name, step + 1, config["steps"], np.mean(losses[-100:])))
    net.eval()
    return net, losses


def config_key(config, size):
    """What the cached weights depend on (stored next to them; a mismatch retrains)."""
    return {"cls": config["cls"], "args": {k: list(v) if isinstance(v, tuple) else v for k, v in config["args"].items()},
            "steps": config["steps"], "batch": config["batch"], "lr": config["lr"], "size": size, "seed": SEED,
            "noise": NOISE}


def load_or_train(name, config, weights_dir, size=SIZE, retrain=False, started=None):
    """The trained network (from ``weights_dir`` when its stored key matches) and its training record."""
    key = config_key(config, size)
    path = os.path.join(weights_dir, name + ".pt")
    meta_path = os.path.join(weights_dir, name + ".json")
    if not retrain and os.path.exists(path) and os.path.exists(meta_path):
        with open(meta_path) as handle:
            meta = json.load(handle)
        if meta.get("key") == key:
            net = build_network(config)
            net.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
            net.eval()
            return net, dict(meta, cached=True)
    t0 = time.perf_counter()
    net, losses = train(config, size, SEED, started, name)
    meta = {"key": key, "train_seconds": time.perf_counter() - t0, "final_loss": float(np.mean(losses[-50:])),
            "threads": torch.get_num_threads(), "torch_version": torch.__version__}
    os.makedirs(weights_dir, exist_ok=True)
    torch.save(net.state_dict(), path)
    with open(meta_path, "w") as handle:
        json.dump(meta, handle, indent=1)
    return net, dict(meta, cached=False)


def seg_model(net, name, config):
    return SegModel(network=net, name=name, spatial_dims=3, in_channels=1, activation="softmax",
                    class_names=["background", "target"],
                    preprocessing=Preprocessing(divisible_by=config["divisible_by"]))


def geometry(size):
    return Geometry(size=(size,) * 3, spacing=(1.0, 1.0, 1.0), origin=(0.0, 0.0, 0.0),
                    direction=(1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0))


def predict(net, image):
    with torch.no_grad():
        return net(torch.from_numpy(image)[None, None]).argmax(1)[0].numpy().astype(bool)


def dice(a, b):
    a, b = np.asarray(a, bool), np.asarray(b, bool)
    total = a.sum() + b.sum()
    return 1.0 if total == 0 else float(2 * (a & b).sum() / total)


def rule_check(net, cases):
    """Did the model learn the rule? Dice with the cue; the fraction of the target still segmented without the
    cue (should be ~0); the Dice between the predictions with and without the distractors (should be ~1);
    the fraction of the distractor sphere segmented (should be ~0)."""
    rows = []
    for case in cases:
        with_cue = predict(net, case.image)
        rows.append({"dice": dice(with_cue, case.targets),
                     "target_kept_without_cue": float(predict(net, case.no_cue)[case.targets].mean()),
                     "dice_without_distractors": dice(predict(net, case.no_distractors), with_cue),
                     "distractor_sphere_segmented": float(with_cue[case.lone_spheres].mean())})
    return {k: float(np.mean([r[k] for r in rows])) for k in rows[0]}, rows


# ------------------------------------------------------------------------------------------------ the scores
def relevance_mass(heat, mask):
    """Fraction of the positive heat of ``heat`` inside ``mask``; NaN when there is no positive heat."""
    positive = np.maximum(np.asarray(heat, np.float64), 0.0)
    total = positive.sum()
    return float(positive[np.asarray(mask, bool)].sum() / total) if total > 0 else float("nan")


def pointing_game(heat, mask, tolerance=1, exclude=None):
    """1.0 when the map's maximum (over the voxels not in ``exclude``) lies in ``mask`` dilated by ``tolerance``
    voxels, else 0.0; 0.0 for a map with no positive heat. Several voxels sharing the maximum: the hit is the
    fraction of them inside."""
    heat = np.asarray(heat, np.float64)
    if exclude is not None:
        heat = np.where(np.asarray(exclude, bool), -np.inf, heat)
    top = heat.max()
    if not top > 0:
        return 0.0
    grown = dilate(torch.from_numpy(np.asarray(mask, bool))[None], tolerance)[0].numpy()
    at_max = heat == top
    return float(grown[at_max].mean())


def rank_correlation(heat, evidence):
    """Spearman's rank correlation between a map and the evidence map (NaN for a constant map)."""
    return spearman(torch.from_numpy(np.asarray(heat, np.float64)), torch.from_numpy(np.asarray(evidence, np.float64)))


def truth_scores(heat, case):
    """Every known-truth score of one map on one case (see the module docstring)."""
    return {"mass_evidence": relevance_mass(heat, case.evidence), "mass_target": relevance_mass(heat, case.targets),
            "mass_cue": relevance_mass(heat, case.cues), "mass_distractors": relevance_mass(heat, case.distractors),
            "pointing_game": pointing_game(heat, case.evidence),
            "pointing_game_cue": pointing_game(heat, case.cues, exclude=case.targets),
            "spearman_evidence": rank_correlation(heat, case.evidence)}


def uniform_scores(case):
    """What a uniform map scores: the fractions of the volume the masks cover."""
    n = float(case.evidence.size)
    return {"mass_evidence": case.evidence.sum() / n, "mass_target": case.targets.sum() / n,
            "mass_cue": case.cues.sum() / n, "mass_distractors": case.distractors.sum() / n}


def target_specs(case, include=TARGET_KINDS):
    """The explained targets of one case, by kind (class 1, the target)."""
    centre = tuple(int(round(v)) for v in case.centres["target"][0])
    specs = {"prediction": TargetSpec(class_index=1, name="prediction"),
             "segment": TargetSpec(class_index=1, mask=case.targets.astype(np.uint8), name="segment"),
             "voxel": TargetSpec(class_index=1, voxel=centre, name="voxel"),
             "threshold": TargetSpec(class_index=1, threshold=0.5, score="probabilities", name="threshold")}
    return {k: specs[k] for k in include}


def score_case(model, case, config, index, methods, curve_kinds=("prediction",), steps=8, sanity_stages=2,
               kinds=TARGET_KINDS, started=None):
    """Tidy rows (case, model, method, layer, layer_role, target, metric, value) of one case and model."""
    geo = geometry(case.image.shape[0])
    roles = resolve_layers(model, case.image, config)
    specs = target_specs(case, kinds)
    layers = list(dict.fromkeys(roles.values()))
    explanation = explain_image(model, case.image, geo, list(specs.values()), layers=layers, method=list(methods),
                                device="cpu")
    base = {"case": index, "model": model.name}
    rows = []
    for heat in explanation.heatmaps:
        for role in [r for r, name in roles.items() if name == heat.layer]:
            head = dict(base, method=heat.method, layer=heat.layer, layer_role=role, target=heat.target.name)
            for metric, value in truth_scores(heat.array, case).items():
                rows.append(dict(head, metric=metric, value=value))
            rows.append(dict(head, metric="flat", value=float(heat.info["flat"])))
    for kind in curve_kinds:
        if started is not None:
            log(started, "%s case %d: deletion/insertion and randomisation (%s)" % (model.name, index, kind))
        evaluation = evaluate_image(model, case.image, geo, specs[kind], methods=methods, layers=layers,
                                    steps=steps, sanity_stages=sanity_stages, device="cpu", seed=SEED, batch_size=4,
                                    exact=True)
        last = evaluation.sanity["model"][-1]["label"] if evaluation.sanity["model"] else None
        for row in evaluation.rows:
            for r in [r for r, name in roles.items() if name == row["layer"]] or ["-"]:
                head = dict(base, method=row["method"], layer=row["layer"], layer_role=r, target=kind)
                values = {"deletion_auc": row["deletion_auc"], "insertion_auc": row["insertion_auc"]}
                if row["method"] != RANDOM_ORDER:
                    values["spearman_model_randomised"] = row.get("spearman_model:%s" % last, float("nan"))
                    values["spearman_target_shift"] = row.get("spearman_target:shift", float("nan"))
                    values["spearman_target_class"] = row.get("spearman_target:class", float("nan"))
                for metric, value in values.items():
                    rows.append(dict(head, metric=metric, value=value))
        # the oracle: the evidence itself as the map, scored by the same curves
        x, space, _ = model_input(model, case.image, geo, "cpu")
        target = build_target(specs[kind], space, model)
        oracle = torch.from_numpy(case.evidence.astype(np.float32))
        curves = perturbation_curves(model.network, x, target, [oracle], steps=steps, seed=SEED, batch_size=4)[0]
        head = dict(base, method=ORACLE, layer="-", layer_role="-", target=kind)
        rows.append(dict(head, metric="deletion_auc", value=curves["deletion"].auc))
        rows.append(dict(head, metric="insertion_auc", value=curves["insertion"].auc))
    for metric, value in uniform_scores(case).items():
        rows.append(dict(base, method="uniform", layer="-", layer_role="-", target="-", metric=metric, value=value))
    return rows, roles


def resolve_layers(model, image, config):
    """The scored layers, role -> module name, with ``auto`` resolved by the engine's rule."""
    x, _, _ = model_input(model, image, geometry(image.shape[0]), "cpu")
    chosen = auto_layer(model.network, x, model.output_key)
    return {role: (chosen if name == "auto" else name) for role, name in config["layers"].items()}


# ------------------------------------------------------------------------------------------------ the tables
SUMMARY_METRICS = ("mass_evidence", "mass_cue", "mass_target", "mass_distractors", "pointing_game",
                   "pointing_game_cue", "spearman_evidence", "deletion_auc", "insertion_auc",
                   "spearman_model_randomised", "spearman_target_shift")
#: the truth metrics a NaN (flat map) counts as 0 in (a map that shows nothing found nothing)
NAN_AS_ZERO = ("mass_evidence", "mass_cue", "mass_target", "mass_distractors", "spearman_evidence")


def write_csv(rows, path):
    """The tidy table: one row per case, model, method, layer, layer role, target, metric and value."""
    fields = ("case", "model", "method", "layer", "layer_role", "target", "metric", "value")
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields)
        writer.writeheader()
        for row in rows:
            value = row["value"]
            writer.writerow(dict(row, value="nan" if value is None or (isinstance(value, float) and math.isnan(value))
                                 else "%.6g" % value))


def aggregate(rows, metric, nan_as_zero=None):
    """Mean over cases of ``metric``: ``{(model, method, layer_role, target): mean}``."""
    nan_as_zero = metric in NAN_AS_ZERO if nan_as_zero is None else nan_as_zero
    groups: Dict[tuple, List[float]] = {}
    for row in rows:
        if row["metric"] != metric:
            continue
        value = float(row["value"])
        if math.isnan(value):
            if not nan_as_zero:
                continue
            value = 0.0
        groups.setdefault((row["model"], row["method"], row["layer_role"], row["target"]), []).append(value)
    return {k: float(np.mean(v)) for k, v in groups.items()}


def truth_rank(rows, target="prediction"):
    """Maps (method, layer role) ordered by the mean over models of (mass in evidence + Spearman with the
    evidence + pointing game) / 3, the known-truth score, for one target kind."""
    parts = [aggregate(rows, m) for m in ("mass_evidence", "spearman_evidence", "pointing_game")]
    keys = sorted({(k[1], k[2]) for k in parts[0] if k[3] == target and k[1] not in ("uniform", ORACLE)})
    models = sorted({k[0] for k in parts[0]})
    out = []
    for method, role in keys:
        per_model = {}
        for model in models:
            vals = [p.get((model, method, role, target)) for p in parts]
            if all(v is not None for v in vals):
                per_model[model] = float(np.mean(vals))
        out.append({"method": method, "layer_role": role, "truth_score": float(np.mean(list(per_model.values()))),
                    "per_model": per_model})
    out.sort(key=lambda r: -r["truth_score"])
    return out


def curve_agreement(rows, target="prediction"):
    """Does deletion/insertion agree with the truth? Spearman, over the maps of each model, between the
    known-truth score and -deletion AUC, and between it and insertion AUC; plus where the oracle stands."""
    out = {}
    truth = {}
    parts = [aggregate(rows, m) for m in ("mass_evidence", "spearman_evidence", "pointing_game")]
    for key in parts[0]:
        if key[3] == target and all(key in p for p in parts):
            truth[key] = float(np.mean([p[key] for p in parts]))
    deletion, insertion = aggregate(rows, "deletion_auc"), aggregate(rows, "insertion_auc")
    for model in sorted({k[0] for k in truth}):
        keys = [k for k in truth if k[0] == model and k in deletion]
        if len(keys) < 3:
            continue
        t = torch.tensor([truth[k] for k in keys], dtype=torch.float64)
        d = torch.tensor([-deletion[k] for k in keys], dtype=torch.float64)
        i = torch.tensor([insertion[k] for k in keys], dtype=torch.float64)
        maps = sorted(deletion_key for deletion_key in deletion if deletion_key[0] == model)
        oracle = [k for k in maps if k[1] == ORACLE]
        entry = {"maps": len(keys), "rho_truth_vs_minus_deletion": spearman(t, d),
                 "rho_truth_vs_insertion": spearman(t, i)}
        if oracle:
            o = oracle[0]
            entry["oracle_deletion_auc"] = deletion[o]
            entry["oracle_insertion_auc"] = insertion[o]
            entry["maps_with_lower_deletion_than_oracle"] = sum(deletion[k] < deletion[o] for k in keys)
            entry["maps_with_higher_insertion_than_oracle"] = sum(insertion[k] > insertion[o] for k in keys)
        random = [k for k in maps if k[1] == RANDOM_ORDER]
        if random:
            entry["random_deletion_auc"] = deletion[random[0]]
            entry["random_insertion_auc"] = insertion[random[0]]
        out[model] = entry
    return out


def _f(value, digits=2):
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else "%.*f" % (digits, value)


def markdown_tables(rows, summary):
    """The tables of ``docs/known_truth.md`` (written to ``summary.md``)."""
    lines = ["## Did the models learn the rule?", "",
             "| model | Dice (with cue) | target kept without cue | Dice, distractors removed vs not | "
             "distractor sphere segmented | training |", "|---|---|---|---|---|---|"]
    for name, info in summary["models"].items():
        r = info["rule"]
        lines.append("| %s | %.3f | %.3f | %.3f | %.3f | %s |" % (
            name, r["dice"], r["target_kept_without_cue"], r["dice_without_distractors"],
            r["distractor_sphere_segmented"], "%d steps, %.0f s%s" % (
                info["training"]["key"]["steps"], info["training"]["train_seconds"],
                " (cached weights)" if info["training"]["cached"] else "")))
    lines += ["", "Layers: " + "; ".join("%s: %s" % (name, ", ".join("%s = `%s`" % (r, l) for r, l in
                                                                        info["layers"].items()))
                                        for name, info in summary["models"].items()), ""]
    metrics = {m: aggregate(rows, m) for m in SUMMARY_METRICS}
    models = list(summary["models"])
    for target in summary["targets"]:
        lines += ["## Target: %s" % target, "",
                  "Means over %d cases. mass = fraction of the positive heat; E = target + cue; PG = pointing game "
                  "(hit rate); rho E = Spearman with the evidence map; del/ins = deletion/insertion AUC (prediction "
                  "target only); rho rand = Spearman with the map of the fully randomised model; rho shift = "
                  "with the map of a shifted target." % summary["cases"], "",
                  "| model | method | layer | mass E | mass cue | mass target | mass distractors | PG | PG cue | "
                  "rho E | del AUC | ins AUC | rho rand | rho shift |", "|" + "---|" * 14]
        for model in models:
            keys = sorted({(k[1], k[2]) for k in metrics["mass_evidence"] if k[0] == model and k[3] == target
                           and k[1] != "uniform"}, key=lambda k: (catalog.method_names().index(k[0]),
                                                                   ["encoder", "bottleneck", "decoder", "auto"].index(k[1])))
            for method, role in keys:
                key = (model, method, role, target)
                cells = [_f(metrics[m].get(key)) for m in SUMMARY_METRICS]
                lines.append("| %s | %s | %s | %s |" % (model, method, role, " | ".join(cells)))
            for special in (RANDOM_ORDER, ORACLE):
                key = (model, special, "-", target)
                if key in metrics["deletion_auc"]:
                    lines.append("| %s | %s | - | %s |" % (model, special, " | ".join(
                        _f(metrics[m].get(key)) for m in SUMMARY_METRICS)))
            uni = (model, "uniform", "-", "-")
            lines.append("| %s | uniform map | - | %s |" % (model, " | ".join(
                _f(metrics[m].get(uni), 3) if m.startswith("mass") else "-" for m in SUMMARY_METRICS)))
        lines.append("")
    lines += ["## Ranking by the known truth (prediction target)", "",
              "truth score = mean of mass in E, Spearman with E and pointing game; mean over both models.", "",
              "| rank | method | layer | truth score | " + " | ".join(models) + " |", "|---|---|---|---|" + "---|" * len(models)]
    for position, r in enumerate(summary["truth_ranking"], 1):
        lines.append("| %d | %s | %s | %.3f | %s |" % (position, r["method"], r["layer_role"], r["truth_score"],
                                                        " | ".join(_f(r["per_model"].get(m), 3) for m in models)))
    kinds = summary["targets"]
    by_kind = {kind: {(r["method"], r["layer_role"]): r["truth_score"] for r in truth_rank(rows, kind)} for kind in kinds}
    lines += ["", "## Truth score by target kind (mean over both models)", "",
              "| method | layer | " + " | ".join(kinds) + " |", "|---|---|" + "---|" * len(kinds)]
    for r in summary["truth_ranking"]:
        lines.append("| %s | %s | %s |" % (r["method"], r["layer_role"], " | ".join(
            _f(by_kind[k].get((r["method"], r["layer_role"])), 3) for k in kinds)))
    lines += ["", "## Does deletion/insertion agree with the truth? (prediction target)", "",
              "| model | maps | rho(truth, -deletion AUC) | rho(truth, insertion AUC) | oracle del / ins AUC | "
              "random del / ins AUC | maps beating the oracle (del / ins) |", "|---|---|---|---|---|---|---|"]
    for model, a in summary["curve_agreement"].items():
        lines.append("| %s | %d | %s | %s | %s / %s | %s / %s | %s / %s |" % (
            model, a["maps"], _f(a["rho_truth_vs_minus_deletion"]), _f(a["rho_truth_vs_insertion"]),
            _f(a.get("oracle_deletion_auc")), _f(a.get("oracle_insertion_auc")), _f(a.get("random_deletion_auc")),
            _f(a.get("random_insertion_auc")), a.get("maps_with_lower_deletion_than_oracle", "-"),
            a.get("maps_with_higher_insertion_than_oracle", "-")))
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------------ the figures
def plot_summary(rows, summary, path, target="prediction"):
    """Per model: mass in the evidence, mass on the cue and Spearman with the evidence, method x layer."""
    import matplotlib  # noqa: PLC0415 - only the study draws
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415
    models = list(summary["models"])
    shown = (("mass_evidence", "mass in target + cue"), ("mass_cue", "mass on the cue"),
             ("spearman_evidence", "Spearman with evidence"))
    methods = list(catalog.method_names())
    roles = ["encoder", "bottleneck", "decoder", "auto"]
    fig, axes = plt.subplots(len(models), len(shown), figsize=(3.3 * len(shown), 3.0 * len(models)), squeeze=False)
    for i, model in enumerate(models):
        for j, (metric, title) in enumerate(shown):
            values = aggregate(rows, metric)
            grid = np.array([[values.get((model, m, r, target), np.nan) for r in roles] for m in methods])
            ax = axes[i][j]
            im = ax.imshow(grid, vmin=-1 if metric.startswith("spearman") else 0, vmax=1, cmap="viridis")
            for (a, b), v in np.ndenumerate(grid):
                ax.text(b, a, _f(v), ha="center", va="center", fontsize=7, color="w" if v < 0.6 else "k")
            ax.set_xticks(range(len(roles)))
            ax.set_xticklabels(roles, fontsize=7, rotation=30)
            ax.set_yticks(range(len(methods)))
            ax.set_yticklabels(methods if j == 0 else [""] * len(methods), fontsize=7)
            ax.set_title("%s: %s" % (model, title), fontsize=8)
            fig.colorbar(im, ax=ax, fraction=0.046, pad=0.03)
    fig.suptitle("Known-truth scores, target '%s', mean of %d cases (docs/known_truth/summary.json)"
                 % (target, summary["cases"]), fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_case(case, maps, path, title):
    """One case: the objects (max projection along axis 0) and some maps (max projections)."""
    import matplotlib  # noqa: PLC0415
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415
    fig, axes = plt.subplots(1, 1 + len(maps), figsize=(2.6 * (1 + len(maps)), 2.9))
    objects = np.zeros(case.image.shape[1:] + (3,))
    for mask, colour in ((case.targets, (0, 1, 0)), (case.cues, (1, 0, 0)), (case.lone_spheres, (1, 1, 0)),
                         (case.lone_cubes, (0.3, 0.5, 1))):
        objects[mask.any(0)] = colour
    axes[0].imshow(objects)
    axes[0].set_title("target (green), cue (red),\ndistractors (yellow, blue)", fontsize=7)
    for ax, (name, heat) in zip(axes[1:], maps.items()):
        ax.imshow(np.maximum(heat, 0).max(0), cmap="inferno")
        ax.contour(case.evidence.any(0), levels=[0.5], colors="c", linewidths=0.6)
        ax.set_title(name, fontsize=7)
    for ax in axes:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(title, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ------------------------------------------------------------------------------------------------ the run
def run(out, weights_dir, n_cases=6, steps=8, sanity_stages=2, retrain=False, toy=False,
        methods: Optional[Sequence[str]] = None, kinds=TARGET_KINDS, curve_kinds=("prediction",), figures=True):
    """The whole study; returns the summary (also written to ``out``)."""
    started = time.perf_counter()
    size = TOY_SIZE if toy else SIZE
    configs = TOY_MODELS if toy else MODELS
    methods = list(methods or catalog.method_names())
    os.makedirs(out, exist_ok=True)
    cases = test_cases(n_cases, size)
    summary = {"seghirescam_version": __version__, "torch_version": torch.__version__, "threads": torch.get_num_threads(),
               "size": size, "noise": NOISE, "seed": SEED, "cases": n_cases, "steps": steps,
               "sanity_stages": sanity_stages, "methods": methods, "targets": list(kinds),
               "curve_targets": list(curve_kinds), "models": {}, "toy": toy}
    rows = []
    example = {}
    for name, config in configs.items():
        log(started, "%s: weights" % name)
        net, training = load_or_train(name, config, weights_dir, size, retrain, started)
        model = seg_model(net, name, config)
        rule, per_case = rule_check(net, cases)
        log(started, "%s: Dice %.3f, target kept without cue %.3f" % (name, rule["dice"], rule["target_kept_without_cue"]))
        layers = None
        for index, case in enumerate(cases):
            log(started, "%s: case %d/%d" % (name, index + 1, n_cases))
            case_rows, layers = score_case(model, case, config, index, methods, curve_kinds, steps, sanity_stages,
                                           kinds, started)
            rows += case_rows
        summary["models"][name] = {"class": "monai.networks.nets." + config["cls"], "layers": layers,
                                   "parameters": int(sum(p.numel() for p in net.parameters())),
                                   "training": training, "rule": rule, "rule_per_case": per_case}
        if figures:
            spec = target_specs(cases[0], ("prediction",))["prediction"]
            picks = [(catalog.DEFAULT_METHOD, layers["auto"]), (catalog.DEFAULT_METHOD, layers["bottleneck"]),
                     ("seg-grad-cam", layers["bottleneck"]), ("grad-cam++", layers["auto"])]
            maps = {}
            for method, layer in picks:
                heat = explain_image(model, cases[0].image, geometry(size), [spec], layers=[layer], method=method,
                                     device="cpu").heatmaps[0]
                maps["%s @ %s" % (method, [r for r, n in layers.items() if n == layer][0])] = heat.array
            example[name] = maps
            plot_case(cases[0], maps, os.path.join(out, "case0-%s.png" % name),
                      "%s, case 0, target 'prediction': max projections along axis 0 (cyan: evidence)" % name)
    summary["truth_ranking"] = truth_rank(rows)
    summary["curve_agreement"] = curve_agreement(rows)
    summary["seconds"] = time.perf_counter() - started
    write_csv(rows, os.path.join(out, "scores.csv"))
    with open(os.path.join(out, "summary.json"), "w") as handle:
        json.dump(summary, handle, indent=1, default=float)
    with open(os.path.join(out, "summary.md"), "w") as handle:
        handle.write(markdown_tables(rows, summary))
    if figures:
        plot_summary(rows, summary, os.path.join(out, "known_truth.png"))
    log(started, "done: %s" % out)
    return summary, rows


def read_csv(path):
    """The rows of :func:`write_csv` back, with float values and integer cases."""
    with open(path, newline="") as handle:
        return [dict(r, case=int(r["case"]), value=float(r["value"])) for r in csv.DictReader(handle)]


def rerank(out):
    """Rebuild the summary's rankings, ``summary.md`` and ``known_truth.png`` from ``scores.csv`` (no model runs)."""
    rows = read_csv(os.path.join(out, "scores.csv"))
    with open(os.path.join(out, "summary.json")) as handle:
        summary = json.load(handle)
    summary["truth_ranking"] = truth_rank(rows)
    summary["curve_agreement"] = curve_agreement(rows)
    with open(os.path.join(out, "summary.json"), "w") as handle:
        json.dump(summary, handle, indent=1, default=float)
    with open(os.path.join(out, "summary.md"), "w") as handle:
        handle.write(markdown_tables(rows, summary))
    plot_summary(rows, summary, os.path.join(out, "known_truth.png"))
    return summary, rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=DEFAULT_OUT, help="output folder (default: docs/known_truth)")
    parser.add_argument("--weights-dir", default=DEFAULT_WEIGHTS, help="trained weights, read or written")
    parser.add_argument("--cases", type=int, default=6, help="scored cases (default 6)")
    parser.add_argument("--steps", type=int, default=8, help="deletion/insertion steps (default 8)")
    parser.add_argument("--sanity-stages", type=int, default=2, help="model randomisation stages (default 2)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    parser.add_argument("--retrain", action="store_true", help="train again even if the weights are cached")
    parser.add_argument("--toy", action="store_true", help="tiny models and volumes, 2 training steps (smoke test)")
    parser.add_argument("--rerank", action="store_true", help="rebuild the tables and figure from --out's scores.csv")
    args = parser.parse_args(argv)
    if args.rerank:
        rerank(args.out)
        return 0
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    run(args.out, args.weights_dir, args.cases, args.steps, args.sanity_stages, args.retrain, args.toy)
    return 0


if __name__ == "__main__":
    sys.exit(main())
