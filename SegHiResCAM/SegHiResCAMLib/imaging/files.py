"""Image files <-> numpy arrays plus an explicit :class:`~SegHiResCAMLib.geometry.Geometry` (SimpleITK).

Supported: NIfTI (``.nii``, ``.nii.gz``), NRRD (``.nrrd``, ``.nhdr``), MetaImage (``.mha``, ``.mhd``) and DICOM
series (a folder). Arrays are in numpy order ``(z, y, x)``; multi-component (vector / RGB) images put the
components last, ``(z, y, x, C)``. Pixel types are kept as the file stores them.

Coordinates: ITK / SimpleITK, DICOM and therefore every :class:`Geometry` here are **LPS** (x to the patient's
Left, y to Posterior, z to Superior). 3D Slicer displays in **RAS** (Right, Anterior, Superior): the first two
physical axes are negated. SimpleITK converts NIfTI's RAS header to LPS while reading, so no flipping is ever
needed in this module; only the Slicer bridge converts, via :meth:`Geometry.ijk_to_ras`.

Writes are atomic: the file is written under a hidden temporary name in the target folder and moved onto the
target with :func:`os.replace`, so a crash never leaves a half-written image under the real name.

This module never imports slicer, qt, vtk or torch.
"""

import os
import shutil
import uuid
from typing import Callable, Optional, Sequence, Tuple

import numpy as np
import SimpleITK as sitk

from ..errors import InputError
from ..geometry import Geometry
from .conversion import SUPPORTED, from_sitk, sitk_reason, to_sitk, write_error
from .dicom import prepare_dicom, read_dicom_folder, write_dicom_atomic

#: file name endings this module reads and writes (checked longest first)
IMAGE_EXTENSIONS = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")


