"""Issue 16, part 3: models with several input channels (T1, T1c, T2, FLAIR...).

Several ``--image`` files (or ``NAME=path``, or one 4D file) become one image on the first image's grid, in the
order the model card declares; ``--per-channel`` adds one gradient x input map per channel and the channel shares.
Tiny networks only. Imports of the new modules sit inside the tests, so that each test fails on its own
assertion on code without them.
"""

import json
import os

import numpy as np
import pytest
import SimpleITK as sitk
import torch

import toy_models
from SegHiResCAMLib.analysis.explain import TargetSpec, explain_image
from SegHiResCAMLib.cli import main
from SegHiResCAMLib.errors import InputError
from SegHiResCAMLib.geometry import Geometry
from SegHiResCAMLib.imaging import files as io
from SegHiResCAMLib.models import load_model

CARD = {"channels": ["T1", "T2"], "divisible_by": 2}


def oblique_geometry(size=(12, 10, 8), spacing=(0.9, 1.1, 1.7), origin=(3.0, -7.5, 12.25)):
    q, _ = np.linalg.qr(np.array([[0.9, -0.3, 0.3], [0.3, 0.95, 0.0], [-0.3, 0.0, 0.95]]))
    return Geometry(size=size, spacing=spacing, origin=origin, direction=tuple(q.flatten()))


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """Two channels (T1, T2) on one oblique grid, as two files and as one 4D file; a T2 on another grid; saved
    weights of a two-channel TinyUNet and of ChannelSplitNet (class 1 ignores channel 0); their cards."""
    folder = tmp_path_factory.mktemp("channels")
    geometry = oblique_geometry()
    rng = np.random.RandomState(0)
    t1 = rng.randn(*geometry.array_shape).astype(np.float32)
    t2 = (3.0 * rng.randn(*geometry.array_shape) + 10.0).astype(np.float32)
    paths = {"t1": str(folder / "t1.nii.gz"), "t2": str(folder / "t2.nii.gz"), "four": str(folder / "t1t2.nii.gz")}
    io.write_image(paths["t1"], t1, geometry)
    io.write_image(paths["t2"], t2, geometry)
    four = sitk.GetImageFromArray(np.stack([t1, t2]), isVector=False)  # numpy (t, z, y, x): NIfTI's 4th axis = t
    direction = np.eye(4)
    direction[:3, :3] = np.asarray(geometry.direction).reshape(3, 3)
    four.SetDirection(tuple(direction.flatten()))
    four.SetSpacing(tuple(geometry.spacing) + (1.0,))
    four.SetOrigin(tuple(geometry.origin) + (0.0,))
    sitk.WriteImage(four, paths["four"])
    # T2 on a coarser, shifted grid (same direction), covering the first grid
    other = Geometry(size=(8, 7, 6), spacing=(1.4, 1.6, 2.2), origin=tuple(np.asarray(geometry.origin) - 0.3),
                     direction=geometry.direction)
    t2_other = (3.0 * rng.randn(*other.array_shape) + 10.0).astype(np.float32)
    paths["t2_other"] = str(folder / "t2_other.nrrd")
    io.write_image(paths["t2_other"], t2_other, other)
    torch.manual_seed(3)
    unet = toy_models.unet3d(classes=2, in_channels=2)
    with torch.no_grad():  # about half of the voxels predicted as class 1: a region neither empty nor everything
        logits = unet(torch.from_numpy(np.stack([t1, t2]))[None])
        unet.head.bias[1] -= float((logits[:, 1] - logits[:, 0]).median())
    split = toy_models.channel_split()
    weights = {"unet": str(folder / "unet.pt"), "split": str(folder / "split.pt")}
    torch.save(unet.state_dict(), weights["unet"])
    torch.save(split.state_dict(), weights["split"])
    cards = {"unet": str(folder / "unet.card.json"), "split": str(folder / "split.card.json")}
    json.dump(CARD, open(cards["unet"], "w"))
    json.dump(dict(CARD, input_channels=2), open(cards["split"], "w"))
    return {"folder": folder, "geometry": geometry, "t1": t1, "t2": t2, "paths": paths, "other": other,
            "t2_other": t2_other, "weights": weights, "cards": cards}


def unet(env):
    return load_model("toy_models:unet3d", weights=env["weights"]["unet"], model_args={"in_channels": 2},
                      model_card=False)


def split_net(env):
    return load_model("toy_models:channel_split", weights=env["weights"]["split"], model_card=False)


