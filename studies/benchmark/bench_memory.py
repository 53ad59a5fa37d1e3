"""Peak resident memory of the whole ``seghirescam explain`` command on a CT-sized scan (issue 16, part 4).

The case of the issue: ``explain --roi-size 128`` on a 512x512x320 int16 CT (NIfTI, as a scanner's export reads)
through the benchmark's MONAI UNet (``cases.build_unet``: channels 16-256, 4 down-samplings, 2 residual units,
seeded random weights saved as a state dict), layer ``model.1.submodule.1.submodule.2`` (the layer whose engine
peak, 3.44 GiB, is in ``results.md``), a CT window of 40/400 HU as the card's intensity step. The command runs in
its own process under ``/usr/bin/time -v``; its "Maximum resident set size" is the figure. A sampler thread in
the same process records the resident set every 20 ms with the stage the progress callback last announced, so
the report also says *where* the peak is (the sampler can miss spikes shorter than 20 ms; the maximum is
``time``'s).

Several source trees can be measured in one call (``--tree before=DIR``, each a checkout holding
``SegHiResCAM/``): the same input, weights and command for each, and every tree's heatmap and label map are
compared bit for bit with the first tree's.

    .venv/bin/python studies/benchmark/bench_memory.py --tree before=/path/to/old/checkout --tree after=.
    .venv/bin/python studies/benchmark/bench_memory.py --quick     # 64x128x128, 64^3 windows: a smoke test

Results: ``benchmarks/results/memory.{md,json}`` (``--quick``: in the scratch folder, ``--work``).
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, HERE)
GIB = float(1 << 30)
LAYER = "model.1.submodule.1.submodule.2"
MODEL_ARGS = {"spatial_dims": 3, "in_channels": 1, "out_channels": 2, "channels": [16, 32, 64, 128, 256],
              "strides": [2, 2, 2, 2], "num_res_units": 2}

#: runs the CLI in this process with a resident-set sampler keyed by the progress callback's last message
RUNNER = r"""
import json, sys, threading, time
from SegHiResCAMLib.cli import common, main
stage = ["start"]
peaks = {}
def rss():
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
def sample():
    while True:
        value, name = rss(), stage[0]
        peaks[name] = max(peaks.get(name, 0), value)
        time.sleep(0.02)
threading.Thread(target=sample, daemon=True).start()
call, close = common.Progress.__call__, common.Progress.close
def named(self, fraction, message):
    stage[0] = message.split(",")[0] if "window" in message else message
    return call(self, fraction, message)
def closed(self):
    stage[0] = "after the explanation: writing the outputs"
    return close(self)
common.Progress.__call__, common.Progress.close = named, closed
status = main(sys.argv[2:])
stage[0] = "exit"
time.sleep(0.05)
with open(sys.argv[1], "w") as fh:
    json.dump(peaks, fh)
sys.exit(status)
"""


def make_case(work: str, shape, seed: int = 0) -> dict:
    """The int16 CT-like scan (NIfTI) and the UNet's state dict under ``work`` (made once)."""
    import SimpleITK as sitk
    import torch
    import cases
    os.makedirs(work, exist_ok=True)
    image = os.path.join(work, "ct-%s.nii.gz" % "x".join(map(str, shape)))
    weights = os.path.join(work, "unet.pt")
    if not os.path.exists(weights):
        torch.manual_seed(0)
        torch.save(cases.build_unet().state_dict(), weights)
    if not os.path.exists(image):
        field = cases.ct_sized_input(shape, seed)  # smooth random field plus noise, ~N(0, 1)
        hu = np.clip(field * 300.0 - 200.0, -1024, 3071).astype(np.int16)  # air, fat, soft tissue, some bone
        del field
        itk = sitk.GetImageFromArray(hu)
        itk.SetSpacing((0.78, 0.78, 1.25))
        sitk.WriteImage(itk, image + ".tmp.nii.gz", True)
        os.replace(image + ".tmp.nii.gz", image)
    return {"image": image, "weights": weights}