# ---------------------------------------------------------------------------------------------------- reading
def read_sitk(path: str) -> sitk.Image:
    """Read an image file or a DICOM series folder as a SimpleITK image.

    Args:
        path: a ``.nii``/``.nii.gz``/``.nrrd``/``.nhdr``/``.mha``/``.mhd`` file, or a folder of DICOM files (the
            series with the most files is read).

    Returns:
        The image, with the file's pixel type.

    Raises:
        InputError: the path is missing, has an unknown extension, or cannot be read.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise InputError(f"Image '{path}' does not exist; check the path ({SUPPORTED}).")
    if os.path.isdir(path):
        return read_dicom_folder(path)
    if path.lower().endswith((".png", ".jpg", ".jpeg")):  # a 2D picture (imaging/pictures.py)
        try:
            return sitk.ReadImage(path)
        except RuntimeError as exc:
            raise InputError(f"Could not read the picture '{path}': {sitk_reason(exc)}.") from exc
    if _extension(path) is None:
        hint = " (for DICOM give the folder that holds the series)" if path.lower().endswith(".dcm") else ""
        raise InputError(f"Image '{path}' has an unknown file type{hint}; {SUPPORTED}; pictures: .png, .jpg, .jpeg "
                         "(2D, read only).")
    try:
        return sitk.ReadImage(path)
    except RuntimeError as exc:
        raise InputError(
            f"Could not read image '{path}': {sitk_reason(exc)}. The file may be corrupt, truncated or not "
            f"really of the type its name says; re-export it ({SUPPORTED})."
        ) from exc


def read_image(path: str) -> Tuple[np.ndarray, Geometry]:
    """Read an image file or DICOM series folder as a numpy array plus its geometry.

    Args:
        path: see :func:`read_sitk`.

    Returns:
        ``(array, geometry)``: the array in numpy order ``(z, y, x)`` (``(z, y, x, C)`` for vector images) with
        the file's pixel type, and the grid in LPS.

    Example:
        >>> from SegHiResCAMLib.imaging.sample_data import robex_atlas
        >>> array, geometry = read_image(robex_atlas()[0])
        >>> array.shape == geometry.array_shape, geometry.spacing
        (True, (1.5, 1.5, 1.5))
    """
    return from_sitk(read_sitk(path))



# ---------------------------------------------------------------------------------------------------- writing
def write_image(
    path: str, array: np.ndarray, geometry: Geometry, compress: bool = True, protect: Sequence[str] = ()
) -> None:
    """Write an array with its geometry, atomically, choosing the format from ``path``.

    Args:
        path: a ``.nii``/``.nii.gz``/``.nrrd``/``.nhdr``/``.mha``/``.mhd`` file, or a folder path without an
            image extension (new, empty, or holding only ``.dcm`` files) for a DICOM series. Missing parent
            folders are created.
        array: see :func:`to_sitk`.
        geometry: the grid of the array.
        compress: compress the pixel data where the format allows (not DICOM; ``.nii`` is never compressed,
            ``.nii.gz`` always).
        protect: input paths that must never be overwritten (e.g. the scan the heatmap was computed from).

    DICOM output (3D scalar only) is a CT Image Storage series (the IOD that carries both the image plane and
    rescale tags). Integer data is stored as is (``int64`` must fit ``int32``); float data is stored as 16-bit
    integers with RescaleSlope/RescaleIntercept, so it reads back within ``slope / 2``, exactly when all values
    are whole numbers within 16 bits. A left-handed direction cannot be expressed in DICOM: the slice order is
    reversed, which describes the same voxels in space, on a right-handed grid.

    Raises:
        InputError: bad path, array or geometry, an output that is a protected input, or a failed write.
        InternalError: an unexpected failure; nothing is left under the target name.
    """
    path = os.fspath(path)
    target = os.path.abspath(path)
    check_not_protected(target, protect)
    ext = _extension(path)
    if ext is None and not _is_folder_path(path):
        raise InputError(f"Output '{path}' has an unknown file type; {SUPPORTED} (a folder path without extension).")
    image = prepare_dicom(array, geometry) if ext is None else to_sitk(array, geometry)
    parent = os.path.dirname(target)
    try:
        os.makedirs(parent, exist_ok=True)
    except OSError as exc:
        raise InputError(f"Cannot create output folder '{parent}': {exc}.") from exc
    if ext is None:
        write_dicom_atomic(image, target)
    else:
        _write_file_atomic(image, target, compress)


def _write_file_atomic(image: sitk.Image, target: str, compress: bool) -> None:
    """Write into a hidden temporary folder beside ``target``, then move the file(s) into place.

    A temporary *folder* holding ``<name>.<ext>`` (rather than a temporary file name) keeps the header of
    ``.mhd`` / ``.nhdr`` files pointing at the right data file name after the move.
    """
    folder, name = os.path.split(target)
    tmp = os.path.join(folder, f".tmp-{uuid.uuid4().hex[:12]}-{name}.d")
    try:
        os.mkdir(tmp)
        sitk.WriteImage(image, os.path.join(tmp, name), compress)
        written = sorted(os.listdir(tmp), key=lambda f: f == name)  # header last: data first
        for file_name in written:
            os.replace(os.path.join(tmp, file_name), os.path.join(folder, file_name))
    except Exception as exc:
        raise write_error(target, exc) from exc
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# ---------------------------------------------------------------------------------------------------- helpers
def _extension(path: str) -> Optional[str]:
    """Return the supported image extension of ``path`` (lower case), or None."""
    lower = path.lower()
    return next((ext for ext in IMAGE_EXTENSIONS if lower.endswith(ext)), None)


def _is_folder_path(path: str) -> bool:
    """Tell whether ``path`` names a folder: an existing one, one ending in a separator, or a name without '.'."""
    if os.path.isdir(path) or path.endswith(("/", os.sep)):
        return True
    return not os.path.exists(path) and os.path.splitext(os.path.basename(path))[1] == ""


def atomic_write(path: str, write: Callable[[str], object], protect: Sequence[str] = ()) -> None:
    """Write a non-image output atomically: ``write(tmp)`` fills a temporary file in the target folder, which is
    then renamed onto ``path``; the temporary file never survives a failure, and ``protect`` paths are refused.

    Raises:
        InputError: ``path`` is a protected input, or the folder cannot be written.
    """
    target = os.path.abspath(os.fspath(path))
    check_not_protected(target, list(protect))
    folder = os.path.dirname(target)
    tmp = os.path.join(folder, ".tmp-%d-%s" % (os.getpid(), os.path.basename(target)))
    try:
        os.makedirs(folder, exist_ok=True)
        write(tmp)
        os.replace(tmp, target)
    except OSError as exc:
        raise InputError("cannot write %r: %s" % (path, exc)) from exc
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def check_not_protected(target: str, protect: Sequence[str]) -> None:
    """Raise InputError when ``target`` is (or, for a folder, contains) one of the ``protect`` paths."""
    if isinstance(protect, (str, os.PathLike)):
        protect = [protect]
    real_target = os.path.realpath(target)
    for item in protect:
        real = os.path.realpath(os.fspath(item))
        same = real == real_target
        if not same and os.path.exists(real) and os.path.exists(real_target):
            same = os.path.samefile(real, real_target)
        inside = os.path.isdir(real_target) and real.startswith(real_target.rstrip(os.sep) + os.sep)
        if same or inside:
            raise InputError(
                f"Refusing to overwrite the input '{item}' with output '{target}'; choose another output path."
            )