def cli(env, *extra, model="unet"):
    factory = {"unet": ["toy_models:unet3d", "--model-args", '{"in_channels": 2}'],
               "split": ["toy_models:channel_split"]}[model]
    return main(["explain", "--model", factory[0], "--weights", env["weights"][model], "--model-card",
                 env["cards"][model], "--layer", "dec" if model == "unet" else "unet.dec", "--device", "cpu",
                 "--quiet"] + factory[1:] + list(extra))


# ------------------------------------------------------------------------------- the card field
def test_card_channels_field_is_checked_and_sets_the_channel_count():
    from SegHiResCAMLib.models.card import apply_card, card_from_dict
    card = card_from_dict({"channels": ["T1", "T1c", "T2", "FLAIR"]})
    assert card.channels == ("T1", "T1c", "T2", "FLAIR") and card.describe()["channels"] == list(card.channels)
    model = apply_card(load_model("toy_models:unet3d", model_card=False), card)
    assert model.in_channels == 4 and model.card["channels"] == ["T1", "T1c", "T2", "FLAIR"]
    for bad, words in (({"channels": ["T1", "T2"], "input_channels": 3}, "input_channels (3)"),
                       ({"channels": ["T1", "t1"]}, "once"), ({"channels": []}, "list of channel names"),
                       ({"channels": ["T1", 2]}, "list of channel names")):
        with pytest.raises(InputError, match="model card field 'channels'") as info:
            card_from_dict(bad)
        assert words in str(info.value)


def test_card_intensity_normalises_each_channel_on_its_own(env):
    from SegHiResCAMLib.analysis.explain import model_input
    from SegHiResCAMLib.models.card import apply_card, card_from_dict
    model = apply_card(unet(env), card_from_dict({"input_channels": 2, "intensity": {"normalize": ["zscore"]}}))
    x, _, _ = model_input(model, np.stack([env["t1"], env["t2"]], -1), env["geometry"], "cpu")
    for k in range(2):  # T2 is ~10 +- 3, T1 ~0 +- 1: jointly z-scored, neither would be mean 0, sd 1
        assert abs(float(x[0, k].mean())) < 1e-5 and abs(float(x[0, k].std(unbiased=False)) - 1) < 1e-4


# ------------------------------------------------------------------------------- images -> channels
def test_several_images_and_one_4d_file_give_identical_heatmaps(env, tmp_path):
    p = env["paths"]
    outs = [str(tmp_path / name) for name in ("two.nii.gz", "four.nii.gz", "named.nii.gz")]
    assert cli(env, "--image", p["t1"], "--image", p["t2"], "--out", outs[0]) == 0
    assert cli(env, "--image", p["four"], "--out", outs[1]) == 0
    assert cli(env, "--image", "T2=" + p["t2"], "--image", "T1=" + p["t1"], "--out", outs[2]) == 0
    two, four, named = (io.read_image(o) for o in outs)
    assert two[1].same_grid(env["geometry"]) and four[1] == two[1] and named[1] == two[1]
    np.testing.assert_array_equal(two[0], four[0])
    np.testing.assert_array_equal(two[0], named[0])  # bound by name: the card's order, whatever the order given
    # the Python API: a channel-first array, a list, a dict by name: the same heatmap
    for image in (np.stack([env["t1"], env["t2"]]), [env["t1"], env["t2"]], {"T2": env["t2"], "T1": env["t1"]}):
        got = explain_image(unet(env), image, env["geometry"], [TargetSpec(1)], layers="dec", device="cpu",
                            model_card=CARD)
        np.testing.assert_array_equal(got.heatmaps[0].array, two[0])
        assert got.metadata["channels"][1]["channel"] == "T2"
    swapped = explain_image(unet(env), [env["t2"], env["t1"]], env["geometry"], [TargetSpec(1)], layers="dec",
                            device="cpu", model_card=CARD)
    assert not np.array_equal(swapped.heatmaps[0].array, two[0])  # the order matters (the test can tell)


