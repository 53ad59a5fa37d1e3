"""Issue 16 in the Slicer module: a model card and several input volumes (channels), from the logic and the panel.

A two-channel TorchScript model with its card (channel names T1, T2), a T1 volume and a T2 volume on another
(coarser, shifted) grid: the logic gives the heatmap of the command line on the same files, the worker process
gives the logic's; the panel's card chooser and channel selectors (parameter node fields) drive the same run.
"""

import json

import numpy as np
import pytest
import torch

import slicer_fixtures
import slicer_standalone
import toy_models

slicer = slicer_standalone.setup()

import SegHiResCAM  # noqa: E402
from SegHiResCAMLib.cli import main  # noqa: E402
from SegHiResCAMLib.errors import InputError  # noqa: E402
from SegHiResCAMLib.geometry import Geometry  # noqa: E402
from SegHiResCAMLib.imaging import files as io  # noqa: E402
from SegHiResCAMLib.slicer_logic import bridge as mrml  # noqa: E402
from SegHiResCAMLib.slicer_logic import job as slicer_job  # noqa: E402

CARD = {"channels": ["T1", "T2"], "divisible_by": 2, "intensity": {"normalize": ["zscore"]}, "classes": {"1": "lesion"}}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """``net.pt`` (a traced two-channel TinyUNet) with ``card.json``; ``t1.nrrd`` and ``t2.nrrd`` (another grid)."""
    folder = tmp_path_factory.mktemp("slicer-channels")
    torch.manual_seed(5)
    net = toy_models.unet3d(classes=2, in_channels=2).eval()
    model = str(folder / "net.pt")
    torch.jit.trace(net, torch.zeros(1, 2, 8, 8, 8)).save(model)
    card = str(folder / "card.json")
    json.dump(CARD, open(card, "w"))
    g1 = Geometry(size=(12, 10, 8), spacing=(1.0, 1.2, 1.5), origin=(-4.0, 3.0, 10.0), direction=tuple(np.eye(3).flat))
    g2 = Geometry(size=(8, 7, 6), spacing=(1.6, 1.9, 2.2), origin=(-4.5, 2.4, 9.3), direction=tuple(np.eye(3).flat))
    rng = np.random.RandomState(2)
    t1, t2 = str(folder / "t1.nrrd"), str(folder / "t2.nrrd")
    io.write_image(t1, rng.randn(*g1.array_shape).astype(np.float32), g1)
    io.write_image(t2, (4.0 * rng.randn(*g2.array_shape) + 20.0).astype(np.float32), g2)
    return {"folder": folder, "model": model, "card": card, "t1": t1, "t2": t2}


@pytest.fixture()
def volumes(files):
    slicer_fixtures.clear_scene()
    return mrml.load_volume(files["t1"], "T1"), mrml.load_volume(files["t2"], "T2")


def cli_heatmap(files, tmp_path):
    out = str(tmp_path / "cli.nrrd")
    assert main(["explain", "--model", files["model"], "--model-card", files["card"], "--image", files["t1"],
                 "--image", files["t2"], "--out", out, "--layer", "dec", "--device", "cpu", "--quiet"]) == 0
    return io.read_image(out)[0]


def test_logic_with_a_card_and_two_volumes_gives_the_command_lines_heatmap(files, volumes, tmp_path):
    t1, t2 = volumes
    logic = SegHiResCAM.SegHiResCAMLogic()
    before = slicer.util.arrayFromVolume(t2).copy()
    heatmap = logic.process(t1, model=files["model"], layer="dec", device="cpu", modelCard=files["card"],
                            channelVolumes=[t2])
    np.testing.assert_allclose(slicer.util.arrayFromVolume(heatmap), cli_heatmap(files, tmp_path), rtol=0, atol=1e-5)
    assert slicer.util.arrayFromVolume(heatmap).any()
    np.testing.assert_array_equal(slicer.util.arrayFromVolume(t2), before)  # inputs are never modified
    attributes = mrml.get_attributes(heatmap)
    assert attributes["channelVolumeIDs"] == t2.GetID() and attributes["modelCard"] == files["card"]
    assert attributes["className"] == "lesion"  # the card's class names reached the engine
    metadata = json.loads(attributes["metadata"])
    assert [c["channel"] for c in metadata["channels"]] == ["T1", "T2"]
    # the card as data, and without the second volume: one clear error naming the count
    with pytest.raises(InputError, match="expects 2 input channel"):
        logic.process(t1, model=files["model"], layer="dec", device="cpu", modelCard=dict(CARD))
    with pytest.raises(InputError, match="does not exist"):
        logic.process(t1, model=files["model"], modelCard=str(tmp_path / "none.json"), channelVolumes=[t2])


def test_the_worker_process_applies_the_card_and_the_channels(files, volumes):
    t1, t2 = volumes
    logic = SegHiResCAM.SegHiResCAMLogic()
    request = logic.prepare(t1, model=files["model"], layer="dec", device="cpu", modelCard=files["card"],
                            channelVolumes=[t2])
    assert request.image.shape == slicer.util.arrayFromVolume(t1).shape + (2,)
    runner = slicer_job.ProcessRunner()
    try:
        status = runner.submit("compute", request).wait(120)
    finally:
        runner.close()
    assert status.finished and status.error is None, status.error
    np.testing.assert_array_equal(status.result.heatmap, logic.compute(request).heatmap)
    assert status.result.metadata["model"]["card"]["channels"] == ["T1", "T2"]


def test_panel_card_chooser_and_channel_selectors_drive_the_run(files, volumes, tmp_path, monkeypatch):
    t1, t2 = volumes
    widget, errors = slicer_fixtures.open_panel(SegHiResCAM, monkeypatch)
    try:
        widget.runner = slicer_job.ThreadRunner(widget.logic)
        ui, p = widget.ui, widget._parameterNode
        p.inputVolume, p.modelSource, p.modelPath, p.layer, p.device = t1, "file", files["model"], "dec", "cpu"
        ui.modelCardPathLineEdit.currentPath = files["card"]  # the user picks the card: the node follows
        assert p.modelCardPath == files["card"] and ui.channel2Label.text == "Channel 2 (T2):"
        p.channel3Volume = t2  # channel 3 without channel 2: Apply says why
        assert not ui.applyButton.enabled and "input channel 2" in ui.applyButton.toolTip
        p.channel3Volume = None
        ui.channel2Selector.setCurrentNode(t2)  # the selector is bound to the parameter node
        assert p.channel2Volume is t2 and ui.applyButton.enabled
        ui.applyButton.click()
        slicer.app.runEventLoop(until=lambda: widget._job is None, timeout=60)
        assert widget._job is None and not errors, errors
        np.testing.assert_allclose(slicer.util.arrayFromVolume(p.outputVolume), cli_heatmap(files, tmp_path),
                                   rtol=0, atol=1e-5)
        p.modelCardPath = str(tmp_path / "missing.json")  # the node drives the widget, and Apply
        assert ui.modelCardPathLineEdit.currentPath == p.modelCardPath and not ui.applyButton.enabled
        assert "does not exist" in ui.applyButton.toolTip and ui.channel2Label.text == "Channel 2:"
    finally:
        slicer.app.quit()
