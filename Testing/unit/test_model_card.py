"""Issue 16, part 1: model cards (declared preprocessing) and models that end in a sigmoid/softmax (``output: auto``).

Tiny networks only. Imports of the new modules sit inside the tests, so that each test fails on its own
assertion on code without them.
"""

import json

import numpy as np
import pytest
import torch

import toy_models
from SegHiResCAMLib.analysis.explain import TargetSpec, explain_image, predict_image
from SegHiResCAMLib.cli import main
from SegHiResCAMLib.geometry import Geometry
from SegHiResCAMLib.imaging import files as io
from SegHiResCAMLib.models import load_model


def oblique_geometry(size=(12, 10, 8), spacing=(0.9, 1.1, 1.7), origin=(3.0, -7.5, 12.25)):
    q, _ = np.linalg.qr(np.array([[0.9, -0.3, 0.3], [0.3, 0.95, 0.0], [-0.3, 0.0, 0.95]]))
    return Geometry(size=size, spacing=spacing, origin=origin, direction=tuple(q.flatten()))


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """An oblique image, and state dicts for TinyUNet with 1 (logits centred on the image) and 3 classes."""
    folder = tmp_path_factory.mktemp("card")
    geometry = oblique_geometry()
    image = np.random.RandomState(0).randn(*geometry.array_shape).astype(np.float32)
    path = str(folder / "img.nrrd")
    io.write_image(path, image, geometry)
    weights = {}
    for classes in (1, 3):
        torch.manual_seed(classes)
        net = toy_models.unet3d(classes=classes).eval()
        if classes == 1:  # about half of the voxels predicted: a region that is neither empty nor everything
            with torch.no_grad():
                net.head.bias -= net(torch.from_numpy(image)[None, None]).median()
                net.head.weight *= 50.0  # logits of a few units: probabilities from 0 to 1
                net.head.bias *= 50.0
        weights[classes] = str(folder / ("w%d.pt" % classes))
        torch.save(net.state_dict(), weights[classes])
    return {"folder": folder, "geometry": geometry, "image": image, "path": path, "weights": weights}


def factory_model(env, name, classes):
    return load_model("toy_models:%s" % name, weights=env["weights"][classes], model_args={"classes": classes})


def explain(model, env, **spec):
    return explain_image(model, env["image"], env["geometry"], [TargetSpec(1, **spec)], layers="dec", device="cpu")


# ------------------------------------------------------------------------------- output: auto (the defect)
@pytest.mark.parametrize("name,classes", [("unet3d_sigmoid_module", 1), ("unet3d_sigmoid_function", 1),
                                          ("unet3d_softmax_module", 3), ("unet3d_softmax_function", 3)])
def test_final_activation_is_bypassed_same_heatmap_as_logits(env, name, classes):
    reference = explain(factory_model(env, "unet3d", classes), env)
    got = explain(factory_model(env, name, classes), env)
    region = got.heatmaps[0].info["region_voxels"][0]
    assert 0 < region < env["image"].size  # the region is not the whole image (sigmoid(p) > 0.5 for every p)
    assert region == reference.heatmaps[0].info["region_voxels"][0]
    np.testing.assert_array_equal(got.prediction, reference.prediction)
    np.testing.assert_allclose(got.heatmaps[0].array, reference.heatmaps[0].array, rtol=0, atol=1e-6)
    output = got.metadata["model_output"]
    assert output["kind"] == ("sigmoid" if classes == 1 else "softmax") and output["explained"] == "logits"
    assert output["bypass"] and output["evidence"] == ("module" if "module" in name else "function")
    assert reference.metadata["model_output"]["kind"] == "logits"


def test_threshold_target_is_applied_to_the_probability_not_sigmoid_of_it(env):
    reference = explain(factory_model(env, "unet3d", 1), env, threshold=0.7)
    got = explain(factory_model(env, "unet3d_sigmoid_module", 1), env, threshold=0.7)
    assert got.heatmaps[0].info["region_voxels"] == reference.heatmaps[0].info["region_voxels"]
    assert 0 < got.heatmaps[0].info["region_voxels"][0] < env["image"].size // 2
    np.testing.assert_allclose(got.heatmaps[0].array, reference.heatmaps[0].array, rtol=0, atol=1e-6)


