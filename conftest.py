"""Repository-root pytest hooks, for the package's docstring examples.

``pyproject.toml`` runs ``--doctest-modules`` over ``SegHiResCAM/SegHiResCAMLib`` beside ``Testing/``, so every
module of the package is imported and its ``>>>`` examples run. The modules under ``slicer_logic/`` import
``slicer``: before one is collected, ``Testing/slicer_standalone.setup()`` (idempotent) puts in place the real
MRML of slicer-core and the stand-ins for Slicer's Qt parts, as the Slicer tests under ``Testing/`` do.
(``Testing/`` is on ``sys.path`` through the ``pythonpath`` ini option.)
"""

import os

import torch

PACKAGE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "SegHiResCAM", "SegHiResCAMLib")
SLICER_LOGIC = os.path.join(PACKAGE, "slicer_logic")

# the same thread count as Testing/conftest.py, for the docstring examples too
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def pytest_collect_file(file_path, parent):
    """Set up ``slicer`` before a ``slicer_logic`` module is imported for its doctests; collect nothing."""
    if str(file_path).startswith(SLICER_LOGIC + os.sep) and file_path.suffix == ".py":
        import slicer_standalone

        slicer_standalone.setup()
    return None
