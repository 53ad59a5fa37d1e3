"""Tests of SegHiResCAMLib.geometry and SegHiResCAMLib.imaging (files, dicom, resample) on real files written and read by SimpleITK."""

import json
import logging
import os
import shutil

import numpy as np
import pytest
import SimpleITK as sitk

from SegHiResCAMLib.imaging import files as shio
from SegHiResCAMLib.imaging.conversion import from_sitk, to_sitk
from SegHiResCAMLib.imaging.resample import read_mask_on_grid, resample_to_grid
from SegHiResCAMLib.errors import InputError, InternalError
from SegHiResCAMLib.geometry import Geometry


def rotation(a, b, c):
    """Right-handed rotation Rz(a) @ Ry(b) @ Rx(c)."""
    ca, sa, cb, sb, cc, sc = np.cos(a), np.sin(a), np.cos(b), np.sin(b), np.cos(c), np.sin(c)
    rz = np.array([[ca, -sa, 0], [sa, ca, 0], [0, 0, 1]])
    ry = np.array([[cb, 0, sb], [0, 1, 0], [-sb, 0, cb]])
    rx = np.array([[1, 0, 0], [0, cc, -sc], [0, sc, cc]])
    return rz @ ry @ rx


@pytest.fixture
def oblique():
    """Anisotropic, oblique, off-origin 3D grid of 7 x 6 x 5 voxels."""
    return Geometry(
        size=(7, 6, 5),
        spacing=(0.7, 1.3, 2.9),
        origin=(-12.345, 67.891, -3.21),
        direction=tuple(rotation(0.3, -0.2, 0.5).ravel()),
    )


@pytest.fixture
def image(oblique):
    rng = np.random.default_rng(0)
    return (rng.normal(size=oblique.array_shape) * 300.0).astype(np.float32)


def assert_geometry(got, want, atol):
    assert got.size == want.size
    np.testing.assert_allclose(got.spacing, want.spacing, rtol=0, atol=atol)
    np.testing.assert_allclose(got.origin, want.origin, rtol=0, atol=atol)
    np.testing.assert_allclose(got.direction, want.direction, rtol=0, atol=atol)


def leftovers(folder):
    return [f for f in os.listdir(folder) if f.startswith((".tmp-", ".old-"))]


# ------------------------------------------------------------------------------------------------ Geometry
def test_ijk_to_lps_and_ras_match_hand_computed_matrix():
    # index x runs along LPS +y, index y along LPS -x (90 degrees about z)
    g = Geometry(size=(4, 5, 6), spacing=(2.0, 3.0, 4.0), origin=(10.0, 20.0, 30.0),
                 direction=(0, -1, 0, 1, 0, 0, 0, 0, 1))
    lps = np.array([[0, -3, 0, 10], [2, 0, 0, 20], [0, 0, 4, 30], [0, 0, 0, 1]], dtype=float)
    ras = np.array([[0, 3, 0, -10], [-2, 0, 0, -20], [0, 0, 4, 30], [0, 0, 0, 1]], dtype=float)
    np.testing.assert_array_equal(g.ijk_to_lps(), lps)
    np.testing.assert_array_equal(g.ijk_to_ras(), ras)
    # agrees with SimpleITK's own index -> physical mapping
    img = to_sitk(np.zeros(g.array_shape, np.uint8), g)
    assert img.TransformIndexToPhysicalPoint((1, 1, 1)) == pytest.approx((7.0, 22.0, 34.0))
    np.testing.assert_allclose(g.ijk_to_lps() @ [1, 1, 1, 1], [7.0, 22.0, 34.0, 1.0])


def test_ijk_to_ras_2d_negates_both_rows():
    g = Geometry(size=(3, 2), spacing=(0.5, 2.0), origin=(1.0, -4.0), direction=(1, 0, 0, 1))
    np.testing.assert_array_equal(g.ijk_to_ras(), [[-0.5, 0, -1.0], [0, -2.0, 4.0], [0, 0, 1]])


