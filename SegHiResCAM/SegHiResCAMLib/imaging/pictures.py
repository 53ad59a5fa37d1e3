"""PNG and JPEG pictures: 2D images for 2D models, and the heatmap drawn over them.

A picture is read with SimpleITK as a 2D image (spacing 1 mm, origin 0, identity direction); colour pictures keep
their components last, ``(rows, columns, 3 or 4)``. :func:`picture_channels` fits them to the model: a model
with one input channel gets the luminance ``Y = 0.299 R + 0.587 G + 0.114 B`` (ITU-R BT.601), a model with three
gets R, G, B; an alpha component is dropped. :func:`write_overlay` draws a heatmap over a picture (a PNG next to
the heatmap file the command line writes).

This module never imports slicer, qt, vtk or torch.
"""

import os
from typing import Optional, Sequence, Tuple

import numpy as np
import SimpleITK as sitk

from ..errors import InputError
from ..geometry import Geometry
from .files import atomic_write

#: file name endings read as pictures
PICTURE_EXTENSIONS = (".png", ".jpg", ".jpeg")
#: ITU-R BT.601 luminance weights of R, G, B
LUMINANCE = (0.299, 0.587, 0.114)


def is_picture(path) -> bool:
    """Whether ``path`` names a PNG or JPEG file (by its extension)."""
    return isinstance(path, (str, os.PathLike)) and os.fspath(path).lower().endswith(PICTURE_EXTENSIONS)


def picture_channels(image: np.ndarray, geometry: Geometry, in_channels: int) -> Tuple[np.ndarray, Optional[str]]:
    """A colour picture fitted to a model with ``in_channels`` inputs (see the module docstring), and a note for
    the user saying what was done (``None`` when nothing was)."""
    image = np.asarray(image)
    if image.ndim != geometry.ndim + 1 or image.shape[-1] not in (3, 4) or in_channels == image.shape[-1]:
        return image, None
    dropped = " (its alpha channel dropped)" if image.shape[-1] == 4 else ""
    rgb = image[..., :3].astype(np.float32)
    if in_channels == 3:
        return rgb, "the colour picture goes to the model as its 3 channels R, G, B%s" % dropped
    if in_channels == 1:
        gray = rgb @ np.asarray(LUMINANCE, dtype=np.float32)
        return gray, "the colour picture was converted to grey (luminance 0.299 R + 0.587 G + 0.114 B)%s" % dropped
    return image, None


def overlay_path(out: str) -> str:
    """Where the overlay of the heatmap file ``out`` goes: ``heat.nii.gz`` -> ``heat_overlay.png``."""
    from .files import IMAGE_EXTENSIONS
    lower = out.lower()
    for ext in IMAGE_EXTENSIONS:
        if lower.endswith(ext):
            return out[:-len(ext)] + "_overlay.png"
    return out + "_overlay.png"


def overlay_rgb(image: np.ndarray, heat: np.ndarray, opacity: float = 0.6) -> np.ndarray:
    """``uint8 (rows, columns, 3)``: the picture in grey (min-max scaled) with the heatmap (clipped to [0, 1]) in
    a black-red-yellow-white scale over it, opaque in proportion to the heat (0 shows the picture alone)."""
    gray = np.asarray(image, dtype=np.float64)
    if gray.ndim == 3:
        gray = gray[..., :3] @ np.asarray(LUMINANCE) if gray.shape[-1] >= 3 else gray.mean(-1)
    if gray.shape != heat.shape:
        raise InputError("the heatmap %s and the picture %s differ in size" % (heat.shape, gray.shape))
    low, high = float(gray.min()), float(gray.max())
    gray = (gray - low) / (high - low) if high > low else np.zeros_like(gray)
    h = np.clip(np.nan_to_num(np.asarray(heat, dtype=np.float64)), 0.0, 1.0)
    colour = np.stack([np.clip(3 * h, 0, 1), np.clip(3 * h - 1, 0, 1), np.clip(3 * h - 2, 0, 1)], axis=-1)
    alpha = (opacity * h)[..., None]
    out = (1.0 - alpha) * gray[..., None] + alpha * colour
    return np.round(out * 255.0).astype(np.uint8)


def write_overlay(path: str, image: np.ndarray, heat: np.ndarray, protect: Sequence[str] = ()) -> None:
    """Write :func:`overlay_rgb` as an RGB PNG, atomically (``protect``: inputs never overwritten)."""
    picture = sitk.GetImageFromArray(overlay_rgb(image, heat), isVector=True)
    if not path.lower().endswith(".png"):
        raise InputError("the overlay is written as PNG; give a .png path, got %r" % path)
    atomic_write(path, lambda tmp: sitk.WriteImage(picture, tmp), protect)  # tmp ends in .png too


__all__ = ["LUMINANCE", "PICTURE_EXTENSIONS", "is_picture", "overlay_path", "overlay_rgb", "picture_channels",
           "write_overlay"]
