"""What ``seghirescam explain --check quick`` costs next to one explain run (issue 18, part 4: "a ``--check quick``
verdict within 2x one explain run").

Each case runs ``explain_image`` (the function behind ``seghirescam explain``, with the CLI's denormal flushing)
alone and with ``check="quick"`` on the same model, image and target, alternating the two ``--repeats`` times after
one untimed warm-up of each, in one process per case and source tree. Reported: the wall seconds of every run, the
median of each kind, their ratio (explain + check over explain: the issue's limit is 2, the aim 1 + 1 = the check
costing at most one explain run) and the check's own seconds (``metadata["timings"]["check_s"]``).

- ``hdbet``: HD-BET fold 0 (the bundled model) on a central crop of the bundled ROBEX atlas T1 (the sample MRI of
  ``seghirescam demo``; ``--hdbet-size``, default 96^3, 0 = the whole 155x150x116 scan), its default layer, the
  predicted brain (class 1).
- ``unet``: the MONAI UNet of the other benchmarks (``cases.py``: 16-256 channels, 2 residual units, seeded
  weights, layer ``model.1.submodule.1.submodule.2``) on ``cases.ct_sized_input`` of ``--unet-size`` voxels per axis
  (default 128), the predicted class 1 (half the input: the check's deletion runs on the whole input).
- ``unet-click``: the same UNet on ``--click-size`` voxels per axis (default 192, 1 mm voxels; from 224 on, the
  memory plan of a 23 GiB machine runs it in windows, where the check does not run), class 1 in a ball of
  10 mm around the centre voxel (a clicked voxel, as in the Slicer module): a small target in a large image. Until
  commit 6c8fd84 its check perturbed and scored only the target's box; the UNet's instance normalisation scores that
  box unlike the whole input, so the check now runs on the whole input (``choose_stand_in``; each run records its
  box and precision).

Several source trees can be measured in one call (``--tree before=DIR --tree after=.``, each a checkout holding
``SegHiResCAM/``), e.g. the code before and after a change; the results name each tree's commit.

    .venv/bin/python studies/benchmark/bench_check.py               # -> benchmarks/results/check.{json,md}
    .venv/bin/python studies/benchmark/bench_check.py --quick       # 64^3 inputs, 1 repeat -> benchmarks/.work-quick/

The machine this runs on may be shared: the 1/5/15-minute load averages are recorded at the start and the end of
every case, and the runs alternate so that a change of load reaches both kinds alike.
"""

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
OUT = os.path.join(ROOT, "benchmarks", "results")
QUICK_OUT = os.path.join(ROOT, "benchmarks", ".work-quick")


