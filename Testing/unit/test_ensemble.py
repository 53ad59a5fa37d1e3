"""Ensembles and mirroring TTA (analysis/ensemble.py): mean map, spread map, agreement."""

import json

import numpy as np
import pytest
import torch

from SegHiResCAMLib import catalog
from SegHiResCAMLib.analysis.ensemble import combine_maps, explain_ensemble, mirror_flips
from SegHiResCAMLib.analysis.explain import TargetSpec, explain_image, predict_image
from SegHiResCAMLib.cli import main
from SegHiResCAMLib.errors import InputError
from SegHiResCAMLib.geometry import Geometry
from SegHiResCAMLib.imaging import files as io
from SegHiResCAMLib.models.base import SegModel

import toy_models
from nets import ErrorToyNet

SHAPE = (24, 24, 24)
CPU = dict(layers="detect", device="cpu")


@pytest.fixture(scope="module")
def scans():
    geometry = Geometry.identity(SHAPE)
    symmetric = np.zeros(SHAPE, np.float32)
    symmetric[8:16, 8:16, 8:16] = 1.0  # mirror-symmetric about the centre along every axis
    lopsided = np.zeros(SHAPE, np.float32)
    lopsided[4:12, 4:12, 4:12] = 1.0
    lopsided[15:21, 15:21, 16:22] = 1.0
    lopsided[3:9, 14:20, 2:5] = -1.0
    return geometry, symmetric, lopsided


def mirror_net():
    """ErrorToyNet: 1x1 and box kernels with centred padding, so it commutes with every axis flip."""
    return SegModel(network=ErrorToyNet().eval(), name="mirror-symmetric")


def test_mirror_flips():
    assert mirror_flips(3, False) == [()]
    assert mirror_flips(3, True) == [(), (0,), (1,), (2,), (0, 1), (0, 2), (1, 2), (0, 1, 2)]
    assert mirror_flips(3, [2]) == [(), (2,)]


def test_identical_members_spread_zero_agreement_one(scans):
    geometry, _, image = scans
    model = mirror_net()
    single = explain_image(model, image, geometry, [TargetSpec(1)], **CPU).heatmaps[0].array
    result = explain_ensemble([model, mirror_net()], image, geometry, [TargetSpec(1)], **CPU)
    heat = result.heatmaps[0]
    np.testing.assert_allclose(heat.array, single, atol=1e-7)
    assert heat.spread.shape == image.shape and float(np.abs(heat.spread).max()) < 1e-6
    assert heat.info["ensemble"]["agreement"] == pytest.approx(1.0, abs=1e-9)
    assert result.metadata["agreement"] == heat.info["ensemble"]["agreement"]
    assert len(result.metadata["ensemble"]["members"]) == 2


@pytest.mark.parametrize("which", ["symmetric", "lopsided"])
@pytest.mark.parametrize("kind", ["prediction", "voxel", "fp"])
def test_tta_with_a_mirror_symmetric_net_gives_the_plain_map(scans, which, kind):
    geometry, symmetric, lopsided = scans
    image = symmetric if which == "symmetric" else lopsided
    model = mirror_net()
    spec = TargetSpec(1)
    if kind == "voxel":
        spec = TargetSpec(1, voxel=(10, 9, 6), radius_mm=2.0)
    if kind == "fp":
        reference, _ = predict_image(model, np.where(image > 0, image, 0) * (np.indices(SHAPE)[2] < 14), geometry,
                                     device="cpu")
        spec = TargetSpec(1, error="fp", reference=reference)
    plain = explain_image(model, image, geometry, [spec], **CPU).heatmaps[0].array
    result = explain_ensemble(model, image, geometry, [spec], tta=True, **CPU)
    heat = result.heatmaps[0]
    assert heat.info["ensemble"]["members"] == 8 and plain.max() > 0
    np.testing.assert_allclose(heat.array, plain, atol=1e-5)
    assert float(heat.spread.max()) < 1e-4 and heat.info["ensemble"]["agreement"] > 1 - 1e-6


