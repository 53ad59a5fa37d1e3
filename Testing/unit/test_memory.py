"""Bounded memory without flags (issue 16, part 4): the estimate, the budget and the automatic choice of windows."""

import json

import numpy as np
import pytest
import torch

from SegHiResCAMLib.analysis.explain import TargetSpec, explain_image, predict_image
from SegHiResCAMLib.analysis.memory import TensorMemory, parse_memory_budget, plan_memory
from SegHiResCAMLib.cli import main
from SegHiResCAMLib.errors import InputError
from SegHiResCAMLib.geometry import Geometry
from SegHiResCAMLib.imaging import files as io
from SegHiResCAMLib.models.base import Preprocessing, SegModel

import toy_models


def _model():
    torch.manual_seed(0)
    return SegModel(network=toy_models.unet3d().eval(), name="toy", preprocessing=Preprocessing(divisible_by=2),
                    output="logits")


def _image(shape=(24, 24, 24)):
    geometry = Geometry(size=shape[::-1], spacing=(1.0, 1.0, 1.0), origin=(0.0, 0.0, 0.0),
                        direction=tuple(np.eye(3).flatten()))
    return np.random.RandomState(1).randn(*shape).astype(np.float32), geometry


def test_budget_sizes_parse_and_a_bad_one_is_one_clear_error():
    assert parse_memory_budget("4G") == 4 << 30 and parse_memory_budget("512 MiB") == 512 << 20
    assert parse_memory_budget("1.5GB") == int(1.5 * (1 << 30)) and parse_memory_budget(1000) == 1000
    assert parse_memory_budget(None) is None and parse_memory_budget("auto") is None
    assert parse_memory_budget("none") == 0
    for bad in ("lots", "4X", "-1G", "0", 0, -5, "G"):
        with pytest.raises(InputError, match="memory budget must be a positive size such as 4G"):
            parse_memory_budget(bad)


def test_tensor_memory_counts_live_storage_once_and_releases_it():
    with TensorMemory() as counter:
        a = torch.ones(1000)           # 4000 bytes
        view = a[10:20]                # a view: no new storage
        b = a * 2                      # 4000 more: peak 8000
        del a, view, b
        c = torch.ones(500)            # 2000 bytes after the others were freed
        del c
    assert counter.peak == 8000 and counter.current == 0


def test_estimate_is_monotone_in_the_input_size():
    model = _model()
    estimates = []
    for side in (8, 16, 24, 32):
        x = torch.randn(1, 1, side, side, side)
        estimates.append(plan_memory(model.network, x, "none", layers=["dec"], methods=["seg-hires-grad-cam"],
                                     align=2).estimate_bytes)
    assert all(b > a for a, b in zip(estimates, estimates[1:])), estimates
    # the network's share is measured, not assumed: a gradient pass of this toy net needs more than its input
    plan = plan_memory(model.network, torch.randn(1, 1, 16, 16, 16), "none", layers=["dec"])
    assert plan.probe_shape == (16, 16, 16) and plan.bytes_per_voxel > 4


def test_a_tiny_budget_picks_windows_equal_to_the_explicitly_windowed_run():
    model, (image, geometry) = _model(), _image()
    target = [TargetSpec(1, whole=True)]
    large = explain_image(model, image, geometry, target, layers="dec", device="cpu", memory_budget="64G")
    assert large.metadata["memory"]["choice"] == "whole input" and large.metadata["memory"]["roi_size"] is None
    estimate = large.metadata["memory"]["estimate_bytes"]
    small = explain_image(model, image, geometry, target, layers="dec", device="cpu", memory_budget=estimate // 2)
    memory = small.metadata["memory"]
    assert memory["choice"] == "windows" and memory["budget_bytes"] == estimate // 2
    roi = tuple(memory["roi_size"])
    assert all(r < 24 and r % 2 == 0 for r in roi) and memory["window_estimate_bytes"] < estimate
    assert "exceeds the budget" in memory["message"]
    explicit = explain_image(model, image, geometry, target, layers="dec", device="cpu", roi_size=roi)
    np.testing.assert_array_equal(small.heatmaps[0].array, explicit.heatmaps[0].array)
    assert not np.allclose(small.heatmaps[0].array, large.heatmaps[0].array)  # windows did run
    labels, meta = predict_image(model, image, geometry, device="cpu", memory_budget=estimate // 8)
    assert meta["memory"]["choice"] == "windows" and labels.shape == image.shape


def test_cli_reports_the_choice_in_one_line_and_in_the_json(tmp_path, capsys):
    torch.manual_seed(0)
    weights = str(tmp_path / "w.pt")
    torch.save(toy_models.unet3d().state_dict(), weights)
    image, geometry = _image()
    path = str(tmp_path / "img.nrrd")
    io.write_image(path, image, geometry)
    base = ["explain", "--model", "toy_models:unet3d", "--weights", weights, "--image", path, "--whole",
            "--layer", "dec", "--quiet", "--card-divisible-by", "2", "--card-output", "logits"]
    assert main(base + ["--out", str(tmp_path / "h0.nrrd"), "--json", str(tmp_path / "m0.json"),
                        "--memory-budget", "64G"]) == 0
    whole = json.load(open(str(tmp_path / "m0.json")))["memory"]
    assert whole["choice"] == "whole input" and "memory:" not in capsys.readouterr().err
    half = "%dK" % (whole["estimate_bytes"] // 2048)
    assert main(base + ["--out", str(tmp_path / "h.nrrd"), "--json", str(tmp_path / "m.json"),
                        "--memory-budget", half]) == 0
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if "memory:" in line]
    assert len(lines) == 1 and "running in windows" in lines[0], err
    meta = json.load(open(str(tmp_path / "m.json")))
    assert meta["memory"]["choice"] == "windows" and meta["memory"]["budget_bytes"] == int(half[:-1]) << 10
    assert main(base + ["--out", str(tmp_path / "never.nrrd"), "--memory-budget", "plenty"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "memory budget must be a positive size" in err[0]
    assert not (tmp_path / "never.nrrd").exists()
    assert main(["predict", "--model", "toy_models:unet3d", "--weights", weights, "--image", path, "--quiet",
                 "--out", str(tmp_path / "seg.nrrd"), "--json", str(tmp_path / "p.json"),
                 "--memory-budget", "64G"]) == 0
    assert json.load(open(str(tmp_path / "p.json")))["memory"]["choice"] == "whole input"
