"""Model space: from the user's image grid to the grid a network wants, and back.

:func:`prepare` applies a model's :class:`~SegHiResCAMLib.models.base.Preprocessing` (reorientation, resampling
to the model's spacing, intensity normalisation, symmetric padding to a multiple of ``divisible_by``) and
returns a :class:`ModelSpace` that remembers both grids. Because every step is a change of the *physical grid*,
the inverse is one resampling from the model grid onto the image grid (linear for heatmaps, nearest for label
masks); when the grids coincide the arrays are passed through (or cropped) exactly, with no interpolation at all.

The model's *prediction* goes back as nnU-Net takes it back (``export_prediction.py``): the per-class **logits**
are resampled (linear) onto the image grid and the label is their arg-max there (softmax: the arg-max of the
probabilities is that of the logits; sigmoid: logit > 0 is probability > 0.5), never an arg-max on the model grid
followed by nearest-neighbour label resampling, which moves boundaries by up to half a model voxel
(:meth:`ModelSpace.labels_to_image`, :meth:`ModelSpace.scores_to_image`). Memory stays bounded on a whole CT: one
class at a time, one image slab at a time.
"""

from dataclasses import dataclass, field
from typing import Callable, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import SimpleITK as sitk

from ..errors import InputError, InternalError
from ..geometry import Geometry
from .conversion import from_sitk, to_sitk
from .resample import resample_to_grid
from ..models.base import Preprocessing

_EPS = 1e-6
#: voxels of one image slab when class scores are resampled onto the image grid (bounded memory on a whole CT)
SLAB_VOXELS = 1 << 24
#: edge voxels repeated around the model grid before resampling scores onto the image grid
EDGE = 2


