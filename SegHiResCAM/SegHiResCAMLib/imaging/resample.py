"""Resampling between grids of the same physical space: :func:`resample_to_grid`, and
:func:`read_mask_on_grid`, the one place where a mask or label map file is read and put on an image's grid.

This module never imports slicer, qt, vtk or torch.
"""

from typing import List, Optional, Tuple

import numpy as np
import SimpleITK as sitk

from ..errors import InputError, InternalError
from ..geometry import Geometry
from .conversion import sitk_reason, to_sitk
from .files import read_image

_INTERPOLATORS = {"nearest": sitk.sitkNearestNeighbor, "linear": sitk.sitkLinear}


def resample_to_grid(
    array: np.ndarray, src: Geometry, dst: Geometry, interpolator: str = "nearest", default: float = 0
) -> np.ndarray:
    """Resample an image from its grid onto another grid (same physical space, identity transform).

    Args:
        array: the image on ``src`` (scalar, or vector with components last).
        src: the grid of ``array``.
        dst: the wanted grid.
        interpolator: ``"nearest"`` for label maps (keeps values and dtype) or ``"linear"`` for heatmaps and
            intensities (returns float32).
        default: value of output voxels that fall outside ``src``.

    Returns:
        Array of shape ``dst.array_shape`` (plus components).
    """
    if interpolator not in _INTERPOLATORS:
        raise InputError(f"Interpolator '{interpolator}' is unknown; use one of {sorted(_INTERPOLATORS)}.")
    if not isinstance(dst, Geometry):
        raise InputError(f"dst must be a Geometry, got {type(dst).__name__}.")
    array = np.asarray(array)
    image = to_sitk(array, src)
    pixel_type = sitk.sitkUnknown  # = the input's
    if interpolator == "linear":
        vector = image.GetNumberOfComponentsPerPixel() > 1
        pixel_type = sitk.sitkVectorFloat32 if vector else sitk.sitkFloat32
    identity = sitk.Transform(dst.ndim, sitk.sitkIdentity)
    try:
        out = sitk.GetArrayFromImage(sitk.Resample(
            image, dst.size, identity, _INTERPOLATORS[interpolator], dst.origin, dst.spacing, dst.direction,
            float(default), pixel_type,
        ))
    except RuntimeError as exc:
        raise InternalError(f"Resampling onto {dst.size} failed: {sitk_reason(exc)}.") from exc
    return out.astype(array.dtype, copy=False) if interpolator == "nearest" else out


def read_mask_on_grid(path: str, geometry: Geometry, label: Optional[float] = None, what: str = "segment",
                      binary: bool = False) -> Tuple[np.ndarray, List[str]]:
    """Read a mask or label map file and put it on the grid of an image (nearest neighbour).

    Args:
        path: the mask file (or DICOM folder); one component.
        geometry: the image's grid.
        label: keep only the voxels of this value (it must occur); ``None``: the values are kept.
        what: the mask's name in messages (``segment``, ``reference``, ``tissue mask``...).
        binary: return a 0/1 ``uint8`` mask, which must hold voxels on the grid.

    Returns:
        ``(mask, notes)``: the mask on ``geometry`` (numpy order) and the notes for the user (a resampling).

    Raises:
        InputError: a multi-component file, a mask that does not overlap the image after resampling, a
            ``label`` that does not occur, or an empty ``binary`` mask.
    """
    mask, mask_geometry = read_image(path)
    if mask.ndim != geometry.ndim:
        raise InputError("the %s %r has %d axes (or several components); give a single-component label map"
                         % (what, path, mask.ndim))
    notes = []
    if not mask_geometry.same_grid(geometry):
        mask = resample_to_grid(mask, mask_geometry, geometry, "nearest")
        notes.append("the %s's grid differs from the image's: resampled onto the image grid (nearest neighbour)"
                     % what)
        if not np.any(mask):
            raise InputError("the %s %r does not overlap the image (empty after resampling onto the image grid); "
                             "check that both are in the same space" % (what, path))
    if label is not None:
        if not np.any(mask == label):
            raise InputError("label %g does not occur in the %s %r" % (label, what, path))
        mask = mask == label
    if binary:
        if not np.any(mask):
            raise InputError("the %s %r is empty on the image grid; check that it lies in the image's space"
                             % (what, path))
        mask = (mask != 0).astype(np.uint8)
    return mask, notes
