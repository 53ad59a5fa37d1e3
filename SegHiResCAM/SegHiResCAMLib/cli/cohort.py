"""``seghirescam cohort``: every case of a manifest explained and scored (:mod:`SegHiResCAMLib.analysis.cohort`),
on a local Dask cluster, a running Dask scheduler or a plain loop; resumable; one table and a report."""

import argparse
import json
import os
import sys

from .. import catalog
from ..errors import InputError
from . import common

COMMAND = "cohort"

EPILOG = """manifest: a CSV with one row per case: case_id, image (or image_1, image_2, ...), and optionally reference
(ground-truth mask), class (index or name), segment (mask explained instead of the prediction), label.
Relative paths are read from the manifest's folder. Rerunning into the same --out skips the finished cases.
examples:
  seghirescam cohort cases.csv --out results/ --model mypkg.nets:unet --weights unet.pt
  seghirescam cohort cases.csv --out results/ --model hd-bet --sa-score --scheduler tcp://10.0.0.5:8786
"""


def add_parser(subparsers) -> None:
    """Register ``cohort`` on the ``seghirescam`` sub-command parser."""
    p = subparsers.add_parser(COMMAND, help="explain and score every case of a manifest (resumable, on Dask)",
                              epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("manifest", help="CSV: case_id, image, [reference, class, segment, label]")
    p.add_argument("--out", required=True, help="output folder: cases/<case_id>/, cohort.csv, cohort.md, figures")
    common.add_model_args(p)
    work = p.add_argument_group("what to compute per case (default: --explain --sa-score; the prediction is "
                                "always written)")
    work.add_argument("--explain", action="store_true", help="heatmap of the target and its mass in/out of it")
    work.add_argument("--sa-score", action="store_true", help="mean SA score (ProtoSeg; needs no ground truth)")
    work.add_argument("--predict", action="store_true", help="the prediction (alone: one pass, no gradients)")
    work.add_argument("--check", choices=["quick", "none"], default="none",
                      help="quick: a one-line verdict on each case's heatmap (model randomisation rho, deletion AUC "
                           "vs random; 0.9-2.9x one explain run per case) in cohort.csv and cohort.md; implies "
                           "--explain")
    common.add_class_arg(p)
    p.add_argument("--method", default=catalog.DEFAULT_METHOD, choices=sorted(catalog.method_names()),
                   help="default: %(default)s")
    p.add_argument("--layer", default="auto", help="layer name, or auto (default)")
    common.add_score_arg(p)
    p.add_argument("--sa-layers", default="features", help="features (default: one pass) or all")
    run = p.add_argument_group("where it runs")
    run.add_argument("--scheduler", default="local",
                     help="local (default: a Dask cluster of worker processes on this machine), none (a plain loop "
                          "in this process) or the address of a running Dask scheduler, e.g. tcp://host:8786")
    run.add_argument("--cluster", choices=["slurm", "pbs"], help="start the workers as batch jobs (dask-jobqueue)")
    run.add_argument("--workers", type=int, help="worker processes (default: from the cores and memory; 0: plain loop)")
    run.add_argument("--worker-memory", help="memory per worker, e.g. 6GiB (sizes the local cluster; default 4GiB)")
    p.add_argument("--retry-failed", action="store_true", help="compute the cases recorded as failed again")
    p.add_argument("--no-report", action="store_true", help="write the table only (no cohort.md, no figures)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    """Run ``seghirescam cohort``; user errors raise :class:`~SegHiResCAMLib.errors.SegHiResCAMError`."""
    from ..analysis.cohort import CohortOptions, ModelSpec, run_cohort
    if args.workers is not None and args.workers < 0:
        raise InputError("--workers must be >= 0 (0: a plain loop in this process), got %d" % args.workers)
    if args.sa_layers not in ("features", "all"):
        raise InputError("--sa-layers must be features or all, got %r" % args.sa_layers)
    explain, sa = args.explain, args.sa_score
    if not (explain or sa or args.predict):
        explain = sa = True
    check = None if args.check == "none" else args.check
    explain = explain or check is not None  # the check is of the heatmap
    options = CohortOptions(explain=explain, sa_score=sa, predict=True, class_=args.class_, method=args.method,
                            layer=args.layer, score=args.score, sa_layers=args.sa_layers, device=args.device,
                            threads=args.threads, quick_check=check)
    model = ModelSpec(args.model, weights=common.weights_file(args), trust_model=args.trust_model, card=common.model_card(args),
                      model_args=json.dumps(json.loads(args.model_args), sort_keys=True) if args.model_args else None)
    try:
        frame = run_cohort(args.manifest, args.out, model, options, scheduler=args.scheduler, workers=args.workers,
                           cluster=args.cluster, worker_memory=args.worker_memory, retry_failed=args.retry_failed,
                           progress=not args.quiet)
    except KeyboardInterrupt:  # not "nothing was written": the finished cases are kept and reused
        print("seghirescam: cohort interrupted; the finished cases are kept in %s: run the same command again to "
              "continue" % os.path.join(args.out, "cases"), file=sys.stderr)
        return 130
    if not args.no_report:
        from ..reporting.cohort import write_report
        report = write_report(frame, args.out)
        print("report: %s" % report)
    failed = frame[frame["status"] == "failed"]
    print("%d cases: %d done, %d failed, %d reused from an earlier run; table: %s/cohort.csv"
          % (len(frame), int((frame["status"] == "done").sum()), len(failed), int(frame["reused"].sum()), args.out))
    for _, row in failed.iterrows():
        print("seghirescam: case %s failed: %s" % (row["case_id"], row["error"]), file=sys.stderr)
    return 0