def test_tta_flips_the_spatial_axes_of_a_two_channel_scan(scans):
    """Several input channels (channels last once stacked): the mirrorings flip the spatial axes, not the channels."""
    geometry, _, image = scans
    model = SegModel(network=ErrorToyNet(in_channels=2).eval(), name="two-channel", in_channels=2)
    channels = [image, np.roll(image, 3, axis=1) * 0.5]
    plain = explain_image(model, channels, geometry, [TargetSpec(1)], **CPU).heatmaps[0].array
    heat = explain_ensemble(model, channels, geometry, [TargetSpec(1)], tta=True, **CPU).heatmaps[0]
    assert heat.info["ensemble"]["members"] == 8 and plain.max() > 0
    np.testing.assert_allclose(heat.array, plain, atol=1e-5)


def test_tta_flips_the_scan_and_the_map_back(scans):
    """A net that is not mirror-symmetric: the TTA mean is the plain map and the flipped run's map flipped back."""
    geometry, _, image = scans
    torch.manual_seed(3)
    model = SegModel(network=toy_models.unet3d().eval(), name="unet")
    opts = dict(layers="dec", device="cpu")
    plain = explain_image(model, image, geometry, [TargetSpec(1, whole=True)], **opts).heatmaps[0].array
    flipped = explain_image(model, np.ascontiguousarray(image[:, :, ::-1]), geometry, [TargetSpec(1, whole=True)],
                            **opts).heatmaps[0].array[:, :, ::-1]
    heat = explain_ensemble(model, image, geometry, [TargetSpec(1, whole=True)], tta=[2], **opts).heatmaps[0]
    np.testing.assert_allclose(heat.array, (plain + flipped) / 2, atol=1e-6)
    assert heat.info["ensemble"]["agreement"] < 0.999 and float(heat.spread.max()) > 0.01


def test_two_different_members_agree_less_than_one(scans):
    geometry, _, image = scans
    nets = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        nets.append(SegModel(network=toy_models.unet3d().eval(), name="unet%d" % seed))
    heat = explain_ensemble(nets, image, geometry, [TargetSpec(1, whole=True)], layers="dec", device="cpu").heatmaps[0]
    assert -1.0 <= heat.info["ensemble"]["agreement"] < 0.99
    assert len(heat.info["ensemble"]["pairwise"]) == 1 and float(heat.spread.max()) > 0.01


def test_combine_maps_definitions():
    a = np.array([[0.0, 1.0], [0.5, 0.0]])
    b = np.array([[0.0, 0.5], [1.0, 0.0]])
    mean, spread, agreement, pairs = combine_maps([a, b])
    np.testing.assert_allclose(mean, (a + b) / 2)
    eps = 0.01 * 0.75
    np.testing.assert_allclose(spread, np.where(mean > 0, 0.25 / (mean + eps), 0.0), rtol=1e-6)
    # the correlation is taken over the two voxels where a map is non-zero: (1, 0.5) against (0.5, 1)
    assert pairs == [pytest.approx(-1.0)] and agreement == pytest.approx(-1.0)


def test_command_line_ensemble_writes_mean_spread_and_agreement(tmp_path, capsys):
    geometry = Geometry(size=(12, 10, 8), spacing=(1.1, 0.9, 2.0), origin=(5.0, -3.0, 7.0),
                        direction=(1, 0, 0, 0, 1, 0, 0, 0, 1))
    image = np.random.RandomState(0).randn(*geometry.array_shape).astype(np.float32)
    path = str(tmp_path / "scan.nii.gz")
    io.write_image(path, image, geometry)
    weights = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        weights += ["--weights", str(tmp_path / ("w%d.pt" % seed))]
        torch.save(toy_models.unet3d().state_dict(), weights[-1])
    out, spread, meta = (str(tmp_path / name) for name in ("mean.nii.gz", "spread.nii.gz", "run.json"))
    base = ["explain", "--model", "toy_models:unet3d", "--image", path, "--layer", "dec", "--whole", "--device", "cpu",
            "--quiet"]
    code = main(base + weights + ["--out", out, "--spread", spread, "--json", meta])
    err = capsys.readouterr().err
    assert code == 0, err
    heat, heat_geometry = io.read_image(out)
    spread_map, spread_geometry = io.read_image(spread)
    assert spread_geometry.same_grid(geometry) and heat_geometry.same_grid(geometry)
    assert spread_map.shape == image.shape and float(spread_map.max()) > 0
    record = json.load(open(meta))
    assert -1 <= record["agreement"] < 0.99 and len(record["ensemble"]["members"]) == 2
    assert "agreement of the 2 members' maps" in err
    # the mean of the members run one by one
    singles = []
    for seed in (0, 1):
        single = str(tmp_path / ("single%d.nii.gz" % seed))
        assert main(base + ["--weights", str(tmp_path / ("w%d.pt" % seed)), "--out", single]) == 0
        singles.append(io.read_image(single)[0])
    np.testing.assert_allclose(heat, (singles[0] + singles[1]) / 2, atol=1e-6)
    capsys.readouterr()
    # one-line errors: --spread without members; several --weights for a command that takes one
    bad = str(tmp_path / "bad.nii.gz")
    assert main(base + weights[:2] + ["--out", bad, "--spread", str(tmp_path / "s2.nii.gz")]) == 2
    assert "--spread needs several members" in capsys.readouterr().err
    assert main(["predict", "--model", "toy_models:unet3d", "--image", path, "--out", bad] + weights) == 2
    assert "--weights was given 2 times" in capsys.readouterr().err
    assert not (tmp_path / "bad.nii.gz").exists()


