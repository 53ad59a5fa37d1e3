""""Explain the errors against this reference segment" in the Slicer module: the logic on a real slicer-core MRML
scene with the known-truth net of Testing/nets.py (``ErrorToyNet``: a planted bright blob is a false positive, a
planted dark blob suppresses the object), and the panel (strict stand-in widgets of the real .ui)."""

import numpy as np
import pytest

import slicer_fixtures
import slicer_standalone
from slicer_fixtures import IJK_TO_RAS, node_ids

slicer = slicer_standalone.setup()

import SegHiResCAM  # noqa: E402
from SegHiResCAMLib.errors import InputError, TargetError  # noqa: E402
from SegHiResCAMLib.slicer_logic import bridge as mrml  # noqa: E402
from SegHiResCAMLib.slicer_logic import job as slicer_job  # noqa: E402

MODEL = "toy_models:error_net"
SHAPE = (24, 24, 24)


def volumes():
    """The clean scan (the true object), the scan with two planted bright blobs, the scan with a dark blob."""
    clean = np.zeros(SHAPE, np.float32)
    clean[4:12, 4:12, 4:12] = 1.0
    big, small, dark = (np.zeros(SHAPE, bool) for _ in range(3))
    big[15:21, 15:21, 15:21] = True
    small[2:7, 16:21, 16:21] = True
    dark[4:12, 4:12, 13:15] = True
    bright = np.where(big | small, 1.0, clean).astype(np.float32)
    inhibited = np.where(dark, -1.0, clean).astype(np.float32)
    return clean, bright, inhibited, dict(big=big, small=small, dark=dark)


@pytest.fixture()
def case():
    slicer_fixtures.clear_scene()
    clean, bright, inhibited, where = volumes()
    logic = SegHiResCAM.SegHiResCAMLogic()
    nodes = {name: slicer.util.addVolumeFromArray(array, IJK_TO_RAS, name=name)
             for name, array in (("clean", clean), ("bright", bright), ("inhibited", inhibited))}
    # the reference: the net's own prediction of the clean scan, as a segment
    prediction = logic.process(nodes["clean"], model=MODEL, layer="detect", device="cpu", addPrediction=True,
                               show=False).GetNodeReference("SegHiResCAMPrediction")
    reference = prediction
    reference.SetName("Truth")
    return dict(logic=logic, nodes=nodes, where=where, reference=reference,
                segmentId=reference.GetSegmentation().GetNthSegmentID(0))


def heat(node):
    return slicer.util.arrayFromVolume(node).astype(np.float64)


def test_false_positives_point_at_the_planted_blobs(case):
    logic, where = case["logic"], case["where"]
    node = logic.process(case["nodes"]["bright"], model=MODEL, segmentationNode=case["reference"],
                         segmentId=case["segmentId"], layer="detect", device="cpu", errorKind="fp", show=False)
    array = heat(node)
    assert array[where["big"] | where["small"]].sum() / array.sum() > 0.99
    values = mrml.get_attributes(node)
    assert values["targetKind"] == "errors" and values["errorKind"] == "fp"
    assert values["target"].startswith("false positives against segment") and values["target"].endswith(
        "; 2 components")
    # one component: the second largest, the small blob
    node = logic.process(case["nodes"]["bright"], model=MODEL, segmentationNode=case["reference"],
                         segmentId=case["segmentId"], layer="detect", device="cpu", errorKind="fp", component=1,
                         show=False)
    array = heat(node)
    assert array[where["small"]].sum() / array.sum() > 0.99
    assert "(component 1)" in mrml.get_attributes(node)["target"]


def test_false_negatives_point_at_the_suppressing_blob(case):
    node = case["logic"].process(case["nodes"]["inhibited"], model=MODEL, segmentationNode=case["reference"],
                                 segmentId=case["segmentId"], layer="detect", device="cpu", errorKind="fn",
                                 show=False)
    array = heat(node)
    assert array[case["where"]["dark"]].sum() / array.sum() > 0.99