def test_from_ijk_to_ras_round_trip(oblique):
    back = Geometry.from_ijk_to_ras(oblique.ijk_to_ras(), oblique.size)
    assert back.size == oblique.size
    assert back.same_grid(oblique, atol=1e-12)
    np.testing.assert_allclose(back.spacing, (0.7, 1.3, 2.9), rtol=0, atol=1e-12)


def test_from_ijk_to_ras_rejects_wrong_shape(oblique):
    with pytest.raises(InputError, match="shape"):
        Geometry.from_ijk_to_ras(np.eye(3), oblique.size)


def test_dict_json_round_trip_is_exact(oblique):
    text = json.dumps(oblique.to_dict())
    back = Geometry.from_dict(json.loads(text))
    assert back == oblique
    assert back.direction == oblique.direction  # bit-exact floats


def test_identity_and_shapes():
    g = Geometry.identity((4, 3, 2))
    assert g.size == (2, 3, 4) and g.array_shape == (4, 3, 2) and g.ndim == 3
    assert g.spacing == (1.0, 1.0, 1.0) and g.origin == (0.0, 0.0, 0.0)
    assert g.direction == (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)
    assert isinstance(g.size[0], int)


def test_same_grid(oblique):
    shifted = Geometry(oblique.size, oblique.spacing, np.add(oblique.origin, 1e-6), oblique.direction)
    moved = Geometry(oblique.size, oblique.spacing, np.add(oblique.origin, 1e-3), oblique.direction)
    bigger = Geometry((8, 6, 5), oblique.spacing, oblique.origin, oblique.direction)
    assert oblique.same_grid(shifted)
    assert not oblique.same_grid(moved)
    assert oblique.same_grid(moved, atol=1e-2)
    assert not oblique.same_grid(bigger)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(spacing=(1.0, 0.0, 1.0)), "spacing"),
        (dict(spacing=(1.0, 1.0)), "give 3 values"),
        (dict(origin=(0.0, float("nan"), 0.0)), "NaN"),
        (dict(direction=(1, 0, 0, 1)), "needs 9"),
        (dict(direction=(1, 0, 0, 1, 0, 0, 0, 0, 1)), "not invertible"),
        (dict(size=(3, 0, 2)), "whole number >= 1"),
        (dict(size=(3, 2.5, 2)), "whole number >= 1"),
        (dict(spacing="abc"), "not a sequence of numbers"),
    ],
)
def test_geometry_validation(kwargs, message):
    args = dict(size=(3, 2, 2), spacing=(1.0, 1.0, 1.0), origin=(0.0, 0.0, 0.0), direction=tuple(np.eye(3).ravel()))
    args.update(kwargs)
    with pytest.raises(InputError, match=message):
        Geometry(**args)


# ------------------------------------------------------------------------------------------------ round trips
@pytest.mark.parametrize(
    "name, atol",
    [
        # NIfTI stores spacing and origin as float32 and the direction as a quaternion: ~1e-6 mm
        ("x.nii", 1e-5),
        ("x.nii.gz", 1e-5),
        ("x.nrrd", 1e-12),
        ("x.nhdr", 1e-12),
        ("x.mha", 1e-12),
        ("x.mhd", 1e-12),
    ],
)
def test_round_trip_files(tmp_path, oblique, image, name, atol):
    path = tmp_path / name
    shio.write_image(str(path), image, oblique)
    array, geometry = shio.read_image(str(path))
    assert array.dtype == np.float32
    np.testing.assert_array_equal(array, image)
    assert_geometry(geometry, oblique, atol)
    assert leftovers(tmp_path) == []
    if name.endswith((".mhd", ".nhdr")):  # header and data file both moved into place, header still valid
        assert len(os.listdir(tmp_path)) == 2


