"""Issue 16, part 2: 2D models on 3D scans, slice by slice (and 2D pictures).

The reference of every comparison is the 2D path run independently on each slice extracted with numpy (a 2D
image with its in-plane spacing), stacked along the axis the test expects from the direction matrix it built.
Tiny 2D networks only; ``slice_batch=1`` where the comparison is bitwise (a batch of slices runs other
convolution kernels: the same values to float32 rounding).
"""

import dataclasses

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from torch import nn

import nets
from slice_cases import SIZE, SPACING, plane, random_image
import toy_models
from SegHiResCAMLib.analysis.explain import TargetSpec, explain_image, predict_image
from SegHiResCAMLib.cli import main
from SegHiResCAMLib.errors import InputError
from SegHiResCAMLib.geometry import Geometry
from SegHiResCAMLib.imaging import files as io
from SegHiResCAMLib.models import load_model
from SegHiResCAMLib.models.base import SegModel



def _rotation(angle_deg, axis):
    a = np.deg2rad(angle_deg)
    c, s = np.cos(a), np.sin(a)
    i, j = [k for k in range(3) if k != axis]
    r = np.eye(3)
    r[i, i], r[i, j], r[j, i], r[j, j] = c, -s, s, c
    return r


#: direction matrices (columns: index axes x, y, z in LPS) and the numpy axis of axial, coronal, sagittal slices
DIRECTIONS = {
    "identity": (np.eye(3), {"axial": 0, "coronal": 1, "sagittal": 2}),
    # x points mostly S, y mostly L, z mostly A, turned by 20 and 15 degrees: no axis is anatomical
    "oblique": (_rotation(20, 0) @ _rotation(15, 2) @ np.array([[0, 1, 0], [0, 0, 1], [1, 0, 0]], float),
                {"axial": 2, "coronal": 0, "sagittal": 1}),
    # x points A, y points I, z points R: permuted and flipped
    "flipped": (np.array([[0, 0, -1], [-1, 0, 0], [0, -1, 0]], float), {"axial": 1, "coronal": 2, "sagittal": 0}),
}


def geometry(direction="identity"):
    return Geometry(size=SIZE, spacing=SPACING, origin=(3.0, -2.0, 7.5),
                    direction=tuple(DIRECTIONS[direction][0].flatten()))




@pytest.fixture(scope="module")
def image():
    return random_image()


@pytest.fixture(scope="module")
def mask():
    m = np.zeros(SIZE[::-1], np.uint8)
    m[2:4, 3:7, 2:6] = 1  # a few slices along every axis, not all
    return m


def unet2d(in_channels=1):
    torch.manual_seed(7)
    return SegModel(nets.TinyUNet(nd=2, in_channels=in_channels).eval(), "tiny-2d", spatial_dims=2,
                    in_channels=in_channels)


def per_slice_reference(model, image, mask, axis, normalization="none", context=0, card=None, spec=None):
    """The 2D path on every slice (numpy), stacked along ``axis``; slices without target voxels are zeros."""
    out = np.zeros(image.shape, np.float32)
    volume, masks = np.moveaxis(image, axis, 0), np.moveaxis(mask, axis, 0) if mask is not None else None
    for k in range(volume.shape[0]):
        if masks is not None and not masks[k].any():
            continue
        picture = volume[k]
        if context:
            picture = np.stack([volume[min(max(j, 0), len(volume) - 1)] for j in range(k - context, k + context + 1)], -1)
        target = TargetSpec(1, mask=masks[k]) if masks is not None else spec
        try:
            res = explain_image(model, picture, plane(axis), [target], layers="dec", device="cpu",
                                normalization=normalization, model_card=card)
        except Exception as exc:  # the prediction of this slice holds no voxel of the class
            if "empty" in str(exc):
                continue
            raise
        np.moveaxis(out, axis, 0)[k] = res.heatmaps[0].array
    return out


