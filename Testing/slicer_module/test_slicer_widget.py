"""The module panel's code paths (Apply -> worker thread -> poll -> apply; Cancel; errors; layer list), driven
without Qt: the panel's methods run on stand-in widgets that only record their properties, as SlicerNNUNet's
WidgetTestCase drives a mock-built widget. The logic, the MRML scene and the model (a tiny factory model) are real.
"""

import os
import time
import types
import xml.etree.ElementTree as ET

import pytest

import slicer_standalone

slicer = slicer_standalone.setup()

import SegHiResCAM  # noqa: E402
from SegHiResCAMLib.slicer_logic import bridge as mrml  # noqa: E402
from SegHiResCAMLib.slicer_logic import explain as slicer_logic
from SegHiResCAMLib.slicer_logic import selftest  # noqa: E402
from slicer.util import VTKObservationMixin  # noqa: E402

SPEC = "toy_models:unet3d"


class StandInWidget:
    """Records what the panel sets; answers what it asks (the few Qt calls the panel makes)."""

    def __init__(self):
        self.enabled, self.visible, self.text, self.toolTip, self.value = True, True, "", "", 0
        self.currentText, self.items, self.connections = "", [], {}
        self._node, self._segment = None, ""

    def connect(self, signal, slot):
        self.connections[signal] = slot

    def show(self):
        self.visible = True

    def hide(self):
        self.visible = False

    def setEditText(self, text):
        self.currentText = text

    def clear(self):
        self.items = []

    def addItems(self, items):
        self.items += list(items)

    def currentNode(self):
        return self._node

    def setCurrentNode(self, node):
        self._node = node

    def currentSegmentID(self):
        return self._segment

    def setCurrentSegmentID(self, segmentId):
        self._segment = segmentId


class StandInTimer:
    active = False

    def start(self):
        self.active = True

    def stop(self):
        self.active = False


@pytest.fixture()
def panel(monkeypatch):
    slicer.mrmlScene.Clear()
    slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(slicer.mrmlScene)
    volume = slicer.util.addVolumeFromArray(
        __import__("numpy").random.RandomState(1).randn(10, 16, 12).astype("float32"), name="scan")
    widget = SegHiResCAM.SegHiResCAMWidget.__new__(SegHiResCAM.SegHiResCAMWidget)  # no Qt base class here
    VTKObservationMixin.__init__(widget)
    widget.logic = SegHiResCAM.SegHiResCAMLogic()
    widget._job, widget._onJobSuccess, widget._timer = None, None, StandInTimer()
    names = [w.get("name") for w in ET.parse(selftest.__file__.replace(
        os.path.join("SegHiResCAMLib", "slicer_logic", "selftest.py"), os.path.join("Resources", "UI", "SegHiResCAM.ui"))).getroot().iter("widget")]
    widget.ui = types.SimpleNamespace(**{name: StandInWidget() for name in names})
    widget._parameterNode = widget.logic.getParameterNode()
    monkeypatch.setattr(widget.logic, "modelSpec", lambda parameters: SPEC)  # the panel offers files; a factory here
    p = widget._parameterNode
    p.inputVolume, p.layer, p.addPrediction = volume, "dec", True
    errors = []
    monkeypatch.setattr(slicer.util, "errorDisplay", lambda text, **kwargs: errors.append(text))
    widget._updateGUI()
    return types.SimpleNamespace(widget=widget, ui=widget.ui, p=p, volume=volume, errors=errors)


def node_ids():
    scene = slicer.mrmlScene
    return sorted(scene.GetNthNode(i).GetID() for i in range(scene.GetNumberOfNodes()))


def run_until_done(widget, timeout=60.0):
    deadline = time.perf_counter() + timeout
    while widget._job is not None and time.perf_counter() < deadline:
        time.sleep(0.02)
        widget._pollJob()  # what the QTimer does on the main thread
    assert widget._job is None, "the job did not finish"


