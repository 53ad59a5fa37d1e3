"""DICOM series: read the largest series of a folder, and write a 3D scalar image as a CT series (SimpleITK/GDCM).

A series is written into a temporary folder beside the target and renamed onto it, so a crash never leaves a
half-written series under the real name. Float data is stored as 16-bit integers with RescaleSlope /
RescaleIntercept; a left-handed grid is written with its slices reversed (the same voxels in space). Used by
:func:`~SegHiResCAMLib.imaging.files.read_image` and :func:`~SegHiResCAMLib.imaging.files.write_image` for
folder paths. This module never imports slicer, qt, vtk or torch.
"""

import logging
import os
import shutil
import uuid
from typing import Tuple

import numpy as np
import SimpleITK as sitk

from ..errors import InputError
from ..geometry import Geometry
from .conversion import SUPPORTED, sitk_reason, to_sitk, write_error

logger = logging.getLogger(__name__)

_DICOM_INT_TYPES = (np.int8, np.uint8, np.int16, np.uint16, np.int32, np.uint32)
_DS_MAX_CHARS = 16  # a DICOM Decimal String holds at most 16 characters


def read_dicom_folder(folder: str) -> sitk.Image:
    """Read the largest DICOM series in ``folder`` (logged when the folder holds several)."""
    show_warnings = sitk.ProcessObject.GetGlobalWarningDisplay()
    sitk.ProcessObject.SetGlobalWarningDisplay(False)  # GDCM prints "No Series were found"; we raise instead
    try:
        series_ids = sitk.ImageSeriesReader.GetGDCMSeriesIDs(folder)
        series = {sid: sitk.ImageSeriesReader.GetGDCMSeriesFileNames(folder, sid) for sid in series_ids}
    except RuntimeError as exc:
        raise InputError(f"Could not scan folder '{folder}' for DICOM files: {sitk_reason(exc)}.") from exc
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
            f"Could not read DICOM series {chosen} in '{folder}': {sitk_reason(exc)}. "
            "Some files may be corrupt or the slices may not form one volume."
        ) from exc



def write_dicom_atomic(image: sitk.Image, target: str) -> None:
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
        raise write_error(target, exc) from exc
    if moved_aside:
        shutil.rmtree(old, ignore_errors=True)


def prepare_dicom(array: np.ndarray, geometry: Geometry) -> sitk.Image:
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