def test_round_trip_dicom_float(tmp_path, oblique, image):
    out = tmp_path / "series"
    shio.write_image(str(out), image, oblique)
    assert len(os.listdir(out)) == 5  # one file per slice
    array, geometry = shio.read_image(str(out))
    assert_geometry(geometry, oblique, 1e-4)
    slope = (float(image.max()) - float(image.min())) / 65532.0
    error = np.abs(array.astype(np.float64) - image.astype(np.float64)).max()
    assert error <= slope / 2 + 1e-9
    assert error > 0  # really quantised (the values are not whole numbers)
    assert leftovers(tmp_path) == []


def test_round_trip_dicom_int16_exact_and_replaces_old_series(tmp_path, oblique, image):
    out = tmp_path / "series"
    labels = np.round(image / 10).astype(np.int16)
    shio.write_image(str(out), labels, oblique)
    smaller = Geometry((7, 6, 2), oblique.spacing, oblique.origin, oblique.direction)
    shio.write_image(str(out), labels[:2], smaller)  # overwrite an existing series folder
    array, geometry = shio.read_image(str(out))
    assert array.dtype == np.int16
    np.testing.assert_array_equal(array, labels[:2])
    assert_geometry(geometry, smaller, 1e-4)
    assert len(os.listdir(out)) == 2  # no stale slices of the first series
    assert leftovers(tmp_path) == []


def test_dicom_whole_float_values_are_exact(tmp_path, oblique):
    values = np.arange(np.prod(oblique.array_shape), dtype=np.float32).reshape(oblique.array_shape) - 100
    shio.write_image(str(tmp_path / "s"), values, oblique)
    array, _ = shio.read_image(str(tmp_path / "s"))
    np.testing.assert_array_equal(array, values)


def test_dicom_left_handed_direction_writes_same_voxels_in_space(tmp_path, oblique, image):
    flipped = rotation(0.3, -0.2, 0.5) @ np.diag([1.0, 1.0, -1.0])  # determinant -1
    g = Geometry(oblique.size, oblique.spacing, oblique.origin, tuple(flipped.ravel()))
    labels = np.round(image).astype(np.int16)
    shio.write_image(str(tmp_path / "s"), labels, g)
    array, geometry = shio.read_image(str(tmp_path / "s"))
    assert np.linalg.det(geometry.direction_matrix) == pytest.approx(1.0)
    np.testing.assert_array_equal(array, labels[::-1])
    # voxel (0, 0, 0) of the read series is voxel (0, 0, 4) of the written array
    np.testing.assert_allclose(geometry.origin, (g.ijk_to_lps() @ [0, 0, 4, 1])[:3], atol=1e-4)
    np.testing.assert_array_equal(resample_to_grid(array, geometry, g), labels)


def test_dicom_folder_with_two_series_reads_the_larger(tmp_path, oblique, image, caplog):
    small = Geometry((7, 6, 2), oblique.spacing, oblique.origin, oblique.direction)
    shio.write_image(str(tmp_path / "a"), np.zeros(small.array_shape, np.int16), small)
    shio.write_image(str(tmp_path / "b"), np.ones(oblique.array_shape, np.int16), oblique)
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    for sub in ("a", "b"):
        for f in os.listdir(tmp_path / sub):
            shutil.copy(tmp_path / sub / f, mixed / f"{sub}-{f}")
    with caplog.at_level(logging.WARNING, logger="SegHiResCAMLib.imaging.dicom"):
        array, geometry = shio.read_image(str(mixed))
    assert array.shape == (5, 6, 7) and np.all(array == 1)
    assert "2 DICOM series" in caplog.text and "(2 files)" in caplog.text


def test_round_trip_2d(tmp_path):
    direction = tuple(rotation(0.4, 0, 0)[:2, :2].ravel())
    g = Geometry(size=(5, 3), spacing=(0.4, 1.7), origin=(3.5, -2.0), direction=direction)
    values = np.arange(15, dtype=np.int16).reshape(3, 5) - 7
    for name, atol in (("a.nii.gz", 1e-5), ("a.nrrd", 1e-12), ("a.mha", 1e-12)):
        shio.write_image(str(tmp_path / name), values, g)
        array, geometry = shio.read_image(str(tmp_path / name))
        assert array.dtype == np.int16 and array.shape == (3, 5)
        np.testing.assert_array_equal(array, values)
        assert_geometry(geometry, g, atol)
    with pytest.raises(InputError, match="3D scalar"):
        shio.write_image(str(tmp_path / "dicom2d"), values, g)


