"""Reuse benchmark: what a further target on the same scan costs next to the first one (issue 6, "Reuse").

A radiologist clicks through several segments of one scan; each new heatmap should not repeat the work that does
not depend on the target. Two paths, each timed end to end as a user meets it:

- ``hdbet-atlas``: HD-BET fold 0 on the whole ROBEX atlas through :func:`SegHiResCAMLib.analysis.explain.explain_image` (the
  path of ``seghirescam explain`` and of the Slicer logic) with a ``session_cache``: the first target builds the
  session (one forward pass, graph kept from the layer up); later targets cost a backward pass to the layer and the
  mapping back to the image grid. Layer: the model's default (``up4``).
- ``unet-windows``: a MONAI UNet (seeded weights) on a CT-like input larger than its window, through
  :class:`~SegHiResCAMLib.engine.windows.WindowedCAM` with 128^3 windows: the first target runs pass 1 (the blended
  prediction, reused) and pass 2; later targets run pass 2 on the windows their gradient reaches.

Targets, in order: the predicted class 1 (the first run), the predicted class 0 (a second segment, as large as the
rest of the scan), and a clicked voxel with a 5 mm ball (class 1). Each later target is also computed *cold* (a new
session) once, to check that reuse changes no value (max |difference| of the maps). Seg-HiRes-Grad CAM and
Seg-Grad-CAM (the latter needs every window's activations once, kept for later targets).

    .venv/bin/python studies/benchmark/bench_reuse.py            # results in benchmarks/results/reuse.{json,md}
    .venv/bin/python studies/benchmark/bench_reuse.py --quick    # small inputs (a minute or two)

Runs in the project's ``.venv`` (``make install``) or in ``benchmarks/.venv``; nothing is downloaded.
"""

import argparse
import datetime
import json
import os
import platform
import sys
import time

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, os.path.join(ROOT, "SegHiResCAM"))
sys.path.insert(0, HERE)

from SegHiResCAMLib import __version__  # noqa: E402
from SegHiResCAMLib.imaging import files as io
from SegHiResCAMLib.engine import SegmentTarget, VoxelRegion  # noqa: E402
from SegHiResCAMLib.analysis.evaluate import crop_image  # noqa: E402
from SegHiResCAMLib.engine.windows import WindowedCAM  # noqa: E402
from SegHiResCAMLib.models import load_model  # noqa: E402
from SegHiResCAMLib.analysis.explain import TargetSpec, explain_image  # noqa: E402
from SegHiResCAMLib.imaging.sample_data import robex_atlas  # noqa: E402

#: the issue's target: a further target costs at most this fraction of the first run
TARGET_RATIO = 0.6


def load_average() -> float:
    try:
        return os.getloadavg()[0]
    except OSError:
        return float("nan")


def timed(fn):
    load = load_average()
    t0 = time.perf_counter()
    value = fn()
    return value, time.perf_counter() - t0, max(load, load_average())


