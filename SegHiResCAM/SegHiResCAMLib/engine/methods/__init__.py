"""CAM methods, one file each; every method overrides only ``combine(A, G)``.

The table of methods is :data:`SegHiResCAMLib.catalog.METHODS`; this module builds the classes from it.
"""

import importlib
from typing import Dict, Type

from ...catalog import DEFAULT_METHOD, METHODS as CATALOG
from ...errors import InputError, close_matches
from .base import CAMMethod


def _load(implementation: str) -> Type[CAMMethod]:
    module, cls = implementation.split(":")
    return getattr(importlib.import_module("." + module, __name__), cls)


#: method name -> class, in the catalog's order
METHODS: Dict[str, Type[CAMMethod]] = {info.name: _load(info.implementation) for info in CATALOG}


def get_method(method, **options) -> CAMMethod:
    """A method instance from its name (``METHODS``) or an instance passed through unchanged.

    Options go to the method's constructor (e.g. ``pool_size`` for ``seg-xres-cam``); options that the method
    does not take are an error, not silently dropped.
    """
    if isinstance(method, CAMMethod):
        if options:
            raise InputError("options %s given with a method instance; set them on the instance" % sorted(options))
        return method
    if method not in METHODS:
        hints = close_matches(str(method), METHODS)
        raise InputError("unknown method %r%s; choose one of: %s" % (
            method, " (did you mean %s?)" % ", ".join(hints) if hints else "", ", ".join(METHODS)))
    try:
        return METHODS[method](**options)
    except TypeError as exc:
        raise InputError("method %r does not take the option(s) %s" % (method, sorted(options))) from exc


__all__ = ["CAMMethod", "METHODS", "DEFAULT_METHOD", "get_method"]
