"""numpy arrays plus an explicit :class:`~SegHiResCAMLib.geometry.Geometry` <-> SimpleITK images, and SimpleITK
failures turned into the project's errors (the plumbing under :mod:`.files`, :mod:`.dicom` and :mod:`.resample`).

Arrays are in numpy order ``(z, y, x)``; multi-component (vector / RGB) images put the components last,
``(z, y, x, C)``. Geometries are LPS, like ITK's. This module never imports slicer, qt, vtk or torch.
"""

import re
from typing import List, Tuple

import numpy as np
import SimpleITK as sitk

from ..errors import InputError, InternalError
from ..geometry import Geometry

#: what the image readers and writers accept, for messages
SUPPORTED = "supported: .nii, .nii.gz, .nrrd, .nhdr, .mha, .mhd or a DICOM series folder"


def from_sitk(image: sitk.Image) -> Tuple[np.ndarray, Geometry]:
    """Split a SimpleITK image into a numpy array and its geometry.

    Args:
        image: any scalar or vector SimpleITK image.

    Returns:
        ``(array, geometry)``: array ``(z, y, x)`` or ``(z, y, x, C)`` with the image's pixel type (a copy).
    """
    geometry = Geometry(
        size=image.GetSize(), spacing=image.GetSpacing(), origin=image.GetOrigin(), direction=image.GetDirection()
    )
    return sitk.GetArrayFromImage(image), geometry


def to_sitk(array: np.ndarray, geometry: Geometry) -> sitk.Image:
    """Build a SimpleITK image from a numpy array and a geometry.

    Args:
        array: ``geometry.array_shape`` (scalar) or ``geometry.array_shape + (C,)`` (vector, components last).
            ``bool`` becomes ``uint8`` and ``float16`` becomes ``float32`` (SimpleITK has neither).
        geometry: the grid of the array.

    Returns:
        The image, with the array's pixel type.
    """
    if not isinstance(geometry, Geometry):
        raise InputError(f"geometry must be a Geometry, got {type(geometry).__name__}.")
    array = np.asarray(array)
    shape = geometry.array_shape
    is_vector = array.ndim == len(shape) + 1 and array.shape[:-1] == shape
    if array.shape != shape and not is_vector:
        raise InputError(
            f"Array shape {array.shape} does not fit the geometry: expected {shape} (scalar) or {shape + ('C',)} "
            "(vector, components last), numpy order (z, y, x)."
        )
    if array.dtype == np.bool_:
        array = array.astype(np.uint8)
    elif array.dtype == np.float16:
        array = array.astype(np.float32)
    elif array.dtype.kind not in "iufc":
        raise InputError(f"Array dtype {array.dtype} cannot be stored in an image; use an integer or float type.")
    image = sitk.GetImageFromArray(np.ascontiguousarray(array), isVector=is_vector)
    image.SetSpacing(geometry.spacing)
    image.SetOrigin(geometry.origin)
    image.SetDirection(geometry.direction)
    return image


def write_error(target: str, exc: BaseException) -> Exception:
    """Turn a failure while writing ``target`` into the project's error type (user-fixable or internal)."""
    if isinstance(exc, InputError):
        return exc
    if isinstance(exc, (OSError, RuntimeError)):
        reason = sitk_reason(exc) if isinstance(exc, RuntimeError) else str(exc)
        return InputError(
            f"Could not write '{target}': {reason}. Check that the folder is writable and has free space; "
            "nothing was written under that name."
        )
    return InternalError(f"Unexpected failure while writing '{target}': {exc!r}; nothing was written.")


def sitk_reason(exc: BaseException) -> str:
    """Shorten a SimpleITK exception to its useful last part (drops build paths and line numbers)."""
    text = " ".join(str(exc).split())
    parts: List[str] = re.split(r"ITK ERROR: \w+\(0x[0-9a-f]+\): |\.cxx:\d+:? ", text)
    reason = parts[-1].strip() or text
    return reason[:300]
