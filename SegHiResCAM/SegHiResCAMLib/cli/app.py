"""The ``seghirescam`` command line: builds the parser from the command modules and runs one command.

Errors made by the user print one line on stderr and exit with status 2; internal failures exit with 1
(set ``SEGHIRESCAM_DEBUG=1`` for a traceback). Outputs are written atomically and never over an input.
"""

import argparse
import os
import sys
import time
from typing import List, Optional

from .. import __version__
from ..errors import CancelledError, InputError, SegHiResCAMError
from . import cohort, common, demo, evaluate, explain, layers, predict, sa_score

#: the commands, in the order of ``seghirescam --help``
COMMANDS = (explain, predict, demo, layers, evaluate, sa_score, cohort)


def build_parser() -> argparse.ArgumentParser:
    """The ``seghirescam`` parser with one sub-parser per command."""
    parser = argparse.ArgumentParser(prog="seghirescam", description="Class-activation heatmaps that explain "
                                     "2D/3D medical segmentation models.", epilog=common.EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version="seghirescam %s" % __version__)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for command in COMMANDS:
        command.add_parser(sub)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    """Run ``seghirescam`` with ``argv`` (default: ``sys.argv[1:]``); returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    from ..engine.outputs import flush_denormals  # before torch starts its threads: they inherit it
    flush_denormals()
    if not args.command:
        parser.print_help(sys.stderr)
        return 2
    started = time.perf_counter()
    try:
        common.parse_model_args(args)
        if getattr(args, "threads", None) is not None:
            if args.threads < 1:
                raise InputError("--threads must be >= 1, got %d" % args.threads)
            import torch
            torch.set_num_threads(args.threads)
        return {command.COMMAND: command.run for command in COMMANDS}[args.command](args)
    except CancelledError:
        print("seghirescam: cancelled; nothing was written", file=sys.stderr)
        return CancelledError.exit_code
    except SegHiResCAMError as exc:
        print("seghirescam: error: %s" % exc, file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("seghirescam: cancelled; nothing was written", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - the last line of defence: one line, exit 1
        if os.environ.get("SEGHIRESCAM_DEBUG"):
            raise
        print("seghirescam: internal error after %.1f s: %s: %s (set SEGHIRESCAM_DEBUG=1 for a traceback)"
              % (time.perf_counter() - started, type(exc).__name__, exc), file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