def command(case: dict, out_dir: str, roi: int, threads: int, layer: str = LAYER) -> list:
    return ["explain", "--model", "monai:UNet", "--model-args", json.dumps(MODEL_ARGS, separators=(",", ":")),
            "--weights", case["weights"], "--image", case["image"], "--roi-size", str(roi), "--layer", layer,
            "--card-ct-window", "40,400", "--device", "cpu", "--threads", str(threads), "--quiet",
            "--out", os.path.join(out_dir, "heat.nii.gz"), "--prediction", os.path.join(out_dir, "labels.nii.gz"),
            "--json", os.path.join(out_dir, "run.json")]


def rel(path: str) -> str:
    """A path as the report shows it: relative to the repository (no machine's folders in committed files)."""
    path = os.path.abspath(path)
    return os.path.relpath(path, ROOT) if path.startswith(ROOT + os.sep) else os.path.basename(path)


def commit_of(tree: str) -> str:
    try:
        name = subprocess.run(["git", "-C", tree, "log", "-1", "--format=%h %s"], capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", tree, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True).stdout.strip()
        name = name if len(name) <= 80 else name[:77] + "..."
        return name + (" (with uncommitted changes)" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown (not a git checkout)"


def measure(label: str, tree: str, case: dict, work: str, roi: int, threads: int, layer: str = LAYER) -> dict:
    out_dir = os.path.join(work, "out-%s-%s" % (label, layer.replace(".", "_")))
    os.makedirs(out_dir, exist_ok=True)
    stages = os.path.join(out_dir, "stages.json")
    env = dict(os.environ, PYTHONPATH=os.path.join(os.path.abspath(tree), "SegHiResCAM"),
               OMP_NUM_THREADS=str(threads))
    argv = command(case, out_dir, roi, threads, layer)
    started = time.perf_counter()
    proc = subprocess.run(["/usr/bin/time", "-v", sys.executable, "-c", RUNNER, stages] + argv, env=env,
                          capture_output=True, text=True)
    seconds = time.perf_counter() - started
    max_kb = next((int(line.split(":")[1]) for line in proc.stderr.splitlines()
                   if "Maximum resident set size" in line), None)
    result = {"label": label, "commit": commit_of(tree), "status": proc.returncode, "wall_s": round(seconds, 1),
              "max_rss_gib": round(max_kb * 1024 / GIB, 3) if max_kb else None,
              "stderr_tail": [l for l in proc.stderr.splitlines() if l.startswith("seghirescam")][-6:],
              "command": "seghirescam " + " ".join(rel(a) if os.path.isabs(a) else a for a in argv),
              "out_dir": out_dir}
    if os.path.exists(stages):
        with open(stages) as fh:
            result["stage_peaks_gib"] = {k: round(v / GIB, 3) for k, v in json.load(fh).items()}
    return result


def compare(results) -> None:
    """Every tree's heatmap and label map against the first tree's, bit for bit."""
    import SimpleITK as sitk
    first = results[0]
    for res in results[1:]:
        same = {}
        for name in ("heat.nii.gz", "labels.nii.gz"):
            a, b = (os.path.join(r["out_dir"], name) for r in (first, res))
            if os.path.exists(a) and os.path.exists(b):
                x, y = sitk.GetArrayFromImage(sitk.ReadImage(a)), sitk.GetArrayFromImage(sitk.ReadImage(b))
                same[name] = bool(x.shape == y.shape and x.dtype == y.dtype and np.array_equal(x, y))
        res["identical_to_" + first["label"]] = same


def write_report(results, shape, roi, threads: int, out: str, quick: bool, layer: str = LAYER) -> None:
    with open(out + ".json", "w") as fh:
        json.dump({"shape_zyx": list(shape), "roi": roi, "threads": threads, "layer": layer,
                   "results": [{k: v for k, v in r.items() if k != "out_dir"} for r in results]}, fh, indent=1)
    lines = ["# Peak memory of the whole `explain` command (issue 16, part 4)", "",
             "Made by `studies/benchmark/bench_memory.py%s%s` (its docstring describes the case). Input: a %s "
             "(z, y, x) int16 CT-like NIfTI; MONAI UNet 16-256 channels, 2 residual units, seeded weights; layer "
             "`%s`; %d^3 windows on the CPU, %d torch threads. Peak = `/usr/bin/time -v` maximum resident set size "
             "of the whole process (Python, torch, MONAI and SimpleITK included). Target: <= 4 GiB." % (
                 " --quick" if quick else "", "" if layer == LAYER else " --layer " + layer,
                 "x".join(map(str, shape)), layer, roi, threads), "",
             "Command (per tree, with `PYTHONPATH=<tree>/SegHiResCAM`): `%s`" % results[0]["command"], "",
             "| tree | commit | exit | peak RSS GiB | <= 4 GiB | wall s | heatmap / labels identical to the first |",
             "|---|---|---|---|---|---|---|"]
    for r in results:
        same = next((v for k, v in r.items() if k.startswith("identical_to_")), None)
        lines.append("| %s | %s | %s | %s | %s | %s | %s |" % (
            r["label"], r["commit"], r["status"], r["max_rss_gib"],
            "yes" if r["max_rss_gib"] is not None and r["max_rss_gib"] <= 4.0 else "no", r["wall_s"],
            "–" if same is None else ", ".join("%s: %s" % (k, "yes" if v else "NO") for k, v in same.items())))
    lines += ["", "Largest resident set seen per stage (sampled every 20 ms, GiB; stage = the progress message "
              "last announced):", ""]
    stages = list(dict.fromkeys(k for r in results for k in r.get("stage_peaks_gib", {})))
    lines.append("| stage | " + " | ".join(r["label"] for r in results) + " |")
    lines.append("|---|" + "---|" * len(results))
    for stage in stages:
        lines.append("| %s | %s |" % (stage, " | ".join(
            str(r.get("stage_peaks_gib", {}).get(stage, "–")) for r in results)))
    with open(out + ".md", "w") as fh:
        fh.write("\n".join(lines) + "\n")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tree", action="append", help="LABEL=DIR, a checkout to measure (repeat; default: "
                        "this one, as 'current')")
    parser.add_argument("--quick", action="store_true", help="64x128x128 input, 64^3 windows")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--layer", default=LAYER, help="explained layer (default %(default)s; auto: the "
                        "command's default); results in memory.md, or memory-<layer>.md for another layer")
    parser.add_argument("--work", help="scratch folder (default: seghirescam-bench-memory[-quick] in the system's "
                        "temporary folder)")
    args = parser.parse_args()
    shape, roi = ((64, 128, 128), 64) if args.quick else ((320, 512, 512), 128)
    work = args.work or os.path.join(tempfile.gettempdir(), "seghirescam-bench-memory" + ("-quick" if args.quick else ""))
    case = make_case(work, shape)
    trees = [t.split("=", 1) for t in (args.tree or ["current=" + ROOT])]
    results = []
    for label, tree in trees:
        print("measuring %s (%s) ..." % (label, tree), file=sys.stderr, flush=True)
        results.append(measure(label, tree, case, work, roi, args.threads, args.layer))
        print(json.dumps(results[-1], indent=1), file=sys.stderr, flush=True)
    compare(results)
    out_dir = os.path.join(work, "report") if args.quick else os.path.join(ROOT, "benchmarks", "results")
    os.makedirs(out_dir, exist_ok=True)
    name = "memory" if args.layer == LAYER else "memory-" + args.layer.replace(".", "_")
    write_report(results, shape, roi, args.threads, os.path.join(out_dir, name), args.quick, args.layer)
    print("wrote %s.{md,json}" % os.path.join(out_dir, name), file=sys.stderr)
    return 0 if all(r["status"] == 0 for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
