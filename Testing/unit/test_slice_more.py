"""2D models on 3D scans, continued: ``layers`` and ``sa-score`` slice by slice, and slice context with a list of
separate channel images (docs/slice_models.md).

The reference of every comparison is the 2D path run on each slice extracted with numpy (a 2D image with its
in-plane spacing), as in ``test_slice_models.py``; tiny 2D networks only.
"""

import csv
import json

import numpy as np
import pytest
import torch

import nets
from slice_cases import SIZE, SPACING, plane, random_image
from SegHiResCAMLib.analysis.explain import TargetSpec, explain_image, predict_image
from SegHiResCAMLib.analysis.segmentation_ability import sa_score_image
from SegHiResCAMLib.cli import main
from SegHiResCAMLib.errors import InputError, TargetError
from SegHiResCAMLib.geometry import Geometry
from SegHiResCAMLib.imaging import files as io
from SegHiResCAMLib.models import load_model
from SegHiResCAMLib.models.base import SegModel

GEOMETRY = Geometry(size=SIZE, spacing=SPACING, origin=(3.0, -2.0, 7.5), direction=tuple(np.eye(3).flatten()))




@pytest.fixture(scope="module")
def image():
    return random_image()


@pytest.fixture(scope="module")
def reference():
    m = np.zeros(SIZE[::-1], np.uint8)
    m[1:5, 3:6, 2:7] = 1  # coronal slices 3, 4, 5 only
    return m


def unet2d(in_channels=1, seed=7):
    torch.manual_seed(seed)
    return SegModel(nets.TinyUNet(nd=2, in_channels=in_channels).eval(), "tiny-2d", spatial_dims=2,
                    in_channels=in_channels)


def test_sa_score_of_a_2d_model_on_a_volume_is_the_mean_over_the_target_slices(image, reference):
    model = unet2d()
    got = sa_score_image(model, image, GEOMETRY, reference=reference, layers="all", map_layer="last-feature",
                         device="cpu", slice_axis="coronal", slice_batch=1)
    volume, masks = np.moveaxis(image, 1, 0), np.moveaxis(reference, 1, 0)
    targets = [k for k in range(volume.shape[0]) if masks[k].any()]
    assert targets == [3, 4, 5]
    singles = [sa_score_image(model, volume[k], plane(1), reference=masks[k], layers="all",
                              map_layer="last-feature", device="cpu") for k in targets]
    assert [r.name for r in got.report.layers] == [r.name for r in singles[0].report.layers]
    for i, row in enumerate(got.report.layers):
        for field in ("score", "score_pred"):
            expected = np.nanmean([float(getattr(s.report.layers[i], field)[0]) for s in singles])
            np.testing.assert_allclose(float(getattr(row, field)[0]), expected, rtol=1e-5, err_msg=row.name)
        if row.units is not None:
            units = np.stack([s.report.layers[i].units[0].numpy() for s in singles])
            np.testing.assert_allclose(row.units[0].numpy(), np.nanmean(units, 0), rtol=1e-5)
    assert got.mean_sa == pytest.approx(np.mean([s.mean_sa for s in singles]), rel=1e-5)
    assert got.metadata["slices"]["target_slices"] == targets and got.metadata["slices"]["axis"] == "coronal"
    assert got.metadata["slices"]["mean_sa_per_slice"] == pytest.approx([s.mean_sa for s in singles], rel=1e-6)
    expected_map = np.zeros(image.shape, np.uint8)  # the slices' SA maps, zeros on slices not scored
    for k, s in zip(targets, singles):
        expected_map[:, k] = s.sa_map
    np.testing.assert_array_equal(got.sa_map, expected_map)
    assert got.sa_map.any()
    np.testing.assert_array_equal(got.prediction, predict_image(model, image, GEOMETRY, device="cpu",
                                                                slice_axis="coronal")[0])
    batched = sa_score_image(model, image, GEOMETRY, reference=reference, layers="features", device="cpu",
                             slice_axis="coronal")  # all target slices in one batch: the same to rounding
    assert batched.mean_sa == pytest.approx(got.mean_sa, rel=1e-5)