class Pointwise2D(torch.nn.Module):
    """A 2D net of 1x1 convolutions: each voxel's output depends on that voxel only, whatever the slice axis."""

    def __init__(self):
        super().__init__()
        self.features = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 1), torch.nn.Tanh())
        self.head = torch.nn.Conv2d(4, 2, 1)

    def forward(self, x):
        return self.head(self.features(x))


def test_slice_axes_of_a_2d_model(scans):
    geometry, _, image = scans
    image = image + np.random.RandomState(0).rand(*SHAPE).astype(np.float32) * 0.1
    torch.manual_seed(0)
    pointwise = SegModel(network=Pointwise2D().eval(), name="pointwise", spatial_dims=2)
    opts = dict(layers="features", device="cpu")
    heat = explain_ensemble(pointwise, image, geometry, [TargetSpec(1, whole=True)], slice_axes=["axial", "coronal"],
                            **opts).heatmaps[0]
    assert heat.info["ensemble"]["flat_members"] == 0 and float(heat.array.max()) > 0
    assert heat.info["ensemble"]["members"] == 2 and heat.info["ensemble"]["agreement"] > 1 - 1e-6
    assert float(heat.spread.max()) < 1e-4
    torch.manual_seed(7)  # a seed whose maps are not flat (ReLU) on this scan
    unet = SegModel(network=toy_models.unet2d().eval(), name="unet2d", spatial_dims=2)
    opts = dict(layers="dec", device="cpu")
    result = explain_ensemble(unet, image, geometry, [TargetSpec(1, whole=True)], slice_axes=catalog.SLICE_AXES,
                              **opts)
    heat = result.heatmaps[0]
    singles = [explain_image(unet, image, geometry, [TargetSpec(1, whole=True)], slice_axis=axis, **opts)
               .heatmaps[0].array for axis in catalog.SLICE_AXES]
    np.testing.assert_allclose(heat.array, np.mean(singles, axis=0), atol=1e-6)
    assert heat.info["ensemble"]["flat_members"] == 0 and float(heat.array.max()) > 0
    assert heat.info["ensemble"]["agreement"] < 0.999 and len(heat.info["ensemble"]["pairwise"]) == 3
    assert [m["slice_axis"] for m in result.metadata["ensemble"]["members"]] == list(catalog.SLICE_AXES)


@pytest.mark.parametrize("axes,options,message", [
    (["axial"], {}, "two or more of axial, coronal, sagittal"),
    (["axial", "oblique"], {}, "two or more"),
    (["axial", "coronal"], {"slice_axis": "axial"}, "not both"),
])
def test_bad_slice_axes(scans, axes, options, message):
    geometry, _, image = scans
    model = SegModel(network=toy_models.unet2d().eval(), name="unet2d", spatial_dims=2)
    with pytest.raises(InputError, match=message):
        explain_ensemble(model, image, geometry, [TargetSpec(1, whole=True)], slice_axes=axes, device="cpu",
                         **options)


