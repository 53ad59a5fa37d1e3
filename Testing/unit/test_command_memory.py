"""The command around the engine makes no needless whole-volume copies (issue 16, part 4).

``prepare`` makes one float32 copy of the scan and normalises it in place (it used to hold the cast, a
SimpleITK image and its array back, plus one temporary per arithmetic step); the label map goes back to the image
grid slab by slab; the heatmap on a coinciding grid is the engine's map itself, not a copy. The numbers must not
change: every in-place path is compared bit for bit with the out-of-place one. Allocation peaks are measured with
``tracemalloc`` (numpy reports its data buffers to it), on small arrays, so they are deterministic.
"""

import tracemalloc

import numpy as np
import pytest

from SegHiResCAMLib.geometry import Geometry
from SegHiResCAMLib.imaging import model_space
from SegHiResCAMLib.imaging.conversion import from_sitk, to_sitk
from SegHiResCAMLib.imaging.model_space import ModelSpace, normalize_intensities, prepare
from SegHiResCAMLib.models.base import Preprocessing

SHAPE = (48, 64, 64)  # 196608 voxels: 768 KiB as float32


def _ct(shape=SHAPE, dtype=np.int16, seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(-1024, 1500, size=shape).astype(dtype)


def _geometry(shape=SHAPE) -> Geometry:
    return Geometry(size=shape[::-1], spacing=(0.8, 0.7, 1.5), origin=(-12.5, 30.25, 7.0),
                    direction=(0, 1, 0, 1, 0, 0, 0, 0, -1))


def _peak(run):
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        before = tracemalloc.get_traced_memory()[0]
        result = run()
        peak = tracemalloc.get_traced_memory()[1] - before
    finally:
        tracemalloc.stop()
    return result, peak


PREPS = [
    Preprocessing(),
    Preprocessing(normalization="ct", ct_window=(-160.0, 240.0)),
    Preprocessing(normalization="zscore"),
    Preprocessing(normalization="zscore-nonzero"),
    Preprocessing(normalization="minmax", scale=2.0, shift=-1.0),
    Preprocessing(normalization="range", intensity_range=(-1000.0, 1000.0), output_range=(0.0, 1.0), clip=True),
    Preprocessing(normalization="range", intensity_range=(-500.0, 500.0), output_range=(1.0, -1.0), clip=False),
    Preprocessing(normalization="clip-zscore", intensity_range=(-900.0, 1200.0), mean_std=(40.0, 350.0)),
    Preprocessing(clip_percentiles=(1.0, 99.0), normalization="zscore", then=("minmax",)),
]


@pytest.mark.parametrize("prep", PREPS, ids=lambda p: p.normalization + ("+" + "+".join(p.then) if p.then else ""))
def test_in_place_normalisation_gives_the_same_numbers(prep):
    values = _ct().astype(np.float32)
    values[:4] = 0  # zscore-nonzero has something to leave out
    kept = values.copy()
    expected = normalize_intensities(values, prep)
    np.testing.assert_array_equal(values, kept)  # the default never writes to its input
    own = values.copy()
    result = normalize_intensities(own, prep, inplace=True)
    assert result.dtype == np.float32
    assert result.tobytes() == expected.tobytes()  # bit for bit
    assert np.shares_memory(result, own) or prep.normalization == "none" and not prep.then


@pytest.mark.parametrize("prep", PREPS[:3], ids=["none", "ct", "zscore"])
@pytest.mark.parametrize("dtype", [np.int16, np.float32, np.float64])
def test_prepare_equals_the_simpleitk_round_trip_and_leaves_the_input_alone(prep, dtype):
    image, geometry = _ct(dtype=dtype), _geometry()
    kept = image.copy()
    x, space = prepare(image, geometry, prep, 3)
    np.testing.assert_array_equal(image, kept)
    assert x.dtype == np.float32 and x.shape == (1,) + SHAPE
    assert not np.shares_memory(x, image)  # the network never gets the caller's array
    values, grid = from_sitk(to_sitk(image.astype(np.float32), geometry))  # what prepare did before
    reference = normalize_intensities(values, prep)
    assert x[0].tobytes() == reference.tobytes()
    assert space.grid == grid and space.image == geometry


def test_prepare_makes_one_float32_copy_of_an_int16_scan():
    """A CT window on an int16 scan: one float32 array (the model input); before, the cast, SimpleITK's array
    and the clip and subtract temporaries were alive at once (at least three times the input)."""
    image, geometry = _ct(), _geometry()
    prep = Preprocessing(normalization="ct", ct_window=(-160.0, 240.0))
    prepare(image, geometry, prep, 3)  # imports and caches outside the measurement
    (x, _), peak = _peak(lambda: prepare(image, geometry, prep, 3))
    assert x.nbytes == 4 * image.size
    assert peak <= 1.25 * x.nbytes, "prepare allocated %.2f times the model input" % (peak / x.nbytes)


def test_prepare_checks_floats_for_nan_slab_by_slab(monkeypatch):
    monkeypatch.setattr(model_space, "SLAB_VOXELS", 64 * 64)  # one z slice per slab
    image, geometry = _ct(dtype=np.float32), _geometry()
    image[-1, 5, 7] = np.nan
    with pytest.raises(Exception, match="NaN or infinite"):
        prepare(image, geometry, Preprocessing(), 3)
    image[-1, 5, 7] = 0
    image[0, 0, 0] = -np.inf
    with pytest.raises(Exception, match="NaN or infinite"):
        prepare(image, geometry, Preprocessing(), 3)


def _space(shape=SHAPE) -> ModelSpace:
    geometry = _geometry(shape)
    return ModelSpace(geometry, geometry, tuple((0, 0) for _ in shape))


def test_labels_on_a_coinciding_grid_are_made_slab_by_slab(monkeypatch):
    """The arg-max of the logits on the image grid, with slab-sized temporaries only (before: a whole-volume
    boolean of the voxels a class wins, besides the running maximum)."""
    monkeypatch.setattr(model_space, "SLAB_VOXELS", 64 * 64 * 4)
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(3,) + SHAPE).astype(np.float32)
    logits[1, :2] = logits[0, :2]  # ties go to the lower class
    space = _space()
    space.labels_to_image(lambda c: logits[c], 3)
    labels, peak = _peak(lambda: space.labels_to_image(lambda c: logits[c], 3))
    np.testing.assert_array_equal(labels, logits.argmax(0))
    voxels = int(np.prod(SHAPE))
    assert peak <= 5 * voxels + 4 * model_space.SLAB_VOXELS, \
        "labels_to_image allocated %.2f bytes per voxel" % (peak / voxels)
    sigmoid = space.labels_to_image(lambda c: logits[c], 3, "sigmoid")
    expected = np.where(logits.max(0) > 0, logits.argmax(0) + 1, 0)
    np.testing.assert_array_equal(sigmoid, expected)