@pytest.mark.parametrize("name,classes", [("unet3d_manual_softmax", 3), ("unet3d_manual_sigmoid", 1)])
def test_activation_that_cannot_be_bypassed_is_explained_on_probabilities(env, name, classes):
    reference = explain(factory_model(env, "unet3d", classes), env, score="probabilities")
    got = explain(factory_model(env, name, classes), env)  # score "logits" asked: probabilities used, and said
    np.testing.assert_array_equal(got.prediction, reference.prediction)
    assert got.heatmaps[0].info["region_voxels"] == reference.heatmaps[0].info["region_voxels"]
    np.testing.assert_allclose(got.heatmaps[0].array, reference.heatmaps[0].array, rtol=0, atol=1e-4)
    assert got.heatmaps[0].info["target"]["score"] == "probabilities"
    output = got.metadata["model_output"]
    assert output["evidence"] == "values" and not output["bypass"] and output["explained"] == "probabilities"
    assert "cannot be bypassed" in output["message"] and "probabilities" in output["message"]


@pytest.mark.parametrize("name,classes", [("unet3d_sigmoid_function", 1), ("unet3d_softmax_module", 3)])
def test_torchscript_model_ending_in_an_activation_is_bypassed(env, tmp_path, name, classes):
    net = getattr(toy_models, name)(classes=classes).eval()
    net.load_state_dict(torch.load(env["weights"][classes]))
    x = torch.from_numpy(env["image"])[None, None]
    path = str(tmp_path / "net.pt")
    torch.jit.trace(net, x).save(path)
    got = explain(load_model(path), env)
    reference = explain(factory_model(env, "unet3d", classes), env)
    np.testing.assert_array_equal(got.prediction, reference.prediction)
    np.testing.assert_allclose(got.heatmaps[0].array, reference.heatmaps[0].array, rtol=0, atol=1e-6)
    assert got.metadata["model_output"]["bypass"] and got.metadata["model_output"]["explained"] == "logits"


def test_cli_prints_one_warning_line_and_records_the_output(env, capsys):
    folder = env["folder"]
    args = ["--weights", env["weights"][1], "--model-args", '{"classes": 1}', "--image", env["path"], "--quiet",
            "--layer", "dec"]
    assert main(["explain", "--model", "toy_models:unet3d", "--out", str(folder / "ref.nrrd")] + args) == 0
    assert capsys.readouterr().err == ""
    meta = str(folder / "sig.json")
    code = main(["explain", "--model", "toy_models:unet3d_sigmoid_module", "--out", str(folder / "sig.nrrd"),
                 "--json", meta, "--prediction", str(folder / "sig-pred.nrrd")] + args)
    err = capsys.readouterr().err
    assert code == 0, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("seghirescam: warning:") and "sigmoid" in lines[0], err
    info = json.load(open(meta))
    assert info["model_output"]["kind"] == "sigmoid" and info["model_output"]["explained"] == "logits"
    np.testing.assert_allclose(io.read_image(str(folder / "sig.nrrd"))[0], io.read_image(str(folder / "ref.nrrd"))[0],
                               rtol=0, atol=1e-6)
    prediction = io.read_image(str(folder / "sig-pred.nrrd"))[0]
    assert 0 < prediction.sum() < prediction.size
    assert main(["predict", "--model", "toy_models:unet3d_sigmoid_module", "--out", str(folder / "p.nrrd")]
                + args[:-2]) == 0
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "sigmoid" in err
    np.testing.assert_array_equal(io.read_image(str(folder / "p.nrrd"))[0], prediction)


def test_bypass_hooks_survive_a_deep_copy_and_declared_logits_are_not_probed(env):
    import copy
    model = factory_model(env, "unet3d_sigmoid_function", 1)
    explain(model, env)
    clone = copy.deepcopy(model.network)
    x = torch.from_numpy(env["image"])[None, None]
    plain = factory_model(env, "unet3d", 1).network
    torch.testing.assert_close(clone(x), plain(x), rtol=0, atol=1e-6)
    declared = factory_model(env, "unet3d_sigmoid_module", 1)
    declared.output = "logits"  # the user says so: nothing is detected, nothing changed
    assert explain(declared, env, whole=True).metadata["model_output"]["evidence"] == "declared"
    assert float(declared.network(x).min()) >= 0


