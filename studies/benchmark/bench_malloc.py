"""Freed-memory reuse benchmark: deletion/insertion passes with and without ``reusing_freed_memory``.

The perturbed forward passes of ``seghirescam evaluate`` and ``--check quick`` run in the engine's
``reusing_freed_memory`` block (``SegHiResCAMLib/engine/outputs.py``): glibc then keeps freed memory for the next
pass instead of returning it to the kernel, which must zero fresh pages for every pass otherwise. This runs the
same deletion/insertion curves of HD-BET fold 0 on the input grid of the whole MNI152 T1 (1 x 1 x 128 x 160 x 144,
the grid of ``benchmarks/results/evaluate-whole-mni152-idle-*.json``; a seeded random input and heatmap, batch 1,
blur baseline, the prediction as target), once per setting in a fresh process each (``SEGHIRESCAM_MALLOC=system``
keeps glibc's settings), the two settings alternating ``--repeats`` times, and reports per forward pass the wall
time, the CPU time (user, system), the minor page faults and each process's peak resident set, and whether the
two settings give bit-identical scores.

    .venv/bin/python studies/benchmark/bench_malloc.py    # results in benchmarks/results/malloc.{json,md}

Runs in the project's ``.venv`` (``make install``); nothing is downloaded.
"""

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
RESULTS = os.path.join(ROOT, "benchmarks", "results")
SHAPE = (128, 160, 144)
SETTINGS = (("system", "glibc's settings (SEGHIRESCAM_MALLOC=system)"), ("", "freed memory reused (default)"))


def child(threads: int, steps: int) -> dict:
    """One run in this process: the curves, timed per forward pass."""
    import resource
    import time

    import torch

    sys.path.insert(0, os.path.join(ROOT, "SegHiResCAM"))
    from SegHiResCAMLib.engine.faithfulness import perturbation_curves
    from SegHiResCAMLib.engine.outputs import flush_denormals
    from SegHiResCAMLib.engine.targets import SegmentTarget
    from SegHiResCAMLib.models import load_model

    flush_denormals()
    torch.set_num_threads(threads)
    net = load_model("hd-bet").network.eval()
    generator = torch.Generator().manual_seed(0)
    x = torch.randn((1, 1) + SHAPE, generator=generator)
    heat = torch.rand(SHAPE, generator=generator)
    with torch.no_grad():
        out = net(x)
    region = out.argmax(1) == 1
    y0 = float(out[:, 1][region].sum())
    del out
    before, wall = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    curves = perturbation_curves(net, x, SegmentTarget(1), [heat], steps=steps, region=region, reference_score=y0,
                                 batch_size=1)
    wall, after = time.perf_counter() - wall, resource.getrusage(resource.RUSAGE_SELF)
    forwards = 1 + 2 * (steps - 1)
    return {"forwards": forwards, "wall_s_per_forward": wall / forwards,
            "user_s_per_forward": (after.ru_utime - before.ru_utime) / forwards,
            "system_s_per_forward": (after.ru_stime - before.ru_stime) / forwards,
            "minor_faults_per_forward": (after.ru_minflt - before.ru_minflt) / forwards,
            "peak_rss_gb": after.ru_maxrss / 1e6,
            "scores": {mode: curve.scores for mode, curve in curves[0].items()}}


def run(threads: int, steps: int, repeats: int) -> dict:
    runs = []
    for repeat in range(repeats):
        for value, label in SETTINGS:
            env = dict(os.environ, SEGHIRESCAM_MALLOC=value)
            done = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", "--threads", str(threads),
                                   "--steps", str(steps)], env=env, check=True, capture_output=True, text=True)
            one = json.loads(done.stdout.strip().splitlines()[-1])
            one.update(setting=label, repeat=repeat, load_average_after=list(os.getloadavg()))
            print("%s, repeat %d: %.2f s per forward pass" % (label, repeat, one["wall_s_per_forward"]), flush=True)
            runs.append(one)
    by = {label: [r for r in runs if r["setting"] == label] for _, label in SETTINGS}
    system, reuse = (by[label] for _, label in SETTINGS)
    ratios = [a["wall_s_per_forward"] / b["wall_s_per_forward"] for a, b in zip(system, reuse)]
    identical = all(r["scores"] == runs[0]["scores"] for r in runs)
    return {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "python": platform.python_version(), "cpu_count": os.cpu_count(), "threads": threads, "steps": steps,
            "input_shape": [1, 1] + list(SHAPE), "runs": runs, "speedup_per_repeat": ratios,
            "scores_identical": identical}


def markdown(result: dict) -> str:
    lines = ["# Deletion/insertion passes with freed memory reused", "",
             "Made by `python studies/benchmark/bench_malloc.py` (its docstring describes the case): HD-BET fold 0, "
             "input %s, %d torch threads, %d forward passes per run (deletion and insertion at %d interior steps + "
             "the fully replaced input), one fresh process per run, the settings alternating. Raw numbers: "
             "`benchmarks/results/malloc.json`." % ("x".join(map(str, result["input_shape"])), result["threads"],
                                                    result["runs"][0]["forwards"], result["steps"] - 1), "",
             "| setting | repeat | wall s / pass | user s / pass | system s / pass | minor faults / pass | "
             "peak RSS GB | load avg after |", "|---|---|---|---|---|---|---|---|"]
    for r in result["runs"]:
        lines.append("| %s | %d | %.2f | %.2f | %.2f | %.0f | %.2f | %.1f |" % (
            r["setting"], r["repeat"], r["wall_s_per_forward"], r["user_s_per_forward"], r["system_s_per_forward"],
            r["minor_faults_per_forward"], r["peak_rss_gb"], r["load_average_after"][0]))
    lines += ["", "Speed-up (wall time per pass, glibc's settings / reused), per repeat: %s. Scores bit-identical "
              "between the settings: %s." % (", ".join("%.2f" % v for v in result["speedup_per_repeat"]),
                                             "yes" if result["scores_identical"] else "**no**"), ""]
    return "\n".join(lines)


def write_results(folder: str, name: str, result: dict, markdown) -> None:
    """``<folder>/<name>.json`` (the raw numbers) and ``<name>.md`` (``markdown(result)``, also printed)."""
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, name + ".json"), "w") as handle:
        json.dump(result, handle, indent=1)
    text = markdown(result)
    with open(os.path.join(folder, name + ".md"), "w") as handle:
        handle.write(text)
    print(text)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3, help="equal steps of the curves (default 3: 5 passes)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", default=RESULTS, help="output folder (default benchmarks/results)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.threads, args.steps)))
        return 0
    write_results(args.out, "malloc", run(args.threads, args.steps, args.repeats), markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
