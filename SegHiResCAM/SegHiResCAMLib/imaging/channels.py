"""Several input channels (T1, T1c, T2, FLAIR...) as one image: channels last, on the first image's grid.

A multi-channel model takes one image whose voxels hold one value per channel. Users have the channels as
separate files (``--image t1.nii.gz --image t2.nii.gz``), as one 4D file, or as separate arrays in Python.
:func:`read_channel_images` and :func:`stack_channels` turn each of these into the one form the rest of the
package takes (:func:`~SegHiResCAMLib.imaging.model_space.prepare`): an array ``(z, y, x, C)`` (numpy order,
channels last) on the grid of the *first* image given, the others resampled onto it (linear,
:func:`~.resample.resample_to_grid`; voxels outside an image's field of view become 0). One image of one channel
is passed through unchanged (same array, same dtype), so single-image runs are exactly as before.

4D files: SimpleITK reads a 4D NIfTI/NRRD/MetaImage as a 4D image whose last index axis (NIfTI's 4th dimension,
``t``) is the first numpy axis; that axis holds the channels, and the first three axes are the grid. A vector image
(NIfTI intent vector, NRRD with a component axis) gives its components as the channels.

Order: the model card's ``channels`` (e.g. ``["T1", "T1c", "T2", "FLAIR"]``) names them in the order the model
takes them. ``NAME=path`` binds a file to a channel by name (every image then has a name, each card channel
once); images without names are taken in the order given.

This module never imports slicer, qt, vtk or torch.
"""

import os
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import SimpleITK as sitk

from ..errors import InputError
from ..geometry import Geometry
from .conversion import from_sitk
from .files import read_sitk
from .resample import resample_to_grid


@dataclass
class ChannelImage:
    """The channels of a model input, on one grid.

    Attributes:
        array: ``geometry.array_shape`` for one channel (the file's array, unchanged), else
            ``geometry.array_shape + (C,)`` (channels last, float32 where channels were resampled or types differ).
        geometry: the grid: the first image's.
        names: one name per channel (the card's, else ``channel0``, ``channel1``, ...).
        sources: per channel, where it came from (``path`` or ``path[t=k]`` for a 4D file, ``array k``).
        resampled: per channel, whether it was resampled onto the grid.
    """

    array: np.ndarray
    geometry: Geometry
    names: List[str]
    sources: List[str] = field(default_factory=list)
    resampled: List[bool] = field(default_factory=list)

    @property
    def channels(self) -> int:
        return len(self.names)

    def notes(self) -> List[str]:
        """One line per resampled channel, for the user."""
        return ["channel %s (%s) is on another grid than the first image: resampled onto its grid (linear)"
                % (name, source) for name, source, moved in zip(self.names, self.sources, self.resampled) if moved]

    def describe(self) -> List[dict]:
        """Per channel: name, source, resampled (for provenance)."""
        return [{"channel": n, "source": s, "resampled": bool(r)}
                for n, s, r in zip(self.names, self.sources, self.resampled)]


def parse_image_arg(text: str) -> Tuple[Optional[str], str]:
    """``"T2=t2.nii.gz"`` -> ``("T2", "t2.nii.gz")``; a plain path (or an existing file whose name holds '=')
    -> ``(None, path)``."""
    text = os.fspath(text)
    name, sep, path = text.partition("=")
    if not sep or os.path.exists(text) or not name.strip() or os.sep in name or "/" in name:
        return None, text
    return name.strip(), path


def split_channels(image: sitk.Image, source: str) -> List[Tuple[np.ndarray, Geometry, str]]:
    """The channels of one image: a 4D image along its last index axis, a vector image by component, else
    itself; each with its (3D) grid and a source label."""
    if image.GetDimension() == 4:
        size = list(image.GetSize())
        out = []
        for t in range(size[3]):
            array, geometry = from_sitk(sitk.Extract(image, size[:3] + [0], [0, 0, 0, t]))
            out.append((array, geometry, "%s[t=%d]" % (source, t)))
        return out
    array, geometry = from_sitk(image)
    if image.GetNumberOfComponentsPerPixel() > 1:
        return [(array[..., c], geometry, "%s[component %d]" % (source, c)) for c in range(array.shape[-1])]
    return [(array, geometry, source)]