# ------------------------------------------------------------------------------- the model card
def test_card_fields_are_checked_one_error_naming_the_field():
    from SegHiResCAMLib.errors import InputError
    from SegHiResCAMLib.models.card import card_from_dict
    cases = [({"output": "probs"}, "'output'", "logits, sigmoid, softmax, auto"),
             ({"dims": 4}, "'dims'", "2, 3"),
             ({"spacing": [1, 0, 1]}, "'spacing'", "positive"),
             ({"resize_mode": "cubic"}, "'resize_mode'", "nearest, linear"),
             ({"divisible_by": "some"}, "'divisible_by'", "\"auto\""),
             ({"intensity": {"normalize": ["minmax", "histogram"]}}, "'intensity.normalize'", "zscore"),
             ({"intensity": {"clip_percentiles": [99, 1]}}, "'intensity.clip_percentiles'", "low < high"),
             ({"intensity": {"gamma": 2}}, "'intensity.gamma'", "clip_percentiles"),
             ({"orientation": "XYZ"}, "'orientation'", "RAS"),
             ({"slice_axis": "oblique"}, "'slice_axis'", "axial, coronal, sagittal"),
             ({"colour": 1}, "'colour'", "dims, input_channels"),
             ({"dims": 3, "spacing": [1, 1]}, "'spacing'", "3 entries")]
    for data, name, allowed in cases:
        with pytest.raises(InputError) as info:
            card_from_dict(data)
        text = str(info.value)
        assert name in text and allowed in text and "\n" not in text, text


