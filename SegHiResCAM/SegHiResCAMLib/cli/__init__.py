"""The ``seghirescam`` command line: :func:`main` (the console script), one module per command."""

from .app import main

__all__ = ["main"]