@pytest.mark.parametrize("direction", sorted(DIRECTIONS))
@pytest.mark.parametrize("axis_name", ["axial", "coronal", "sagittal"])
def test_2d_model_on_a_volume_equals_the_2d_path_on_each_slice(image, mask, direction, axis_name):
    model = unet2d()
    axis = DIRECTIONS[direction][1][axis_name]
    got = explain_image(model, image, geometry(direction), [TargetSpec(1, mask=mask)], layers="dec", device="cpu",
                        normalization="none", slice_axis=axis_name, slice_batch=1)
    heat = got.heatmaps[0].array
    expected = per_slice_reference(model, image, mask, axis)
    assert heat.shape == image.shape and heat.dtype == np.float32
    np.testing.assert_array_equal(heat, expected)
    assert np.abs(heat).max() > 0
    assert got.metadata["slices"]["array_axis"] == axis and got.metadata["slices"]["axis"] == axis_name


def test_card_preprocessing_is_applied_and_undone_per_slice_and_batches_agree(image, mask):
    model = unet2d()
    card = {"dims": 2, "resize_to": [12, 12], "intensity": {"normalize": ["zscore"], "scale": 0.5},
            "slice_axis": "coronal"}
    got = explain_image(model, image, geometry("oblique"), [TargetSpec(1, mask=mask)], layers="dec", device="cpu",
                        normalization="per-slice", model_card=card, slice_batch=1)
    expected = per_slice_reference(model, image, mask, 0, normalization="max", card=card)  # coronal: axis 0
    np.testing.assert_array_equal(got.heatmaps[0].array, expected)
    assert "resized from" in " ".join(got.metadata["model_space"]["steps"])
    slices = [predict_image(model, image[k], plane(0), device="cpu", model_card=card)[0] for k in range(len(image))]
    np.testing.assert_array_equal(got.prediction, np.stack(slices))  # labels mapped back as for a 2D image
    batched = explain_image(model, image, geometry("oblique"), [TargetSpec(1, mask=mask)], layers="dec",
                            device="cpu", normalization="per-slice", model_card=card, slice_batch=3)
    np.testing.assert_allclose(batched.heatmaps[0].array, expected, rtol=1e-5, atol=1e-6)


def test_one_global_normalisation_by_default_and_per_slice_as_an_option(image, mask):
    model = unet2d()
    raw = per_slice_reference(model, image, mask, 1)
    glob = explain_image(model, image, geometry(), [TargetSpec(1, mask=mask)], layers="dec", device="cpu",
                         slice_axis="coronal", slice_batch=1).heatmaps[0]
    np.testing.assert_allclose(glob.array, raw / raw.max(), rtol=1e-6, atol=0)
    per = explain_image(model, image, geometry(), [TargetSpec(1, mask=mask)], layers="dec", device="cpu",
                        slice_axis="coronal", normalization="per-slice", slice_batch=1).heatmaps[0]
    np.testing.assert_array_equal(per.array, per_slice_reference(model, image, mask, 1, normalization="max"))
    peaks_global = np.moveaxis(glob.array, 1, 0).reshape(SIZE[1], -1).max(1)
    peaks_per = np.moveaxis(per.array, 1, 0).reshape(SIZE[1], -1).max(1)
    run = [k for k in range(SIZE[1]) if np.moveaxis(mask, 1, 0)[k].any()]
    np.testing.assert_allclose(peaks_per[run], 1.0, rtol=1e-6)
    assert peaks_global.max() == pytest.approx(1.0) and len(set(np.round(peaks_global[run], 5))) > 1
    assert glob.info["slices"]["normalization"] == "max" and per.info["slices"]["normalization"] == "per-slice"


class SignNet(nn.Module):
    """Class 1 where the input is positive (logits 0 and x); records (grad enabled, batch size) of every call."""

    def __init__(self):
        super().__init__()
        self.features = nn.Conv2d(1, 2, 1)
        with torch.no_grad():
            self.features.weight.copy_(torch.tensor([0.0, 1.0]).view(2, 1, 1, 1))
            self.features.bias.zero_()
        self.calls = []

    def forward(self, x):
        self.calls.append((torch.is_grad_enabled(), x.shape[0]))
        return self.features(x)


