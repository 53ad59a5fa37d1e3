"""The `seghirescam` command line: geometry round trip, equality with the Python engine, one-line errors."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from SegHiResCAMLib.imaging import files as io
from SegHiResCAMLib.imaging.resample import resample_to_grid
from SegHiResCAMLib.cli import main
from SegHiResCAMLib.engine import SegmentTarget, WholeRegion, explain
from SegHiResCAMLib.geometry import Geometry

import toy_models

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # Testing/


def oblique_geometry(size=(20, 18, 10), spacing=(0.7, 1.3, 2.9), origin=(10.0, -20.5, 30.25)):
    a = np.array([[0.9, -0.3, 0.3], [0.3, 0.95, 0.0], [-0.3, 0.0, 0.95]])
    q, _ = np.linalg.qr(a)
    return Geometry(size=size, spacing=spacing, origin=origin, direction=tuple(q.flatten()))


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cli")
    torch.manual_seed(0)
    net = toy_models.unet3d()
    weights = str(folder / "w.pt")
    torch.save(net.state_dict(), weights)
    geometry = oblique_geometry()
    image = np.random.RandomState(0).randn(*geometry.array_shape).astype(np.float32)
    paths = {}
    for ext in (".nii.gz", ".nrrd", ".mha"):
        paths[ext] = str(folder / ("img" + ext))
        io.write_image(paths[ext], image, geometry)
    return {"folder": folder, "net": net, "weights": weights, "geometry": geometry, "image": image, "paths": paths}


def run(args, capsys):
    code = main(args)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.mark.parametrize("ext", [".nii.gz", ".nrrd", ".mha"])
@pytest.mark.parametrize("method,layer", [("seg-hires-grad-cam", "dec"), ("seg-grad-cam", "down")])
def test_explain_round_trip_geometry_and_values(case, capsys, ext, method, layer):
    out = str(case["folder"] / ("heat-%s-%s%s" % (method, layer, ext)))
    meta = out + ".json"
    code, _, err = run(["explain", "--model", "toy_models:unet3d", "--weights", case["weights"], "--image",
                        case["paths"][ext], "--out", out, "--whole", "--method", method, "--layer", layer,
                        "--json", meta, "--quiet"], capsys)
    assert code == 0, err
    heat, geometry = io.read_image(out)
    _, in_geometry = io.read_image(case["paths"][ext])
    assert heat.dtype == np.float32
    assert geometry.size == in_geometry.size
    np.testing.assert_allclose(geometry.spacing, in_geometry.spacing, rtol=0, atol=1e-6)
    np.testing.assert_allclose(geometry.origin, in_geometry.origin, rtol=0, atol=1e-5)
    np.testing.assert_allclose(geometry.direction, in_geometry.direction, rtol=0, atol=1e-6)
    # the file holds exactly the engine's map computed in Python on the same array
    x = torch.from_numpy(io.read_image(case["paths"][ext])[0].astype(np.float32))[None, None]
    expected = explain(case["net"], x, SegmentTarget(1, WholeRegion()), layer=layer, method=method).map[0].numpy()
    np.testing.assert_allclose(heat, expected, rtol=0, atol=1e-6)
    assert heat.max() == pytest.approx(1.0)
    info = json.load(open(meta))
    assert info["method"] == method and info["layer"] == layer
    assert info["target"]["class"] == 1 and info["target"]["region"] == "whole"
    assert list(info["model"]["file_hashes"].values())[0] == _sha256(case["weights"])
    assert info["timings"]["total_s"] > 0 and info["mask_resampled"] is False


def _sha256(path):
    import hashlib
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def test_segment_on_another_grid_is_resampled_and_noted(case, capsys):
    geometry = case["geometry"]
    # a label map on a coarser grid covering the same space
    coarse = Geometry(size=(10, 9, 5), spacing=(1.4, 2.6, 5.8), origin=geometry.origin, direction=geometry.direction)
    labels = np.zeros(coarse.array_shape, dtype=np.uint8)
    labels[1:4, 2:6, 3:8] = 2
    seg = str(case["folder"] / "seg-coarse.nrrd")
    io.write_image(seg, labels, coarse)
    out = str(case["folder"] / "heat-seg.nrrd")
    meta = str(case["folder"] / "heat-seg.json")
    code, _, err = run(["explain", "--model", "toy_models:unet3d", "--weights", case["weights"], "--image",
                        case["paths"][".nrrd"], "--out", out, "--segment", seg, "--label", "2", "--json", meta,
                        "--quiet"], capsys)
    assert code == 0, err
    assert "resampled onto the image grid" in err
    info = json.load(open(meta))
    assert info["mask_resampled"] is True and "nearest" in info["notes"][0]
    expected_mask = resample_to_grid(labels, coarse, geometry, "nearest") == 2
    assert info["cam"]["region_voxels"] == [int(expected_mask.sum())]
    heat, _ = io.read_image(out)
    assert heat.shape == geometry.array_shape and heat.max() == pytest.approx(1.0)


def test_prediction_and_predict_command(case, capsys):
    out = str(case["folder"] / "pred.nii.gz")
    code, _, err = run(["predict", "--model", "toy_models:unet3d", "--weights", case["weights"], "--image",
                        case["paths"][".nii.gz"], "--out", out, "--quiet"], capsys)
    assert code == 0, err
    labels, geometry = io.read_image(out)
    x = torch.from_numpy(case["image"])[None, None]
    with torch.no_grad():
        expected = case["net"](x).argmax(1)[0].numpy()
    np.testing.assert_array_equal(labels, expected)
    assert geometry.size == case["geometry"].size


def test_layers_command_lists_shapes_and_auto(case, capsys):
    code, out, err = run(["layers", "--model", "toy_models:unet3d", "--weights", case["weights"], "--image",
                          case["paths"][".nrrd"]], capsys)
    assert code == 0, err
    lines = dict(line.split("\t", 1) for line in out.splitlines() if not line.startswith("#"))
    assert lines["down"].split("\t")[1] == "8x5x9x10"
    assert lines["dec"].endswith("<- auto")
    code, out, _ = run(["layers", "--model", "toy_models:unet3d"], capsys)
    assert code == 0 and "dec.0\tConv3d" in out


@pytest.mark.parametrize("problem,fragment", [
    ("missing-image", "does not exist"),
    ("unknown-layer", "unknown layer 'decc' (did you mean dec"),
    ("empty-target", "target segment is empty"),
    ("wrong-channels", "expects 2 input channel(s) but the image has 1"),
    ("missing-weights", "does not exist"),
    ("pickled-model", "--trust-model"),
    ("overwrite-input", "Refusing to overwrite the input"),
    ("label-absent", "label 9 does not occur"),
    ("bad-class", "class 5 does not exist"),
    ("no-overlap", "does not overlap the image"),
])
def test_user_mistakes_exit_2_with_one_line(case, capsys, problem, fragment):
    base = ["explain", "--model", "toy_models:unet3d", "--weights", case["weights"], "--image",
            case["paths"][".nrrd"], "--out", str(case["folder"] / "never.nrrd"), "--quiet"]
    empty = str(case["folder"] / "empty.nrrd")
    io.write_image(empty, np.zeros(case["geometry"].array_shape, np.uint8), case["geometry"])
    far = Geometry(size=(4, 4, 4), spacing=(1, 1, 1), origin=(900.0, 900.0, 900.0), direction=tuple(np.eye(3).flatten()))
    far_path = str(case["folder"] / "far.nrrd")
    io.write_image(far_path, np.ones(far.array_shape, np.uint8), far)
    args = {
        "missing-image": base[:5] + ["--image", "nope.nii.gz"] + base[7:],
        "unknown-layer": base + ["--layer", "decc"],
        "empty-target": base + ["--segment", empty],
        "wrong-channels": base + ["--model-args", '{"in_channels": 2}'],
        "missing-weights": base[:3] + ["--weights", "nope.pt"] + base[5:],
        "pickled-model": None,
        "overwrite-input": base[:7] + ["--out", case["paths"][".nrrd"], "--quiet"],
        "label-absent": base + ["--segment", empty, "--label", "9"],
        "bad-class": base + ["--class", "5"],
        "no-overlap": base + ["--segment", far_path],
    }[problem]
    if problem == "wrong-channels":
        two = str(case["folder"] / "w2.pt")
        torch.save(toy_models.unet3d(in_channels=2).state_dict(), two)
        args = base[:3] + ["--weights", two] + base[5:] + ["--model-args", '{"in_channels": 2}']
    if problem == "pickled-model":
        full = str(case["folder"] / "full.pt")
        torch.save(case["net"], full)
        args = base[:3] + ["--weights", full] + base[5:]
    code, out, err = run(args, capsys)
    assert code == 2
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("seghirescam: error: "), err
    assert fragment in lines[0]
    assert "Traceback" not in err
    assert not os.path.exists(case["folder"] / "never.nrrd")


def test_console_script_entry_point(case):
    """The installed `seghirescam` script runs and prints one line for a user mistake."""
    exe = os.path.join(os.path.dirname(sys.executable), "seghirescam")
    env = dict(os.environ, PYTHONPATH=HERE)
    done = subprocess.run([exe, "explain", "--model", "toy_models:unet3d", "--weights", case["weights"], "--image",
                           case["paths"][".nrrd"], "--out", str(case["folder"] / "cs.nrrd"), "--layer", "nope"],
                          capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 2 and done.stderr.count("\n") == 1 and "unknown layer" in done.stderr
    done = subprocess.run([exe, "--version"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and "seghirescam" in done.stdout
    # the same command as a module, for a Python without the console script (Slicer's)
    done = subprocess.run([sys.executable, "-m", "SegHiResCAMLib.cli", "--version"], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0 and "seghirescam" in done.stdout


def test_windowed_explain_with_one_window_equals_whole_volume(case, capsys):
    outs = []
    for extra in ([], ["--roi-size", "10,18,20"], ["--roi-size", "8", "--overlap", "0.5", "--blend", "gaussian"]):
        out = str(case["folder"] / ("heat-win-%d.nrrd" % len(outs)))
        code, _, err = run(["explain", "--model", "toy_models:unet3d", "--weights", case["weights"], "--image",
                            case["paths"][".nrrd"], "--out", out, "--whole", "--layer", "dec", "--quiet"] + extra,
                           capsys)
        assert code == 0, err
        outs.append(io.read_image(out)[0])
    np.testing.assert_allclose(outs[1], outs[0], rtol=0, atol=1e-5)  # one window = the whole volume
    assert outs[2].shape == outs[0].shape and np.isfinite(outs[2]).all() and outs[2].max() == pytest.approx(1.0)
    assert np.corrcoef(outs[2].ravel(), outs[0].ravel())[0, 1] > 0.5  # many windows: close, not identical


@pytest.mark.parametrize("roi", [None, (8, 8, 8)])
def test_session_cache_reuses_the_forward_pass(case, roi):
    from SegHiResCAMLib.models import load_model
    from SegHiResCAMLib.analysis.explain import TargetSpec, explain_image
    model = load_model("toy_models:unet3d", weights=case["weights"])
    # declared, so that no probe resolves divisible_by/output "auto" (they would add forward passes to the count)
    model.preprocessing.divisible_by, model.output = 2, "logits"
    calls = {"n": 0}
    handle = model.network.register_forward_pre_hook(lambda m, i: calls.__setitem__("n", calls["n"] + 1))
    cache = {}
    image, geometry = case["image"], case["geometry"]
    kw = dict(layers="dec", device="cpu", roi_size=roi)
    first = explain_image(model, image, geometry, [TargetSpec(1, whole=True)], session_cache=cache, **kw)
    n_first = calls["n"]
    second = explain_image(model, image, geometry, [TargetSpec(0, whole=True)], session_cache=cache, **kw)
    n_second = calls["n"] - n_first
    third = explain_image(model, image + 1.0, geometry, [TargetSpec(0, whole=True)], session_cache=cache, **kw)
    handle.remove()
    assert second.metadata["timings"]["reused_forward"] and not third.metadata["timings"]["reused_forward"]
    # whole volume: no forward at all; windows: the first call ran 1 probe + W windows (pass 1) + W (pass 2),
    # the second only pass 2
    assert n_second == (0 if roi is None else (n_first - 1) // 2) and (roi is None or n_second > 0)
    fresh = explain_image(model, image, geometry, [TargetSpec(0, whole=True)], **kw)
    np.testing.assert_allclose(second.heatmaps[0].array, fresh.heatmaps[0].array, rtol=0, atol=1e-6)
    assert not np.allclose(first.heatmaps[0].array, second.heatmaps[0].array)


def test_evaluate_command_writes_table_json_markdown_and_plot(case, capsys):
    out_json = str(case["folder"] / "eval.json")
    out_md = str(case["folder"] / "eval.md")
    plot = str(case["folder"] / "eval.png")
    code, out, err = run(["evaluate", "--model", "toy_models:unet3d", "--weights", case["weights"], "--image",
                          case["paths"][".nrrd"], "--methods", "seg-hires-grad-cam", "seg-grad-cam", "--layers",
                          "dec", "down", "--steps", "4", "--out-json", out_json, "--out-md", out_md, "--plot", plot,
                          "--quiet"], capsys)
    assert code == 0, err
    data = json.load(open(out_json))
    rows = data["rows"]
    assert {(r["method"], r["layer"]) for r in rows if r["method"] != "random-order"} == {
        (m, l) for m in ("seg-hires-grad-cam", "seg-grad-cam") for l in ("dec", "down")}
    for row in rows:
        assert np.isfinite(row["deletion_auc_raw"]) and np.isfinite(row["insertion_auc_raw"])
        if row["method"] != "random-order":
            assert 0.0 <= row["energy_in_segment"] <= row["energy_in_dilated_segment"] <= 1.0
            rhos = [v for k, v in row.items() if k.startswith("spearman") and v is not None]
            assert rhos and all(-1.0 <= v <= 1.0 for v in rhos)
    assert open(plot, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    assert "| method | layer |" in open(out_md).read()


def test_evaluate_steps_take_interior_fractions(case, capsys):
    out_json = str(case["folder"] / "eval-fractions.json")
    base = ["evaluate", "--model", "toy_models:unet3d", "--weights", case["weights"], "--image",
            case["paths"][".nrrd"], "--methods", "seg-grad-cam", "--layers", "dec", "--sanity-stages", "0",
            "--random-targets", "--no-random-reference"]
    code, out, err = run(base + ["--out-json", out_json], capsys)  # the default steps: the measured error, the hint
    assert code == 0, err
    from SegHiResCAMLib.engine.faithfulness import MEASURED_ERROR
    assert "AUCs were within %.2f (deletion) and %.2f (insertion)" % (MEASURED_ERROR["deletion"],
                                                                      MEASURED_ERROR["insertion"]) in err
    assert "will run 9 forward passes (1 maps x 2 curves x 4 interior steps + 1)" in err
    assert "this shortcut kept every ranking of --exact" in err
    code, out, err = run(base + ["--steps", "0.25,0.75", "--out-json", out_json], capsys)
    assert code == 0, err
    assert "AUCs were within" not in err  # the benchmark measured the default steps only
    assert "will run 5 forward passes (1 maps x 2 curves x 2 interior steps + 1)" in err
    data = json.load(open(out_json))
    assert data["metadata"]["options"]["steps"] == [0.0, 0.25, 0.75, 1.0]
    assert data["curves"]["seg-grad-cam @ dec"]["deletion"]["fractions"] == [0.0, 0.25, 0.75, 1.0]
    assert data["metadata"]["shortcut"]["measured_error"] is None  # the benchmark measured the default steps only
    for bad in ("0.75,0.25", "0,0.5", "0.5,1", "0", "x", "0.5,,0.6x"):
        code, out, err = run(base + ["--steps", bad, "--out-json", str(case["folder"] / "bad.json")], capsys)
        assert code == 2 and err.count("\n") == 1 and "--steps" in err, (bad, err)
        assert not os.path.exists(str(case["folder"] / "bad.json"))


def test_sa_score_command_writes_tables_plot_and_map(case, capsys):
    import csv
    out_csv = str(case["folder"] / "sa.csv")
    out_map = str(case["folder"] / "sa-map.nrrd")
    plot = str(case["folder"] / "sa.png")
    meta = str(case["folder"] / "sa.json")
    code, out, err = run(["sa-score", "--model", "toy_models:unet3d", "--weights", case["weights"], "--image",
                          case["paths"][".nrrd"], "--out-csv", out_csv, "--plot", plot, "--map-layer", "dec",
                          "--out-map", out_map, "--json", meta, "--quiet"], capsys)
    assert code == 0, err
    rows = list(csv.DictReader(open(out_csv)))
    assert {"enc", "down", "dec"} <= {r["layer"] for r in rows}
    scores = [float(r["sa_score"]) for r in rows if r["sa_score"] not in ("", "nan")]
    assert scores and all(0.0 <= v <= 1.0 for v in scores)
    units = list(csv.DictReader(open(out_csv.replace(".csv", "-units.csv"))))
    assert len(units) >= sum(int(r["channels"]) for r in rows if r["layer"] in ("dec", "down"))
    labels, geometry = io.read_image(out_map)
    assert geometry.same_grid(case["geometry"]) and set(np.unique(labels)) <= {0, 1}
    assert open(plot, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    info = json.load(open(meta))
    assert 0.0 <= info["mean_sa"] <= 1.0 and info["map_layer"] == "dec" and info["class"] == 1


def test_one_json_encoder_is_strict_and_knows_numpy_and_paths(tmp_path):
    import pathlib
    from SegHiResCAMLib.analysis.provenance import dumps
    text = dumps({"a": np.float32(0.5), "b": (1, np.int64(2)), "c": float("nan"), "d": np.array([1.0, np.inf]),
                  "e": pathlib.Path("/x"), 3: object}, indent=None)
    data = json.loads(text, parse_constant=lambda name: pytest.fail("not strict JSON: %s" % name))
    assert data == {"a": 0.5, "b": [1, 2], "c": None, "d": [1.0, None], "e": "/x", "3": str(object)}


def test_method_options_come_from_the_catalog():
    import argparse
    from SegHiResCAMLib import catalog
    from SegHiResCAMLib.cli import common
    args = argparse.Namespace(pool_size=3)
    assert common.method_options(args, ["seg-xres-cam", "seg-grad-cam"]) == {"pool_size": 3}
    assert common.method_options(args, [catalog.DEFAULT_METHOD]) == {}


def test_the_command_line_computes_subnormals_as_zero():
    """HD-BET feeds subnormal activations to its convolutions, 30x slower on some processors: the command line
    flushes them to zero (on every torch thread) before it runs anything. A fresh process shows it."""
    code = ("import torch, sys; from SegHiResCAMLib.cli import main; "
            "before = float(torch.tensor([1e-39]) * 1.5); main(['layers', '--model', 'hd-bet-unknown-spec']); "
            "print(before, float(torch.tensor([1e-39]) * 1.5))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    before, after = map(float, done.stdout.split())
    assert before > 0 and after == 0.0, done.stdout + done.stderr