def test_round_trip_vector_image(tmp_path, oblique):
    values = np.random.default_rng(1).random(oblique.array_shape + (3,)).astype(np.float32)
    for name, atol in (("v.nrrd", 1e-12), ("v.mha", 1e-12), ("v.nii.gz", 1e-5)):
        shio.write_image(str(tmp_path / name), values, oblique)
        array, geometry = shio.read_image(str(tmp_path / name))
        assert array.shape == (5, 6, 7, 3)
        np.testing.assert_array_equal(array, values)
        assert_geometry(geometry, oblique, atol)
        assert shio.read_sitk(str(tmp_path / name)).GetNumberOfComponentsPerPixel() == 3


def test_to_sitk_from_sitk(oblique, image):
    img = to_sitk(image, oblique)
    assert img.GetSize() == (7, 6, 5) and img.GetPixelID() == sitk.sitkFloat32
    assert img[2, 1, 0] == image[0, 1, 2]  # sitk indexes (x, y, z), numpy (z, y, x)
    array, geometry = from_sitk(img)
    np.testing.assert_array_equal(array, image)
    assert geometry == oblique
    mask, _ = from_sitk(to_sitk(image > 0, oblique))
    assert mask.dtype == np.uint8 and mask.sum() == (image > 0).sum()
    with pytest.raises(InputError, match="does not fit the geometry"):
        to_sitk(image[:, :, :3], oblique)


# ------------------------------------------------------------------------------------------------ resampling
def test_resample_nearest_label_map_onto_shifted_grid():
    src = Geometry.identity((2, 3, 4))  # x: 0..3
    labels = np.arange(24, dtype=np.int16).reshape(2, 3, 4)
    # dst x index i sits at LPS x = 1 + 2 i: source x 1, 3, then outside
    dst = Geometry(size=(3, 3, 2), spacing=(2.0, 1.0, 1.0), origin=(1.0, 0.0, 0.0), direction=src.direction)
    out = resample_to_grid(labels, src, dst, "nearest", default=-1)
    assert out.dtype == np.int16 and out.shape == (2, 3, 3)
    np.testing.assert_array_equal(out[..., 0], labels[..., 1])
    np.testing.assert_array_equal(out[..., 1], labels[..., 3])
    assert np.all(out[..., 2] == -1)
    assert out[1, 2, 1] == 23  # z=1, y=2, x=3 -> 12 + 8 + 3


def test_resample_linear_half_voxel_and_same_grid(oblique, image):
    src = Geometry.identity((1, 1, 4))
    values = np.array([[[0, 10, 20, 30]]], dtype=np.int16)
    dst = Geometry((3, 1, 1), (1.0, 1.0, 1.0), (0.5, 0.0, 0.0), src.direction)
    out = resample_to_grid(values, src, dst, "linear")
    assert out.dtype == np.float32
    np.testing.assert_allclose(out.ravel(), [5.0, 15.0, 25.0])
    np.testing.assert_array_equal(resample_to_grid(image, oblique, oblique), image)
    with pytest.raises(InputError, match="cubic"):
        resample_to_grid(image, oblique, oblique, "cubic")