def cam_slices(net):
    return sum(n for grad, n in net.calls if grad)


def test_slices_without_target_voxels_are_zeros_and_not_run():
    image = -np.ones(SIZE[::-1], np.float32)
    image[1, 2:5, 2:5] = 2.0  # class 1 is predicted on axial slices 1 and 4 only
    image[4, 6:8, 1:3] = 1.0
    net = SignNet().eval()
    model = SegModel(net, "sign", spatial_dims=2, output="logits")
    got = explain_image(model, image, geometry(), [TargetSpec(1)], layers="features", device="cpu", slice_batch=2)
    heat = got.heatmaps[0].array
    assert cam_slices(net) == 2  # the gradient pass saw slices 1 and 4 only
    assert [k for k in range(SIZE[2]) if heat[k].any()] == [1, 4]
    np.testing.assert_array_equal(got.prediction, (image > 0).astype(np.uint8))
    assert got.metadata["slices"]["cam_slices"] == 2 and got.heatmaps[0].info["slices"]["run"] == 2
    net.calls.clear()  # a segment on two coronal slices: two slices through the CAM, the others only predicted
    segment = np.zeros(SIZE[::-1], np.uint8)
    segment[:, 3:5, 2:4] = 1
    got = explain_image(model, image, geometry(), [TargetSpec(1, mask=segment)], layers="features", device="cpu",
                        slice_axis="coronal", normalization="none")
    assert cam_slices(net) == 2 and sum(n for grad, n in net.calls if not grad) >= SIZE[1] - 2
    assert [k for k in range(SIZE[1]) if got.heatmaps[0].array[:, k].any()] == [3, 4]
    np.testing.assert_array_equal(got.prediction, (image > 0).astype(np.uint8))


def test_prediction_target_and_predict_equal_the_2d_path(image):
    model = unet2d()
    got = explain_image(model, image, geometry("flipped"), [TargetSpec(1)], layers="dec", device="cpu",
                        slice_axis="sagittal", normalization="none", slice_batch=1)
    expected = per_slice_reference(model, image, None, 0, spec=TargetSpec(1))  # flipped sagittal: numpy axis 0
    np.testing.assert_array_equal(got.heatmaps[0].array, expected)
    labels, meta = predict_image(model, image, geometry("flipped"), device="cpu", slice_axis="sagittal")
    slices = [predict_image(model, image[k], plane(0), device="cpu")[0] for k in range(image.shape[0])]
    np.testing.assert_array_equal(labels, np.stack(slices))
    np.testing.assert_array_equal(got.prediction, labels)
    assert meta["slices"]["axis"] == "sagittal"


def test_slice_context_gives_neighbouring_slices_as_channels(image, mask):
    model = unet2d(in_channels=3)
    got = explain_image(model, image, geometry(), [TargetSpec(1, mask=mask)], layers="dec", device="cpu",
                        normalization="none", slice_context=1, slice_axis="sagittal", slice_batch=1)
    np.testing.assert_array_equal(got.heatmaps[0].array, per_slice_reference(model, image, mask, 2, context=1))
    edge = np.zeros_like(mask)
    edge[:, :, 0] = 1  # the first sagittal slice: its missing neighbour is the slice itself
    got = explain_image(model, image, geometry(), [TargetSpec(1, mask=edge)], layers="dec", device="cpu",
                        normalization="none", slice_context=1, slice_axis="sagittal", slice_batch=1)
    np.testing.assert_array_equal(got.heatmaps[0].array, per_slice_reference(model, image, edge, 2, context=1))
    with pytest.raises(InputError, match="slice context 1"):
        explain_image(model, image, geometry(), [TargetSpec(1, mask=mask)], layers="dec", device="cpu")