def test_apply_turns_into_cancel_and_adds_the_heatmap(panel):
    widget, ui, p = panel.widget, panel.ui, panel.p
    assert ui.applyButton.enabled and ui.applyButton.text == "Apply"
    widget.onApplyButton()
    assert ui.applyButton.text == "Cancel" and ui.applyButton.enabled and widget._timer.active
    assert ui.progressBar.visible and not ui.loadLayersButton.enabled
    run_until_done(widget)
    assert ui.applyButton.text == "Apply" and not widget._timer.active and not ui.progressBar.visible
    heatmap = p.outputVolume
    assert heatmap is not None and mrml.get_attributes(heatmap)["layer"] == "dec"
    assert p.predictionSegmentation is not None and "Done" in ui.statusLabel.text and not panel.errors
    # Apply again: the same output node is updated
    widget.onApplyButton()
    run_until_done(widget)
    assert p.outputVolume.GetID() == heatmap.GetID()


def test_cancel_adds_nothing(panel):
    widget, ui = panel.widget, panel.ui
    before = node_ids()
    widget.onApplyButton()
    widget.onApplyButton()  # the button reads "Cancel" now
    assert widget._job.cancelling and "Cancelling" in ui.statusLabel.text
    run_until_done(widget)
    assert "Cancelled" in ui.statusLabel.text and ui.applyButton.text == "Apply"
    assert node_ids() == before and panel.p.outputVolume is None and not panel.errors


def test_engine_error_is_shown_and_adds_nothing(panel):
    panel.p.layer = "decc"
    before = node_ids()
    panel.widget.onApplyButton()
    run_until_done(panel.widget)
    assert len(panel.errors) == 1 and "unknown layer 'decc'" in panel.errors[0]
    assert "Failed" in panel.ui.statusLabel.text and node_ids() == before


def test_apply_is_disabled_with_a_reason(panel):
    panel.p.targetKind = "segment"
    panel.widget._updateGUI()
    assert not panel.ui.applyButton.enabled and "segment" in panel.ui.applyButton.toolTip
    assert panel.ui.segmentGroup.visible and not panel.ui.pointGroup.visible


def test_missing_packages_are_installed_only_after_asking(panel, monkeypatch):
    asked, installed = [], []
    monkeypatch.setattr(SegHiResCAM, "missingPackages", lambda model: [("no_such_pkg_x", "no-such-pkg-x")])
    monkeypatch.setattr(slicer.util, "confirmOkCancelDisplay", lambda text, **kw: asked.append(text) or False)
    monkeypatch.setattr(slicer.util, "pip_install", lambda requirement, **kw: installed.append(requirement))
    panel.widget.onApplyButton()
    assert len(asked) == 1 and "no-such-pkg-x" in asked[0] and installed == [] and panel.widget._job is None
    monkeypatch.setattr(slicer.util, "confirmOkCancelDisplay", lambda text, **kw: True)
    panel.widget.onApplyButton()
    assert installed == ["no-such-pkg-x"] and panel.widget._job is None  # still missing: nothing started


def test_load_layers_fills_the_layer_list(panel):
    panel.widget.onLoadLayers()
    run_until_done(panel.widget)
    items = panel.ui.layerComboBox.items
    assert items[0] == "auto" and "dec" in items and panel.ui.layerComboBox.currentText == "dec"
    assert slicer_logic.missingPackages(SPEC) == []


@pytest.mark.parametrize("button, kind", [("evaluateButton", "evaluation"),
                                          ("segmentationAbilityButton", "segmentation-ability")])
def test_analysis_buttons_run_on_the_worker_thread(panel, button, kind):
    widget, ui, p = panel.widget, panel.ui, panel.p
    p.evaluateSteps = 2
    assert getattr(ui, button).enabled
    tables = slicer.mrmlScene.GetNumberOfNodesByClass("vtkMRMLTableNode")
    widget.onAnalysis(kind)
    assert ui.applyButton.text == "Cancel" and not getattr(ui, button).enabled and widget._timer.active
    run_until_done(widget)
    assert not panel.errors and getattr(ui, button).enabled
    assert slicer.mrmlScene.GetNumberOfNodesByClass("vtkMRMLTableNode") == tables + 1
    if kind == "segmentation-ability":
        assert "Mean SA score" in ui.meanSALabel.text == ui.statusLabel.text


def test_analysis_cancel_adds_nothing(panel):
    widget, ui = panel.widget, panel.ui
    before = node_ids()
    widget.onAnalysis("segmentation-ability")
    widget.onApplyButton()  # Apply is the Cancel button while a job runs
    run_until_done(widget)
    assert node_ids() == before and "Cancelled" in ui.statusLabel.text and not panel.errors