def test_bad_card_on_the_command_line_is_one_line(env, tmp_path, capsys):
    card = tmp_path / "bad.card.json"
    card.write_text(json.dumps({"intensity": {"normalize": "gauss"}}))
    code = main(["explain", "--model", "toy_models:unet3d", "--image", env["path"], "--out", str(tmp_path / "o.nrrd"),
                 "--model-card", str(card), "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "intensity.normalize" in err[0] and "minmax" in err[0]
    code = main(["explain", "--model", "toy_models:unet3d", "--image", env["path"], "--out", str(tmp_path / "o.nrrd"),
                 "--card-output", "maybe", "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "'output'" in err[0]


def test_intensity_steps_clip_normalize_scale_shift_exactly():
    from SegHiResCAMLib.imaging.model_space import normalize_intensities
    from SegHiResCAMLib.models.card import card_from_dict, card_preprocessing
    from SegHiResCAMLib.models.base import Preprocessing
    values = np.random.RandomState(1).gamma(2.0, 50.0, size=(6, 7, 8)).astype(np.float32)
    card = card_from_dict({"intensity": {"clip_percentiles": [1, 99], "normalize": ["minmax"], "scale": 2.0,
                                         "shift": -1.0}})
    low, high = np.percentile(values, [1, 99])
    clipped = np.clip(values, np.float32(low), np.float32(high))
    expected = (clipped - clipped.min()) / (clipped.max() - clipped.min()) * 2 - 1
    got = normalize_intensities(values, card_preprocessing(card, Preprocessing()))
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-6)
    assert got.min() == pytest.approx(-1.0) and got.max() == pytest.approx(1.0)
    ct = card_from_dict({"intensity": {"ct_window": [40, 400]}})
    got = normalize_intensities(np.array([-1000.0, -160.0, 40.0, 240.0, 3000.0], np.float32),
                                card_preprocessing(ct, Preprocessing()))
    np.testing.assert_allclose(got, [0.0, 0.0, 0.5, 1.0, 1.0], atol=1e-7)


def test_card_grid_steps_are_undone_exactly(env):
    """orientation + spacing + a fixed grid + padding: the heatmap comes back on exactly the input grid, and equals
    the same model run by hand on the model grid, resampled back."""
    from SegHiResCAMLib.imaging.resample import resample_to_grid
    model = factory_model(env, "unet3d", 3)
    card = {"orientation": "LPS", "spacing": [1.3, 1.3, 1.3], "resize_to": [10, 9, 7], "resize_mode": "linear",
            "divisible_by": 4, "intensity": {"normalize": ["zscore"]}}
    got = explain_image(model, env["image"], env["geometry"], [TargetSpec(1, whole=True)], layers="dec",
                        device="cpu", model_card=card)
    space = got.space
    assert space.grid.size == (12, 12, 8) and tuple(space.pad) == ((0, 1), (0, 3), (0, 2))
    assert any("resized" in step for step in space.steps) and any("LPS" in step for step in space.steps)
    assert got.heatmaps[0].array.shape == env["geometry"].array_shape and got.heatmaps[0].array.dtype == np.float32
    assert got.metadata["model"]["card"]["resize_to"] == [10, 9, 7]
    assert got.metadata["model"]["preprocessing"]["resize_to"] == [10, 9, 7]
    from SegHiResCAMLib.engine import SegmentTarget, WholeRegion
    from SegHiResCAMLib.engine import explain as engine_explain
    from SegHiResCAMLib.imaging.model_space import prepare
    from SegHiResCAMLib.models.card import apply_card, card_from_dict
    carded = apply_card(factory_model(env, "unet3d", 3), card_from_dict(card))
    x, same = prepare(env["image"], env["geometry"], carded.preprocessing, 3, 1)
    assert same.grid == space.grid
    by_hand = engine_explain(carded.network, torch.from_numpy(x)[None], SegmentTarget(1, WholeRegion()), layer="dec")
    expected = resample_to_grid(by_hand.map[0].numpy(), space.grid, env["geometry"], "linear")
    np.testing.assert_allclose(got.heatmaps[0].array, expected, rtol=0, atol=1e-6)


def test_card_next_to_a_torchscript_file_is_used_and_flags_override_it(env, tmp_path, capsys):
    net = toy_models.unet3d(classes=3).eval()
    net.load_state_dict(torch.load(env["weights"][3]))
    path = str(tmp_path / "seg.pt")
    torch.jit.trace(net, torch.from_numpy(env["image"])[None, None]).save(path)
    (tmp_path / "seg.card.json").write_text(json.dumps({
        "classes": {"1": "liver", "2": "spleen"}, "spacing": [1.5, 1.5, 1.5], "divisible_by": "auto",
        "intensity": {"normalize": ["zscore"], "scale": 2.0}, "output": "auto", "patch_size": None}))
    meta = str(tmp_path / "m.json")
    code = main(["explain", "--model", path, "--image", env["path"], "--out", str(tmp_path / "h.nrrd"), "--class",
                 "spleen", "--whole", "--layer", "dec", "--json", meta, "--quiet", "--card-spacing", "1.2,1.2,1.2"])
    assert code == 0, capsys.readouterr().err
    info = json.load(open(meta))
    card = info["model"]["card"]
    assert card["classes"] == {"1": "liver", "2": "spleen"} and card["spacing"] == [1.2, 1.2, 1.2]
    assert card["source"].endswith("seg.card.json + --card-spacing")
    assert info["target"]["class"] == 2 and info["model"]["class_names"][2] == "spleen"
    assert info["model_space"]["model_grid"]["spacing"] == pytest.approx([1.2, 1.2, 1.2])
    assert info["model"]["preprocessing"]["scale"] == 2.0
    assert info["model"]["resolved"]["divisible_by"] == {"declared": "auto", "probed": 2, "used": 2}
    heat, geometry = io.read_image(str(tmp_path / "h.nrrd"))
    assert geometry.same_grid(env["geometry"], atol=1e-5) and np.isfinite(heat).all()
    # the API: load_model finds the same card by itself
    model = load_model(path)
    assert model.class_names[1:] == ["liver", "spleen"] and model.preprocessing.spacing == (1.5, 1.5, 1.5)
    assert load_model(path, model_card=False).class_names[1] == "class1"


def test_divisible_by_auto_finds_the_smallest_multiple_and_crops_back(env):
    from SegHiResCAMLib.models.base import Preprocessing, SegModel
    from SegHiResCAMLib.models.output import probe_divisible_by

    class TwoLevels(torch.nn.Module):  # needs multiples of 4
        def __init__(self):
            super().__init__()
            self.enc = torch.nn.Conv3d(1, 2, 3, padding=1)
            self.down = torch.nn.Sequential(torch.nn.MaxPool3d(2), torch.nn.MaxPool3d(2))
            self.dec = torch.nn.Conv3d(4, 4, 3, padding=1)
            self.head = torch.nn.Conv3d(4, 2, 1)

        def forward(self, x):
            e = self.enc(x)
            up = torch.nn.functional.interpolate(self.down(e), scale_factor=4)
            return self.head(self.dec(torch.cat([up, e], 1)))

    model = SegModel(network=TwoLevels().eval(), name="two", preprocessing=Preprocessing(divisible_by="auto"))
    assert probe_divisible_by(model) == 4
    odd = oblique_geometry(size=(11, 9, 7))
    image = np.random.RandomState(2).randn(*odd.array_shape).astype(np.float32)
    got = explain_image(model, image, odd, [TargetSpec(1, whole=True)], layers="dec", device="cpu")
    assert got.space.grid.size == (12, 12, 8) and got.heatmaps[0].array.shape == odd.array_shape
    assert got.metadata["model"]["resolved"]["divisible_by"]["used"] == 4
    labels, meta = predict_image(model, image, odd, device="cpu")
    assert labels.shape == odd.array_shape and meta["model"]["preprocessing"]["divisible_by"] == 4


def test_card_patch_size_is_the_default_window_and_classes_name_the_outputs(env):
    model = factory_model(env, "unet3d", 3)
    got = explain_image(model, env["image"], env["geometry"], [TargetSpec(2, whole=True)], layers="dec",
                        device="cpu", model_card={"patch_size": 4, "classes": ["bg", "a", "b"]})
    whole = explain_image(model, env["image"], env["geometry"], [TargetSpec(2, whole=True)], layers="dec",
                          device="cpu")
    assert got.metadata["model"]["class_names"] == ["bg", "a", "b"] and model.class_names[1] == "class1"
    assert got.heatmaps[0].target.class_index == 2
    assert got.heatmaps[0].info["options"]["roi_size"] == [4, 4, 4] and "roi_size" not in whole.heatmaps[0].info["options"]


@pytest.mark.parametrize("name,classes", [("unet3d_sigmoid_function", 1), ("unet3d_softmax_module", 3)])
def test_opaque_torchscript_model_is_read_from_its_graph_and_explained_on_probabilities(env, tmp_path, name,
                                                                                        classes):
    from SegHiResCAMLib.models.torchscript.loader import load_torchscript
    net = getattr(toy_models, name)(classes=classes).eval()
    net.load_state_dict(torch.load(env["weights"][classes]))
    path = str(tmp_path / "net.pt")
    torch.jit.trace(net, torch.from_numpy(env["image"])[None, None]).save(path)
    model = load_torchscript(path, interpret=False)  # runs as one call: no layer inside, no op to bypass
    labels, meta = predict_image(model, env["image"], env["geometry"], device="cpu")
    reference, _ = predict_image(factory_model(env, "unet3d", classes), env["image"], env["geometry"], device="cpu")
    np.testing.assert_array_equal(labels, reference)
    output = meta["model_output"]
    assert output["kind"] == ("sigmoid" if classes == 1 else "softmax") and output["evidence"] == "graph"
    assert output["explained"] == "probabilities" and "cannot be bypassed" in output["message"]


@pytest.mark.parametrize("net_name", ["UNet", "SegResNet"])
@pytest.mark.parametrize("final", ["sigmoid", "softmax"])
def test_monai_networks_with_a_final_activation_are_detected_and_bypassed(net_name, final):
    monai_nets = pytest.importorskip("monai.networks.nets")
    from SegHiResCAMLib.engine.activation import detect_final_activation, install_output_hooks
    torch.manual_seed(0)
    body = (monai_nets.UNet(3, 1, 2, (4, 8, 16), (2, 2)) if net_name == "UNet"
            else monai_nets.SegResNet(3, 8, 1, 2)).eval()
    net = torch.nn.Sequential(body, torch.nn.Sigmoid() if final == "sigmoid" else torch.nn.Softmax(dim=1))
    x = torch.randn(1, 1, 16, 16, 16)
    assert detect_final_activation(body, x).kind == "logits"
    found = detect_final_activation(net, x)
    assert (found.kind, found.evidence, found.where, found.bypass) == (final, "module", "1", True)
    install_output_hooks(net, found)
    with torch.no_grad():
        torch.testing.assert_close(net(x), body(x), rtol=0, atol=0)
