"""ProtoSeg (He et al. 2023): prototypes, maps and SA scores against hand-computed values and the literal
(brute-force) definition, 2D and 3D; hook hygiene; and HD-BET on the ROBEX atlas (one forward pass)."""

import os

import numpy as np
import pytest
import torch
from torch import nn

from SegHiResCAMLib.engine import count_hooks
from SegHiResCAMLib.engine.protoseg import (Scorer, dead_units, protoseg, prototypes, resize, sa_scores,
                                            segmentation_ability, unit_maps)
from SegHiResCAMLib.errors import CancelledError, InputError, ModelError, TargetError

from nets import TinyUNet


def brute_dice(maps: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Dice of maps ``[B, K, *S]`` (or ``[B, *S]``) against ``reference [B, *S]``, straight from the definition."""
    single = maps.ndim == reference.ndim
    maps = maps[:, None] if single else maps
    ref = reference[:, None].expand_as(maps)
    inter = (maps & ref).flatten(2).sum(2).double()
    total = maps.flatten(2).sum(2).double() + ref.flatten(2).sum(2).double()
    dice = 2 * inter / total
    return dice[:, 0] if single else dice


class MaskLinearNet(nn.Module):
    """``features`` is a known linear function of the input mask: ``F_k = a_k * mask + b_k`` (a 1x1 convolution);
    the head turns channel 0 into confident logits, so the network predicts the mask itself."""

    def __init__(self, nd, scales=(2.0, -1.5, 0.5, 3.0), offsets=(0.5, 1.0, -2.0, 0.0)):
        super().__init__()
        conv = nn.Conv2d if nd == 2 else nn.Conv3d
        self.features = conv(1, len(scales), 1)
        self.head = conv(len(scales), 2, 1)
        with torch.no_grad():
            self.features.weight.copy_(torch.tensor(scales).view(-1, 1, *([1] * nd)))
            self.features.bias.copy_(torch.tensor(offsets))
            self.head.weight.zero_()
            self.head.weight[1, 0] = 8.0 / scales[0]  # logit_1 - logit_0 = 8 (mask - 0.5)
            self.head.bias.copy_(torch.tensor([0.0, -4.0 - 8.0 * offsets[0] / scales[0]]))

    def forward(self, x):
        return self.head(self.features(x))


def blob(nd, size=12, batch=2, seed=0):
    gen = torch.Generator().manual_seed(seed)
    grids = torch.meshgrid(*[torch.linspace(-1, 1, size)] * nd, indexing="ij")
    radius = sum(g ** 2 for g in grids)
    masks = [radius < r for r in (0.4 + 0.3 * torch.rand(batch, generator=gen)).tolist()]
    return torch.stack(masks)


@pytest.mark.parametrize("nd", [2, 3])
def test_per_unit_closed_form_equals_full_map_on_a_linear_function_of_a_mask(nd):
    mask = blob(nd)
    net = MaskLinearNet(nd)
    x = mask[:, None].float()
    report = segmentation_ability(net, x, layers=["features"], map_layers=["features"])
    assert torch.equal(report.prediction, mask)
    feats = net.features(x).detach()
    guide = torch.softmax(net(x).detach(), 1)[:, 1]
    units = unit_maps(feats, guide)
    for k in range(feats.shape[1]):
        full = protoseg(feats[:, k:k + 1], guide)  # the literal ProtoSeg map of channel k alone
        assert torch.equal(units[:, k], full)
        assert torch.equal(full, mask)  # an affine function of the mask separates it exactly
    assert torch.equal(report.maps["features"], mask)
    row = report.layer("features")
    assert torch.allclose(row.units, torch.ones_like(row.units)) and torch.allclose(row.score, torch.ones(2))


def test_prototypes_by_hand():
    feats = torch.tensor([[[1.0, 2.0, 3.0, 4.0], [0.0, 0.0, 1.0, 3.0]]])  # [B=1, K=2, 4 voxels]
    guide = torch.tensor([[1.0, 1.0, 0.0, 0.0]])
    c_t, c_b, valid = prototypes(feats, guide)
    assert torch.allclose(c_t, torch.tensor([[1.5, 0.0]])) and torch.allclose(c_b, torch.tensor([[3.5, 2.0]]))
    assert bool(valid.all())
    tissue = torch.tensor([[1.0, 0.0, 1.0, 1.0]])  # restricts the prototypes only
    c_t, c_b, _ = prototypes(feats, guide, tissue)
    assert torch.allclose(c_t, torch.tensor([[1.0, 0.0]])) and torch.allclose(c_b, torch.tensor([[3.5, 2.0]]))
    soft = torch.tensor([[0.5, 1.0, 0.0, 0.0]])
    c_t, c_b, _ = prototypes(feats, soft)
    assert torch.allclose(c_t, torch.tensor([[(0.5 + 2.0) / 1.5, 0.0]]))
    assert torch.allclose(c_b, torch.tensor([[(0.5 + 3 + 4) / 2.5, 4.0 / 2.5]]))
    # channel 0 alone: midpoint 2.5 -> voxels 1, 2 foreground; both channels: nearest prototype
    hard = protoseg(feats, guide)
    assert hard.tolist() == [[True, True, False, False]]
    assert unit_maps(feats, guide)[0, 0].tolist() == [True, True, False, False]
    assert unit_maps(feats, guide)[0, 1].tolist() == [True, True, False, False]  # midpoint 1: 0, 0 < 1 < 3
    layer, units = sa_scores(feats, guide, torch.tensor([[True, False, False, False]]))
    assert layer.tolist() == pytest.approx([2 / 3]) and units[0].tolist() == pytest.approx([2 / 3, 2 / 3])


# grids of every counting path: cells of any factor, the same grid, every voxel by phases (factors of 2), cells by
# sub-blocks (factors of 16), downsampling
@pytest.mark.parametrize("src,dst", [((5, 7, 6), (16, 20, 13)), ((4, 4, 4), (32, 32, 32)), ((3, 5, 4), (3, 5, 4)),
                                     ((10, 9), (7, 20)), ((6, 8), (48, 64)), ((3,), (17,)), ((20, 30, 10), (8, 12, 50)),
                                     ((6, 5, 4), (12, 10, 8)), ((8, 6), (16, 12)), ((3, 3, 3), (48, 48, 48))])
def test_fast_scores_equal_the_literal_definition(src, dst):
    gen = torch.Generator().manual_seed(1)
    feats = torch.randn((2, 5) + src, generator=gen) + torch.linspace(-2, 2, src[-1])
    guide = torch.rand((2,) + dst, generator=gen)
    reference = torch.rand((2,) + dst, generator=gen) > 0.5
    layer, units = sa_scores(feats, guide, reference)
    assert torch.allclose(layer.double(), brute_dice(protoseg(feats, guide), reference), atol=2e-4)
    assert torch.allclose(units.double(), brute_dice(unit_maps(feats, guide), reference), atol=1e-6)
    assert ((units >= 0) & (units <= 1)).all() and ((layer >= 0) & (layer <= 1)).all()


@pytest.mark.parametrize("share", [0.0, 2.0])  # every voxel by phases, or cells (the share of straddling pairs)
@pytest.mark.parametrize("src,dst", [((6, 5, 4), (12, 10, 8)), ((8, 6), (16, 12)), ((5, 4, 3), (10, 8, 6))])
def test_phases_and_cells_both_equal_the_literal_definition(src, dst, share, monkeypatch):
    import SegHiResCAMLib.engine.protoseg.count as count
    monkeypatch.setattr(count, "_DENSE_SHARE", share)
    gen = torch.Generator().manual_seed(5)
    feats = torch.randn((2, 6) + src, generator=gen)
    guide = torch.rand((2,) + dst, generator=gen)
    reference = torch.rand((2,) + dst, generator=gen) > 0.5
    region = torch.zeros((2,) + dst, dtype=torch.bool)
    region[(slice(None),) + tuple(slice(1, n - 1) for n in dst)] = True
    result = Scorer(guide, reference[:, None], region=region).score(feats)
    units = unit_maps(feats, guide, tissue=region) & region[:, None]
    assert torch.allclose(result["units"][..., 0].double(), brute_dice(units, reference & region), atol=1e-6)


@pytest.mark.parametrize("src,dst", [((4, 5, 3), (16, 20, 9)), ((6, 7), (6, 7)), ((5, 6), (20, 13)),
                                     ((6, 5, 4), (12, 10, 8)), ((3, 3, 3), (48, 48, 48))])
def test_region_restricts_prototypes_and_dice(src, dst):
    gen = torch.Generator().manual_seed(3)
    feats = torch.randn((1, 4) + src, generator=gen) + torch.linspace(-1, 1, src[-1])
    guide = torch.rand((1,) + dst, generator=gen)
    reference = torch.rand((1,) + dst, generator=gen) > 0.4
    region = torch.zeros((1,) + dst, dtype=torch.bool)
    region[(0,) + tuple(slice(1, n - 2) for n in dst)] = True  # e.g. the image inside the network's padding
    result = Scorer(guide, reference[:, None], region=region).score(feats)
    units = unit_maps(feats, guide, tissue=region) & region[:, None]
    layer = protoseg(feats, guide, tissue=region) & region
    assert torch.allclose(result["units"][..., 0].double(), brute_dice(units, reference & region), atol=1e-6)
    assert torch.allclose(result["layer"][:, 0].double(), brute_dice(layer, reference & region), atol=2e-4)


@pytest.mark.parametrize("src,dst", [((6, 5, 4), (12, 10, 8)), ((3, 3, 3), (48, 48, 48)), ((5, 7, 6), (16, 20, 13)),
                                     ((16, 16), (16, 16))])
def test_scores_do_not_depend_on_the_number_of_threads(src, dst):
    gen = torch.Generator().manual_seed(4)
    feats = torch.randn((1, 40) + src, generator=gen)
    guide = torch.rand((1,) + dst, generator=gen)
    reference = (guide > 0.5)[:, None]
    threads = torch.get_num_threads()
    one, three = (Scorer(guide, reference, threads=t).score(feats) for t in (1, 3))
    for key in ("units", "layer", "decision", "c_t", "c_b"):
        assert torch.equal(one[key], three[key])
    assert torch.get_num_threads() == threads  # torch's setting is restored


@pytest.mark.parametrize("src,dst", [((6, 5, 4), (12, 10, 8)), ((3, 3, 3), (48, 48, 48)), ((16, 16), (16, 16)),
                                     ((5, 7, 6), (16, 20, 13))])
def test_scores_are_invariant_to_scaling_and_dead_units_are_nan(src, dst):
    """Per-unit and layer scores do not change when the features are scaled by 1e-24 (products of two such numbers
    underflow float32); a constant unit and one at float32 rounding of the layer's largest activation are dead: NaN."""
    gen = torch.Generator().manual_seed(8)
    feats = torch.randn((2, 7) + src, generator=gen) + torch.linspace(-1, 1, src[-1])
    feats[:, 5] = 0.25  # constant
    feats[:, 6] *= 1e-30  # ~1e-30 beside activations of ~1: it contributes nothing downstream
    feats[1, 4] = 0.0
    feats[1, 4, 0] = 3.0  # one voxel: small prototypes, but alive
    guide = torch.rand((2,) + dst, generator=gen)
    reference = (guide > 0.5)[:, None]
    base = Scorer(guide, reference).score(feats)
    tiny = Scorer(guide, reference).score(feats * 1e-24)
    live = torch.arange(7) < 5
    assert torch.equal(dead_units(feats, base["c_t"], base["c_b"]), ~live.expand(2, 7))
    assert torch.equal(base["dead"], ~live.expand(2, 7)) and torch.equal(tiny["dead"], ~live.expand(2, 7))
    assert torch.isnan(base["units"][:, ~live]).all() and torch.isfinite(base["units"][:, live]).all()
    assert torch.allclose(base["units"], tiny["units"], atol=5e-5, equal_nan=True)
    assert torch.allclose(base["layer"], tiny["layer"], atol=1e-6)
    # against the literal maps: equal up to a few guide voxels within float rounding of a unit's midpoint
    assert torch.allclose(base["units"][:, live, 0].double(),
                          brute_dice(unit_maps(feats[:, :5], guide), reference[:, 0]), atol=5e-5)
    assert torch.allclose(tiny["units"][:, live, 0].double(),
                          brute_dice(unit_maps(feats[:, :5] * 1e-24, guide), reference[:, 0]), atol=5e-5)
    hard = Scorer(guide, reference).layer_map(tiny["decision"], False, tiny["scale"])
    assert (hard == protoseg(feats, guide)).float().mean() > 0.999  # the layer map, as unscaled


@pytest.mark.parametrize("nd", [2, 3])
def test_soft_and_hard_layer_maps_match_the_literal_definition(nd):
    gen = torch.Generator().manual_seed(2)
    feats = torch.randn((1, 6) + (5,) * nd, generator=gen)
    guide = torch.rand((1,) + (15,) * nd, generator=gen)
    scorer = Scorer(guide, (guide > 0.5)[:, None])
    c_t, c_b = scorer.prototypes(feats)
    ref_t, ref_b, _ = prototypes(feats, guide)
    assert torch.allclose(c_t, ref_t, atol=1e-5) and torch.allclose(c_b, ref_b, atol=1e-5)
    decision = scorer.decision(feats, c_t, c_b)
    assert torch.allclose(scorer.layer_map(decision, soft=True), protoseg(feats, guide, soft=True), atol=1e-5)
    agree = (scorer.layer_map(decision) == protoseg(feats, guide)).float().mean()
    assert agree > 0.999  # equal up to voxels within float rounding of the decision boundary


def test_empty_foreground_is_nan_or_a_clear_error():
    feats = torch.randn(1, 3, 6, 6)
    empty = torch.zeros(1, 6, 6)
    reference = torch.zeros(1, 6, 6, dtype=torch.bool)
    reference[0, 2:4, 2:4] = True
    layer, units = sa_scores(feats, empty, reference)
    assert torch.isnan(layer).all() and torch.isnan(units).all()
    assert not protoseg(feats, empty).any() and torch.isnan(protoseg(feats, empty, soft=True)).all()
    with pytest.raises(TargetError, match="empty foreground"):
        sa_scores(feats, empty, reference, on_empty="raise")
    layer, _ = sa_scores(feats, torch.rand(1, 6, 6), torch.zeros_like(reference))  # empty reference
    assert torch.isnan(layer).all()
    with pytest.raises(TargetError, match="reference mask is empty"):
        sa_scores(feats, torch.rand(1, 6, 6), torch.zeros_like(reference), on_empty="raise")
    # a class the network never predicts: NaN scores and mean SA score, no crash
    net = MaskLinearNet(2)
    report = segmentation_ability(net, torch.zeros(1, 1, 8, 8))
    assert not report.prediction.any() and torch.isnan(report.mean_sa).all()


@pytest.mark.parametrize("nd", [2, 3])
def test_whole_network_2d_3d_scores_in_range_and_feature_layers(nd):
    net = TinyUNet(nd=nd)
    x = torch.randn((2, 1) + (16,) * nd)
    calls = []
    handle = net.register_forward_hook(lambda *args: calls.append(1))
    try:
        one = segmentation_ability(net, x)
        assert len(calls) == 1  # the feature layers come out of the single (tracing) forward pass
        full = segmentation_ability(net, x, layers="all", map_layers=["dec"])
        assert len(calls) == 3  # every layer: one more pass, scored inside the hooks
    finally:
        handle.remove()
    assert one.feature_layers == full.feature_layers == ["down.1", "dec.0"]
    assert [r.name for r in full.layers][:4] == ["input", "enc.0", "enc.1", "enc"]
    assert [r.depth for r in full.layers] == list(range(len(full.layers)))
    for row in full.layers:
        assert ((row.score >= 0) & (row.score <= 1)).all()
        live = ~torch.isnan(row.units)  # NaN: a dead unit (e.g. a ReLU channel that is zero everywhere)
        assert row.units.shape == (2, row.channels) and ((row.units[live] >= 0) & (row.units[live] <= 1)).all()
        if row.name in one.feature_layers:
            assert torch.allclose(row.units, one.layer(row.name).units)
    expected = torch.cat([one.layer(n).units_pred for n in one.feature_layers], 1).mean(1)
    assert torch.allclose(one.mean_sa, expected) and torch.allclose(full.mean_sa, expected)
    assert full.maps["dec"].shape == (2,) + (16,) * nd and full.maps["dec"].dtype == torch.bool
    # the input's score is ProtoSeg on the intensities
    assert torch.allclose(full.layer("input").score.double(), brute_dice(protoseg(x, full.guide), full.prediction))
    # reused rows are exact: a container returning its last child's (unchanged) output
    assert torch.equal(full.layer("enc").units, full.layer("enc.1").units)


def test_ground_truth_reference_and_norm_reuse():
    net = nn.Sequential(nn.Conv3d(1, 4, 3, padding=1), nn.InstanceNorm3d(4, affine=True), nn.Conv3d(4, 2, 1))
    with torch.no_grad():
        net[1].weight.copy_(torch.tensor([1.0, -2.0, 0.5, 3.0]))
    x = torch.randn(1, 1, 10, 10, 10)
    truth = torch.zeros(1, 10, 10, 10, dtype=torch.bool)
    truth[0, 2:7, 3:8, 1:6] = True
    report = segmentation_ability(net, x, reference=truth, layers="all")
    conv, norm = report.layer("0"), report.layer("1")
    assert torch.equal(norm.units, conv.units)  # per-unit SA is invariant to a per-channel affine map
    direct = Scorer(report.guide, torch.stack([truth, report.prediction], 1)).score(net[1](net[0](x)).detach())
    assert torch.allclose(norm.units, direct["units"][..., 0], atol=1e-6)
    assert torch.allclose(norm.score, direct["layer"][:, 0])
    assert not torch.equal(norm.score, norm.score_pred) or torch.equal(truth, report.prediction)


def test_hooks_removed_and_model_unchanged_after_success_and_failure():
    net = TinyUNet(nd=2)
    net.train()
    net.dec.eval()
    x = torch.randn(1, 1, 16, 16)
    segmentation_ability(net, x, layers="all")
    assert count_hooks(net) == 0 and net.training and not net.dec.training
    assert all(p.requires_grad and p.grad is None for p in net.parameters())

    def cancel(fraction, message):
        if fraction > 0.5:
            raise CancelledError("cancelled")

    with pytest.raises(CancelledError):
        segmentation_ability(net, x, layers="all", progress=cancel)
    assert count_hooks(net) == 0 and net.training and not net.dec.training

    class Broken(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(1, 2, 3)

        def forward(self, x):
            return self.conv(x).view(-1)[None, :5]

    broken_head = Broken()
    with pytest.raises(InputError, match="batch, classes"):
        segmentation_ability(broken_head, x)
    assert count_hooks(broken_head) == 0
    broken = TinyUNet(nd=2)
    with pytest.raises(ModelError):
        segmentation_ability(broken, torch.randn(1, 1, 15, 15))  # odd size: the skip concatenation fails
    assert count_hooks(broken) == 0


def test_resize_records_trilinear_align_corners_false():
    feats = torch.arange(8.0).view(1, 1, 2, 2, 2)
    expected = torch.nn.functional.interpolate(feats, size=(4, 4, 4), mode="trilinear", align_corners=False)
    assert torch.equal(resize(feats, (4, 4, 4)), expected)
    net = TinyUNet(nd=3)
    report = segmentation_ability(net, torch.randn(1, 1, 8, 8, 8))
    assert "trilinear, align_corners=False" in report.info["resize"]


# ----------------------------------------------------------------------------------------------- command line
def sa_main(argv):
    """``seghirescam sa-score ...`` through cli.main (errors: one line on stderr, the error's exit status)."""
    from SegHiResCAMLib import cli
    return cli.main(argv)


@pytest.fixture(scope="module")
def toy_case(tmp_path_factory):
    import toy_models
    from SegHiResCAMLib.imaging import files as io
    from SegHiResCAMLib.geometry import Geometry
    folder = tmp_path_factory.mktemp("sa")
    torch.manual_seed(0)
    weights = str(folder / "w.pt")
    torch.save(toy_models.unet3d().state_dict(), weights)
    geometry = Geometry(size=(20, 18, 10), spacing=(0.7, 1.3, 2.9), origin=(10.0, -20.5, 30.25),
                        direction=(1, 0, 0, 0, 0, 1, 0, -1, 0))
    image = np.random.RandomState(0).randn(*geometry.array_shape).astype(np.float32)
    mask = np.zeros(geometry.array_shape, np.uint8)
    mask[2:8, 4:14, 5:15] = 1
    paths = {"image": str(folder / "img.nrrd"), "mask": str(folder / "mask.nii.gz"), "weights": weights}
    io.write_image(paths["image"], image, geometry)
    io.write_image(paths["mask"], mask, geometry)
    return folder, paths, geometry


def test_cli_writes_tables_plot_map_and_json(toy_case, capsys):
    import csv
    import json
    from SegHiResCAMLib.imaging import files as io
    folder, paths, geometry = toy_case
    out = folder / "out"
    code = sa_main(["sa-score", "--model", "toy_models:unet3d", "--weights", paths["weights"], "--image",
                    paths["image"], "--reference", paths["mask"], "--out-csv", str(out / "sa.csv"), "--plot",
                    str(out / "sa.png"), "--map-layer", "dec", "--out-map", str(out / "map.nii.gz"), "--json",
                    str(out / "sa.json"), "--quiet"])
    printed = capsys.readouterr()
    assert code == 0, printed.err
    assert "mean SA score" in printed.out
    layers = list(csv.DictReader(open(out / "sa.csv")))
    assert [r["layer"] for r in layers][:3] == ["input", "enc.0", "enc.1"]
    assert {"layer", "depth", "resolution", "channels", "sa_score", "sa_score_vs_prediction"} <= set(layers[0])
    units = list(csv.DictReader(open(out / "sa-units.csv")))
    assert len(units) == sum(int(r["channels"]) for r in layers)
    assert all(0.0 <= float(r["sa_score"]) <= 1.0 for r in units if r["sa_score"] != "nan")
    assert open(out / "sa.png", "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    sa_map, map_geometry = io.read_image(str(out / "map.nii.gz"))
    assert map_geometry.same_grid(geometry) and set(np.unique(sa_map)) <= {0, 1}
    meta = json.load(open(out / "sa.json"))
    assert meta["command"] == "sa-score" and meta["map_layer"] == "dec" and 0 <= meta["mean_sa"] <= 1
    assert meta["protoseg"]["passes"] == 2 and "align_corners=False" in meta["protoseg"]["resize"]
    assert not [f for f in os.listdir(out) if f.startswith(".tmp")]


@pytest.mark.parametrize("extra,message", [
    (["--map-layer", "dec"], "--map-layer needs --out-map"),
    (["--layers", "nope"], "unknown layer 'nope'"),
    (["--reference", "MASK", "--label", "7"], "label 7 does not occur"),
])
def test_cli_errors_are_one_line(toy_case, capsys, extra, message):
    folder, paths, _ = toy_case
    extra = [paths["mask"] if e == "MASK" else e for e in extra]
    code = sa_main(["sa-score", "--model", "toy_models:unet3d", "--weights", paths["weights"], "--image",
                    paths["image"], "--out-csv", str(folder / "bad.csv"), "--quiet"] + extra)
    err = capsys.readouterr().err
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1
    assert not os.path.exists(folder / "bad.csv")