def hdbet_case(quick: bool, methods) -> dict:
    model = load_model("hd-bet")
    image, geometry = io.read_image(robex_atlas()[0])
    if quick:  # a central 64^3 block, every voxel kept where it was
        image, geometry, _ = crop_image(image, geometry, (64, 64, 64))
    centre = tuple(int(s) // 2 for s in image.shape)
    specs = [("predicted class 1", TargetSpec(class_index=1)),
             ("predicted class 0", TargetSpec(class_index=0)),
             ("voxel %s, 5 mm ball, class 1" % (centre,), TargetSpec(class_index=1, voxel=centre, radius_mm=5.0))]
    cache: dict = {}
    rows, maps = [], []
    for i, (label, spec) in enumerate(specs):
        res, seconds, load = timed(lambda: explain_image(model, image, geometry, [spec], method=list(methods),
                                                        device="cpu", session_cache=cache))
        rows.append({"target": label, "seconds": seconds, "reused_forward": res.metadata["timings"]["reused_forward"],
                     "load_avg": load, "timings": res.metadata["timings"]})
        maps.append([h.array for h in res.heatmaps])
    cache.clear()
    for i, (label, spec) in enumerate(specs[1:], start=1):
        res, seconds, load = timed(lambda: explain_image(model, image, geometry, [spec], method=list(methods),
                                                        device="cpu"))
        rows[i]["cold_seconds"] = seconds
        rows[i]["cold_load_avg"] = load
        rows[i]["max_abs_diff_vs_cold"] = max(float(np.abs(a - h.array).max()) for a, h in zip(maps[i], res.heatmaps))
    return {"title": "HD-BET fold 0, ROBEX atlas %s, explain_image with a session cache, layer %s"
            % ("x".join(map(str, image.shape)), model.default_layer), "rows": rows}


def unet_case(quick: bool, methods) -> dict:
    import cases  # the benchmark's UNet and CT-like input
    shape, roi = ((96, 128, 128), 64) if quick else ((192, 256, 256), 128)
    torch.manual_seed(0)
    net = cases.build_unet().eval()
    x = torch.from_numpy(cases.ct_sized_input(shape))[None, None]
    layer = cases.UNET_LAYER
    click = tuple(s // 5 for s in shape)  # inside the first window only
    targets = [("predicted class 1", SegmentTarget(1)), ("predicted class 0", SegmentTarget(0)),
               ("voxel %s, 5-voxel ball, class 1" % (click,), SegmentTarget(1, VoxelRegion(click, 5.0)))]
    cam = WindowedCAM(net, x, roi, [layer], overlap=0.25)
    rows, maps = [], []
    for label, target in targets:
        res, seconds, load = timed(lambda: cam.explain([target], list(methods)))
        rows.append({"target": label, "seconds": seconds, "windows": len(cam.windows), "windows_run": cam.windows_run,
                     "load_avg": load})
        maps.append([r.map for r in res])
    for i, (label, target) in enumerate(targets[1:], start=1):
        res, seconds, load = timed(lambda: WindowedCAM(net, x, roi, [layer], overlap=0.25).explain([target],
                                                                                                  list(methods)))
        rows[i]["cold_seconds"] = seconds
        rows[i]["cold_load_avg"] = load
        rows[i]["max_abs_diff_vs_cold"] = max(float((a - r.map).abs().max()) for a, r in zip(maps[i], res))
    return {"title": "MONAI UNet (seeded), 1x1x%s CT-like input, %d^3 windows (overlap 0.25), layer %s"
            % ("x".join(map(str, shape)), roi, layer), "rows": rows}


def markdown(report: dict) -> str:
    lines = ["# Reuse benchmark: a further target on the same scan", "",
             "Measured %s on %s (%d CPU cores), torch %s, threads %d, SegHiResCAM %s. Command: `%s`." % (
                 report["date"], report["machine"], os.cpu_count() or 0, report["torch"], report["threads"],
                 report["version"], report["command"]), "",
             "Methods per run: %s (one backward pass serves both). Each later target ran once in the same session "
             "(reusing what does not depend on the target) and once cold, in a new session; the ratio is the "
             "reused time over the first run's time (issue 6: at most %.1f)." % (", ".join(report["methods"]),
                                                                                 TARGET_RATIO), ""]
    for case in report["cases"].values():
        lines += ["## " + case["title"], "",
                  "| target | time s | / first run | met (<= %.1f) | cold time s | max abs diff vs cold | windows run "
                  "| load avg |" % TARGET_RATIO, "|---|---|---|---|---|---|---|---|"]
        first = case["rows"][0]["seconds"]
        for i, row in enumerate(case["rows"]):
            ratio = row["seconds"] / first
            lines.append("| %s | %.1f | %s | %s | %s | %s | %s | %.1f |" % (
                row["target"], row["seconds"], "1 (first run)" if i == 0 else "%.2f" % ratio,
                "–" if i == 0 else ("yes" if ratio <= TARGET_RATIO else "**no**"),
                "%.1f" % row["cold_seconds"] if "cold_seconds" in row else "–",
                "%.1e" % row["max_abs_diff_vs_cold"] if "max_abs_diff_vs_cold" in row else "–",
                "%d of %d" % (row["windows_run"], row["windows"]) if "windows" in row else "–", row["load_avg"]))
        lines.append("")
    lines += ["The maps are on [0, 1] (ReLU, division by the maximum); a difference of 0 means reuse is exact. "
              "Timings come from one run on a possibly shared machine: compare rows of similar load."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="small inputs, for checking that it runs")
    p.add_argument("--cases", default="hdbet-atlas,unet-windows")
    p.add_argument("--out", help="results folder (default: benchmarks/results; --quick: benchmarks/.work-quick)")
    p.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    out = args.out or (os.path.join(HERE, ".work-quick") if args.quick else os.path.join(ROOT, "benchmarks", "results"))
    os.makedirs(out, exist_ok=True)
    methods = ("seg-hires-grad-cam", "seg-grad-cam")
    runners = {"hdbet-atlas": hdbet_case, "unet-windows": unet_case}
    wanted = [c for c in args.cases.split(",") if c]
    unknown = [c for c in wanted if c not in runners]
    if unknown:
        p.error("unknown case(s) %s; choose from %s" % (", ".join(unknown), ", ".join(runners)))
    report = {"date": datetime.datetime.now().isoformat(timespec="minutes"), "machine": platform.machine(),
              "torch": torch.__version__, "threads": torch.get_num_threads(), "version": __version__,
              "command": "studies/benchmark/bench_reuse.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "methods": list(methods), "quick": args.quick, "cases": {}}
    for name in wanted:
        print("==", name, flush=True)
        report["cases"][name] = runners[name](args.quick, methods)
        for row in report["cases"][name]["rows"]:
            print("  %-40s %7.1f s%s" % (row["target"], row["seconds"], "  (cold %.1f s, max diff %.1e)" % (
                row["cold_seconds"], row["max_abs_diff_vs_cold"]) if "cold_seconds" in row else ""), flush=True)
    for name, text in (("reuse.json", json.dumps(report, indent=2) + "\n"), ("reuse.md", markdown(report))):
        io.atomic_write(os.path.join(out, name), lambda tmp, text=text: open(tmp, "w").write(text))
    print("wrote", os.path.join(out, "reuse.md"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
