"""The one error family of SegHiResCAM.

Every user-facing failure is a :class:`SegHiResCAMError`. Its message says what was given, what is allowed and
what to do. The command line prints the message on one line and exits with :attr:`exit_code` (2 for bad input,
1 for an internal failure); Slicer shows it through ``slicer.util.tryWithErrorDisplay``.

This module imports only the standard library so that every layer (engine, models, io, mrml, cli) can use it.
"""

import difflib
from typing import Iterable, List


class SegHiResCAMError(Exception):
    """Base class of all errors raised on purpose by SegHiResCAM."""

    #: exit status of the command line for this error
    exit_code = 2


class InputError(SegHiResCAMError):
    """The user gave something unusable: a file, an image, a mask, an option."""


class LayerError(InputError):
    """A layer name that the model does not have, or a layer that cannot be explained."""


class TargetError(InputError):
    """The explained target is unusable, e.g. an empty region or a class the model does not output."""


class ModelError(InputError):
    """A model specification or weights file that cannot be loaded, or a model that fails on the input."""


class CancelledError(SegHiResCAMError):
    """The run was cancelled by the user; nothing was written."""

    exit_code = 130


class InternalError(SegHiResCAMError):
    """A failure that is not the user's fault (a bug, or an exhausted resource)."""

    exit_code = 1


def close_matches(name: str, choices: Iterable[str], limit: int = 5) -> List[str]:
    """Return up to ``limit`` entries of ``choices`` that look like ``name`` (for 'did you mean' hints)."""
    choices = list(choices)
    found = difflib.get_close_matches(name, choices, n=limit, cutoff=0.5)
    if not found:
        found = [c for c in choices if name.lower() in c.lower()][:limit]
    return found