def test_a_2d_model_without_a_card_is_detected_by_running_it(image, mask):
    model = load_model("toy_models:fconv2d")
    assert model.spatial_dims == 3  # nothing in its layers says 2D
    got = explain_image(model, image, geometry(), [TargetSpec(1, mask=mask)], layers="features", device="cpu",
                        normalization="none", slice_batch=1)
    assert model.spatial_dims == 2 and model.resolved["dims"] == {"declared": None, "probed": 2, "used": 2}
    flat = dataclasses.replace(model, spatial_dims=2)
    expected = np.zeros(image.shape, np.float32)
    for k in range(image.shape[0]):
        if mask[k].any():
            expected[k] = explain_image(flat, image[k], plane(0), [TargetSpec(1, mask=mask[k])], layers="features",
                                        device="cpu", normalization="none").heatmaps[0].array
    np.testing.assert_array_equal(got.heatmaps[0].array, expected)
    assert got.metadata["model"]["resolved"]["dims"]["used"] == 2


def test_a_3d_model_is_not_sliced_and_per_slice_needs_a_2d_model(image, mask):
    model = SegModel(nets.TinyUNet(nd=3).eval(), "tiny-3d")
    got = explain_image(model, image, geometry(), [TargetSpec(1, mask=mask)], layers="dec", device="cpu")
    assert "slices" not in got.metadata and "dims" not in model.resolved
    with pytest.raises(InputError, match="per-slice normalisation is for a 2D model"):
        explain_image(model, image, geometry(), [TargetSpec(1, mask=mask)], layers="dec", device="cpu",
                      normalization="per-slice")


