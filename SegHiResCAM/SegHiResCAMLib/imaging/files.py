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

import logging
import os
import re
import shutil
import uuid
from typing import Callable, List, Optional, Sequence, Tuple

import numpy as np
import SimpleITK as sitk

from ..errors import InputError, InternalError
from ..geometry import Geometry

logger = logging.getLogger(__name__)

#: file name endings this module reads and writes (checked longest first)
IMAGE_EXTENSIONS = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")
SUPPORTED = "supported: .nii, .nii.gz, .nrrd, .nhdr, .mha, .mhd or a DICOM series folder"
_INTERPOLATORS = {"nearest": sitk.sitkNearestNeighbor, "linear": sitk.sitkLinear}
_DICOM_INT_TYPES = (np.int8, np.uint8, np.int16, np.uint16, np.int32, np.uint32)
_DS_MAX_CHARS = 16  # a DICOM Decimal String holds at most 16 characters


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
        return _read_dicom_folder(path)
    if _extension(path) is None:
        hint = " (for DICOM give the folder that holds the series)" if path.lower().endswith(".dcm") else ""
        raise InputError(f"Image '{path}' has an unknown file type{hint}; {SUPPORTED}.")
    try:
        return sitk.ReadImage(path)
    except RuntimeError as exc:
        raise InputError(
            f"Could not read image '{path}': {_sitk_reason(exc)}. The file may be corrupt, truncated or not "
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
        >>> array, geometry = read_image("scan.nii.gz")  # doctest: +SKIP
        >>> array.shape[:geometry.ndim] == geometry.array_shape  # doctest: +SKIP
        True
    """
    return from_sitk(read_sitk(path))


def _read_dicom_folder(folder: str) -> sitk.Image:
    """Read the largest DICOM series in ``folder`` (logged when the folder holds several)."""
    show_warnings = sitk.ProcessObject.GetGlobalWarningDisplay()
    sitk.ProcessObject.SetGlobalWarningDisplay(False)  # GDCM prints "No Series were found"; we raise instead
    try:
        series_ids = sitk.ImageSeriesReader.GetGDCMSeriesIDs(folder)
        series = {sid: sitk.ImageSeriesReader.GetGDCMSeriesFileNames(folder, sid) for sid in series_ids}
    except RuntimeError as exc:
        raise InputError(f"Could not scan folder '{folder}' for DICOM files: {_sitk_reason(exc)}.") from exc
    finally:
        sitk.ProcessObject.SetGlobalWarningDisplay(show_warnings)
    if not series:
        raise InputError(
            f"Folder '{folder}' holds no DICOM series; give a folder of DICOM files or an image file ({SUPPORTED})."
        )
    chosen = max(series, key=lambda sid: len(series[sid]))
    if len(series) > 1:
        others = ", ".join(f"{sid} ({len(files)} files)" for sid, files in series.items() if sid != chosen)
        logger.warning(
            "Folder '%s' holds %d DICOM series; reading %s (%d files), the largest; ignoring %s. "
            "Put each series in its own folder to choose another.",
            folder, len(series), chosen, len(series[chosen]), others,
        )
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(series[chosen])
    try:
        return reader.Execute()
    except RuntimeError as exc:
        raise InputError(
            f"Could not read DICOM series {chosen} in '{folder}': {_sitk_reason(exc)}. "
            "Some files may be corrupt or the slices may not form one volume."
        ) from exc


# ---------------------------------------------------------------------------------------------------- conversion
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
    image = _prepare_dicom(array, geometry) if ext is None else to_sitk(array, geometry)
    parent = os.path.dirname(target)
    try:
        os.makedirs(parent, exist_ok=True)
    except OSError as exc:
        raise InputError(f"Cannot create output folder '{parent}': {exc}.") from exc
    if ext is None:
        _write_dicom_atomic(image, target)
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
        raise _write_error(target, exc) from exc
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _write_dicom_atomic(image: sitk.Image, target: str) -> None:
    """Write a DICOM series into a temporary folder, then rename it onto ``target``."""
    if os.path.isfile(target):
        raise InputError(f"Output '{target}' is a file; a DICOM series needs a folder path (or use {SUPPORTED}).")
    if os.path.isdir(target):
        foreign = [f for f in os.listdir(target) if not f.lower().endswith(".dcm")]
        if foreign:
            raise InputError(
                f"Output folder '{target}' holds files that are not DICOM ({foreign[:3]}); give a new or empty folder "
                "so nothing else is deleted."
            )
    parent, name = os.path.split(target)
    token = uuid.uuid4().hex[:12]
    tmp = os.path.join(parent, f".tmp-{token}-{name}")
    old = os.path.join(parent, f".old-{token}-{name}")
    moved_aside = False
    try:
        os.mkdir(tmp)
        _write_dicom_slices(image, tmp)
        if os.path.isdir(target):
            os.rename(target, old)
            moved_aside = True
        os.rename(tmp, target)
    except Exception as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if moved_aside and not os.path.exists(target):
            os.rename(old, target)
        raise _write_error(target, exc) from exc
    if moved_aside:
        shutil.rmtree(old, ignore_errors=True)


def _prepare_dicom(array: np.ndarray, geometry: Geometry) -> sitk.Image:
    """Check that ``array`` can be a DICOM series; return a right-handed image carrying the rescale tags."""
    array = np.asarray(array)
    if geometry.ndim != 3 or array.shape != geometry.array_shape:
        raise InputError(
            f"DICOM output needs a 3D scalar image; got array {array.shape} on a {geometry.ndim}D grid. "
            "Write .nii.gz, .nrrd or .mha instead."
        )
    direction = geometry.direction_matrix
    if not np.allclose(direction.T @ direction, np.eye(3), atol=1e-6):
        raise InputError("DICOM output needs an orthonormal direction matrix; write .nii.gz, .nrrd or .mha instead.")
    if np.linalg.det(direction) < 0:  # DICOM's slice normal is row x column: reverse the slices to match
        origin = geometry.ijk_to_lps() @ np.array([0.0, 0.0, geometry.size[2] - 1, 1.0])
        direction = direction.copy()
        direction[:, 2] *= -1
        geometry = Geometry(geometry.size, geometry.spacing, tuple(origin[:3]), tuple(direction.ravel()))
        array = array[::-1]
        logger.info("Left-handed direction: writing the DICOM slices in reverse order (same voxels in space).")
    tags = {}
    array = array.astype(np.uint8) if array.dtype == np.bool_ else array
    if array.dtype.kind in "iu":
        if array.dtype not in _DICOM_INT_TYPES:
            if array.size and (array.min() < np.iinfo(np.int32).min or array.max() > np.iinfo(np.int32).max):
                raise InputError(f"DICOM stores at most 32-bit integers; the {array.dtype} values do not fit.")
            array = array.astype(np.int32)
    elif array.dtype.kind == "f":
        if not np.all(np.isfinite(array)):
            raise InputError("DICOM cannot store NaN or infinite values; replace them first or write .nii.gz.")
        array = array.astype(np.float64)
        slope, intercept, signed = _rescale_for(array)
        tags = {
            "0028|1053": slope, "0028|1052": intercept, "0028|0100": "16", "0028|0101": "16",
            "0028|0102": "15", "0028|0103": "1" if signed else "0",
        }
    else:
        raise InputError(f"DICOM cannot store {array.dtype} data; use integer or real values.")
    image = to_sitk(array, geometry)
    for key, value in tags.items():
        image.SetMetaData(key, value)
    return image


def _rescale_for(values: np.ndarray) -> Tuple[str, str, bool]:
    """Pick RescaleSlope / RescaleIntercept (as DICOM strings) that map ``values`` into 16-bit integers."""
    lo, hi = (float(values.min()), float(values.max())) if values.size else (0.0, 0.0)
    if np.all(values == np.round(values)) and -32768 <= lo and hi <= 65535 and (lo >= 0 or hi <= 32767):
        return "1", "0", lo < 0  # whole numbers that fit 16 bits: stored exactly
    # Signed storage, centred, one count of margin at each end so rounding never saturates.
    slope = _ds((hi - lo) / 65532.0) if hi > lo else "1"
    return slope, _ds((hi + lo) / 2.0), True


def _write_dicom_slices(image: sitk.Image, folder: str) -> None:
    """Write ``image`` slice by slice with per-slice position / orientation tags into ``folder``."""
    direction = np.asarray(image.GetDirection()).reshape(3, 3)
    orientation = "\\".join(_ds(v) for v in np.concatenate([direction[:, 0], direction[:, 1]]))
    study, series, frame = (f"2.25.{uuid.uuid4().int}" for _ in range(3))
    z_spacing = _ds(image.GetSpacing()[2])
    shared = {key: image.GetMetaData(key) for key in image.GetMetaDataKeys()}
    shared.update({
        "0008|0008": "DERIVED\\SECONDARY", "0008|0060": "CT", "0008|103e": "SegHiResCAM output",
        "0020|000d": study, "0020|000e": series, "0020|0052": frame, "0020|0011": "1",
        "0020|0037": orientation, "0018|0050": z_spacing, "0018|0088": z_spacing,
    })
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()  # keep the study / series UIDs set above on every slice
    for k in range(image.GetSize()[2]):
        slice_image = image[:, :, k]
        for key, value in shared.items():
            slice_image.SetMetaData(key, value)
        position = image.TransformIndexToPhysicalPoint((0, 0, k))
        slice_image.SetMetaData("0020|0032", "\\".join(_ds(v) for v in position))
        slice_image.SetMetaData("0020|0013", str(k + 1))
        slice_image.SetMetaData("0008|0018", f"2.25.{uuid.uuid4().int}")
        writer.SetFileName(os.path.join(folder, f"slice{k + 1:05d}.dcm"))
        writer.Execute(slice_image)


def _ds(value: float) -> str:
    """Format ``value`` as the most precise DICOM Decimal String (at most 16 characters)."""
    for digits in range(16, 0, -1):
        text = f"{value:.{digits}g}"
        if len(text) <= _DS_MAX_CHARS:
            return text
    raise InputError(f"Value {value} cannot be written as a DICOM decimal string.")


# ---------------------------------------------------------------------------------------------------- resampling
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
        raise InternalError(f"Resampling onto {dst.size} failed: {_sitk_reason(exc)}.") from exc
    return out.astype(array.dtype, copy=False) if interpolator == "nearest" else out


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


def _write_error(target: str, exc: BaseException) -> Exception:
    """Turn a failure while writing ``target`` into the project's error type (user-fixable or internal)."""
    if isinstance(exc, InputError):
        return exc
    if isinstance(exc, (OSError, RuntimeError)):
        reason = _sitk_reason(exc) if isinstance(exc, RuntimeError) else str(exc)
        return InputError(
            f"Could not write '{target}': {reason}. Check that the folder is writable and has free space; "
            "nothing was written under that name."
        )
    return InternalError(f"Unexpected failure while writing '{target}': {exc!r}; nothing was written.")


def _sitk_reason(exc: BaseException) -> str:
    """Shorten a SimpleITK exception to its useful last part (drops build paths and line numbers)."""
    text = " ".join(str(exc).split())
    parts: List[str] = re.split(r"ITK ERROR: \w+\(0x[0-9a-f]+\): |\.cxx:\d+:? ", text)
    reason = parts[-1].strip() or text
    return reason[:300]