def test_to_image_without_copy_hands_back_the_map_itself():
    space = _space()
    heat = np.random.default_rng(2).random(SHAPE, dtype=np.float32)
    same = space.to_image(heat, "linear", copy=False)
    assert same is heat or np.shares_memory(same, heat)
    copied = space.to_image(heat, "linear")
    assert not np.shares_memory(copied, heat) and copied.tobytes() == heat.tobytes()


COUNT_SCRIPT = r"""
import resource, sys
import torch
from SegHiResCAMLib.engine import SegmentTarget, WholeRegion
from SegHiResCAMLib.engine.cam import CAMResult
from SegHiResCAMLib.engine.regions import MaskRegion
mask = torch.zeros((1, 256, 256, 256), dtype=torch.bool)  # 16 MiB; as int64 it would be 128 MiB
mask[0, 10:20, 30:70, 5:9] = True
target = SegmentTarget(1, WholeRegion(), reduction="mean")
target.region_size(mask[:, :2])  # kernels and allocator set up outside the measurement
def peak():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)
before = peak()
size = int(target.region_size(mask)[0])
none = torch.zeros(1)
info = CAMResult(target, "layer", "method", none, none, none, mask, torch.zeros(1, dtype=torch.bool), none).describe()
voxels = MaskRegion(mask[0]).describe()["mask_voxels"]
print(size, info["region_voxels"][0], voxels, peak() - before)
"""


def test_counting_a_region_makes_no_whole_volume_int64_copy():
    """The voxels of M are counted with ``count_nonzero``: a bool ``sum`` first casts the whole mask to int64
    (640 MiB for a CT's prediction; the JSON's ``region_voxels`` and ``reduction="mean"`` count it)."""
    import os
    import subprocess
    import sys
    env = dict(os.environ, OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "-c", COUNT_SCRIPT], capture_output=True, text=True, env=env, check=True)
    size, region_voxels, mask_voxels, grown = (int(v) for v in out.stdout.split())
    assert size == region_voxels == mask_voxels == 10 * 40 * 4
    assert grown < 48 << 20, "counting a 16 MiB mask grew the resident set by %d MiB" % (grown >> 20)