def commit_of(tree: str) -> str:
    try:
        name = subprocess.run(["git", "-C", tree, "log", "-1", "--format=%h"], capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", tree, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, check=True).stdout.strip()
        return name + (" + uncommitted changes" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def load_average():
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return [float("nan")] * 3


# ------------------------------------------------------------------------------------------ one case (worker)
def _case(name: str, size: int):
    """``(model, image, geometry, layer, title, target)`` of one case (module docstring)."""
    import numpy as np
    import torch
    from SegHiResCAMLib.analysis.explain import TargetSpec
    from SegHiResCAMLib.geometry import Geometry
    from SegHiResCAMLib.models import load_model
    if name == "hdbet":
        from SegHiResCAMLib.analysis.evaluate import crop_image
        from SegHiResCAMLib.imaging import files as io
        from SegHiResCAMLib.imaging.sample_data import robex_atlas
        image, geometry = io.read_image(robex_atlas()[0])
        image = image.astype(np.float32)
        title = "HD-BET fold 0, ROBEX atlas T1 %s" % "x".join(str(s) for s in image.shape)
        if size:
            image, geometry, _ = crop_image(image, geometry, (size,) * 3)
            title += ", central %s crop" % "x".join(str(s) for s in image.shape)
        return load_model("hd-bet"), image, geometry, "auto", title, TargetSpec(class_index=1)
    sys.path.insert(0, HERE)
    from cases import UNET_LAYER, build_unet, ct_sized_input
    from SegHiResCAMLib.models.base import Preprocessing, SegModel
    torch.manual_seed(0)  # as cases.prepare: the seeded weights of the other benchmarks
    network = build_unet().eval()
    model = SegModel(network=network, name="monai-unet", preprocessing=Preprocessing(divisible_by=16),
                     output="logits")
    image = ct_sized_input((size,) * 3)
    geometry = Geometry(size=(size,) * 3, spacing=(1.0,) * 3, origin=(0.0,) * 3,
                        direction=tuple(np.eye(3).flatten()))
    title = "MONAI UNet (cases.py, seeded), CT-like %d^3 input" % size
    if name == "unet-click":
        return (model, image, geometry, UNET_LAYER, title + ", 10 mm ball at the centre",
                TargetSpec(class_index=1, voxel=(size // 2,) * 3, radius_mm=10.0))
    return model, image, geometry, UNET_LAYER, title, TargetSpec(class_index=1)


def _checked_box(meta: dict):
    """The box the check's deletion ran on (``None``: the whole input); an error when the check did not run."""
    if "deletion" not in meta["check"]:
        raise RuntimeError("the check did not run (%s): use a smaller input" % meta["check"]["verdict"])
    return meta["check"]["deletion"]["box"]


def worker(name: str, size: int, repeats: int, threads: int) -> dict:
    import torch
    from SegHiResCAMLib import __version__
    from SegHiResCAMLib.analysis.explain import explain_image
    from SegHiResCAMLib.engine.outputs import flush_denormals
    torch.set_num_threads(threads)
    flush_denormals()  # as the CLI does (cli/app.py)
    model, image, geometry, layer, title, target = _case(name, size)

    def run(check):
        t0 = time.perf_counter()
        got = explain_image(model, image, geometry, [target], layers=layer, device="cpu", check=check)
        return time.perf_counter() - t0, got.metadata

    load_start = load_average()
    run(None)  # warm-up: the first call pays one-off costs (allocator, kernel selection) for both kinds
    run("quick")
    runs = []
    for i in range(repeats):
        for check in ((None, "quick") if i % 2 == 0 else ("quick", None)):
            seconds, meta = run(check)
            timings = meta["timings"]
            runs.append({"kind": "explain + check" if check else "explain", "seconds": seconds,
                         "cam_s": timings["cam_s"], "check_s": timings.get("check_s"), "load_1min": load_average()[0],
                         "verdict": meta.get("verdict"),
                         "check_box": _checked_box(meta) if check else None,
                         "check_precision": meta["check"]["deletion"].get("precision") if check else None})
    return {"case": name, "title": title, "layer": layer, "version": __version__, "threads": torch.get_num_threads(),
            "torch": torch.__version__, "load_average_start": load_start, "load_average_end": load_average(),
            "runs": runs}


def _median(values):
    values = sorted(values)
    n = len(values)
    return float("nan") if not n else (values[n // 2] if n % 2 else (values[n // 2 - 1] + values[n // 2]) / 2.0)


def summarise(result: dict) -> dict:
    plain = [r["seconds"] for r in result["runs"] if r["kind"] == "explain"]
    checked = [r["seconds"] for r in result["runs"] if r["kind"] == "explain + check"]
    check_s = [r["check_s"] for r in result["runs"] if r["kind"] == "explain + check"]
    pairs = [c / p for p, c in zip(plain, checked)]
    result["summary"] = {"explain_s": _median(plain), "explain_check_s": _median(checked), "check_s": _median(check_s),
                         "ratio": _median(checked) / _median(plain), "pair_ratios": pairs,
                         "check_over_explain": _median(check_s) / _median(plain),
                         "verdict": next(r["verdict"] for r in result["runs"] if r["verdict"]),
                         "precision": next((r.get("check_precision") for r in result["runs"]
                                            if r.get("check_precision")), None)}
    return result


# ---------------------------------------------------------------------------------------------------- report
def markdown(data: dict) -> str:
    lines = ["# `explain --check quick` against one explain run", "",
             "Made %s by `%s` on %s (%d CPU cores), torch threads %d. Raw numbers: `check.json` next to this file. "
             "Each row: one process per case and source tree, one untimed warm-up of each kind, then `repeats` runs "
             "of each kind (see `check.json`), alternating; medians of the wall seconds of `explain_image` (the "
             "function behind `seghirescam explain`, denormals flushed as the CLI does). Ratio: explain + check over "
             "explain alone (issue 18 part 4 asks for the check within 2x one explain run, i.e. `check s / explain "
             "s` <= 2, ratio <= 3; the aim was the check within 1x, ratio <= 2). `check s`: the check's own seconds "
             "(`metadata.timings.check_s`), median." % (data["date"], data["command"], data["machine"],
                                                       data["cpu_count"], data["threads"]), "",
             "| tree | commit | case | explain s | explain + check s | ratio | check s / explain s | per-pair ratios "
             "| load avg start -> end | verdict |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in data["results"]:
        s = r["summary"]
        lines.append("| %s | %s | %s | %.1f | %.1f | **%.2f** | %.2f | %s | %s -> %s | %s |" % (
            r["tree"], r["commit"], r["title"] + (", check in %s" % s["precision"] if s.get("precision") else ""),
            s["explain_s"], s["explain_check_s"], s["ratio"],
            s["check_over_explain"], ", ".join("%.2f" % p for p in s["pair_ratios"]),
            "/".join("%.1f" % v for v in r["load_average_start"]), "/".join("%.1f" % v for v in r["load_average_end"]),
            s["verdict"]))
    lines += ["", "Load averages are 1/5/15-minute figures of the whole (shared) machine; a load above the core count "
              "means other jobs ran at the same time, slowing both kinds of run.", ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", default="hdbet,unet,unet-click", help="comma-separated, of hdbet, unet and "
                        "unet-click (default: all three)")
    parser.add_argument("--hdbet-size", type=int, default=96, help="central crop of the ROBEX atlas, voxels per axis "
                        "(default 96; 0: the whole scan)")
    parser.add_argument("--unet-size", type=int, default=128, help="UNet input, voxels per axis (default 128)")
    parser.add_argument("--click-size", type=int, default=192,
                        help="unet-click's input, voxels per axis (default 192)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of each kind per case (default 3)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--tree", action="append", help="LABEL=DIR, a checkout to measure (repeat; default: "
                        "current=<this repository>)")
    parser.add_argument("--quick", action="store_true", help="64^3 inputs, 1 repeat, results in benchmarks/.work-quick/")
    parser.add_argument("--out", help="folder of check.json and check.md (default benchmarks/results)")
    parser.add_argument("--append", action="store_true", help="add these rows to the check.json already in --out "
                        "(e.g. a tree measured later); check.md then names every command")
    parser.add_argument("--worker", nargs=2, metavar=("CASE", "SIZE"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args.worker[0], int(args.worker[1]), args.repeats, args.threads)))
        return 0
    if args.quick:
        args.hdbet_size, args.unet_size, args.click_size, args.repeats = 64, 64, 96, 1
    out = args.out or (QUICK_OUT if args.quick else OUT)
    trees = [t.split("=", 1) for t in (args.tree or ["current=" + ROOT])]
    commits = {tree: commit_of(tree) for _, tree in trees}  # before any case: the results written below dirty "."
    shown = " ".join(argv if argv is not None else sys.argv[1:])
    for label, tree in trees:  # no local paths in the committed command: a tree is named by its commit
        if tree != ".":
            shown = shown.replace("=" + tree, "=<checkout of %s>" % commits[tree].split()[0])
    command = ("python studies/benchmark/bench_check.py " + shown).strip()
    stamp = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    data = {"command": command, "date": stamp, "machine": platform.machine(), "cpu_count": os.cpu_count(),
            "threads": args.threads, "results": []}
    if args.append and os.path.exists(os.path.join(out, "check.json")):
        with open(os.path.join(out, "check.json")) as handle:
            data = json.load(handle)
        data["command"] += "`, then `" + command
        data["date"] += ", then " + stamp
    sizes = {"hdbet": args.hdbet_size, "unet": args.unet_size, "unet-click": args.click_size}
    for name in args.cases.split(","):
        for label, tree in trees:
            print("%s on %s (%s) ..." % (name, label, tree), file=sys.stderr, flush=True)
            env = dict(os.environ, PYTHONPATH=os.path.join(os.path.abspath(tree), "SegHiResCAM"))
            proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--worker", name, str(sizes[name]),
                                   "--repeats", str(args.repeats), "--threads", str(args.threads)], env=env,
                                  capture_output=True, text=True)
            if proc.returncode:
                sys.stderr.write(proc.stderr)
                return proc.returncode
            result = summarise(json.loads(proc.stdout.strip().splitlines()[-1]))
            result.update(tree=label, commit=commits[tree], command=command, date=stamp, repeats=args.repeats)
            data["results"].append(result)
            s = result["summary"]
            print("  explain %.1f s, explain + check %.1f s, ratio %.2f" % (s["explain_s"], s["explain_check_s"],
                                                                           s["ratio"]), file=sys.stderr, flush=True)
            _write(out, data)  # after every case: a later failure keeps the rows measured
    print(os.path.join(out, "check.md"))
    return 0


def _write(out: str, data: dict) -> None:
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "check.json"), "w") as handle:
        json.dump(data, handle, indent=1)
    with open(os.path.join(out, "check.md"), "w") as handle:
        handle.write(markdown(data))


if __name__ == "__main__":
    sys.exit(main())