def test_extra_channels_are_resampled_onto_the_first_images_grid(env, tmp_path, capsys):
    from SegHiResCAMLib.imaging.channels import read_channel_images
    from SegHiResCAMLib.imaging.resample import resample_to_grid
    p = env["paths"]
    got = read_channel_images([p["t1"], p["t2_other"]], ("T1", "T2"), 2)
    assert got.geometry.same_grid(env["geometry"]) and got.array.shape == env["geometry"].array_shape + (2,)
    np.testing.assert_array_equal(got.array[..., 0], env["t1"])
    expected = resample_to_grid(*io.read_image(p["t2_other"]), got.geometry, "linear")
    np.testing.assert_array_equal(got.array[..., 1], expected)
    assert got.resampled == [False, True] and got.names == ["T1", "T2"]
    # the first image given defines the grid, also when it is bound to the card's second channel
    first_t2 = read_channel_images(["T2=" + p["t2_other"], "T1=" + p["t1"]], ("T1", "T2"), 2)
    assert first_t2.geometry.same_grid(env["other"]) and first_t2.resampled == [True, False]
    out, meta = str(tmp_path / "h.nii.gz"), str(tmp_path / "h.json")
    assert cli(env, "--image", p["t1"], "--image", p["t2_other"], "--out", out, "--json", meta) == 0
    err = capsys.readouterr().err
    assert "note: channel T2" in err and "resampled onto its grid" in err
    assert io.read_image(out)[1].same_grid(env["geometry"])
    info = json.load(open(meta))
    assert [c["resampled"] for c in info["channels"]] == [False, True] and info["image"] == os.path.abspath(p["t1"])


def test_wrong_channel_count_and_names_are_one_clear_error(env, tmp_path, capsys):
    p = env["paths"]
    out = str(tmp_path / "x.nii.gz")

    def error(*images):
        code = cli(env, *sum([["--image", i] for i in images], []), "--out", out)
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1 and err[0].startswith("seghirescam: error:"), err
        return err[0]

    three = error(p["t1"], p["t2"], p["t1"])
    assert "expects 2 input channel(s) but the images have 3 (its card names T1, T2)" in three
    assert "expects 2 input channel(s) but the images have 3" in error(p["four"], p["t1"])
    assert "'FLAIR' is not one of the model card's channels T1, T2" in error("T1=" + p["t1"], "FLAIR=" + p["t2"])
    assert "missing: T2" in error("T1=" + p["t1"])
    assert "given twice: T1" in error("T1=" + p["t1"], "t1=" + p["t2"])
    assert "name every one" in error("T1=" + p["t1"], p["t2"])
    assert not os.path.exists(out)
    with pytest.raises(InputError, match="expects 2 input channel.*have 3"):
        explain_image(unet(env), [env["t1"]] * 3, env["geometry"], [TargetSpec(1)], layers="dec", device="cpu")


# ------------------------------------------------------------------------------- per-channel maps and shares
@pytest.mark.parametrize("class_index,ignored", [(1, 0), (0, 1)])
def test_a_channel_the_class_ignores_gets_a_zero_map_and_a_share_of_exactly_zero(env, class_index, ignored):
    got = explain_image(split_net(env), [env["t1"], env["t2"]], env["geometry"], [TargetSpec(class_index, whole=True)],
                        layers="unet.dec" if class_index == 1 else "other.1", device="cpu", model_card=CARD,
                        per_channel=True)
    (attribution,) = got.channels
    shares = got.metadata["channel_shares"]
    assert list(shares) == ["T1", "T2"] and shares == attribution.describe()
    assert shares[CARD["channels"][ignored]] == 0.0
    assert shares[CARD["channels"][1 - ignored]] == 1.0
    assert not attribution.maps[ignored].any()
    assert attribution.maps[1 - ignored].any()
    assert all(m.shape == env["geometry"].array_shape and m.dtype == np.float32 for m in attribution.maps)


def test_channel_maps_are_gradient_times_input_and_shares_sum_to_one(env):
    from SegHiResCAMLib.analysis.explain import model_input
    model, card = unet(env), dict(CARD, divisible_by=4)  # 12 x 10 x 8 padded to 12 x 12 x 8
    got = explain_image(model, [env["t1"], env["t2"]], env["geometry"], [TargetSpec(1)], layers="dec",
                        device="cpu", model_card=card, per_channel=True)
    shares = list(got.metadata["channel_shares"].values())
    assert abs(sum(shares) - 1.0) < 1e-12 and all(0.0 < s < 1.0 for s in shares)
    # independent computation: the same model input, autograd by hand, the predicted voxels of class 1
    from SegHiResCAMLib.models.card import apply_card, card_from_dict
    carded = apply_card(model, card_from_dict(card))
    x, space, _ = model_input(carded, np.stack([env["t1"], env["t2"]], -1), env["geometry"], "cpu")
    assert any(b or a for b, a in space.pad)  # the padding is left out of the shares
    x = x.clone().requires_grad_(True)
    logits = carded.network(x)
    region = logits.argmax(1) == 1
    (grad,) = torch.autograd.grad(logits[:, 1][region].sum(), x)
    attribution = (grad * x).detach()[0]
    inner = tuple(slice(b, s - a) for (b, a), s in zip(space.pad, space.grid.array_shape))
    totals = [float(attribution[(k,) + inner].abs().double().sum()) for k in range(2)]
    np.testing.assert_allclose(shares, [t / sum(totals) for t in totals], rtol=1e-5)
    for k in range(2):
        np.testing.assert_allclose(got.channels[0].maps[k], space.to_image(attribution[k].numpy(), "linear"),
                                   rtol=0, atol=1e-6)


