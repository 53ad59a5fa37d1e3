"""CAM methods, one file each; every method overrides only ``combine(A, G)``."""

from typing import Dict, Type

from ...errors import InputError, close_matches
from .base import CAMMethod
from .grad_cam_pp import GradCAMPlusPlus
from .layer_cam import LayerCAM
from .seg_grad_cam import SegGradCAM
from .seg_hires_grad_cam import SegHiResGradCAM
from .seg_xres_cam import SegXResCAM
from .xgrad_cam import XGradCAM

METHODS: Dict[str, Type[CAMMethod]] = {
    cls.name: cls for cls in (SegHiResGradCAM, SegGradCAM, SegXResCAM, GradCAMPlusPlus, LayerCAM, XGradCAM)
}

#: the default method (Rheude et al. 2024)
DEFAULT_METHOD = SegHiResGradCAM.name


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


__all__ = ["CAMMethod", "METHODS", "DEFAULT_METHOD", "get_method", "SegGradCAM", "SegHiResGradCAM",
           "SegXResCAM", "GradCAMPlusPlus", "LayerCAM", "XGradCAM"]
