"""The Slicer panel's run under a GIL-holding main thread: worker thread (before) vs worker process (issue 15, item 1).

PythonQt does not release the GIL while Slicer's main thread idles in the Qt event loop; the main thread runs Python
only when a timer is due (the panel's ticks) or a watched socket is readable (the panel's ``QSocketNotifier`` on the
worker's socket). The emulation here: the stand-in application's ``runEventLoop(holdGIL=True)``, which idles in C
through ``ctypes.PyDLL`` (``usleep``/``poll``, GIL held) and runs Python only at those events. The same explain
run, three ways, each timed from the click to the heatmap in the scene:

- ``direct``: prepare, compute and apply in a row on the main thread (what ``seghirescam explain`` or
  ``logic.process`` costs), model loaded;
- ``thread``: the panel with the former design, a Python worker thread (``ThreadRunner``), under the emulation;
- ``process``: the panel with the worker process (``ProcessRunner``, the default), under the emulation, worker warm.

Target (issue 15): process <= 1.10x direct.

    .venv/bin/python studies/benchmark/bench_slicer_gil.py            # toy UNet, 64^3; benchmarks/results/slicer_gil.*
    .venv/bin/python studies/benchmark/bench_slicer_gil.py --hdbet    # also HD-BET on the ROBEX atlas (minutes)
"""

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import tempfile
import time

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path[:0] = [os.path.join(ROOT, "SegHiResCAM"), os.path.join(ROOT, "Testing")]

import slicer_standalone  # noqa: E402

slicer = slicer_standalone.setup()

import SegHiResCAM  # noqa: E402
from SegHiResCAMLib import __version__  # noqa: E402
from SegHiResCAMLib.slicer_logic import job as slicer_job  # noqa: E402

def idle_like_slicer(widget, timeout=1800.0):
    started = time.perf_counter()
    slicer.app.runEventLoop(until=lambda: widget._job is None, timeout=timeout, holdGIL=True)
    if widget._job is not None:
        raise RuntimeError("the run did not finish within %d s" % timeout)
    return time.perf_counter() - started


def panel(spec, weights, image, ijk_to_ras=None):
    slicer.mrmlScene.Clear()
    slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(slicer.mrmlScene)
    slicer.util.addVolumeFromArray(image, ijk_to_ras, name="scan")
    SegHiResCAM.SegHiResCAMLogic.modelSpec = staticmethod(lambda parameters: spec)
    original = SegHiResCAM.SegHiResCAMLogic.prepare
    if not hasattr(original, "benchWrapped"):
        def prepare(self, *args, **kwargs):
            kwargs["weights"] = panel.weights
            return original(self, *args, **kwargs)
        prepare.benchWrapped = True
        SegHiResCAM.SegHiResCAMLogic.prepare = prepare
    panel.weights = weights
    slicer.util.errorDisplay = lambda text, **kwargs: (_ for _ in ()).throw(RuntimeError(text))
    slicer.app.loadModule(SegHiResCAM)
    return slicer.app.selectModule("SegHiResCAM")


def direct(widget):
    logic, p = widget.logic, widget._parameterNode
    started = time.perf_counter()
    request = logic.prepareFromParameters(p)
    logic.apply(request, logic.compute(request))
    return time.perf_counter() - started


def click(widget):
    widget.onApplyButton()
    seconds = idle_like_slicer(widget)
    assert "Done" in widget.ui.statusLabel.text, widget.ui.statusLabel.text
    return seconds


def roundtrip(widget):
    """A layer-list job on the warm worker (model loaded: milliseconds of work), click to list: what going through
    the panel and the worker process costs per job, whatever the model."""
    started = time.perf_counter()
    widget.onLoadLayers()
    idle_like_slicer(widget)
    assert widget.ui.layerComboBox.items, widget.ui.statusLabel.text
    return time.perf_counter() - started


