"""``seghirescam demo``: the bundled HD-BET model explained on the bundled ROBEX atlas scan
(:func:`~SegHiResCAMLib.reporting.demo.run_demo`)."""

import argparse
import os
import sys

from . import common

COMMAND = "demo"


def add_parser(subparsers) -> None:
    """Register ``demo`` on the ``seghirescam`` sub-command parser."""
    p = subparsers.add_parser(COMMAND, help="explain the bundled HD-BET model on the bundled ROBEX atlas scan")
    p.add_argument("--out", required=True, help="folder for the results")
    p.add_argument("--device", default="auto", help="auto (default), cpu or cuda")
    p.add_argument("--quiet", action="store_true")


def run(args: argparse.Namespace) -> int:
    """Run ``seghirescam demo`` and print its summary."""
    from ..reporting.demo import run_demo
    progress = common.Progress(args.quiet)
    try:
        data = run_demo(args.out, device=args.device, progress=progress)
    finally:
        progress.close()
    print("Dice vs atlas mask: %.4f" % data["dice"])
    for row in data["heatmaps"]:
        print("%-20s %-10s heat inside/outside brain %.2f  %s" % (row["method"], row["layer"], row["ratio"],
                                                                row["figure"]))
    for row in data["heatmaps"]:  # e.g. Seg-Grad CAM at context5: the gradients' spatial means cancel
        for warning in row.get("warnings") or []:
            print("seghirescam: warning: %s / %s: %s" % (row["method"], row["layer"], warning), file=sys.stderr)
    print("report: %s" % os.path.join(args.out, "report.md"))
    return 0