def test_read_mask_on_grid_resamples_notes_and_checks(tmp_path, oblique):
    labels = np.zeros(oblique.array_shape, np.uint8)
    labels[1:3, 2:5, 2:6] = 2
    same = str(tmp_path / "same.nrrd")
    shio.write_image(same, labels, oblique)
    mask, notes = read_mask_on_grid(same, oblique)
    np.testing.assert_array_equal(mask, labels)
    assert notes == []
    coarse = Geometry(tuple(s // 2 for s in oblique.size), tuple(2 * s for s in oblique.spacing), oblique.origin,
                      oblique.direction)
    other = str(tmp_path / "coarse.nii.gz")
    shio.write_image(other, resample_to_grid(labels, oblique, coarse), coarse)
    mask, notes = read_mask_on_grid(other, oblique, label=2, what="reference", binary=True)
    assert mask.dtype == np.uint8 and set(np.unique(mask)) == {0, 1} and mask.shape == oblique.array_shape
    assert len(notes) == 1 and "reference's grid differs" in notes[0] and "nearest" in notes[0]
    with pytest.raises(InputError, match="label 7 does not occur in the segment"):
        read_mask_on_grid(same, oblique, label=7)
    empty = str(tmp_path / "empty.nrrd")
    shio.write_image(empty, np.zeros_like(labels), oblique)
    assert not read_mask_on_grid(empty, oblique)[0].any()  # the caller decides (a target reports it)
    with pytest.raises(InputError, match="tissue mask .* is empty on the image grid"):
        read_mask_on_grid(empty, oblique, what="tissue mask", binary=True)
    far = Geometry((3, 3, 3), (1.0, 1.0, 1.0), (900.0, 900.0, 900.0), tuple(np.eye(3).ravel()))
    shio.write_image(str(tmp_path / "far.nrrd"), np.ones(far.array_shape, np.uint8), far)
    with pytest.raises(InputError, match="does not overlap the image"):
        read_mask_on_grid(str(tmp_path / "far.nrrd"), oblique)
    shio.write_image(str(tmp_path / "rgb.nrrd"), np.zeros(oblique.array_shape + (3,), np.uint8), oblique)
    with pytest.raises(InputError, match="3 axes|4 axes"):
        read_mask_on_grid(str(tmp_path / "rgb.nrrd"), oblique)


# ------------------------------------------------------------------------------------------------ atomic writes
def test_failed_write_leaves_no_temp_and_keeps_target(tmp_path, monkeypatch, oblique, image):
    target = tmp_path / "heat.nii.gz"
    shio.write_image(str(target), image, oblique)
    before = target.read_bytes()

    def broken(*args, **kwargs):
        raise RuntimeError("disk full (simulated)")

    monkeypatch.setattr(shio.sitk, "WriteImage", broken)
    with pytest.raises(InputError, match="disk full"):
        shio.write_image(str(target), image * 2, oblique)
    assert target.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["heat.nii.gz"]

    def buggy(*args, **kwargs):
        raise ValueError("bug (simulated)")

    monkeypatch.setattr(shio.sitk, "WriteImage", buggy)
    with pytest.raises(InternalError):
        shio.write_image(str(tmp_path / "new.mhd"), image, oblique)
    assert sorted(os.listdir(tmp_path)) == ["heat.nii.gz"]


def test_failed_dicom_write_keeps_old_series(tmp_path, monkeypatch, oblique, image):
    out = tmp_path / "series"
    labels = np.round(image).astype(np.int16)
    shio.write_image(str(out), labels, oblique)
    files = sorted(os.listdir(out))

    def broken(self, *args):
        raise RuntimeError("simulated GDCM failure")

    monkeypatch.setattr(sitk.ImageFileWriter, "Execute", broken)
    with pytest.raises(InputError, match="simulated GDCM failure"):
        shio.write_image(str(out), labels + 1, oblique)
    monkeypatch.undo()
    assert sorted(os.listdir(out)) == files
    np.testing.assert_array_equal(shio.read_image(str(out))[0], labels)
    assert leftovers(tmp_path) == []


def test_dicom_refuses_folder_with_other_files(tmp_path, oblique, image):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    with pytest.raises(InputError, match="not DICOM"):
        shio.write_image(str(out), image, oblique)
    assert (out / "notes.txt").read_text() == "keep me"


def test_refuses_to_overwrite_protected_input(tmp_path, oblique, image):
    source = tmp_path / "scan.nrrd"
    shio.write_image(str(source), image, oblique)
    before = source.read_bytes()
    with pytest.raises(InputError, match="(?i)refusing to overwrite the input"):
        shio.write_image(str(source), image * 0, oblique, protect=[str(source)])
    link = tmp_path / "link.nrrd"
    link.symlink_to(source)
    with pytest.raises(InputError, match="(?i)refusing"):
        shio.write_image(str(link), image * 0, oblique, protect=[str(source)])
    series = tmp_path / "series"
    shio.write_image(str(series), image, oblique)
    with pytest.raises(InputError, match="(?i)refusing"):
        shio.write_image(str(series), image, oblique, protect=[str(series / sorted(os.listdir(series))[0])])
    assert source.read_bytes() == before


# ------------------------------------------------------------------------------------------------ errors
def test_read_missing_file(tmp_path):
    with pytest.raises(InputError, match="does not exist") as info:
        shio.read_image(str(tmp_path / "nothere.nii.gz"))
    assert "nothere.nii.gz" in str(info.value) and ".nrrd" in str(info.value)


def test_read_corrupt_file(tmp_path):
    bad = tmp_path / "x.nii.gz"
    bad.write_bytes(b"\x00garbage bytes, not gzip\xff" * 20)
    with pytest.raises(InputError, match="corrupt") as info:
        shio.read_image(str(bad))
    assert str(bad) in str(info.value)
    assert isinstance(info.value.__cause__, RuntimeError)


def test_unknown_extension(tmp_path, oblique, image):
    other = tmp_path / "x.gif"
    other.write_bytes(b"GIF89a")
    with pytest.raises(InputError, match="unknown file type") as info:
        shio.read_image(str(other))
    assert "supported: .nii, .nii.gz, .nrrd" in str(info.value) and "pictures: .png, .jpg" in str(info.value)
    broken = tmp_path / "x.png"  # a picture (2D models read PNG/JPEG), but not a readable one
    broken.write_bytes(b"\x89PNG")
    with pytest.raises(InputError, match="Could not read the picture"):
        shio.read_image(str(broken))
    with pytest.raises(InputError, match="unknown file type"):
        shio.write_image(str(tmp_path / "out.png"), image, oblique)
    assert not (tmp_path / "out.png").exists()


def test_folder_without_dicom(tmp_path):
    (tmp_path / "readme.txt").write_text("no images here")
    with pytest.raises(InputError, match="holds no DICOM series"):
        shio.read_image(str(tmp_path))


def test_model_space_padding_sides_and_exact_round_trip():
    from SegHiResCAMLib.models.base import Preprocessing
    from SegHiResCAMLib.imaging.model_space import prepare

    geometry = Geometry(size=(20, 18, 9), spacing=(0.8, 1.1, 2.5), origin=(3.0, -4.0, 7.0),
                        direction=tuple(np.eye(3).flatten()))
    image = np.random.RandomState(1).rand(*geometry.array_shape).astype(np.float32)
    for side, expected in (("end", ((0, 7), (0, 6), (0, 4))), ("both", ((3, 4), (3, 3), (2, 2)))):
        x, space = prepare(image, geometry, Preprocessing(divisible_by=8, pad_side=side), 3)
        assert x.shape == (1, 16, 24, 24) and space.pad == expected
        np.testing.assert_array_equal(space.to_image(x[0]), image)  # padding removed exactly, no interpolation
        # the model grid is the image grid extended: voxel (0,0,0) of the image sits at index `before`
        before = np.array([p[0] for p in expected][::-1], dtype=float)
        np.testing.assert_allclose(space.grid.ijk_to_lps() @ np.append(before, 1), geometry.ijk_to_lps()[:, 3])
    x, space = prepare(image, geometry, Preprocessing(orientation="RAS"), 3)
    np.testing.assert_array_equal(space.to_image(x[0]), image)  # a reorientation is a permutation: exact
