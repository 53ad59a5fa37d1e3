"""nnU-Net's preprocessing and its way back to the image grid (``nnunetv2/preprocessing/preprocessors/
default_preprocessor.py``, ``preprocessing/resampling/default_resampling.py``, ``inference/export_prediction.py``).

For a model whose ``inference["framework"] == "nnunet"`` (:mod:`SegHiResCAMLib.models.nnunet.loader`), in
nnU-Net's order and with its functions:

1. crop to the bounding box of the non-zero voxels (any channel);
2. normalise each channel (the plans' scheme) *before* resampling;
3. resample to the plans' spacing with the plans' ``resampling_fn_data_kwargs`` (third-order splines; for
   anisotropic spacing, max/min > 3, in-plane splines and nearest along the low-resolution axis); the new shape
   is ``round(shape * spacing / target)``, a 2d configuration keeps the slice spacing;
4. pad (centred, zeros) to at least the patch size.

Back: the logits are resampled per class with ``resampling_fn_probabilities_kwargs`` (linear, nearest along a
low-resolution axis) to the cropped shape and put into the image (outside the crop: background).

Like nnU-Net, everything happens in the image's *array* axes: the direction matrix is carried, not applied (a
flipped or oblique image is processed as its voxels are stored). The model grid's :class:`Geometry` is the
cropped image grid resized (same field of view), so heatmaps and masks move between grids as usual.

The resampling is nnU-Net's own (``resample_data_or_seg_to_shape``) when ``nnunetv2`` is installed; otherwise
:func:`resample_data_or_seg` below, the same algorithm (scikit-image ``resize`` with ``mode="edge"``, scipy
``map_coordinates`` along the low-resolution axis), which the tests compare with nnU-Net's.
"""

from typing import Any, Dict, Optional, Sequence, Tuple

import numpy as np

from ..errors import InputError, ModelError
from ..geometry import Geometry
from .model_space import ModelSpace, normalize_intensities

ANISO_THRESHOLD = 3
#: the logit given outside the crop: background wins (softmax probability 1), every sigmoid region is off
OUTSIDE = 1e4


def _lowres_axis(spacing) -> Optional[int]:
    spacing = np.asarray(spacing, dtype=float)
    axes = np.where(max(spacing) / spacing == 1)[0]
    return int(axes[0]) if len(axes) == 1 else None


def separate_z(force: Optional[bool], current, new) -> Tuple[bool, Optional[int]]:
    """``(resample the low-resolution axis separately, that axis)``: nnU-Net's ``determine_do_sep_z_and_axis``."""
    if force is not None:
        axis = _lowres_axis(current) if force else None
        return bool(force) and axis is not None, axis
    for spacing in (current, new):
        if max(spacing) / min(spacing) > ANISO_THRESHOLD:
            axis = _lowres_axis(spacing)
            return axis is not None, axis
    return False, None


def resample_data_or_seg(data: np.ndarray, new_shape, current_spacing, new_spacing, order: int = 3,
                         order_z: int = 0, force_separate_z: Optional[bool] = None) -> np.ndarray:
    """``data`` ``[C, *S]`` (float) resized to ``new_shape`` as nnU-Net's ``resample_data_or_seg_to_shape``
    (``is_seg=False``); returns float32. See the module docstring."""
    try:
        from nnunetv2.preprocessing.resampling.default_resampling import resample_data_or_seg_to_shape
    except ImportError:
        resample_data_or_seg_to_shape = None
    if resample_data_or_seg_to_shape is not None and data.ndim == 4:
        out = resample_data_or_seg_to_shape(data, new_shape, current_spacing, new_spacing, is_seg=False, order=order,
                                            order_z=order_z, force_separate_z=force_separate_z)
        return np.asarray(out, dtype=np.float32)
    return own_resample(data, new_shape, current_spacing, new_spacing, order, order_z, force_separate_z)


