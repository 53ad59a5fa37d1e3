"""The evaluate shortcut against the full computation, on the committed faithfulness study's cases (issue 18).

For every case of ``docs/faithfulness/`` (the ROBEX atlas and the MNI152 template, HD-BET fold 0, the study's 64^3
model-voxel box, 18 maps = 6 methods x 3 layers, plus the random-order row) this runs the deletion/insertion curves
the way ``seghirescam evaluate`` now does by default (perturbed inputs on the target's bounding box + 16 voxels,
four interior steps at 1/8, 3/8, 5/8 and 7/8, in bfloat16 on a CPU that computes it natively;
:mod:`SegHiResCAMLib.engine.faithfulness.shortcut`) and compares them with the full computation stored by the study
(``--exact``: every input on the whole box, 8 equal steps, float32):

- the AUC differences per map (shortcut - full), normalised deletion and insertion AUC;
- the study's ranking (:func:`studies.faithfulness.recommend`, per scan, and :func:`recommend_combined`, across
  scans) with the full AUCs and with the shortcut's, every other criterion (sanity checks, heat on the whole scan)
  taken from the stored study;
- the wall time and the forward passes of the curves, next to the stored full computation's (which ran at
  another time: compare the forward-pass counts and the seconds per pass, and the load averages).

Run from the repository root (after ``make install``)::

    .venv/bin/python studies/benchmark/bench_evaluate.py            # -> benchmarks/results/evaluate.{json,md}

``--rule union`` runs the same cases with three interior points, those of the two rules before the present default
(``r / 2``, ``r`` and ``(1 + r) / 2``), and adds them to ``evaluate.json`` (``union_rule``) and ``evaluate.md``.

The timing of the default ``seghirescam evaluate`` on a whole MRI is measured by the command line itself (see
``benchmarks/results/evaluate.md``, which names the command and the JSON it wrote).
"""

import argparse
import itertools
import json
import os
import sys
import time

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, os.path.join(ROOT, "studies"))
import faithfulness as study  # noqa: E402 - the study's cases, boxes and ranking rules

from SegHiResCAMLib.analysis.evaluate import METHOD_NAMES, crop_image, evaluate_image  # noqa: E402
from SegHiResCAMLib.analysis.explain import TargetSpec  # noqa: E402
from SegHiResCAMLib.analysis.provenance import dumps  # noqa: E402
from SegHiResCAMLib.engine.outputs import flush_denormals  # noqa: E402
from SegHiResCAMLib.imaging import files as io  # noqa: E402
from SegHiResCAMLib.imaging.sample_data import mni152_template, robex_atlas  # noqa: E402
from SegHiResCAMLib.models import load_model  # noqa: E402

STUDY = os.path.join(ROOT, "docs", "faithfulness")
MODES = ("deletion", "insertion")
OUT = os.path.join(ROOT, "benchmarks", "results")


def _image(name):
    path = robex_atlas()[0] if name == "robex" else mni152_template().t1
    image, geometry = io.read_image(path)
    return image.astype(np.float32), geometry


def _study(name):
    """The committed faithfulness study's result for one scan (``docs/faithfulness/<name>.json``)."""
    with open(os.path.join(STUDY, "%s.json" % name)) as handle:
        return json.load(handle)


def _energy(one):
    """``{(method, layer): heat in the predicted brain}`` of a study case's whole-scan check (the study rule's third
    criterion; empty without a whole-scan check)."""
    return {(r["method"], r["layer"]): r["energy_in_prediction"] for r in one.get("whole_scan", {}).get("rows", [])}