def test_sa_score_without_a_reference_scores_the_slices_where_the_class_is_predicted(image):
    model = unet2d(seed=14)  # class 1 on axial slices 3 and 5 only
    got = sa_score_image(model, image, GEOMETRY, layers="features", device="cpu", slice_batch=2)
    labels = predict_image(model, image, GEOMETRY, device="cpu")[0]
    predicted = [k for k in range(image.shape[0]) if (labels[k] == 1).any()]  # axial: numpy axis 0
    assert predicted == [3, 5] and got.metadata["slices"]["target_slices"] == predicted
    singles = [sa_score_image(model, image[k], plane(0), layers="features", device="cpu") for k in predicted]
    assert got.mean_sa == pytest.approx(np.mean([s.mean_sa for s in singles]), rel=1e-5)
    assert got.report.info["reference"] == "prediction" and got.dice is None
    never = SegModel(nets.TinyUNet(nd=2).eval(), "never", spatial_dims=2)
    with torch.no_grad():
        never.network.head.bias.copy_(torch.tensor([1e6, -1e6]))  # class 1 is predicted nowhere
    with pytest.raises(TargetError, match="no voxel of class 1 on any axial slice"):
        sa_score_image(never, image, GEOMETRY, layers="features", device="cpu")


def test_cli_layers_and_sa_score_with_a_2d_model_on_a_volume(image, reference, tmp_path, capsys):
    path, ref_path, weights = (str(tmp_path / n) for n in ("scan.nrrd", "ref.nrrd", "w.pt"))
    io.write_image(path, image, GEOMETRY)
    io.write_image(ref_path, reference, GEOMETRY)
    torch.manual_seed(7)
    torch.save(nets.TinyUNet(nd=2).state_dict(), weights)
    model_args = ["--model", "toy_models:unet2d", "--weights", weights]
    slice_path = str(tmp_path / "slice.nrrd")  # coronal slice: the 2D image whose layers the scan's slices have
    io.write_image(slice_path, np.ascontiguousarray(image[:, 4]), plane(1))
    assert main(["layers"] + model_args + ["--image", slice_path]) == 0
    flat = capsys.readouterr().out.splitlines()
    assert main(["layers"] + model_args + ["--image", path, "--slice-axis", "coronal"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[1:] == flat[1:] and "enc.0\tConv2d\t4x6x8" in lines
    assert "per slice: 10 coronal slices" in lines[0] and "model input (1, 1, 6, 8)" in lines[0]
    out_csv, out_map, meta = (str(tmp_path / n) for n in ("sa.csv", "sa_map.nii.gz", "sa.json"))
    code = main(["sa-score"] + model_args + ["--image", path, "--reference", ref_path, "--out-csv", out_csv,
                                            "--out-map", out_map, "--json", meta, "--slice-axis", "coronal",
                                            "--device", "cpu", "--quiet"])
    assert code == 0, capsys.readouterr().err
    expected = sa_score_image(load_model("toy_models:unet2d", weights=weights), image, GEOMETRY, reference=reference,
                              map_layer="last-feature", device="cpu", slice_axis="coronal")
    rows = list(csv.DictReader(open(out_csv)))
    assert [r["layer"] for r in rows] == [r.name for r in expected.report.layers]
    record = json.load(open(meta))
    assert record["mean_sa"] == pytest.approx(expected.mean_sa, rel=1e-6)
    assert record["slices"]["target_slices"] == [3, 4, 5] and "mean over the target slices" in \
        record["slices"]["aggregation"]
    sa_map, grid = io.read_image(out_map)
    assert grid.same_grid(GEOMETRY) and np.array_equal(sa_map, expected.sa_map)


def test_slice_context_with_a_list_of_separate_channel_images(image, reference, tmp_path, capsys):
    second = np.random.RandomState(4).randn(*image.shape).astype(np.float32)
    model = unet2d(in_channels=6)  # 2 image channels x (slice and one neighbour on each side)
    opts = dict(layers="dec", device="cpu", slice_axis="sagittal", slice_context=1, normalization="none")
    stacked = explain_image(model, np.stack([image, second], -1), GEOMETRY, [TargetSpec(1, mask=reference)], **opts)
    listed = explain_image(model, [image, second], GEOMETRY, [TargetSpec(1, mask=reference)], **opts)
    np.testing.assert_array_equal(listed.heatmaps[0].array, stacked.heatmaps[0].array)
    assert stacked.heatmaps[0].array.any()
    labels = predict_image(model, [image, second], GEOMETRY, device="cpu", slice_axis="sagittal", slice_context=1)[0]
    np.testing.assert_array_equal(labels, stacked.prediction)
    with pytest.raises(InputError, match="expects 6 input channel"):  # without the context the count is wrong
        explain_image(model, [image, second], GEOMETRY, [TargetSpec(1, mask=reference)], layers="dec", device="cpu")
    paths = [str(tmp_path / n) for n in ("t1.nii.gz", "t2.nii.gz")]
    for p, array in zip(paths, (image, second)):
        io.write_image(p, array, GEOMETRY)
    weights, out = str(tmp_path / "w6.pt"), str(tmp_path / "heat.nii.gz")
    torch.save(model.network.state_dict(), weights)
    code = main(["explain", "--model", "toy_models:unet2d", "--model-args", '{"in_channels": 6}', "--weights",
                 weights, "--image", paths[0], "--image", paths[1], "--whole", "--layer", "dec", "--slice-axis",
                 "sagittal", "--slice-context", "1", "--normalize", "none", "--out", out, "--quiet"])
    assert code == 0, capsys.readouterr().err
    whole = explain_image(model, [image, second], GEOMETRY, [TargetSpec(1, whole=True)], **opts)
    np.testing.assert_allclose(io.read_image(out)[0], whole.heatmaps[0].array, rtol=0, atol=1e-6)


class BoxNet2D(torch.nn.Module):
    """A 2D net of 3x3 box kernels with circular padding: symmetric under in-plane rotations and flips, and
    translation-equivariant on a periodic slice."""

    def __init__(self):
        super().__init__()
        self.features = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3, padding=1, padding_mode="circular"),
                                            torch.nn.Tanh())
        self.head = torch.nn.Conv2d(2, 2, 3, padding=1, padding_mode="circular")
        with torch.no_grad():
            for conv, scale in ((self.features[0], (1.0, -0.5)), (self.head, (0.7, -0.3))):
                conv.weight.copy_(torch.tensor(scale).view(-1, 1, 1, 1).expand_as(conv.weight) / 9.0)
                conv.bias.copy_(torch.tensor([0.1, -0.2]))

    def forward(self, x):
        return self.head(self.features(x))