def own_resample(data: np.ndarray, new_shape, current_spacing, new_spacing, order: int = 3, order_z: int = 0,
                 force_separate_z: Optional[bool] = None) -> np.ndarray:
    """The algorithm of nnU-Net's ``resample_data_or_seg`` (``is_seg=False``) without nnU-Net."""
    try:
        from scipy.ndimage import map_coordinates
        from skimage.transform import resize
    except ImportError as exc:
        raise ModelError("nnU-Net's resampling needs scikit-image and scipy (or nnunetv2); install them with `pip "
                         "install scikit-image scipy`") from exc
    shape = np.array(data.shape[1:])
    new_shape = np.array([int(s) for s in new_shape])
    if np.all(shape == new_shape):
        return data.astype(np.float32)
    data = data.astype(float, copy=False)
    do_separate, axis = separate_z(force_separate_z, current_spacing, new_spacing)
    if data.ndim != 4:
        do_separate = False
    out = np.zeros((data.shape[0],) + tuple(new_shape), dtype=np.float32)
    kwargs = {"mode": "edge", "anti_aliasing": False}
    for c in range(data.shape[0]):
        if not do_separate:
            out[c] = resize(data[c], new_shape, order, **kwargs)
            continue
        plane = [i for i in range(3) if i != axis]
        tmp_shape = new_shape.copy()
        tmp_shape[axis] = shape[axis]
        here = np.zeros(tmp_shape)
        for i in range(shape[axis]):
            index = [slice(None)] * 3
            index[axis] = i
            here[tuple(index)] = resize(data[c][tuple(index)], new_shape[plane], order, **kwargs)
        if shape[axis] != new_shape[axis]:
            scales = [float(o) / n for o, n in zip(here.shape, new_shape)]
            grid = np.mgrid[:new_shape[0], :new_shape[1], :new_shape[2]].astype(float)
            coords = np.array([s * (g + 0.5) - 0.5 for s, g in zip(scales, grid)])
            out[c] = map_coordinates(here, coords, order=order_z, mode="nearest")
        else:
            out[c] = here
    return out


def new_shape(shape, spacing, target) -> Tuple[int, ...]:
    """nnU-Net's ``compute_new_shape``: ``round(shape * spacing / target)``."""
    return tuple(int(round(s / t * n)) for s, t, n in zip(spacing, target, shape))


def nonzero_bbox(data: np.ndarray) -> Tuple[slice, ...]:
    """The bounding box of the voxels non-zero in any channel (``data`` ``[C, *S]``); all of it if none."""
    mask = np.any(data != 0, axis=0)
    if not mask.any():
        return tuple(slice(0, n) for n in mask.shape)
    out = []
    for axis in range(mask.ndim):
        hit = np.where(np.any(mask, axis=tuple(a for a in range(mask.ndim) if a != axis)))[0]
        out.append(slice(int(hit[0]), int(hit[-1]) + 1))
    return tuple(out)


class NnunetSpace(ModelSpace):
    """A :class:`ModelSpace` whose prediction goes back as nnU-Net's does (see the module docstring)."""

    def __init__(self, image: Geometry, grid: Geometry, pad, steps, crop: Tuple[slice, ...],
                 model_spacing: Sequence[float], image_spacing: Sequence[float], kwargs: Dict[str, Any]):
        super().__init__(image, grid, pad, steps)
        self.crop = crop
        self.model_spacing = [float(s) for s in model_spacing]
        self.image_spacing = [float(s) for s in image_spacing]
        self.kwargs = dict(kwargs)

    def channel_to_image(self, channel: np.ndarray, fill: float = 0.0):
        channel = np.asarray(channel, dtype=np.float32)
        if channel.shape != self.grid.array_shape:
            raise InputError("array shape %s does not match the model grid %s" % (channel.shape, self.grid.array_shape))
        inner = channel[tuple(slice(b, s - a) for s, (b, a) in zip(channel.shape, self.pad))]
        shape = tuple(s.stop - s.start for s in self.crop)
        values = resample_data_or_seg(inner[None], shape, self.model_spacing, self.image_spacing,
                                      **self.kwargs)[0]
        out = np.full(self.image.array_shape, fill, dtype=np.float32)
        out[self.crop] = values
        yield slice(None), out

    def outside_score(self, c: int, channels: int, activation: str) -> float:
        return OUTSIDE if (activation == "softmax" and c == 0) else -OUTSIDE