def run_case(name, model, batch_size, steps=None):
    """One study case with evaluate's shortcut: its default steps, or the fractions ``steps``."""
    one = _study(name)
    image, geometry = _image(name)
    box = [slice(a, b) for a, b in one["crop"]["box"]]
    size = [s.stop - s.start for s in box]
    box_image, box_geometry, got = crop_image(image, geometry, size, [s.start + n // 2 for s, n in zip(box, size)])
    assert [[s.start, s.stop] for s in got] == one["crop"]["box"], "the study's box could not be rebuilt"
    load = list(os.getloadavg())
    t0 = time.perf_counter()
    ev = evaluate_image(model, box_image, box_geometry, TargetSpec(class_index=1), methods=METHOD_NAMES,
                        layers=list(study.LAYERS), steps=steps, batch_size=batch_size, sanity_stages=None,
                        random_targets=(), device="cpu", exact=False, pool_size=2)
    seconds = time.perf_counter() - t0
    full_rows = one["evaluation"]["rows"]
    fast = {(r["method"], r["layer"]): r for r in ev.rows}
    rows, diffs = [], []
    for row in full_rows:
        mine = fast[(row["method"], row["layer"])]
        merged = dict(row, deletion_auc=mine["deletion_auc"], insertion_auc=mine["insertion_auc"])
        rows.append(merged)
        diffs.append({"method": row["method"], "layer": row["layer"],
                      "deletion_auc_full": row["deletion_auc"], "deletion_auc_shortcut": mine["deletion_auc"],
                      "insertion_auc_full": row["insertion_auc"], "insertion_auc_shortcut": mine["insertion_auc"],
                      "deletion_diff": mine["deletion_auc"] - row["deletion_auc"],
                      "insertion_diff": mine["insertion_auc"] - row["insertion_auc"]})
    energy = _energy(one)
    table_full, ranked_full = study.recommend(full_rows, energy)
    table_fast, ranked_fast = study.recommend(rows, energy)
    meta, full_meta = ev.metadata, one["evaluation"]["metadata"]
    return {
        "case": name, "box": one["crop"]["box"], "load_average_start": load, "load_average_end": list(os.getloadavg()),
        "shortcut": {"curves_s": meta["timings"]["curves_s"], "total_s": seconds,
                     "precision": meta["precision"]["used"],
                     "forwards": meta["cost"]["perturbation_forwards"], "box": meta["shortcut"]["box"],
                     "box_share": meta["shortcut"]["box_share"], "fractions": meta["shortcut"]["fractions"],
                     "seconds_per_forward": meta["timings"]["curves_s"] / meta["cost"]["perturbation_forwards"]},
        "full": {"curves_s": full_meta["timings"]["curves_s"], "forwards": full_meta["cost"]["perturbation_forwards"],
                 "steps": full_meta["options"]["steps"],
                 "seconds_per_forward": full_meta["timings"]["curves_s"] / full_meta["cost"]["perturbation_forwards"],
                 "source": "docs/faithfulness/%s.json (studies/faithfulness.py)" % name},
        "auc": diffs,
        "max_abs_deletion_diff": max(abs(d["deletion_diff"]) for d in diffs),
        "max_abs_insertion_diff": max(abs(d["insertion_diff"]) for d in diffs),
        "ranking_full": [(t["method"], t["layer"]) for t in ranked_full],
        "ranking_shortcut": [(t["method"], t["layer"]) for t in ranked_fast],
        "tables": {"full": table_full, "shortcut": table_fast},
    }


def _auc(xs, ys):
    return sum((x1 - x0) * (a + b) / 2.0 for x0, x1, a, b in zip(xs[:-1], xs[1:], ys[:-1], ys[1:]))


def _combined_order(tables):
    """``[(method, layer), ...]``: the study's cross-scan ranking of ``{case: table}``."""
    return [(o["method"], o["layer"]) for o in study.recommend_combined(tables)]


def step_sensitivity(names, subsets=((0.5,), (0.5, 0.75), (0.25, 0.5), (0.25, 0.5, 0.75),
                                    (0.125, 0.375, 0.625, 0.875))):
    """The study's rankings from its own full computation, with the curves cut to fewer of its 8 equal steps (no
    model run): how much of a ranking the step grid alone decides, how many of the pairs the full computation
    resolves (:func:`pair_orders`) the fewer steps reverse, and their largest AUC error."""
    cases = {name: _study(name) for name in names}

    def cut(fractions):
        tables, out, aucs = {}, {}, {}
        for name, one in cases.items():
            curves, rows, aucs[name] = one["evaluation"]["curves"], [], {}
            for row in one["evaluation"]["rows"]:
                pair, new = curves["%s @ %s" % (row["method"], row["layer"])], dict(row)
                for mode in MODES:
                    known = pair[mode]["fractions"]
                    keep = [known.index(f) for f in fractions]
                    new[mode + "_auc"] = _auc([known[i] for i in keep], [pair[mode]["normalized"][i] for i in keep])
                    aucs[name][(row["method"], row["layer"]), mode] = new[mode + "_auc"]
                rows.append(new)
            energy = _energy(one)
            tables[name], kept = study.recommend(rows, energy)
            out[name] = [(t["method"], t["layer"]) for t in kept]
        if len(cases) > 1:
            out["all scans"] = _combined_order(tables)
        return out, aucs

    full, full_aucs = cut([i / 8.0 for i in range(9)])
    rows = []
    for sub in subsets:
        ranked, aucs = cut([0.0] + list(sub) + [1.0])
        orders = {n: pair_orders(cases[n], aucs[n]) for n in cases}
        rows.append({"interior": list(sub), "same": {n: r == full[n] for n, r in ranked.items()},
                     "same_first": {n: r[:1] == full[n][:1] for n, r in ranked.items()},
                     "resolved_reversed": {n: len(o["resolved_reversed"]) for n, o in orders.items()},
                     "resolved": {n: o["resolved"] for n, o in orders.items()},
                     "max_abs_diff": max(abs(aucs[n][k] - full_aucs[n][k]) for n in cases
                                         for k in aucs[n] if k[0] in _kept(cases[n]))})
    return rows


def adaptive_refinement(names, start=(0.5,), grid=8, every_map=False):
    """A rule that adds steps only where the ranking needs them, simulated on the study's own full curves (no model
    run): every map's curves start from the interior fractions ``start``; then, while the AUC brackets of two kept
    maps overlap on a criterion, each of their curves gets the midpoint of its widest-bracket interval on the
    study's grid (as new forward passes would), until every pair is separated or the curves are on the full grid.
    The bracket of a curve is its trapezoid AUC +- the sum over its intervals [a, b] of (b - a) |y_b - y_a| / 2: a
    bound where the curve is monotone. Returns, per scan, the passes it takes against the default and midpoint
    rules, whether it keeps the rankings, and how many of the study's curves are not monotone (where the bracket
    is no bound). ``every_map``: refine the pairs of every map but the random-order row, not only of the kept ones
    (what ``evaluate`` could do without the study's sanity rule)."""
    cases = {name: _study(name) for name in names}
    out, tables_full, tables_adaptive = {"start": list(start), "cases": {}}, {}, {}
    for name, one in cases.items():
        curves, rows = one["evaluation"]["curves"], one["evaluation"]["rows"]
        energy = _energy(one)
        table, kept = study.recommend(rows, energy)
        keys = [(t["method"], t["layer"]) for t in (table if every_map else kept)]
        values = {((r["method"], r["layer"]), mode): curves["%s @ %s" % (r["method"], r["layer"])][mode]["normalized"]
                  for r in rows for mode in MODES}
        known = {k: {0, grid} | {int(round(f * grid)) for f in start} for k in values}
        passes = sum(len(v) - 2 for v in known.values())

        def bracket(k):
            y, idx = values[k], sorted(known[k])
            pieces = list(zip(idx[:-1], idx[1:]))
            return (sum((b - a) / grid * (y[a] + y[b]) / 2.0 for a, b in pieces),
                    sum((b - a) / grid * abs(y[b] - y[a]) / 2.0 for a, b in pieces))

        while True:
            todo = set()
            for mode in MODES:
                for i, a in enumerate(keys):
                    for b in keys[i + 1:]:
                        (va, ha), (vb, hb) = bracket((a, mode)), bracket((b, mode))
                        if abs(va - vb) <= ha + hb:
                            todo |= {(k, mode) for k in (a, b) if len(known[k, mode]) < grid + 1}
            if not todo:
                break
            for k in sorted(todo):
                y, idx = values[k], sorted(known[k])
                _, a, b = max(((b - a) * abs(y[b] - y[a]), a, b) for a, b in zip(idx[:-1], idx[1:]) if b - a > 1)
                known[k].add((a + b) // 2)
                passes += 1
        adapted, full = [], []
        for r in rows:
            key = (r["method"], r["layer"])
            adapted.append(dict(r, **{mode + "_auc": bracket((key, mode))[0] for mode in MODES}))
            full.append(dict(r, **{mode + "_auc": _auc([i / float(grid) for i in range(grid + 1)], values[key, mode])
                                   for mode in MODES}))
        tables_full[name], ranked_full = study.recommend(full, energy)
        tables_adaptive[name], ranked = study.recommend(adapted, energy)
        trend = {"deletion": -1.0, "insertion": 1.0}
        against = [max([0.0] + [abs(b - a) for a, b in zip(y[:-1], y[1:]) if (b - a) * trend[k[1]] < 0])
                   for k, y in values.items()]
        out["cases"][name] = {
            "maps": len(rows), "kept": len(keys), "passes": passes, "passes_full": len(values) * (grid - 1),
            "passes_default": len(values) * 2, "passes_midpoint": len(values) * 4,
            "same": [(t["method"], t["layer"]) for t in ranked] == [(t["method"], t["layer"]) for t in ranked_full],
            "curves": len(values), "not_monotone": sum(1 for v in against if v > 0),
            "largest_step_against_trend": max(against)}
    if len(cases) > 1:
        out["same_all_scans"] = _combined_order(tables_adaptive) == _combined_order(tables_full)
    return out


def _kept(one):
    energy = _energy(one)
    return [(t["method"], t["layer"]) for t in study.recommend(one["evaluation"]["rows"], energy)[1]]


def full_estimates(one):
    """``{(map, mode): (AUC on the stored 8 steps, its discretisation error)}`` for the maps the study keeps; the
    error is Richardson's estimate for the trapezoid rule, ``|T_8 - T_4| / 3`` (``T_4``: every other step)."""
    out = {}
    for key in _kept(one):
        pair = one["evaluation"]["curves"]["%s @ %s" % key]
        for mode in MODES:
            f, y = pair[mode]["fractions"], pair[mode]["normalized"]
            t8, t4 = _auc(f, y), _auc(f[::2], y[::2])
            out[key, mode] = (t8, abs(t8 - t4) / 3.0)
    return out


def pair_orders(one, other):
    """Every pair of kept maps, per criterion: ``resolved`` when the full AUCs differ by more than the sum of their
    discretisation errors (:func:`full_estimates`), and whether ``other`` (``{(map, mode): AUC}``) orders the pair
    as the full computation does. Returns ``{"resolved": n, "resolved_reversed": [...], "unresolved": n,
    "unresolved_reversed": [...]}``."""
    full = full_estimates(one)
    keys = _kept(one)
    out = {"resolved": 0, "resolved_reversed": [], "unresolved": 0, "unresolved_reversed": []}
    for mode in MODES:
        for i, a in enumerate(keys):
            for b in keys[i + 1:]:
                (fa, ea), (fb, eb) = full[a, mode], full[b, mode]
                kind = "resolved" if abs(fa - fb) > ea + eb else "unresolved"
                out[kind] += 1
                if (fa - fb) * (other[a, mode] - other[b, mode]) <= 0:
                    out[kind + "_reversed"].append({"criterion": mode, "maps": ["%s @ %s" % a, "%s @ %s" % b],
                                                    "full_difference": fa - fb, "full_error": ea + eb,
                                                    "other_difference": other[a, mode] - other[b, mode]})
    return out


def refine_case(name, model, steps=16, batch_size=2):
    """The full computation again with ``steps`` equal steps (its 8 are every other one), on the maps the study's
    rule keeps: whether the study's own ranking survives a finer step grid. Returns the refined rows, the ranking
    with them (every other criterion from the stored study) and the largest difference between the recomputed
    values at the stored study's 8 steps and the stored ones (0 when the recomputation is the study's)."""
    one = _study(name)
    energy = _energy(one)
    _, kept = study.recommend(one["evaluation"]["rows"], energy)
    keys = [(t["method"], t["layer"]) for t in kept]
    image, geometry = _image(name)
    box = [slice(a, b) for a, b in one["crop"]["box"]]
    size = [s.stop - s.start for s in box]
    box_image, box_geometry, _ = crop_image(image, geometry, size, [s.start + n // 2 for s, n in zip(box, size)])
    started = time.perf_counter()
    ev = evaluate_image(model, box_image, box_geometry, TargetSpec(class_index=1),
                        methods=sorted({k[0] for k in keys}), layers=sorted({k[1] for k in keys}), steps=steps,
                        batch_size=batch_size, sanity_stages=None, random_targets=(), random_reference=False,
                        device="cpu", exact=True, pool_size=2,
                        progress=lambda f, m: print("  %3.0f%% %s" % (100 * f, m), flush=True))
    seconds = time.perf_counter() - started
    fine = {(r["method"], r["layer"]): r for r in ev.rows}
    stored_curves, drift, rows = one["evaluation"]["curves"], 0.0, []
    for row in one["evaluation"]["rows"]:
        key = (row["method"], row["layer"])
        if key not in keys:
            continue
        rows.append(dict(row, deletion_auc=fine[key]["deletion_auc"], insertion_auc=fine[key]["insertion_auc"]))
        for mode in MODES:
            mine = ev.curves["%s @ %s" % key][mode]
            stored = stored_curves["%s @ %s" % key][mode]
            at = {round(f, 6): v for f, v in zip(mine.fractions, mine.normalized)}
            drift = max(drift, max(abs(at[round(f, 6)] - v) for f, v in zip(stored["fractions"], stored["normalized"])))
    _, ranked = study.recommend(rows, energy)
    return {"case": name, "steps": steps, "seconds": seconds, "drift_at_stored_steps": drift,
            "load_average_end": list(os.getloadavg()),
            "auc": [{"method": r["method"], "layer": r["layer"], "deletion_auc": r["deletion_auc"],
                     "insertion_auc": r["insertion_auc"]} for r in rows],
            "ranking_stored": keys, "ranking_refined": [(t["method"], t["layer"]) for t in ranked],
            "tables": {"refined": [dict(t) for t in ranked]}}


def analyse(result, folder):
    """The analyses that need no model run: the pairs the full computation resolves and how the shortcut orders
    them, the step-grid sensitivity, and the finer full computation of ``refine.json`` when ``folder`` has one."""
    for c in result["cases"]:
        one = _study(c["case"])
        shortcut = {((d["method"], d["layer"]), mode): d[mode + "_auc_shortcut"] for d in c["auc"] for mode in MODES}
        c["pairs"] = pair_orders(one, shortcut)
    for key, _ in OTHER_RULES:
        if result.get(key):
            other = result[key]
            other["pairs"] = {}
            for c in other["cases"]:
                one = _study(c["case"])
                aucs = {((d["method"], d["layer"]), mode): d[mode + "_auc_shortcut"] for d in c["auc"]
                        for mode in MODES}
                other["pairs"][c["case"]] = pair_orders(one, aucs)
    names = [c["case"] for c in result["cases"]]
    result["sensitivity"] = step_sensitivity(names)
    every = step_sensitivity(names, [tuple(k / 8.0 for k in chosen) for n in (1, 2, 3)
                                     for chosen in itertools.combinations(range(1, 8), n)])
    result["every_rule"] = {"rules": len(every), "keep_every_ranking": [r["interior"] for r in every
                                                                        if all(r["same"].values())]}
    result["adaptive"] = adaptive_refinement(names)
    result["adaptive"]["every_map"] = adaptive_refinement(names, every_map=True)
    refined = os.path.join(folder, "refine.json")
    if os.path.exists(refined):
        with open(refined) as handle:
            result["refine"] = json.load(handle)
        for c in result["refine"]["cases"]:
            one = _study(c["case"])
            fine = {((d["method"], d["layer"]), mode): d[mode + "_auc"] for d in c["auc"] for mode in MODES}
            c["pairs"] = pair_orders(one, fine)
            energy = _energy(one)
            stored = {(t["method"], t["layer"]): t for t in study.recommend(one["evaluation"]["rows"], energy)[1]}
            c["criterion_ranks_changed"] = [
                {"map": "%s @ %s" % (t["method"], t["layer"]), "criterion": name,
                 "stored": stored[(t["method"], t["layer"])]["rank_" + name], "refined": t["rank_" + name]}
                for t in c["tables"]["refined"] for name in ("deletion_auc", "insertion_auc")
                if t["rank_" + name] != stored[(t["method"], t["layer"])]["rank_" + name]]


def _with_mean_ranks(case, kind):
    """The ranking of one scan with each map's mean rank, from the stored tables."""
    means = {(t["method"], t["layer"]): t.get("mean_rank") for t in case["tables"][kind]}
    return ", ".join("%s @ %s (%.2f)" % (k[0], k[1], means[tuple(k)]) for k in case["ranking_" + kind])


#: other step rules run on the same cases (evaluate.json key, section title): the rule before the default, and
#: ``--rule union`` (the points of both)
OTHER_RULES = (("placed_rule", "The default before this one (interior points at %s)"),
               ("previous_rule", "The default before that (interior points at %s)"),
               ("union_rule", "Three interior points: those of the two defaults before (%s)"))


def _rule_section(rule, title):
    """The Markdown section of another step rule run on the study's cases: rankings and AUC errors."""
    lines = ["", "## " + title % rule["fractions"], "",
             "Made by `%s`; the same cases and full computation.%s" % (rule["command"], "" if any(
                 "shortcut" not in c for c in rule["cases"]) else " Forward passes of its curves: %s." % ", ".join(
                 "%s %d" % (c["case"], c["shortcut"]["forwards"]) for c in rule["cases"])), "",
             "| scan | same ranking | max abs deletion | max abs insertion | mean abs deletion | mean abs insertion |",
             "|---|---|---|---|---|---|"]
    for c in rule["cases"]:
        lines.append("| %s | %s | %.3f | %.3f | %.3f | %.3f |" % (
            c["case"], "yes" if [list(k) for k in c["ranking_full"]] == [list(k) for k in c["ranking_shortcut"]]
            else "**no**", c["max_abs_deletion_diff"], c["max_abs_insertion_diff"],
            float(np.mean([abs(d["deletion_diff"]) for d in c["auc"]])),
            float(np.mean([abs(d["insertion_diff"]) for d in c["auc"]]))))
    lines.append("| all scans | %s | | | | |" % ("yes" if rule["combined"]["full"] == rule["combined"]["shortcut"]
                                               else "**no**"))
    for c in rule["cases"]:
        if "tables" in c and [list(k) for k in c["ranking_full"]] != [list(k) for k in c["ranking_shortcut"]]:
            lines += ["", "%s, mean ranks in brackets: full computation %s; this rule %s." % (
                c["case"], _with_mean_ranks(c, "full"), _with_mean_ranks(c, "shortcut"))]
    if rule["combined"]["full"] != rule["combined"]["shortcut"]:
        lines += ["", "All scans: full computation %s; this rule %s." % tuple(
            ", ".join("%s @ %s" % tuple(k) for k in rule["combined"][kind]) for kind in ("full", "shortcut"))]
    if rule.get("pairs"):
        lines += ["", "Pairs the full computation resolves that this rule reversed: %s." % ", ".join(
            "%s %d of %d" % (n, len(p["resolved_reversed"]), p["resolved"]) for n, p in rule["pairs"].items())]
    return lines


def markdown(result):
    lines = ["# evaluate: the shortcut against the full computation", "",
             "Made by `%s` (HD-BET fold 0, %d torch threads, CPU). The full computation is the committed "
             "faithfulness study (`docs/faithfulness/<case>.json`, `studies/faithfulness.py`, `--exact`, 8 equal "
             "steps, float32); the shortcut is `seghirescam evaluate`'s default (target's box + 16 voxels, 4 "
             "interior steps at 1/8, 3/8, 5/8 and 7/8, forward passes in %s). Raw numbers: "
             "`benchmarks/results/evaluate.json`." % (
                 result["command"], result["threads"],
                 " and ".join(sorted({c["shortcut"].get("precision", "float32") for c in result["cases"]}))), ""]
    lines += ["## Rankings (the study's rule; sanity and whole-scan criteria from the stored study)", "",
              "Per scan, each map's mean rank is in brackets: equal mean ranks are ties, which the study's rule "
              "leaves in the order of its table.", "",
              "| scan | full computation | shortcut | same |", "|---|---|---|---|"]
    for c in result["cases"]:
        lines.append("| %s | %s | %s | %s |" % (c["case"], _with_mean_ranks(c, "full"), _with_mean_ranks(c, "shortcut"),
                                                "yes" if c["ranking_full"] == c["ranking_shortcut"] else "**no**"))
    if result.get("combined"):
        comb = result["combined"]
        lines.append("| all scans | %s | %s | %s |" % (", ".join("%s @ %s" % k for k in comb["full"]),
                                                       ", ".join("%s @ %s" % k for k in comb["shortcut"]),
                                                       "yes" if comb["full"] == comb["shortcut"] else "**no**"))
    lines += ["", "## AUC error of the shortcut (shortcut - full, normalised AUC)", "",
              "| scan | max abs deletion | max abs insertion | mean abs deletion | mean abs insertion |",
              "|---|---|---|---|---|"]
    for c in result["cases"]:
        lines.append("| %s | %.3f | %.3f | %.3f | %.3f |" % (
            c["case"], c["max_abs_deletion_diff"], c["max_abs_insertion_diff"],
            float(np.mean([abs(d["deletion_diff"]) for d in c["auc"]])),
            float(np.mean([abs(d["insertion_diff"]) for d in c["auc"]]))))
    for key, title in OTHER_RULES:
        if result.get(key):
            lines += _rule_section(result[key], title)
    lines += ["", "## Cost of the curves", "",
              "| scan | full: forwards, s, s/forward | shortcut: forwards, box share, s, s/forward "
              "| load avg (shortcut) |",
              "|---|---|---|---|"]
    for c in result["cases"]:
        f, s = c["full"], c["shortcut"]
        lines.append("| %s | %d, %.0f, %.1f | %d, %.2f, %.0f, %.1f | %.1f-%.1f |" % (
            c["case"], f["forwards"], f["curves_s"], f["seconds_per_forward"], s["forwards"], s["box_share"],
            s["curves_s"], s["seconds_per_forward"], c["load_average_start"][0], c["load_average_end"][0]))
    lines += ["", "The full computation's seconds were measured when the study ran (its own load is in "
              "`docs/faithfulness/summary.json`); compare the forward-pass counts, which do not depend on the load. "
              "A box share of 1.00: the target's box + 16 voxels covers the study's whole 64^3 box (HD-BET's brain "
              "fills half of it), so on these cases only the steps differ."]
    lines += ["", "## Pairs of maps the full computation resolves", "",
              "A pair of maps the study keeps is *resolved* on a criterion (deletion or insertion AUC) when their full "
              "AUCs differ by more than the sum of their discretisation errors, each estimated by Richardson's rule "
              "for the trapezoid, |T_8 - T_4| / 3 (T_4: the stored curve on every other step). An unresolved pair's "
              "order is not decided by the full computation itself.", "",
              "| scan | resolved pairs | reversed by the shortcut | unresolved pairs | reordered by the shortcut |",
              "|---|---|---|---|---|"]
    for c in result["cases"]:
        p = c["pairs"]
        lines.append("| %s | %d | %d | %d | %d |" % (c["case"], p["resolved"], len(p["resolved_reversed"]),
                                                   p["unresolved"], len(p["unresolved_reversed"])))
    for c in result["cases"]:
        for r in c["pairs"]["resolved_reversed"]:
            lines.append("- %s, %s AUC: %s - %s = %+.3f in the full computation (error %.3f), %+.3f in the "
                         "shortcut" % (c["case"], r["criterion"], r["maps"][0], r["maps"][1], r["full_difference"],
                                       r["full_error"], r["other_difference"]))
    if result.get("refine"):
        ref = result["refine"]
        lines += ["", "## The full computation on a finer grid", "",
                  "Made by `%s`: the full computation again with %d equal steps (the study's 8 are every other "
                  "one), on the maps the study keeps, other criteria from the stored study. Raw numbers: "
                  "`benchmarks/results/refine.json`." % (ref["command"], ref["cases"][0]["steps"]), "",
                  "| scan | stored ranking (8 steps) | %d steps | same | resolved pairs reversed | unresolved pairs "
                  "reordered | criterion ranks that change | largest difference from the stored curves at their 8 "
                  "steps |" % ref["cases"][0]["steps"], "|---|---|---|---|---|---|---|---|"]
        for c in ref["cases"]:
            p = c["pairs"]
            lines.append("| %s | %s | %s | %s | %d of %d | %d of %d | %s | %.1e |" % (
                c["case"], ", ".join("%s @ %s" % tuple(k) for k in c["ranking_stored"]),
                ", ".join("%s @ %s" % tuple(k) for k in c["ranking_refined"]),
                "yes" if [list(k) for k in c["ranking_stored"]] == [list(k) for k in c["ranking_refined"]]
                else "**no**", len(p["resolved_reversed"]), p["resolved"], len(p["unresolved_reversed"]),
                p["unresolved"], ", ".join("%s %s %d->%d" % (r["map"], r["criterion"].split("_")[0], r["stored"],
                                                            r["refined"]) for r in c["criterion_ranks_changed"])
                or "none", c["drift_at_stored_steps"]))
    if result.get("sensitivity"):
        lines += ["", "## How much the step grid alone decides (the study's own full curves, fewer of its steps)", "",
                  "| interior fractions kept | same ranking | same first place | resolved pairs reversed | "
                  "max abs dAUC |", "|---|---|---|---|---|"]
        for row in result["sensitivity"]:
            lines.append("| %s | %s | %s | %s | %.3f |" % (
                ", ".join("%g" % f for f in row["interior"]),
                ", ".join("%s: %s" % (n, "yes" if v else "no") for n, v in row["same"].items()),
                ", ".join("%s: %s" % (n, "yes" if v else "no") for n, v in row["same_first"].items()),
                ", ".join("%s: %d of %d" % (n, v, row["resolved"][n]) for n, v in row["resolved_reversed"].items()),
                row["max_abs_diff"]))
    if result.get("every_rule"):
        e = result["every_rule"]
        lines += ["", "Every rule of 1 to 3 interior points of the study's 8-step grid (%d rules): the ones that keep "
                  "all the rankings above: %s." % (e["rules"], "; ".join(", ".join("%g" % f for f in r)
                                                                          for r in e["keep_every_ranking"]) or "none")]
    if result.get("adaptive"):
        a = result["adaptive"]
        lines += ["", "## Steps only where the ranking needs them (simulated on the study's full curves)", "",
                  "`adaptive_refinement` in this script: every curve starts from the interior fraction(s) %s; while "
                  "two kept maps' AUC brackets overlap (trapezoid +- sum of (b - a) |y_b - y_a| / 2 over its "
                  "intervals, a bound for a monotone curve), each of their curves gets the midpoint of its widest "
                  "interval on the study's 8-step grid, until every pair is separated or the curves are complete. "
                  "Passes are counted over all the study's maps (the default before, 2 per curve, and the midpoint "
                  "rule, now the default, 4 per curve). "
                  "Made by `python studies/benchmark/bench_evaluate.py --rerank` (no model run)."
                  % ", ".join("%g" % f for f in a["start"]), "",
                  "| scan | maps (kept) | passes: adaptive, default before, midpoint rule, full | same ranking | "
                  "curves not monotone | largest step against the trend (of y0) |", "|---|---|---|---|---|---|"]
        for name, c in a["cases"].items():
            lines.append("| %s | %d (%d) | %d, %d, %d, %d | %s | %d of %d | %.2f |" % (
                name, c["maps"], c["kept"], c["passes"], c["passes_default"], c["passes_midpoint"], c["passes_full"],
                "yes" if c["same"] else "**no**", c["not_monotone"], c["curves"], c["largest_step_against_trend"]))
        if "same_all_scans" in a:
            lines.append("")
            ratios = [c["passes"] / float(c["passes_default"]) for c in a["cases"].values()]
            lines.append("Across scans: same ranking %s. The study's curves are not monotone, so the brackets are no "
                         "bounds and the rule is a heuristic. It takes %.2f-%.2fx the default before's passes here; "
                         "on that rule's whole-MNI152 run below (29 passes of 12.7 s and 132 s for the rest, "
                         "`evaluate-whole-mni152-idle-1b62c93.json`) that would be about %.1f-%.1f min, an estimate "
                         "that assumes the same ratio there." % (
                             "yes" if a["same_all_scans"] else "**no**", min(ratios), max(ratios),
                             (29 * min(ratios) * 12.7 + 132) / 60.0, (29 * max(ratios) * 12.7 + 132) / 60.0))
        if a.get("every_map"):
            e = a["every_map"]["cases"]
            lines += ["", "The saving comes from the study's sanity rule, which leaves %s maps to order: refining the "
                      "pairs of every map but the random-order row instead (what `evaluate`, which has no such rule, "
                      "would do) takes %s passes." % (
                          ", ".join("%s %d of %d" % (n, c["kept"], c["maps"] - 1) for n, c in a["cases"].items()),
                          ", ".join("%s %d of %d" % (n, c["passes"], c["passes_full"]) for n, c in e.items()))]
    if result.get("whole_scan"):
        w = result["whole_scan"]
        lines += ["", "## The default `seghirescam evaluate` on a whole MRI", "", w["text"]]
    return "\n".join(lines) + "\n"


def _study_model(threads):
    """HD-BET fold 0 as the study runs it (no minimum size: the study's 64^3 box is its input), on ``threads``
    threads with denormals flushed."""
    flush_denormals()
    torch.set_num_threads(threads)
    model = load_model("hd-bet")
    return study.dataclasses.replace(model, preprocessing=study.dataclasses.replace(model.preprocessing,
                                                                                    min_size=None))


def _print_case(c):
    print("  same ranking: %s; max |dAUC| deletion %.3f insertion %.3f; curves %.0f s"
          % (c["ranking_full"] == c["ranking_shortcut"], c["max_abs_deletion_diff"], c["max_abs_insertion_diff"],
             c["shortcut"]["curves_s"]), flush=True)


def _combined(cases):
    """The cross-scan rankings, ``{"full": [(method, layer), ...], "shortcut": [...]}``, of run cases."""
    return {kind: _combined_order({c["case"]: c["tables"][kind] for c in cases}) for kind in ("full", "shortcut")}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", default="robex,mni152", help="study cases (default robex,mni152)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=2, help="as the study (default 2)")
    parser.add_argument("--out", default=OUT, help="folder of evaluate.json and evaluate.md")
    parser.add_argument("--rerank", action="store_true", help="no model runs: rewrite evaluate.md (and the "
                        "step-grid sensitivity) from the stored evaluate.json")
    parser.add_argument("--refine", type=int, default=0, metavar="STEPS",
                        help="instead: the full computation with STEPS equal steps (e.g. 16) on the maps the study "
                        "keeps, into refine.json (whether the study's own ranking survives a finer step grid)")
    parser.add_argument("--rule", choices=("union",), help="instead: the study's cases with interior points at r / 2, "
                        "r and (1 + r) / 2 (r from the default's run in --out's evaluate.json), added to it as "
                        "union_rule")
    args = parser.parse_args(argv)
    if args.rule:
        with open(os.path.join(args.out, "evaluate.json")) as handle:
            result = json.load(handle)
        boxed = _study_model(args.threads)
        rule = {"fractions": "r / 2, r and (1 + r) / 2",
                "command": "python studies/benchmark/bench_evaluate.py " + " ".join(argv or sys.argv[1:]), "cases": []}
        for stored in result["cases"]:
            r = stored["shortcut"]["fractions"][2]  # the default's [0, r / 2, r, 1]
            steps = [0.0, stored["shortcut"]["fractions"][1], r, round((1.0 + r) / 2.0, 6), 1.0]
            print("case %s, fractions %s ..." % (stored["case"], steps), flush=True)
            c = run_case(stored["case"], boxed, args.batch_size, steps)
            rule["cases"].append(c)
            _print_case(c)
        rule["combined"] = _combined(rule["cases"])
        result["union_rule"] = rule
        args.rerank = True
        with open(os.path.join(args.out, "evaluate.json"), "w") as handle:
            handle.write(dumps(study.portable(result), indent=1))
    if args.refine:
        boxed = _study_model(args.threads)
        out = {"command": "python studies/benchmark/bench_evaluate.py " + " ".join(argv or sys.argv[1:]),
               "threads": torch.get_num_threads(), "cases": []}
        for name in [c for c in args.cases.split(",") if c]:
            print("case %s ..." % name, flush=True)
            out["cases"].append(refine_case(name, boxed, args.refine, args.batch_size))
            c = out["cases"][-1]
            print("  same ranking at %d steps: %s; drift at the stored steps %.2e; %.0f s" % (
                args.refine, c["ranking_stored"] == c["ranking_refined"], c["drift_at_stored_steps"],
                c["seconds"]), flush=True)
            os.makedirs(args.out, exist_ok=True)
            with open(os.path.join(args.out, "refine.json"), "w") as handle:
                handle.write(dumps(study.portable(out), indent=1))
        return 0
    if args.rerank:
        with open(os.path.join(args.out, "evaluate.json")) as handle:
            result = json.load(handle)
        for c in result["cases"]:
            c["ranking_full"] = [tuple(k) for k in c["ranking_full"]]
            c["ranking_shortcut"] = [tuple(k) for k in c["ranking_shortcut"]]
        if result.get("combined"):
            result["combined"] = {k: [tuple(x) for x in v] for k, v in result["combined"].items()}
        analyse(result, args.out)
        with open(os.path.join(args.out, "evaluate.json"), "w") as handle:
            handle.write(dumps(study.portable(result), indent=1))
        with open(os.path.join(args.out, "evaluate.md"), "w") as handle:
            handle.write(markdown(result))
        return 0
    boxed = _study_model(args.threads)
    result = {"command": "python studies/benchmark/bench_evaluate.py " + " ".join(argv or sys.argv[1:]),
              "threads": torch.get_num_threads(), "cpu_count": os.cpu_count(), "cases": []}
    for name in [c for c in args.cases.split(",") if c]:
        print("case %s ..." % name, flush=True)
        result["cases"].append(run_case(name, boxed, args.batch_size))
        _print_case(result["cases"][-1])
    if len(result["cases"]) > 1:
        result["combined"] = _combined(result["cases"])
    stored = os.path.join(args.out, "evaluate.json")
    if os.path.exists(stored):  # the other step rules' runs and the whole-scan text stay
        with open(stored) as handle:
            before = json.load(handle)
        result.update({key: before[key] for key in [k for k, _ in OTHER_RULES] + ["whole_scan"] if key in before})
    analyse(result, args.out)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "evaluate.json"), "w") as handle:
        handle.write(dumps(study.portable(result), indent=1))
    with open(os.path.join(args.out, "evaluate.md"), "w") as handle:
        handle.write(markdown(result))
    same = all(c["ranking_full"] == c["ranking_shortcut"] for c in result["cases"]) and \
        (not result.get("combined") or result["combined"]["full"] == result["combined"]["shortcut"])
    print("rankings the same: %s" % same)
    return 0


if __name__ == "__main__":
    sys.exit(main())