def _order(given: List[Optional[str]], declared: Optional[Sequence[str]], what: str) -> List[int]:
    """Indices of the given channels in the model's order (names matched without case)."""
    named = [n for n in given if n is not None]
    if not named:
        return list(range(len(given)))
    if len(named) != len(given):
        raise InputError("some %s have channel names and some do not; name every one (NAME=...) or none (then "
                         "the order given is the model's order)" % what)
    if not declared:
        raise InputError("%s are bound to channels by name (%s) but the model card declares no channel names; "
                         "add \"channels\": [...] to the card (or --card-channels) or give the images in the "
                         "model's order without names" % (what, ", ".join(named)))
    lowered = [d.lower() for d in declared]
    index = []
    for name in named:
        if name.lower() not in lowered:
            raise InputError("channel %r is not one of the model card's channels %s; use those names"
                             % (name, ", ".join(declared)))
        index.append(lowered.index(name.lower()))
    if sorted(index) != list(range(len(declared))) or len(index) != len(declared):
        missing = [d for i, d in enumerate(declared) if i not in index]
        twice = sorted({named[k] for k, i in enumerate(index) if index.count(i) > 1})
        problems = (["missing: %s" % ", ".join(missing)] if missing else []) + (
            ["given twice: %s" % ", ".join(twice)] if twice else [])
        raise InputError("the model takes the channels %s; %s" % (", ".join(declared), "; ".join(problems)))
    return [index.index(i) for i in range(len(declared))]


def check_count(count: int, expected: Optional[int], names: Optional[Sequence[str]] = None,
                what: str = "images") -> None:
    """One clear error when ``count`` channels are given to a model that takes ``expected``."""
    if expected is not None and count != expected:
        raise InputError("the model expects %d input channel(s) but the %s %d%s; give %s" % (
            expected, "image has" if count == 1 else "%s have" % what, count,
            " (its card names %s)" % ", ".join(names) if names else "",
            "one image per channel (repeat --image, or NAME=path) or one 4D file" if what == "images"
            else "one array per channel (a list, a channel-first array or a dict by channel name)"))


def _assemble(parts: List[Tuple[np.ndarray, Geometry, str]], names: Optional[Sequence[str]],
              expected: Optional[int], what: str, reference: int = 0) -> ChannelImage:
    """Stack ``parts`` (already in the model's order) on the grid of ``parts[reference]``."""
    check_count(len(parts), expected, names, what)
    for array, geometry, source in parts:
        if array.ndim != geometry.ndim or geometry.ndim not in (2, 3):
            raise InputError("channel %s has %d axes; each channel must be one 2D or 3D image" % (source, array.ndim))
        if array.dtype.kind not in "iufb":
            raise InputError("channel %s has voxels of type %s; give numeric images" % (source, array.dtype))
    grid = parts[reference][1]
    labels = list(names) if names and len(names) == len(parts) else ["channel%d" % i for i in range(len(parts))]
    if len(parts) == 1:
        array, geometry, source = parts[0]
        return ChannelImage(array, geometry, labels, [source], [False])
    stacked, moved = [], []
    for array, geometry, source in parts:
        if geometry.ndim != grid.ndim:
            raise InputError("channel %s is %dD but the first image is %dD; give images of one dimensionality"
                             % (source, geometry.ndim, grid.ndim))
        same = geometry.same_grid(grid)
        stacked.append(array if same else resample_to_grid(array.astype(np.float32, copy=False), geometry, grid,
                                                           "linear"))
        moved.append(not same)
    dtype = np.result_type(*[a.dtype for a in stacked])
    return ChannelImage(np.stack([a.astype(dtype, copy=False) for a in stacked], axis=-1), grid, labels,
                        [p[2] for p in parts], moved)


def read_channel_images(items: Union[str, Sequence[str]], names: Optional[Sequence[str]] = None,
                        expected: Optional[int] = None) -> ChannelImage:
    """Read the images of ``--image`` (each ``path`` or ``NAME=path``) as one multi-channel image.

    Args:
        items: the ``--image`` values, in the order given; a 4D or vector file gives several channels.
        names: the model card's channel names (the model's order), if any.
        expected: the model's input channels: any other count is one clear error.

    Returns:
        A :class:`ChannelImage` on the grid of the first image given (the heatmap's grid).
    """
    items = [items] if isinstance(items, (str, os.PathLike)) else list(items)
    parsed = [parse_image_arg(item) for item in items]
    parts, given = [], []
    for name, path in parsed:
        found = split_channels(read_sitk(path), path)
        if name is not None and len(found) != 1:
            raise InputError("%s=%s holds %d channels; a name binds one channel (give the channels as separate "
                             "files, or the 4D file without a name in the model's order)" % (name, path, len(found)))
        parts.extend(found)
        given.extend([name] * len(found))
    order = _order(given, names, "images")
    reference = order.index(0)  # the first image given defines the grid, whatever its channel
    return _assemble([parts[i] for i in order], names, expected, "images", reference)