def test_slice_axes_need_a_2d_model(scans):
    geometry, _, image = scans
    with pytest.raises(InputError, match="slice axes are for a 2D model on a 3D scan"):
        explain_ensemble(mirror_net(), image, geometry, [TargetSpec(1)], slice_axes=["axial", "coronal"], **CPU)


def test_command_line_slice_axes(tmp_path, capsys):
    image = np.random.RandomState(1).randn(8, 10, 9).astype(np.float32)
    path, weights = str(tmp_path / "scan.nii.gz"), str(tmp_path / "w2d.pt")
    io.write_image(path, image, Geometry.identity(image.shape))
    torch.manual_seed(7)
    torch.save(toy_models.unet2d().state_dict(), weights)
    out, spread, meta = (str(tmp_path / name) for name in ("mean.nii.gz", "spread.nii.gz", "run.json"))
    code = main(["explain", "--model", "toy_models:unet2d", "--weights", weights, "--image", path, "--layer", "dec",
                 "--whole", "--device", "cpu", "--quiet", "--slice-axes", "all", "--out", out, "--spread", spread,
                 "--json", meta])
    err = capsys.readouterr().err
    assert code == 0, err
    record = json.load(open(meta))
    assert [m["slice_axis"] for m in record["ensemble"]["members"]] == list(catalog.SLICE_AXES)
    assert -1 <= record["agreement"] <= 1 and io.read_image(spread)[0].shape == image.shape
    assert main(["explain", "--model", "toy_models:unet2d", "--weights", weights, "--image", path, "--whole",
                 "--device", "cpu", "--quiet", "--slice-axes", "axial,diagonal", "--out", out + "2.nii.gz"]) == 2
    assert "slice axes must be two or more" in capsys.readouterr().err


def test_commands_that_load_one_model_get_one_weights_path(tmp_path, monkeypatch, capsys):
    """``--weights`` is repeatable (explain's ensembles): the cohort command still gets one path, not a list."""
    import pandas
    from SegHiResCAMLib.analysis import cohort
    seen = []
    empty = pandas.DataFrame({"status": [], "reused": [], "case_id": [], "error": []})
    monkeypatch.setattr(cohort, "run_cohort", lambda manifest, out, model, *args, **kwargs: seen.append(model) or empty)
    manifest = tmp_path / "cases.csv"
    manifest.write_text("case,image\n")
    base = ["cohort", str(manifest), "--out", str(tmp_path / "out"), "--model", "toy_models:unet3d", "--no-report",
            "--quiet"]
    assert main(base + ["--weights", "w.pt"]) == 0 and seen[0].weights == "w.pt"
    assert main(base + ["--weights", "a.pt", "--weights", "b.pt"]) == 2 and len(seen) == 1
    assert "--weights was given 2 times" in capsys.readouterr().err


def test_an_nnunet_fold_ensemble_is_one_member_per_fold(scans):
    """``fold="auto"`` loads one network averaging the folds' logits (models/nnunet/loader.py ``FoldEnsemble``);
    the ensemble explains each fold on its own (its layer names without ``folds.K.``)."""
    from SegHiResCAMLib.analysis.ensemble import fold_members
    from SegHiResCAMLib.models.nnunet.loader import FoldEnsemble
    geometry, _, image = scans
    nets = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        nets.append(toy_models.unet3d().eval())
    model = SegModel(network=FoldEnsemble(nets).eval(), name="nnunet:Dataset001/folds_0+3")
    members = fold_members(model)
    assert [m.name for m in members] == ["nnunet:Dataset001/fold_0", "nnunet:Dataset001/fold_3"]
    assert [m.network for m in members] == nets and fold_members(members[0]) == [members[0]]
    result = explain_ensemble(model, image, geometry, [TargetSpec(1, whole=True)], layers="folds.0.dec",
                              device="cpu")
    heat = result.heatmaps[0]
    singles = [explain_image(SegModel(network=net, name="one"), image, geometry, [TargetSpec(1, whole=True)],
                             layers="dec", device="cpu").heatmaps[0].array for net in nets]
    np.testing.assert_allclose(heat.array, (singles[0] + singles[1]) / 2, atol=1e-6)
    assert heat.info["ensemble"]["members"] == 2 and heat.info["ensemble"]["agreement"] < 0.999
    assert [m["model"] for m in result.metadata["ensemble"]["members"]] == [m.name for m in members]