def test_cli_per_channel_writes_one_map_per_channel_and_the_shares(env, tmp_path):
    p = env["paths"]
    out, meta = str(tmp_path / "heat.nii.gz"), str(tmp_path / "heat.json")
    assert cli(env, "--image", p["t1"], "--image", p["t2"], "--out", out, "--json", meta, "--per-channel",
               "--class", "1", "--whole", model="split") == 0
    files = sorted(f for f in os.listdir(tmp_path) if not f.startswith("."))
    assert files == ["heat.json", "heat.nii.gz", "heat_channel-T1.nii.gz", "heat_channel-T2.nii.gz"]
    info = json.load(open(meta))
    assert info["channel_shares"] == {"T1": 0.0, "T2": 1.0}
    assert info["channel_maps"]["T2"] == str(tmp_path / "heat_channel-T2.nii.gz")
    t1_map, grid = io.read_image(str(tmp_path / "heat_channel-T1.nii.gz"))
    assert grid.same_grid(env["geometry"]) and not t1_map.any()
    python = explain_image(split_net(env), [env["t1"], env["t2"]], env["geometry"], [TargetSpec(1, whole=True)],
                           layers="unet.dec", device="cpu", model_card=env["cards"]["split"], per_channel=True)
    np.testing.assert_array_equal(io.read_image(str(tmp_path / "heat_channel-T2.nii.gz"))[0],
                                  python.channels[0].maps[1])
    np.testing.assert_array_equal(io.read_image(out)[0], python.heatmaps[0].array)


def test_per_channel_with_windows_is_refused_before_any_work(env):
    with pytest.raises(InputError, match="per-channel maps.*windows"):
        explain_image(unet(env), [env["t1"], env["t2"]], env["geometry"], [TargetSpec(1)], layers="dec",
                      device="cpu", model_card=CARD, per_channel=True, roi_size=(8, 8, 8))


def test_a_cached_forward_pass_is_not_reused_under_another_card(env):
    """The Slicer logic keeps the last forward pass (session_cache): a card that changes the model input (here the
    intensity steps) must not get the forward pass of the previous card."""
    cache, image, model = {}, [env["t1"], env["t2"]], unet(env)

    def run(card):
        return explain_image(model, image, env["geometry"], [TargetSpec(1, whole=True)], layers="dec", device="cpu",
                             model_card=card, session_cache=cache)

    run(CARD)
    again = run(CARD)
    assert again.metadata["timings"]["reused_forward"]
    other = dict(CARD, intensity={"normalize": ["minmax"]})
    got = run(other)
    assert not got.metadata["timings"]["reused_forward"]
    fresh = explain_image(unet(env), image, env["geometry"], [TargetSpec(1, whole=True)], layers="dec", device="cpu",
                          model_card=other)
    np.testing.assert_array_equal(got.heatmaps[0].array, fresh.heatmaps[0].array)


def test_predict_takes_several_images_too(env, tmp_path):
    p, out = env["paths"], str(tmp_path / "pred.nii.gz")
    assert main(["predict", "--model", "toy_models:unet3d", "--weights", env["weights"]["unet"], "--model-args",
                 '{"in_channels": 2}', "--model-card", env["cards"]["unet"], "--image", "T2=" + p["t2"],
                 "--image", "T1=" + p["t1"], "--out", out, "--device", "cpu", "--quiet"]) == 0
    labels, grid = io.read_image(out)
    expected = explain_image(unet(env), [env["t1"], env["t2"]], env["geometry"], [TargetSpec(1)], layers="dec",
                             device="cpu", model_card=CARD).prediction
    assert grid.same_grid(io.read_image(p["t2"])[1]) and 0 < labels.sum() < labels.size
    np.testing.assert_array_equal(labels, expected)