def case(name, spec, weights, image, layer, repeats, thread_repeats, ijk_to_ras=None):
    widget = panel(spec, weights, image, ijk_to_ras)
    widget._parameterNode.layer = layer
    rows = {"case": name, "shape": list(image.shape), "layer": layer}
    direct(widget)  # load the model in this process
    rows["process_first_run_s"] = click(widget)  # starts the worker, loads the model there
    rows["direct_s"], rows["process_s"] = [], []
    for _ in range(repeats):  # alternating, so that both see the same load of the machine
        rows["direct_s"].append(direct(widget))
        rows["process_s"].append(click(widget))
    rows["pair_ratios"] = [p / d for p, d in zip(rows["process_s"], rows["direct_s"])]
    rows["roundtrip_s"] = [roundtrip(widget) for _ in range(repeats)]  # the fixed cost of a job, alone
    widget.runner.close()
    widget.runner = slicer_job.ThreadRunner(widget.logic)
    widget.POLL_MS = 200  # the former design's tick
    widget._timer.setInterval(widget.POLL_MS)
    rows["thread_s"] = [click(widget) for _ in range(thread_repeats)]
    d = statistics.median(rows["direct_s"])
    rows["direct_median_s"] = d
    rows["process_median_s"] = statistics.median(rows["process_s"])
    rows["thread_median_s"] = statistics.median(rows["thread_s"])
    rows["process_ratio"] = rows["process_median_s"] / d
    rows["pair_ratio_median"] = statistics.median(rows["pair_ratios"])
    rows["roundtrip_median_s"] = statistics.median(rows["roundtrip_s"])
    rows["thread_ratio"] = rows["thread_median_s"] / d
    rows["target_met"] = rows["process_ratio"] <= 1.10
    rows["load_average"] = list(os.getloadavg())
    slicer.app.quit()
    print(json.dumps(rows), flush=True)
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", type=int, default=64, help="edge of the toy case's cube (default 64)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--hdbet", action="store_true", help="also HD-BET on the ROBEX atlas")
    parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "slicer_gil"))
    args = parser.parse_args(argv)
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    load_before = list(os.getloadavg())
    cases = []
    with tempfile.TemporaryDirectory() as folder:
        import slicer_fixtures
        weights = slicer_fixtures.save_toy_weights(folder)
        image = np.random.RandomState(1).randn(*(args.size,) * 3).astype(np.float32)
        cases.append(case("toy UNet (Testing/toy_models.py:unet3d, seed-0 weights)", "toy_models:unet3d", weights,
                          image, "dec", args.repeats, args.repeats))
    if args.hdbet:
        from SegHiResCAMLib.imaging import files
        from SegHiResCAMLib.imaging.sample_data import robex_atlas
        image, geometry = files.read_image(robex_atlas()[0])
        cases.append(case("HD-BET, ROBEX atlas", "hd-bet", None, image.astype(np.float32), "auto", 1, 1,
                          geometry.ijk_to_ras()))
    command = "studies/benchmark/bench_slicer_gil.py " + " ".join(argv if argv is not None else sys.argv[1:])
    result = {"date": datetime.datetime.now().isoformat(timespec="minutes"), "machine": platform.machine(),
              "cpus": os.cpu_count(), "torch": torch.__version__, "threads": torch.get_num_threads(),
              "version": __version__, "python": platform.python_version(), "command": command.strip(),
              "load_average_before": load_before, "poll_ms": SegHiResCAM.SegHiResCAMWidget.POLL_MS, "cases": cases}
    with open(args.out + ".json", "w") as stream:
        json.dump(result, stream, indent=2)
    with open(args.out + ".md", "w") as stream:
        stream.write(markdown(result))
    print(markdown(result))


def markdown(result):
    lines = ["# The Slicer panel under a GIL-holding main thread (issue 15, item 1)", "",
             "Measured %s on %s (%d CPU cores), torch %s, threads %d, Python %s, SegHiResCAM %s. Command: `%s`. "
             "Load average before: %s." % (result["date"], result["machine"], result["cpus"], result["torch"],
                                           result["threads"], result["python"], result["version"], result["command"],
                                           ", ".join("%.1f" % v for v in result["load_average_before"])), "",
             "Each run is timed from the click to the heatmap in the scene. `direct`: prepare + compute + apply on "
             "the main thread (the command line's cost; model loaded). `thread`: the former design, a Python worker "
             "thread polled every 200 ms, while the main thread idles with the GIL held and runs Python only at the "
             "panel's timer ticks (PythonQt). `process`: the worker process (the panel's default: its timer ticks "
             "every %d ms for the progress, and a QSocketNotifier on the worker's socket wakes it as soon as a "
             "message is readable), worker warm. Direct and process runs alternate, so both see the same load. "
             "Target: process <= 1.10x direct. Medians of the runs listed; the pairwise ratio is the median of "
             "process / direct over the alternating pairs. `job round trip`: a layer-list job on the warm worker "
             "(milliseconds of work), click to list: the fixed cost of a run through the panel and the worker "
             "process." % result["poll_ms"], "",
             "| case | shape | direct s | process s | process / direct | met (<= 1.10) | thread s | thread / direct "
             "| process first run s (starts the worker) | job round trip ms | load avg after |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in result["cases"]:
        lines.append("| %s | %s | %.3f | %.3f | %.2f | %s | %.3f | %.1f | %.2f | %.0f | %.1f |" % (
            row["case"], "x".join(map(str, row["shape"])), row["direct_median_s"], row["process_median_s"],
            row["process_ratio"], "yes" if row["target_met"] else "no", row["thread_median_s"], row["thread_ratio"],
            row["process_first_run_s"], 1000 * row["roundtrip_median_s"], row["load_average"][0]))
    lines += ["", "Single runs (s): " + "; ".join(
        "%s: direct %s, process %s (pairwise ratio median %.2f), thread %s" % (
            row["case"].split(" (")[0], ", ".join("%.3f" % v for v in row["direct_s"]),
            ", ".join("%.3f" % v for v in row["process_s"]), row["pair_ratio_median"],
            ", ".join("%.3f" % v for v in row["thread_s"]))
        for row in result["cases"]), ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