def test_a_bad_slice_axis_is_one_clear_error(image, mask, tmp_path, capsys):
    with pytest.raises(InputError, match="slice axis 'transverse' is not one of axial, coronal, sagittal"):
        explain_image(unet2d(), image, geometry(), [TargetSpec(1, mask=mask)], device="cpu", slice_axis="transverse")
    path = str(tmp_path / "img.nii.gz")
    io.write_image(path, image, geometry())
    code = main(["explain", "--model", "toy_models:unet2d", "--image", path, "--out", str(tmp_path / "h.nii.gz"),
                 "--slice-axis", "transverse", "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "slice axis 'transverse' is not one of axial" in err[0]
    assert not (tmp_path / "h.nii.gz").exists()


def test_card_orientation_reorients_the_scan_and_is_undone_exactly(image, mask):
    model = unet2d()
    card = {"dims": 2, "orientation": "RAS"}  # the scan is LPS: x and y reversed
    got = explain_image(model, image, geometry(), [TargetSpec(1, mask=mask)], layers="dec", device="cpu",
                        normalization="none", model_card=card, slice_batch=1)
    flipped = image[:, ::-1, ::-1].copy()
    expected = per_slice_reference(model, flipped, mask[:, ::-1, ::-1].copy(), 0)[:, ::-1, ::-1]
    np.testing.assert_array_equal(got.heatmaps[0].array, expected)
    assert got.metadata["slices"]["reoriented"] == "RAS"


def test_png_picture_round_trip_heatmap_nifti_and_overlay(tmp_path, capsys):
    picture = (np.random.RandomState(1).rand(12, 16) * 255).astype(np.uint8)
    png = str(tmp_path / "photo.png")
    sitk.WriteImage(sitk.GetImageFromArray(picture), png)
    torch.manual_seed(1)
    weights = str(tmp_path / "unet2d.pt")
    torch.save(toy_models.unet2d().state_dict(), weights)
    out = str(tmp_path / "heat.nii.gz")
    code = main(["explain", "--model", "toy_models:unet2d", "--weights", weights, "--image", png, "--out", out,
                 "--layer", "dec", "--whole", "--card-normalize", "zscore", "--quiet"])
    err = capsys.readouterr().err
    assert code == 0, err
    heat, geom = io.read_image(out)
    assert heat.shape == picture.shape and geom.same_grid(io.read_image(png)[1])
    model = load_model("toy_models:unet2d", weights=weights, model_card={"intensity": {"normalize": ["zscore"]}})
    expected = explain_image(model, picture, geom, [TargetSpec(1, whole=True)], layers="dec", device="cpu")
    np.testing.assert_allclose(heat, expected.heatmaps[0].array, rtol=0, atol=1e-6)
    overlay = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "heat_overlay.png")))
    assert overlay.shape == picture.shape + (3,) and overlay.dtype == np.uint8
    cold = heat == 0  # no heat: the picture itself, grey
    assert cold.any() and (heat > 0.5).any()
    gray = np.round((picture - picture.min()) / float(picture.max() - picture.min()) * 255)
    np.testing.assert_array_equal(overlay[cold], np.repeat(gray[cold][:, None], 3, 1).astype(np.uint8))
    assert not np.array_equal(overlay[heat > 0.5][:, 0], overlay[heat > 0.5][:, 2])  # coloured where hot
    assert "heat_overlay.png" in err
    rgb = np.stack([picture, picture // 2, 255 - picture], -1).astype(np.uint8)
    colour = str(tmp_path / "colour.png")
    sitk.WriteImage(sitk.GetImageFromArray(rgb, isVector=True), colour)
    code = main(["explain", "--model", "toy_models:unet2d", "--weights", weights, "--image", colour, "--out",
                 str(tmp_path / "c.nii.gz"), "--layer", "dec", "--whole", "--card-normalize", "zscore", "--quiet"])
    err = capsys.readouterr().err
    assert code == 0 and "converted to grey (luminance 0.299 R + 0.587 G + 0.114 B)" in err
    luminance = rgb.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)
    expected = explain_image(model, luminance, geom, [TargetSpec(1, whole=True)], layers="dec", device="cpu")
    np.testing.assert_allclose(io.read_image(str(tmp_path / "c.nii.gz"))[0], expected.heatmaps[0].array, atol=1e-6)


def test_cli_explain_and_predict_with_a_2d_model_on_a_volume(image, mask, tmp_path, capsys):
    import json
    path, seg = str(tmp_path / "img.nrrd"), str(tmp_path / "seg.nrrd")
    io.write_image(path, image, geometry("oblique"))
    io.write_image(seg, mask, geometry("oblique"))
    torch.manual_seed(5)
    weights = str(tmp_path / "unet2d.pt")
    torch.save(toy_models.unet2d().state_dict(), weights)
    out, meta = str(tmp_path / "heat.nii.gz"), str(tmp_path / "meta.json")
    code = main(["explain", "--model", "toy_models:unet2d", "--weights", weights, "--image", path, "--segment", seg,
                 "--out", out, "--layer", "dec", "--slice-axis", "sagittal", "--normalize", "per-slice",
                 "--json", meta, "--quiet"])
    assert code == 0, capsys.readouterr().err
    model = load_model("toy_models:unet2d", weights=weights)
    expected = explain_image(model, image, geometry("oblique"), [TargetSpec(1, mask=mask)], layers="dec",
                             device="cpu", slice_axis="sagittal", normalization="per-slice")
    heat, geom = io.read_image(out)
    assert geom.same_grid(geometry("oblique"), atol=1e-6)
    np.testing.assert_allclose(heat, expected.heatmaps[0].array, rtol=0, atol=1e-6)
    record = json.load(open(meta))
    assert record["slices"]["axis"] == "sagittal" and record["slices"]["array_axis"] == 1
    labels_path = str(tmp_path / "labels.nii.gz")
    assert main(["predict", "--model", "toy_models:unet2d", "--weights", weights, "--image", path, "--out",
                 labels_path, "--slice-axis", "sagittal", "--quiet"]) == 0
    np.testing.assert_array_equal(io.read_image(labels_path)[0], expected.prediction)
