"""Real model on a real scan: HD-BET fold 0 on the ROBEX atlas T1 (both from wheels), through the CLI.

The expensive runs happen once per session (module-scoped fixtures): the demo (one forward + one backward
pass for two layers x two methods), one `predict`, one `explain`. About 3 minutes and 8 GiB on 2 cores.
"""

import json
import os

import numpy as np
import pytest

from SegHiResCAMLib.imaging import files as io
from SegHiResCAMLib.cli import main
from SegHiResCAMLib.analysis.measures import dice, energy_ratio
from SegHiResCAMLib.imaging.sample_data import robex_atlas

pytestmark = pytest.mark.real


@pytest.fixture(scope="module")
def atlas():
    image_path, mask_path = robex_atlas()
    image, geometry = io.read_image(image_path)
    mask, mask_geometry = io.read_image(mask_path)
    assert mask_geometry.same_grid(geometry)
    return {"image": image_path, "mask": mask != 0, "geometry": geometry}


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("demo"))
    assert main(["demo", "--out", out, "--quiet"]) == 0
    return out


@pytest.fixture(scope="module")
def predicted(tmp_path_factory, atlas):
    out = str(tmp_path_factory.mktemp("predict") / "brain.nii.gz")
    assert main(["predict", "--model", "hd-bet", "--image", atlas["image"], "--out", out, "--quiet"]) == 0
    return io.read_image(out)


def test_predict_reaches_dice_095(predicted, atlas):
    labels, geometry = predicted
    assert geometry.same_grid(atlas["geometry"])
    assert set(np.unique(labels)) <= {0, 1}
    assert dice(labels == 1, atlas["mask"]) >= 0.95


def test_demo_writes_everything(demo, predicted):
    files = set(os.listdir(demo))
    for method in ("seg-hires-grad-cam", "seg-grad-cam"):
        for layer in ("context5", "loc2"):
            assert "heatmap-%s-%s.nii.gz" % (method, layer) in files
            png = os.path.join(demo, "heatmap-%s-%s.png" % (method, layer))
            assert open(png, "rb").read(8) == b"\x89PNG\r\n\x1a\n" and os.path.getsize(png) > 20000
    assert {"prediction.nii.gz", "report.md", "metadata.json"} <= files
    meta = json.load(open(os.path.join(demo, "metadata.json")))
    assert meta["dice"] >= 0.95
    report = open(os.path.join(demo, "report.md")).read()
    assert "Dice" in report and "%.4f" % meta["dice"] in report and "sha256" in report
    # the demo's prediction is the predict command's
    demo_pred, _ = io.read_image(os.path.join(demo, "prediction.nii.gz"))
    np.testing.assert_array_equal(demo_pred, predicted[0])


@pytest.mark.parametrize("layer", ["context5", "loc2", "up4"])
def test_hires_heat_is_at_least_twice_as_high_inside_the_brain(demo, atlas, layer):
    heat, geometry = io.read_image(os.path.join(demo, "heatmap-seg-hires-grad-cam-%s.nii.gz" % layer))
    assert geometry.same_grid(atlas["geometry"]) and heat.dtype == np.float32
    assert np.isfinite(heat).all() and heat.max() == pytest.approx(1.0, abs=1e-3) and heat.min() >= 0
    assert energy_ratio(heat, atlas["mask"]) >= 2.0


def test_windowed_default_layer_heat_is_at_least_twice_as_high_inside_the_brain(atlas, tmp_path):
    """HD-BET's default layer (``up4``: no ``--layer``) explained in windows of its training patch size, 128^3,
    with the default overlap (4 windows on the 160x160x128 model grid). The in/out energy ratio holds as for the
    whole volume (8.9 seen). Windows of 160x160x64 without overlap give 0.92: HD-BET's instance normalisation
    sees another input in a window that small, so its prediction and map change; such windows are not used."""
    out = str(tmp_path / "heat-up4-windowed.nii.gz")
    meta = str(tmp_path / "heat-up4-windowed.json")
    assert main(["explain", "--model", "hd-bet", "--image", atlas["image"], "--out", out, "--class", "brain",
                 "--roi-size", "128", "--json", meta, "--quiet"]) == 0
    info = json.load(open(meta))
    assert info["layer"] == "up4" and info["method"] == "seg-hires-grad-cam"
    assert '"windows_run": 4' in json.dumps(info)  # the run was windowed
    heat, geometry = io.read_image(out)
    assert geometry.same_grid(atlas["geometry"]) and np.isfinite(heat).all()
    assert heat.max() == pytest.approx(1.0, abs=1e-3) and heat.min() >= 0
    assert energy_ratio(heat, atlas["mask"]) >= 2.0


def test_explain_command_matches_demo_and_records_provenance(demo, atlas, tmp_path):
    out = str(tmp_path / "heat-loc2.nrrd")
    meta = str(tmp_path / "heat-loc2.json")
    assert main(["explain", "--model", "hd-bet", "--image", atlas["image"], "--out", out, "--class", "brain",
                 "--layer", "loc2", "--json", meta, "--quiet"]) == 0
    heat, geometry = io.read_image(out)
    assert geometry.same_grid(atlas["geometry"])
    reference, _ = io.read_image(os.path.join(demo, "heatmap-seg-hires-grad-cam-loc2.nii.gz"))
    np.testing.assert_allclose(heat, reference, rtol=0, atol=1e-4)
    assert energy_ratio(heat, atlas["mask"]) >= 2.0
    info = json.load(open(meta))
    assert info["layer"] == "loc2" and info["method"] == "seg-hires-grad-cam"
    assert info["model"]["name"] == "hd-bet" and len(list(info["model"]["file_hashes"].values())[0]) == 64
    assert info["target"]["class"] == 1 and info["target_kind"] == "prediction"
    steps = info["model_space"]["steps"]  # the atlas is already at HD-BET's 1.5 mm: no resampling step
    assert "reoriented to LAS" in steps and "intensity zscore" in steps and not any("resampled" in s for s in steps)
