"""``python -m SegHiResCAMLib.cli ...``: the ``seghirescam`` command without the console script (e.g. from
Slicer's Python, where no script is installed on the ``PATH``)."""

import sys

from .app import main

if __name__ == "__main__":
    sys.exit(main())