def stack_channels(image, geometry: Geometry, names: Optional[Sequence[str]] = None,
                   expected: Optional[int] = None) -> ChannelImage:
    """The Python API's forms of a (multi-channel) image as one :class:`ChannelImage` on ``geometry``.

    ``image`` is one of:

    - an array on ``geometry`` (``geometry.array_shape``), or channels last (``array_shape + (C,)``): unchanged
      (its channel count is checked later, by :func:`~.model_space.prepare`, as before);
    - a channel-first array ``(C,) + geometry.array_shape`` (when ``C`` equals the last axis's size, the array is
      read as channels last, as before);
    - a list of channels: arrays on ``geometry``, or ``(array, Geometry)`` pairs resampled onto ``geometry`` (the
      first channel's grid);
    - a dict ``{name: channel}`` in any order, ordered by the model card's channel names ``names``.
    """
    if isinstance(image, dict):
        keys = list(image)
        order = _order([str(k) for k in keys], names, "channels")
        image = [image[keys[i]] for i in order]
    if isinstance(image, (list, tuple)):
        parts = []
        for k, item in enumerate(image):
            array, grid = (item if isinstance(item, tuple) and len(item) == 2 and isinstance(item[1], Geometry)
                           else (item, geometry))
            array = np.asarray(array)
            if array.shape != grid.array_shape:
                raise InputError("channel %d has shape %s but its grid %s; give one scalar image per channel"
                                 % (k, array.shape, grid.array_shape))
            parts.append((array, grid, "array %d" % k))
        if not parts:
            raise InputError("an empty list of channels was given; give at least one image")
        if not parts[0][1].same_grid(geometry):
            raise InputError("the first channel's grid differs from the geometry given; the first channel defines "
                             "the grid: pass its geometry")
        return _assemble(parts, names, expected, "channels")
    array = np.asarray(image)
    shape = geometry.array_shape
    if array.ndim == len(shape) + 1 and array.shape[1:] == shape and array.shape[:-1] != shape:
        array = np.moveaxis(array, 0, -1)  # channel-first -> channels last
    count = array.shape[-1] if array.ndim == len(shape) + 1 and array.shape[:-1] == shape else 1
    labels = list(names) if names and len(names) == count else ["channel%d" % i for i in range(count)]
    return ChannelImage(array, geometry, labels, ["array"] * count, [False] * count)


def image_channels(in_channels: Optional[int], slice_context: int = 0) -> Optional[int]:
    """The image channels a model of ``in_channels`` input channels takes: with ``slice_context`` K > 0 (a 2.5D model
    on a 3D scan) each slice brings its image channels ``2K + 1`` times, so ``in_channels / (2K + 1)``; ``None``
    (no count check here) when that does not divide: the slicer then says which context would fit.

    Example:
        >>> image_channels(6, 1), image_channels(2), image_channels(4, 1)
        (2, 2, None)
    """
    if not slice_context or in_channels is None:
        return in_channels
    per_slice, rest = divmod(int(in_channels), 2 * int(slice_context) + 1)
    return per_slice if rest == 0 and per_slice > 0 else None


def channel_file_name(out: str, name: str) -> str:
    """The file of one channel's map next to ``out``: ``heat.nii.gz`` + ``T2`` -> ``heat_channel-T2.nii.gz``."""
    from .files import IMAGE_EXTENSIONS
    lower = out.lower()
    ext = next((e for e in IMAGE_EXTENSIONS if lower.endswith(e)), os.path.splitext(out)[1])
    stem = out[:len(out) - len(ext)] if ext else out
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in name)
    return "%s_channel-%s%s" % (stem, safe, ext)


__all__ = ["ChannelImage", "channel_file_name", "check_count", "image_channels", "parse_image_arg", "read_channel_images",
           "split_channels", "stack_channels"]
