"""Batch-size benchmark: seconds per perturbed input when the deletion/insertion passes are batched on a CPU.

``perturbation_curves`` scores its perturbed inputs in batches; with ``batch_size=None`` (what ``seghirescam
evaluate`` and ``--check quick`` use) ``auto_batch_size`` picks the batch (``SegHiResCAMLib/engine/faithfulness/
perturbation.py``). This measures what a batch buys on this machine: gradient-free forward passes, as the scorer
runs them (``torch.no_grad`` inside ``reusing_freed_memory``), of batches of ``b`` copies of one input, one fresh
process per (case, b), one untimed warm-up batch, then ``--passes`` timed batches; reported per input (the batch's
seconds / b): the best and the median, the process's peak resident set, and whether the first input's output is
bit-identical to the one computed alone. The (case, b) runs alternate ``--repeats`` times.

Cases (``--cases``, default all), with the batch each got from ``auto_batch_size`` on the CPU:

- ``hdbet-mni``: HD-BET fold 0 on the whole MNI152 T1's model input (nilearn's template on HD-BET's 1.5 mm grid,
  128x160x144, the grid of ``benchmarks/results/evaluate-whole-mni152-idle-*.json``);
- ``hdbet-128`` / ``hdbet-96``: the central 128^3 / 96^3 cube of that input;
- ``unet-128``: the MONAI UNet of the other benchmarks (``cases.py``, seeded weights) on
  ``cases.ct_sized_input`` of 128^3 voxels.

    .venv/bin/python studies/benchmark/bench_batch.py    # results in benchmarks/results/batch.{json,md}

Runs in the project's ``.venv`` (``make install``, which installs nilearn and MONAI); nothing is downloaded.
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
#: case -> (batch sizes measured, title)
CASES = {
    "hdbet-mni": ((1, 2, 3), "HD-BET fold 0, whole MNI152 T1 (1x1x128x160x144)"),
    "hdbet-128": ((1, 2, 4), "HD-BET fold 0, central 128^3 of the MNI152 input"),
    "hdbet-96": ((1, 2, 4), "HD-BET fold 0, central 96^3 of the MNI152 input"),
    "unet-128": ((1, 2, 4), "MONAI UNet (cases.py, seeded), CT-like 128^3 input"),
}


def _input(case: str):
    """The network (eval mode) and its input ``[1, 1, *S]`` of ``case``."""
    import torch

    sys.path[:0] = [os.path.join(ROOT, "SegHiResCAM"), HERE]
    from cases import build_unet, ct_sized_input, mni152_model_input
    if case.startswith("unet"):
        torch.manual_seed(0)  # as cases.prepare: the seeded weights of the other benchmarks
        return build_unet().eval(), torch.from_numpy(ct_sized_input((128,) * 3))[None, None].float()
    from SegHiResCAMLib.models import load_model
    model = load_model("hd-bet")
    return model.network.eval(), mni152_model_input(model, 0 if case == "hdbet-mni" else int(case.split("-")[1]))


def child(case: str, batch: int, threads: int, passes: int) -> dict:
    """One (case, batch) in this process."""
    import hashlib
    import resource
    import time

    import torch

    sys.path.insert(0, os.path.join(ROOT, "SegHiResCAM"))
    from SegHiResCAMLib.engine.faithfulness import auto_batch_size
    from SegHiResCAMLib.engine.outputs import flush_denormals, reusing_freed_memory

    flush_denormals()  # as the command line does
    torch.set_num_threads(threads)
    net, x = _input(case)
    batched = x.repeat((batch,) + (1,) * (x.ndim - 1))
    seconds = []
    with torch.no_grad(), reusing_freed_memory():
        out = net(batched)
        first = hashlib.sha256(out[0].contiguous().numpy().tobytes()).hexdigest()
        del out
        before = resource.getrusage(resource.RUSAGE_SELF)
        for _ in range(passes):
            started = time.perf_counter()
            out = net(batched)
            seconds.append((time.perf_counter() - started) / batch)
            del out
        after = resource.getrusage(resource.RUSAGE_SELF)
    inputs = passes * batch
    seconds.sort()
    return {"case": case, "batch": batch, "input_shape": list(x.shape), "s_per_input": seconds,
            "best_s": seconds[0], "median_s": seconds[len(seconds) // 2],
            "user_s_per_input": (after.ru_utime - before.ru_utime) / inputs,
            "system_s_per_input": (after.ru_stime - before.ru_stime) / inputs,
            "minor_faults_per_input": (after.ru_minflt - before.ru_minflt) / inputs,
            "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6, "first_output_sha256": first,
            "auto_batch_size": auto_batch_size(x)}


def run(cases, threads: int, passes: int, repeats: int) -> dict:
    runs = []
    for repeat in range(repeats):
        for case in cases:
            for batch in CASES[case][0]:
                done = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", case, str(batch),
                                       "--threads", str(threads), "--passes", str(passes)],
                                      check=True, capture_output=True, text=True)
                one = json.loads(done.stdout.strip().splitlines()[-1])
                one.update(repeat=repeat, load_average_after=list(os.getloadavg()))
                print("%s, batch %d, repeat %d: %.2f s per input (best)" % (case, batch, repeat, one["best_s"]),
                      flush=True)
                runs.append(one)
    summary = []
    for case in cases:
        alone = [r for r in runs if r["case"] == case and r["batch"] == 1]
        for batch in CASES[case][0]:
            mine = [r for r in runs if r["case"] == case and r["batch"] == batch]
            summary.append({"case": case, "batch": batch,
                            "speedup_per_repeat": [a["best_s"] / b["best_s"] for a, b in zip(alone, mine)],
                            "peak_rss_gb": [r["peak_rss_gb"] for r in mine],
                            "identical_to_alone": all(r["first_output_sha256"] == alone[0]["first_output_sha256"]
                                                      for r in mine)})
    return {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "python": platform.python_version(), "cpu_count": os.cpu_count(), "threads": threads, "passes": passes,
            "runs": runs, "summary": summary}


def markdown(result: dict) -> str:
    lines = ["# Batched perturbed inputs on a CPU", "",
             "Made by `python studies/benchmark/bench_batch.py` (its docstring describes the cases) on %s, %d CPU "
             "cores, %d torch threads: per (case, batch) one fresh process, a warm-up batch, then %d timed batches; "
             "the runs alternate. Raw numbers: `benchmarks/results/batch.json`." % (
                 result["date"], result["cpu_count"], result["threads"], result["passes"]), "",
             "| case | batch | s per input (best), per repeat | speed-up over batch 1, per repeat | user + system s "
             "per input | minor faults per input | peak RSS GB | output = batch 1's | batch picked by "
             "`auto_batch_size` |", "|---|---|---|---|---|---|---|---|---|"]
    for s in result["summary"]:
        mine = [r for r in result["runs"] if r["case"] == s["case"] and r["batch"] == s["batch"]]
        lines.append("| %s | %d | %s | %s | %s | %s | %s | %s | %d |" % (
            CASES[s["case"]][1], s["batch"], " / ".join("%.2f" % r["best_s"] for r in mine),
            " / ".join("%.2f" % v for v in s["speedup_per_repeat"]),
            " / ".join("%.1f + %.1f" % (r["user_s_per_input"], r["system_s_per_input"]) for r in mine),
            " / ".join("%.0fk" % (r["minor_faults_per_input"] / 1e3) for r in mine),
            " / ".join("%.1f" % v for v in s["peak_rss_gb"]), "yes" if s["identical_to_alone"] else "no",
            mine[0]["auto_batch_size"]))
    lines += ["", "Load average (1 minute) after each run: %s." % ", ".join(
        "%.1f" % r["load_average_after"][0] for r in result["runs"]), ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", default=",".join(CASES), help="comma-separated, of %s" % ", ".join(CASES))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--passes", type=int, default=2, help="timed batches per run (default 2)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", default=RESULTS, help="output folder (default benchmarks/results)")
    parser.add_argument("--child", nargs=2, metavar=("CASE", "BATCH"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child[0], int(args.child[1]), args.threads, args.passes)))
        return 0
    cases = [c for c in args.cases.split(",") if c]
    unknown = [c for c in cases if c not in CASES]
    if unknown:
        parser.error("unknown case(s) %s; choose from %s" % (", ".join(unknown), ", ".join(CASES)))
    sys.path.insert(0, HERE)
    from bench_malloc import write_results
    write_results(args.out, "batch", run(cases, args.threads, args.passes, args.repeats), markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