def prepare_nnunet(image: np.ndarray, geometry: Geometry, prep, inference: Dict[str, Any],
                   in_channels: int) -> Tuple[np.ndarray, NnunetSpace]:
    """The network input ``[C, *S_model]`` (float32) and its :class:`NnunetSpace`, as nnU-Net preprocesses.

    ``image``: numpy order, channels last when several; ``prep``: the model's :class:`Preprocessing` (its
    intensity schemes are used); ``inference``: the loader's nnU-Net recipe."""
    image = np.asarray(image)
    if image.ndim == geometry.ndim + 1 and image.shape[:-1] == geometry.array_shape:
        data = np.moveaxis(image, -1, 0)
    elif image.shape == geometry.array_shape:
        data = image[None]
    else:
        raise InputError("image shape %s does not match its geometry %s" % (image.shape, geometry.array_shape))
    if data.shape[0] != in_channels:
        raise InputError("the model expects %d input channel(s) but the image has %d; give an image with %d "
                         "channel(s)" % (in_channels, data.shape[0], in_channels))
    if image.dtype.kind not in "iufb":
        raise InputError("image voxels of type %s cannot be used; give a numeric image" % image.dtype)
    if not np.isfinite(image).all():
        raise InputError("the image holds NaN or infinite voxels; fix or mask them before explaining")
    dims = int(inference["dims"])
    if geometry.ndim != 3 and dims == 3 or geometry.ndim not in (2, 3):
        raise InputError("the model is a %dD nnU-Net configuration but the image is %dD; give a 3D image"
                         % (dims, geometry.ndim))
    data = data.astype(np.float32)
    spacing = list(geometry.spacing[::-1])  # array order, as nnU-Net's SimpleITK reader gives it
    crop = nonzero_bbox(data)
    data = data[(slice(None),) + crop]
    steps = []
    if any(s.stop - s.start != n for s, n in zip(crop, geometry.array_shape)):
        steps.append("cropped to the non-zero box %s" % ([[s.start, s.stop] for s in crop],))
    channels = prep.channels if prep.channels is not None else (prep,)
    data = np.stack([normalize_intensities(data[c], channels[c] if len(channels) > 1 else channels[0])
                     for c in range(data.shape[0])])
    steps.append("intensity normalised per channel (before resampling, as nnU-Net)")
    target = [float(s) for s in inference["spacing"]]
    if len(target) < len(spacing):  # a 2d configuration keeps the spacing between slices
        target = spacing[:len(spacing) - len(target)] + target
    shape = new_shape(data.shape[1:], spacing, target)
    if tuple(shape) != tuple(data.shape[1:]):
        data = resample_data_or_seg(data, shape, spacing, target, **inference["data_resampling"])
        steps.append("resampled from %s mm to %s mm (nnU-Net: %s)" % (
            [round(s, 4) for s in spacing], [round(s, 4) for s in target], inference["data_resampling"]))
    # the cropped grid, then resized to the new shape (same field of view: nnU-Net resizes shapes)
    direction = np.asarray(geometry.direction).reshape(geometry.ndim, -1)
    start = np.asarray([s.start for s in crop][::-1], dtype=float)
    origin = np.asarray(geometry.origin) + direction @ (start * np.asarray(geometry.spacing))
    cropped = Geometry(size=tuple(s.stop - s.start for s in crop)[::-1], spacing=geometry.spacing,
                       origin=tuple(origin), direction=geometry.direction)
    new_spacing = np.asarray(cropped.spacing) * np.asarray(cropped.size, float) / np.asarray(shape[::-1], float)
    grid_origin = np.asarray(cropped.origin) + direction @ ((new_spacing - np.asarray(cropped.spacing)) / 2.0)
    grid = Geometry(size=tuple(shape[::-1]), spacing=tuple(new_spacing), origin=tuple(grid_origin),
                    direction=geometry.direction)
    patch = [int(p) for p in inference["patch_size"]]
    patch = [1] * (len(shape) - len(patch)) + patch
    pad = []
    for size, low in zip(shape, patch):
        extra = max(0, low - size)
        pad.append((extra // 2, extra - extra // 2))
    if any(b or a for b, a in pad):
        data = np.pad(data, [(0, 0)] + pad, mode="constant", constant_values=0.0)
        before = np.asarray([b for b, _ in pad][::-1], dtype=float)
        origin = np.asarray(grid.origin) - direction @ (before * np.asarray(grid.spacing))
        grid = Geometry(size=data.shape[1:][::-1], spacing=grid.spacing, origin=tuple(origin),
                        direction=grid.direction)
        steps.append("padded by %s voxels to the patch size %s" % ([list(p) for p in pad], patch))
    space = NnunetSpace(geometry, grid, tuple(pad), steps, crop, target, spacing, inference["probability_resampling"])
    return np.ascontiguousarray(data, dtype=np.float32), space


def pad_to_multiple(x: np.ndarray, space: NnunetSpace, multiple: int) -> Tuple[np.ndarray, NnunetSpace]:
    """``x`` ``[C, *S]`` zero-padded at the end of each axis to a multiple of ``multiple``, for a whole-image pass
    of the network (explanations without windows); nnU-Net's own windows never need it."""
    multiple = int(multiple) if isinstance(multiple, int) else 1
    shape = x.shape[1:]
    extra = [(-n) % multiple for n in shape]
    if multiple <= 1 or not any(extra):
        return x, space
    x = np.pad(x, [(0, 0)] + [(0, e) for e in extra])
    grid = Geometry(size=x.shape[1:][::-1], spacing=space.grid.spacing, origin=space.grid.origin,
                    direction=space.grid.direction)
    pad = tuple((b, a + e) for (b, a), e in zip(space.pad, extra))
    out = NnunetSpace(space.image, grid, pad, space.steps + ["padded at the end by %s voxels to a multiple of %d"
                                                             % (extra, multiple)],
                      space.crop, space.model_spacing, space.image_spacing, space.kwargs)
    return np.ascontiguousarray(x), out
