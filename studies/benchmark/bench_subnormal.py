"""Subnormal-weights benchmark: HD-BET's forward pass with its weights as stored and with their subnormals zeroed.

45% of HD-BET fold 0's parameters are subnormal floats (below 1.2e-38 in magnitude). ``load_model`` sets them to
zero (``SegHiResCAMLib/models/weights.py:zero_subnormal_parameters``); the command line, the Slicer worker and the
test suite also make every torch thread treat subnormals as zero (``flush_denormals``, FTZ/DAZ), which a Python
session may call too late or not at all. This times one forward pass of the network on a cube of the whole
MNI152 T1's model input (nilearn's template, HD-BET's 1.5 mm grid, the cube at the grid's centre), in the four
combinations of {weights as stored, subnormals zeroed} x {FTZ/DAZ off, on}, each in a fresh process (one
warm-up pass, then ``--repeats`` timed passes, the best kept), and checks that the four outputs are bit-identical.

    .venv/bin/python studies/benchmark/bench_subnormal.py    # results in benchmarks/results/subnormal.{json,md}

Runs in the project's ``.venv`` (``make install``, which installs nilearn); nothing is downloaded.
"""

import argparse
import datetime
import hashlib
import json
import os
import platform
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
RESULTS = os.path.join(ROOT, "benchmarks", "results")
SETTINGS = ((False, False), (True, False), (False, True), (True, True))  # (zeroed, ftz)


def child(threads: int, size: int, repeats: int, zeroed: bool, ftz: bool) -> dict:
    """One setting in this process: the best of ``repeats`` timed forward passes after a warm-up pass."""
    import time

    import torch

    sys.path[:0] = [os.path.join(ROOT, "SegHiResCAM"), HERE]
    from cases import mni152_model_input
    from SegHiResCAMLib.engine.outputs import flush_denormals
    from SegHiResCAMLib.models import hdbet
    from SegHiResCAMLib.models.weights import zero_subnormal_parameters

    if ftz:
        flush_denormals()  # before the first torch operation, as the command line does
    torch.set_num_threads(threads)
    model = hdbet.load()  # the kind's own loader: the weights as stored
    count = sum(p.numel() for p in model.network.parameters())
    zero = zero_subnormal_parameters(model.network) if zeroed else 0
    x = mni152_model_input(model, size)
    times = []
    with torch.no_grad():
        out = model.network(x)
        for _ in range(repeats):
            started = time.perf_counter()
            out = model.network(x)
            times.append(time.perf_counter() - started)
    return {"zeroed": zeroed, "ftz": ftz, "parameters": count, "subnormal_parameters_zeroed": zero,
            "input_shape": list(x.shape), "seconds": times, "best_s": min(times),
            "output_sha256": hashlib.sha256(out.contiguous().numpy().tobytes()).hexdigest()}


def run(threads: int, size: int, repeats: int) -> dict:
    runs = []
    for zeroed, ftz in SETTINGS:
        command = [sys.executable, os.path.abspath(__file__), "--child", "--threads", str(threads), "--size",
                   str(size), "--repeats", str(repeats)] + (["--zeroed"] if zeroed else []) + (["--ftz"] if ftz else [])
        done = subprocess.run(command, check=True, capture_output=True, text=True)
        one = json.loads(done.stdout.strip().splitlines()[-1])
        one["load_average_after"] = list(os.getloadavg())
        print("zeroed=%s ftz=%s: %.2f s" % (zeroed, ftz, one["best_s"]), flush=True)
        runs.append(one)
    slowest = runs[0]["best_s"]
    return {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "python": platform.python_version(), "cpu_count": os.cpu_count(), "threads": threads, "size": size,
            "runs": runs, "speedup_over_stored_without_ftz": [slowest / r["best_s"] for r in runs],
            "outputs_identical": len({r["output_sha256"] for r in runs}) == 1}


def markdown(result: dict) -> str:
    runs = result["runs"]
    lines = ["# HD-BET's forward pass with subnormal weights zeroed", "",
             "Made by `python studies/benchmark/bench_subnormal.py` (its docstring describes the case): HD-BET fold 0, "
             "input %s (a cube of the whole MNI152 T1's model grid), %d torch threads, one fresh process per "
             "setting, best of %d passes after a warm-up pass. %d of the network's %d parameters are subnormal. Raw "
             "numbers: `benchmarks/results/subnormal.json`." % (
                 "x".join(map(str, runs[0]["input_shape"])), result["threads"], len(runs[0]["seconds"]),
                 max(r["subnormal_parameters_zeroed"] for r in runs), runs[0]["parameters"]), "",
             "| weights | subnormals as zero on every thread (FTZ/DAZ) | s / pass | speed-up | load avg after |",
             "|---|---|---|---|---|"]
    for r, ratio in zip(runs, result["speedup_over_stored_without_ftz"]):
        lines.append("| %s | %s | %.2f | %.1fx | %.1f |" % (
            "subnormals zeroed" if r["zeroed"] else "as stored", "yes" if r["ftz"] else "no", r["best_s"], ratio,
            r["load_average_after"][0]))
    lines += ["", "Outputs bit-identical in all four settings: %s." % (
        "yes" if result["outputs_identical"] else "**no**"), ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--size", type=int, default=64, help="edge of the input cube in model voxels (default 64)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", default=RESULTS, help="output folder (default benchmarks/results)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--zeroed", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--ftz", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.threads, args.size, args.repeats, args.zeroed, args.ftz)))
        return 0
    from bench_malloc import write_results  # the sibling script (this folder is on sys.path when run)
    write_results(args.out, "subnormal", run(args.threads, args.size, args.repeats), markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