@dataclass
class ModelSpace:
    """The image grid, the model grid, and what was done between them.

    Attributes:
        image: the user's grid.
        grid: the model input grid (after reorientation, resampling and padding).
        pad: ``(before, after)`` voxels added per array axis.
        steps: human-readable record of the preprocessing, for provenance.
    """

    image: Geometry
    grid: Geometry
    pad: Tuple[Tuple[int, int], ...]
    steps: List[str] = field(default_factory=list)

    def _unpadded(self) -> Tuple[Geometry, Tuple[slice, ...]]:
        before = tuple(b for b, _ in self.pad)
        inner = tuple(s - b - a for s, (b, a) in zip(self.grid.array_shape, self.pad))
        offset = np.asarray(self.grid.direction).reshape(self.grid.ndim, -1) @ (
            np.asarray(before[::-1], dtype=float) * np.asarray(self.grid.spacing))
        geom = Geometry(size=inner[::-1], spacing=self.grid.spacing,
                        origin=tuple(np.asarray(self.grid.origin) + offset), direction=self.grid.direction)
        return geom, tuple(slice(b, b + n) for b, n in zip(before, inner))

    def to_image(self, array: np.ndarray, interpolator: str = "linear", copy: bool = True) -> np.ndarray:
        """Map an array on the model grid (``grid.array_shape``) onto the image grid.

        ``copy=False``: where the grids coincide and ``array`` (float32 for ``linear``) needs no cropping, it is
        returned itself instead of a copy (a caller that drops ``array`` saves a whole-volume copy)."""
        array = np.asarray(array)
        if array.shape != self.grid.array_shape:
            raise InputError("array shape %s does not match the model grid %s" % (array.shape, self.grid.array_shape))
        inner, crop = self._unpadded()
        cropped = array[crop]
        if inner.same_grid(self.image, atol=1e-6):
            if interpolator == "linear":
                cropped = cropped.astype(np.float32, copy=copy)
            return np.ascontiguousarray(cropped)
        return resample_to_grid(array, self.grid, self.image, interpolator)

    def to_model(self, array: np.ndarray, interpolator: str = "nearest") -> np.ndarray:
        """Map an array on the image grid (e.g. a mask) onto the model grid (padding filled with 0)."""
        array = np.asarray(array)
        if array.shape != self.image.array_shape:
            raise InputError("array shape %s does not match the image grid %s" % (array.shape, self.image.array_shape))
        inner, crop = self._unpadded()
        if inner.same_grid(self.image, atol=1e-6):
            out = np.zeros(self.grid.array_shape, dtype=np.float32 if interpolator == "linear" else array.dtype)
            out[crop] = array
            return out
        return resample_to_grid(array, self.image, self.grid, interpolator)

    def _slabs(self, voxels: Optional[int] = None) -> List[Tuple[slice, Geometry]]:
        """The image grid cut along its first array axis into slabs of about ``voxels`` (default
        :data:`SLAB_VOXELS`): ``(slice, geometry)``."""
        voxels = SLAB_VOXELS if voxels is None else voxels
        shape = self.image.array_shape
        step = max(1, voxels // max(1, int(np.prod(shape[1:]))))
        direction = np.asarray(self.image.direction).reshape(self.image.ndim, -1)
        out = []
        for start in range(0, shape[0], step):
            stop = min(shape[0], start + step)
            offset = direction[:, -1] * (start * self.image.spacing[-1])
            size = tuple(self.image.size[:-1]) + (stop - start,)
            out.append((slice(start, stop), Geometry(size=size, spacing=self.image.spacing,
                                                      origin=tuple(np.asarray(self.image.origin) + offset),
                                                      direction=self.image.direction)))
        return out

    def outside_score(self, c: int, channels: int, activation: str) -> float:
        """The score of class ``c`` where the model saw nothing of the image (none here: the model grid covers
        it; :class:`~SegHiResCAMLib.imaging.nnunet_space.NnunetSpace` crops)."""
        return 0.0

    def channel_to_image(self, channel: np.ndarray, fill: float = 0.0) -> Iterator[Tuple[slice, np.ndarray]]:
        """One class's scores on the model grid -> ``(slab, float32 values)`` over the image grid, slab by slab
        (``fill``: the value where the model saw nothing, see :meth:`outside_score`).

        Linear interpolation from the unpadded model grid; beyond its outermost voxel centres the coordinates are
        clamped to them (as nnU-Net's resizing does), never the padding's values."""
        channel = np.asarray(channel, dtype=np.float32)
        if channel.shape != self.grid.array_shape:
            raise InputError("array shape %s does not match the model grid %s" % (channel.shape, self.grid.array_shape))
        inner, crop = self._unpadded()
        cropped = channel[crop]
        if inner.same_grid(self.image, atol=1e-6):  # slab by slab too: callers' temporaries stay slab-sized
            for part, _ in self._slabs():
                yield part, cropped[part]
            return
        # edge values repeated two voxels beyond each side: linear interpolation there is the clamped one of
        # nnU-Net's resizing (SimpleITK's own extrapolator takes the nearest voxel along every axis instead)
        extended = np.pad(cropped, EDGE, mode="edge")
        direction = np.asarray(inner.direction).reshape(inner.ndim, -1)
        origin = np.asarray(inner.origin) - direction @ (EDGE * np.asarray(inner.spacing))
        source = to_sitk(extended, Geometry(size=extended.shape[::-1], spacing=inner.spacing, origin=tuple(origin),
                                            direction=inner.direction))
        identity = sitk.Transform(inner.ndim, sitk.sitkIdentity)
        for part, slab in self._slabs():
            yield part, sitk.GetArrayFromImage(sitk.Resample(
                source, slab.size, identity, sitk.sitkLinear, slab.origin, slab.spacing, slab.direction, 0.0,
                sitk.sitkFloat32, True))

    def scores_to_image(self, scores: Callable[[int], np.ndarray], channels: int,
                        activation: str = "softmax") -> np.ndarray:
        """Probabilities ``[C, *image]`` (float32) from logits on the model grid: each class's logits resampled
        onto the image grid, then softmax over the classes (or sigmoid), as nnU-Net does. ``scores(c)``: the
        logits of class ``c`` on the model grid. Holds ``C`` image-grid arrays: for a whole CT prefer
        :meth:`labels_to_image`."""
        out = np.empty((channels,) + tuple(self.image.array_shape), dtype=np.float32)
        for c in range(channels):
            for part, values in self.channel_to_image(scores(c), self.outside_score(c, channels, activation)):
                out[(c, part)] = values
        if activation == "sigmoid":
            return (1.0 / (1.0 + np.exp(-out))).astype(np.float32)
        out -= out.max(axis=0, keepdims=True)
        np.exp(out, out=out)
        out /= out.sum(axis=0, keepdims=True)
        return out

    def labels_to_image(self, scores: Callable[[int], np.ndarray], channels: int,
                        activation: str = "softmax") -> np.ndarray:
        """The label map on the image grid from per-class logits on the model grid (``scores(c)``): the logits
        resampled onto the image grid, then the arg-max (softmax), ``logit > 0`` (one sigmoid channel), or the
        highest class above 0 else background (several sigmoid channels). Ties go to the lower class, as
        ``argmax``. Memory: the label map and one float32 image-grid array, whatever the number of classes."""
        dtype = np.uint8 if channels < 256 else np.uint16
        labels = np.zeros(self.image.array_shape, dtype=dtype)
        if activation == "sigmoid" and channels == 1:
            for part, values in self.channel_to_image(scores(0), self.outside_score(0, 1, activation)):
                labels[part] = values > 0
            return labels
        best = np.full(self.image.array_shape, -np.inf, dtype=np.float32)
        for c in range(channels):
            for part, values in self.channel_to_image(scores(c), self.outside_score(c, channels, activation)):
                better = values > best[part]
                np.copyto(labels[part], c + 1 if activation == "sigmoid" else c, where=better)  # no index arrays
                np.maximum(best[part], values, out=best[part])
        if activation == "sigmoid":
            for part, _ in self._slabs():
                np.copyto(labels[part], 0, where=best[part] <= 0)
        return labels

    def image_index_to_model(self, index: Sequence[int]) -> Tuple[int, ...]:
        """A voxel index of the image grid (array order) -> the nearest voxel of the model grid (array order)."""
        point = self.image.ijk_to_lps() @ np.append(np.asarray(index[::-1], dtype=float), 1.0)
        ijk = np.linalg.solve(self.grid.ijk_to_lps(), point)[:-1]
        model_index = tuple(int(round(v)) for v in ijk[::-1])
        if any(not 0 <= i < s for i, s in zip(model_index, self.grid.array_shape)):
            raise InputError("voxel %s lies outside the model grid" % (tuple(index),))
        return model_index

    def describe(self) -> dict:
        return {"image_grid": self.image.to_dict(), "model_grid": self.grid.to_dict(),
                "padding": [list(p) for p in self.pad], "steps": list(self.steps)}


def _resized_grid(geom: Geometry, size: Sequence[int]) -> Geometry:
    """Same direction and field of view (outer voxel edges aligned), ``size`` voxels (ITK order)."""
    old = np.asarray(geom.spacing)
    new = old * np.asarray(geom.size, dtype=float) / np.asarray(size, dtype=float)
    direction = np.asarray(geom.direction).reshape(geom.ndim, -1)
    origin = np.asarray(geom.origin) + direction @ ((new - old) / 2.0)
    return Geometry(size=tuple(int(s) for s in size), spacing=tuple(new), origin=tuple(origin),
                    direction=geom.direction)


def _resampled_grid(geom: Geometry, spacing: Sequence[float]) -> Geometry:
    """Same direction and field of view (outer voxel edges aligned), new spacing."""
    old = np.asarray(geom.spacing)
    new = np.asarray(spacing, dtype=float)
    size = np.maximum(1, np.round(np.asarray(geom.size) * old / new)).astype(int)
    direction = np.asarray(geom.direction).reshape(geom.ndim, -1)
    origin = np.asarray(geom.origin) + direction @ ((new - old) / 2.0)
    return Geometry(size=tuple(size), spacing=tuple(new), origin=tuple(origin), direction=geom.direction)


def normalize_intensities(values: np.ndarray, prep: Preprocessing, inplace: bool = False) -> np.ndarray:
    """The intensity steps of ``prep``: percentile clipping, ``normalization``, the ``then`` normalisations,
    ``scale``/``shift`` (the last three are a model card's; only the first step of ``channels`` schemes).

    ``inplace=True``: ``values`` is a float32 array the caller owns; it is overwritten and returned (the same
    numbers as without, no whole-volume temporaries: what :func:`prepare` does with its own copy of a scan)."""
    inplace = bool(inplace) and values.dtype == np.float32 and values.flags.writeable
    values = values.astype(np.float32, copy=False)
    if prep.channels is not None:  # one scheme per channel; a single channel has no channel axis here
        if len(prep.channels) == 1:
            return normalize_intensities(values, prep.channels[0], inplace)
        if values.shape[-1] != len(prep.channels):
            raise InputError("the model normalises %d channels separately but the image has %d"
                             % (len(prep.channels), values.shape[-1]))
        return np.stack([normalize_intensities(values[..., c], scheme) for c, scheme in enumerate(prep.channels)], axis=-1)
    out = values if inplace else None  # ``out=None``: every step makes a new array, as numpy's operators do
    if prep.clip_percentiles is not None:
        low, high = np.percentile(values, prep.clip_percentiles)
        values = np.clip(values, np.float32(low), np.float32(high), out=out)
    values = _normalize(values, prep.normalization, prep, out)
    for how in prep.then:
        values = _normalize(values, how, prep, out)
    if (prep.scale, prep.shift) != (1.0, 0.0):
        values = np.add(np.multiply(values, np.float32(prep.scale), out=out), np.float32(prep.shift), out=out)
    return values.astype(np.float32, copy=False)


def _normalize(values: np.ndarray, how: str, prep: Preprocessing, out: Optional[np.ndarray] = None) -> np.ndarray:
    """One normalisation; ``out`` (``values`` itself, or ``None``) receives every step in place."""
    if how == "none":
        return values
    if how == "zscore":
        std = float(values.std())
        mean = float(values.mean())
        return np.divide(np.subtract(values, mean, out=out), std if std > _EPS else 1.0, out=out)
    if how == "zscore-nonzero":
        inside = values != 0
        if not inside.any():
            return values
        mean, std = float(values[inside].mean()), float(values[inside].std())
        result = np.divide(np.subtract(values, mean, out=out), std if std > _EPS else 1.0, out=out)
        result[~inside] = 0.0
        return result
    if how == "minmax":
        low, high = float(values.min()), float(values.max())
        return np.divide(np.subtract(values, low, out=out), high - low if high - low > _EPS else 1.0, out=out)
    if how == "range":  # MONAI ScaleIntensityRange: [a_min, a_max] -> [b_min, b_max], optionally clipped
        (a_min, a_max), (b_min, b_max) = prep.intensity_range, prep.output_range
        result = np.subtract(values, a_min, out=out)
        result = np.divide(result, a_max - a_min, out=out)
        result = np.add(np.multiply(result, b_max - b_min, out=out), b_min, out=out)
        return np.clip(result, min(b_min, b_max), max(b_min, b_max), out=out) if prep.clip else result
    if how == "clip-zscore":  # nnU-Net CTNormalization: clip to dataset percentiles, dataset mean and std
        (low, high), (mean, std) = prep.intensity_range, prep.mean_std
        return np.divide(np.subtract(np.clip(values, low, high, out=out), mean, out=out), max(std, 1e-8), out=out)
    low, high = prep.ct_window
    return np.divide(np.subtract(np.clip(values, low, high, out=out), low, out=out), float(high - low), out=out)


def prepare(image: np.ndarray, geometry: Geometry, prep: Preprocessing, spatial_dims: int,
            in_channels: int = 1) -> Tuple[np.ndarray, ModelSpace]:
    """Turn an image on its grid into the network input on the model grid.

    Args:
        image: array in numpy order, ``(z, y, x)`` or ``(y, x)``; multi-channel images put channels last.
        geometry: the image grid.
        prep: the model's preprocessing.
        spatial_dims: 2 or 3, the model's.
        in_channels: the model's input channels.

    Returns:
        ``(x, space)`` with ``x`` float32 ``[C, *S_model]``.
    """
    image = np.asarray(image)
    channels = 1
    if image.ndim == geometry.ndim + 1 and image.shape[:-1] == geometry.array_shape:
        channels = image.shape[-1]
    elif image.shape != geometry.array_shape:
        raise InputError("image shape %s does not match its geometry %s" % (image.shape, geometry.array_shape))
    if geometry.ndim != spatial_dims:
        raise InputError("the model is %dD but the image is %dD; give a %dD image" % (
            spatial_dims, geometry.ndim, spatial_dims))
    if channels != in_channels:
        raise InputError("the model expects %d input channel(s) but the image has %d; give an image with %d "
                         "channel(s)" % (in_channels, channels, in_channels))
    if image.dtype.kind not in "iufb":
        raise InputError("image voxels of type %s cannot be used; give a numeric image" % image.dtype)
    if not _all_finite(image):
        raise InputError("the image holds NaN or infinite voxels; fix or mask them before explaining")
    steps = []
    # one float32 copy of the scan, whatever is done to it (the caller's array is never written to, nor handed
    # on); steps that change nothing keep it (no SimpleITK round trip: that held three whole-volume copies)
    values, grid = image.astype(np.float32, copy=True), geometry
    if prep.orientation not in (None, "keep"):
        sitk_image = sitk.DICOMOrient(to_sitk(values, geometry), prep.orientation)
        del values
        values, grid = from_sitk(sitk_image)
        del sitk_image
        steps.append("reoriented to %s" % prep.orientation)
    if prep.spacing is not None:
        if len(prep.spacing) != grid.ndim:
            raise InputError("the model spacing %s has %d entries for a %dD image" % (prep.spacing, len(prep.spacing), grid.ndim))
        if not np.allclose(grid.spacing, prep.spacing, rtol=0, atol=1e-6):
            target = _resampled_grid(grid, prep.spacing)
            values = _resample_extrapolate(values, grid, target)
            steps.append("resampled from %s mm to %s mm (linear)" % (
                tuple(round(s, 4) for s in grid.spacing), prep.spacing))
            grid = target
    if prep.resize_to is not None:
        if len(prep.resize_to) != grid.ndim:
            raise InputError("the model grid resize_to %s has %d entries for a %dD image"
                             % (prep.resize_to, len(prep.resize_to), grid.ndim))
        if tuple(grid.size) != prep.resize_to:
            target = _resized_grid(grid, prep.resize_to)
            values = _resample_extrapolate(values, grid, target, prep.resize_mode)
            steps.append("resized from %s to %s voxels (%s)" % (tuple(grid.size), prep.resize_to, prep.resize_mode))
            grid = target
    if channels == 1 and values.ndim == grid.ndim + 1:
        values = values[..., 0]
    values = normalize_intensities(values, prep, inplace=True)  # our own copy: no further whole-volume copies
    if prep.clip_percentiles is not None:
        steps.append("intensity clipped to percentiles %g-%g" % prep.clip_percentiles)
    if prep.normalization != "none":
        steps.append("intensity %s" % prep.normalization)
    steps.extend("intensity %s" % how for how in prep.then if how != "none")
    if (prep.scale, prep.shift) != (1.0, 0.0):
        steps.append("intensity x %g + %g" % (prep.scale, prep.shift))
    shape = grid.array_shape
    minimum = prep.min_size or (1,) * len(shape)
    k = prep.divisible_by
    if k == "auto":
        raise InternalError("divisible_by 'auto' reached prepare(); resolve it first "
                            "(SegHiResCAMLib.models.output.resolve_divisible_by)")
    pad = []
    for size, low in zip(shape, minimum):
        want = max(size, int(low))
        want = int(np.ceil(want / k) * k)
        extra = want - size
        pad.append((extra // 2, extra - extra // 2) if prep.pad_side == "both" else (0, extra))
    pad = tuple(pad)
    if any(b or a for b, a in pad):
        widths = list(pad) + ([(0, 0)] if values.ndim > len(shape) else [])
        values = np.pad(values, widths, mode="constant", constant_values=prep.pad_value)
        before = np.asarray([b for b, _ in pad][::-1], dtype=float)
        direction = np.asarray(grid.direction).reshape(grid.ndim, -1)
        origin = np.asarray(grid.origin) - direction @ (before * np.asarray(grid.spacing))
        grid = Geometry(size=values.shape[:len(shape)][::-1], spacing=grid.spacing, origin=tuple(origin),
                        direction=grid.direction)
        steps.append("padded by %s voxels to a multiple of %d" % ([list(p) for p in pad], k))
    x = values[None] if values.ndim == len(shape) else np.moveaxis(values, -1, 0)
    return np.ascontiguousarray(x, dtype=np.float32), ModelSpace(geometry, grid, pad, steps)


def _all_finite(image: np.ndarray) -> bool:
    """No NaN or infinite voxel (integers always; floats checked slab by slab, not with a whole-volume mask)."""
    if image.dtype.kind not in "fc":
        return True
    step = max(1, SLAB_VOXELS // max(1, int(np.prod(image.shape[1:], dtype=np.int64))))
    return all(bool(np.isfinite(image[i:i + step]).all()) for i in range(0, max(1, image.shape[0]), step))


def _resample_extrapolate(values: np.ndarray, src: Geometry, dst: Geometry, mode: str = "linear") -> np.ndarray:
    """Linear (or nearest) resampling that extends edge values instead of padding with 0 (no dark rim at the
    border)."""
    image = to_sitk(values, src)
    resampler = sitk.ResampleImageFilter()
    resampler.SetSize(dst.size)
    resampler.SetOutputSpacing(dst.spacing)
    resampler.SetOutputOrigin(dst.origin)
    resampler.SetOutputDirection(dst.direction)
    resampler.SetInterpolator(sitk.sitkNearestNeighbor if mode == "nearest" else sitk.sitkLinear)
    resampler.SetUseNearestNeighborExtrapolator(True)
    return sitk.GetArrayFromImage(resampler.Execute(image)).astype(np.float32, copy=False)