def test_no_false_positives_is_one_error_and_adds_nothing(case):
    before = node_ids()
    with pytest.raises(TargetError, match="no false positives"):
        case["logic"].process(case["nodes"]["clean"], model=MODEL, segmentationNode=case["reference"],
                              segmentId=case["segmentId"], layer="detect", device="cpu", errorKind="fp", show=False)
    with pytest.raises(InputError, match="errorKind must be one of fp, fn"):
        case["logic"].process(case["nodes"]["clean"], model=MODEL, segmentationNode=case["reference"],
                              segmentId=case["segmentId"], errorKind="tp", show=False)
    assert node_ids() == before


def test_parameter_node_drives_the_error_target(case):
    logic = case["logic"]
    p = logic.getParameterNode()
    p.inputVolume, p.targetKind = case["nodes"]["bright"], "errors"
    assert (p.errorKind, p.errorComponent) == ("fp", -1)
    assert "reference segment" in logic.whyCannotApply(p)
    p.segmentationNode, p.segmentId = case["reference"], case["segmentId"]
    assert logic.whyCannotApply(p) is None
    request = logic.prepareFromParameters(p)
    assert request.targetKind == "errors" and request.target["error"] == "fp" and request.target["component"] is None
    assert request.target["reference"].any() and "mask" not in request.target
    p.errorKind, p.errorComponent = "fn", 0
    request = logic.prepareFromParameters(p)
    assert (request.target["error"], request.target["component"]) == ("fn", 0)
    p.targetKind = "segment"  # the same segment, now the explained one
    request = logic.prepareFromParameters(p)
    assert "error" not in request.target and request.target["mask"].any()
    with pytest.raises(ValueError):
        p.errorKind = "tp"


@pytest.fixture()
def panel(monkeypatch, case):
    monkeypatch.setattr(SegHiResCAM.SegHiResCAMLogic, "modelSpec", staticmethod(lambda parameters: MODEL))
    old = slicer_standalone.emulate_slicer("5.12")
    app = slicer.app
    widget, errors = slicer_fixtures.open_panel(SegHiResCAM, monkeypatch)
    widget.runner = slicer_job.ThreadRunner(widget.logic)
    p = widget._parameterNode
    p.inputVolume, p.layer, p.device = case["nodes"]["bright"], "detect", "cpu"
    yield widget, widget.ui, p, errors
    app.quit()
    slicer_standalone.emulate_slicer(old)


def test_panel_explains_the_errors_against_the_reference_segment(panel, case):
    widget, ui, p, errors = panel
    ui.targetKindComboBox.currentIndex = ui.targetKindComboBox.items.index("errors")  # what a click does
    assert p.targetKind == "errors"
    widget._updateGUI()
    assert ui.segmentGroup.visible and ui.errorGroup.visible and not ui.pointGroup.visible
    assert not ui.applyButton.enabled and "reference segment" in ui.applyButton.toolTip
    ui.segmentSelector.setCurrentNode(case["reference"])
    ui.segmentSelector.setCurrentSegmentID(case["segmentId"])
    assert p.segmentationNode is case["reference"] and p.segmentId == case["segmentId"]
    assert ui.errorKindComboBox.items == ["fp", "fn"]
    ui.errorComponentSpinBox.value = 0  # the largest false positive
    assert p.errorComponent == 0
    widget._updateGUI()
    assert ui.applyButton.enabled
    ui.applyButton.click()
    slicer.app.runEventLoop(until=lambda: widget._job is None, timeout=60.0)
    assert widget._job is None and not errors, errors
    array = heat(p.outputVolume)
    assert array[case["where"]["big"]].sum() / array.sum() > 0.99
    assert "false positives (component 0)" in ui.summaryLabel.text
    # fn on the scan with planted bright blobs: the reference is fully predicted, so there is nothing to explain
    ui.errorKindComboBox.currentIndex = 1
    assert p.errorKind == "fn"
    before = node_ids()
    ui.applyButton.click()
    slicer.app.runEventLoop(until=lambda: widget._job is None, timeout=60.0)
    assert len(errors) == 1 and "no false negatives" in errors[0] and node_ids() == before
    ui.targetKindComboBox.currentIndex = ui.targetKindComboBox.items.index("prediction")
    widget._updateGUI()
    assert not ui.segmentGroup.visible and not ui.errorGroup.visible