def test_agreement_between_slice_axes_is_1_for_a_symmetric_net_on_a_symmetric_volume_and_less_otherwise():
    from SegHiResCAMLib.analysis.ensemble import explain_ensemble
    n = 8  # an isotropic cube; h(x + y + z) is periodic: every voxel's neighbourhood is the same in all three planes
    z, y, x = np.meshgrid(*[np.arange(n)] * 3, indexing="ij")
    symmetric = np.cos(2 * np.pi * (x + y + z) / n).astype(np.float32)
    grid = Geometry.identity(symmetric.shape)
    model = SegModel(BoxNet2D().eval(), "box2d", spatial_dims=2)
    opts = dict(layers="features", device="cpu", slice_axes=["axial", "coronal", "sagittal"])
    same = explain_ensemble(model, symmetric, grid, [TargetSpec(1, whole=True)], **opts)
    heat = same.heatmaps[0]
    assert float(heat.array.max()) > 0 and heat.info["ensemble"]["flat_members"] == 0
    assert same.metadata["agreement"] == pytest.approx(1.0, abs=1e-6) and float(heat.spread.max()) < 1e-4
    assert same.metadata["ensemble"]["kind"] == ["slice axes"]
    lopsided = symmetric + np.random.RandomState(0).rand(n, n, n).astype(np.float32)
    other = explain_ensemble(model, lopsided, grid, [TargetSpec(1, whole=True)], **opts)
    assert other.heatmaps[0].info["ensemble"]["flat_members"] == 0
    assert other.metadata["agreement"] < 0.99 and float(other.heatmaps[0].spread.max()) > 0.01
