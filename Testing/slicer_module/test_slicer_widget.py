"""The module panel's code paths (Apply -> worker thread -> poll -> apply; Cancel; errors; layer list), driven
without Qt: the panel's methods run on stand-in widgets that only record their properties, as SlicerNNUNet's
WidgetTestCase drives a mock-built widget. The logic, the MRML scene and the model (a tiny factory model) are real.
"""

import time
import types

import pytest

import slicer_fixtures
import slicer_standalone
from slicer_fixtures import SPEC, node_ids

slicer = slicer_standalone.setup()

import SegHiResCAM  # noqa: E402
from SegHiResCAMLib.slicer_logic import bridge as mrml  # noqa: E402
from SegHiResCAMLib.slicer_logic import explain as slicer_logic
from SegHiResCAMLib.slicer_logic import job as slicer_job  # noqa: E402
from SegHiResCAMLib.errors import CancelledError  # noqa: E402


@pytest.fixture()
def slicer_version():
    """The Slicer release whose parameterNodeWrapper the stand-in emulates (tests parametrize it)."""
    return "5.12"


@pytest.fixture()
def panel(monkeypatch, slicer_version):
    """The module as the application shows it: loaded into ``slicer.modules``, its widget made and ``setup()`` on
    the stand-in widgets of the real .ui, then ``enter()``; ``exit()`` and ``cleanup()`` at the end."""
    slicer_fixtures.clear_scene()
    volume = slicer.util.addVolumeFromArray(
        __import__("numpy").random.RandomState(1).randn(10, 16, 12).astype("float32"), name="scan")
    # the panel offers files; a factory model here
    monkeypatch.setattr(SegHiResCAM.SegHiResCAMLogic, "modelSpec", staticmethod(lambda parameters: SPEC))
    old = slicer_standalone.emulate_slicer(slicer_version)
    app = slicer.app
    widget, errors = slicer_fixtures.open_panel(SegHiResCAM, monkeypatch)
    # the in-process thread runner: the unweighted toy model is drawn from this process's seeded RNG (the worker
    # process, the panel's default, is tested with saved weights in test_worker_process.py)
    widget.runner = slicer_job.ThreadRunner(widget.logic)
    p = widget._parameterNode
    assert p.inputVolume is volume  # enter() picks the scene's first volume
    p.layer, p.addPrediction = "dec", True
    yield types.SimpleNamespace(widget=widget, ui=widget.ui, p=p, volume=volume, errors=errors, app=app)
    app.quit()
    slicer_standalone.emulate_slicer(old)


def run_until_done(widget, timeout=60.0, holdGIL=False):
    """Run the application's event loop (its QTimer polls the job) until the job is done."""
    slicer.app.runEventLoop(until=lambda: widget._job is None, timeout=timeout, holdGIL=holdGIL)
    assert widget._job is None, "the job did not finish"


def test_apply_turns_into_cancel_and_adds_the_heatmap(panel):
    widget, ui, p = panel.widget, panel.ui, panel.p
    assert ui.applyButton.enabled and ui.applyButton.text == "Apply"
    ui.applyButton.click()
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
    monkeypatch.setattr(slicer_logic, "missingPackages", lambda model: [("no_such_pkg_x", "no-such-pkg-x")])
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


def test_evaluate_steps_start_at_the_default_rule(panel):
    """The panel's steps start at 0, shown as evaluate's default rule (the measured one), as on the command line."""
    spin = panel.ui.evaluateStepsSpinBox
    assert panel.p.evaluateSteps == 0 and spin.minimum == 0 and spin.value == 0
    assert spin.specialValueText == "default (1/8, 3/8, 5/8, 7/8)"


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


# ---------------------------------------------------------------------------------------------- issue 15
def choose(combo, text):
    """What a user's click on an item of a combo box does."""
    combo.currentIndex = combo.items.index(text)


@pytest.mark.parametrize("slicer_version", slicer_standalone.SLICER_VERSIONS)
def test_settings_survive_leaving_and_entering_the_module(panel):
    """Item 2: on Slicer 5.8 connectGui returns no tag, so each enter() connected again and reset the combo boxes."""
    ui, p, app = panel.ui, panel.p, panel.app
    chosen = {"methodComboBox": "layer-cam", "targetKindComboBox": "point", "modelSourceComboBox": "file",
              "scoreComboBox": "probabilities", "deviceComboBox": "cpu"}
    for name, text in chosen.items():
        choose(getattr(ui, name), text)
    ui.classIndexSpinBox.value = 3
    expected = ("layer-cam", "point", "file", "probabilities", "cpu", 3)
    state = lambda: (p.method, p.targetKind, p.modelSource, p.score, p.device, p.classIndex)  # noqa: E731
    assert state() == expected
    for _ in range(3):
        app.leaveModule()
        app.selectModule("SegHiResCAM")
        assert state() == expected
        assert all(getattr(ui, name).currentText == text for name, text in chosen.items())
    choose(ui.methodComboBox, "grad-cam++")  # the GUI still drives the node, through one connection
    assert p.method == "grad-cam++" and len(ui.methodComboBox.connected("currentIndexChanged(int)")) == 1


def test_placing_a_point_enables_apply(panel):
    """Item 3: the markups node is observed, so placing (moving, removing) a point updates Apply at once."""
    ui, p = panel.ui, panel.p
    choose(ui.targetKindComboBox, "point")
    points = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "P")
    ui.pointNodeSelector.setCurrentNode(points)
    assert p.pointNode is points and not ui.applyButton.enabled and "Place a point" in ui.applyButton.toolTip
    points.AddControlPoint([0.0, 0.0, 0.0])  # the user clicks on the scan
    assert ui.applyButton.enabled
    points.RemoveAllControlPoints()
    assert not ui.applyButton.enabled
    other = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "Q")
    ui.pointNodeSelector.setCurrentNode(other)
    points.AddControlPoint([0.0, 0.0, 0.0])  # the list no longer selected: not observed any more
    assert not ui.applyButton.enabled
    other.AddControlPoint([0.0, 0.0, 0.0])
    assert ui.applyButton.enabled


def test_a_second_scan_gets_its_own_outputs_and_checkboxes_count(panel):
    """Item 4: outputs belong to their input; unticking 'add model prediction' adds no prediction."""
    widget, ui, p = panel.widget, panel.ui, panel.p
    ui.applyButton.click()
    run_until_done(widget)
    first, prediction = p.outputVolume, p.predictionSegmentation
    firstHeat = slicer.util.arrayFromVolume(first).copy()
    assert first is not None and prediction is not None
    scanB = slicer.util.addVolumeFromArray(
        __import__("numpy").random.RandomState(2).randn(10, 16, 12).astype("float32"), name="scanB")
    ui.inputVolumeSelector.setCurrentNode(scanB)
    ui.addPredictionCheckBox.checked = False
    segmentations = slicer.mrmlScene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode")
    ui.applyButton.click()
    run_until_done(widget)
    assert not panel.errors, panel.errors
    second = p.outputVolume
    assert second is not None and second is not first
    assert mrml.get_attributes(second)["inputVolumeID"] == scanB.GetID()
    assert mrml.get_attributes(first)["inputVolumeID"] == panel.volume.GetID()
    assert (slicer.util.arrayFromVolume(first) == firstHeat).all(), "the first scan's heatmap was overwritten"
    assert slicer.mrmlScene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode") == segmentations
    assert second.GetNodeReference("SegHiResCAMPrediction") is None
    # back on the first scan, with the box ticked again: its own nodes are updated, nothing new is added
    ui.inputVolumeSelector.setCurrentNode(panel.volume)
    ui.addPredictionCheckBox.checked = True
    volumes = slicer.mrmlScene.GetNumberOfNodesByClass("vtkMRMLScalarVolumeNode")
    ui.applyButton.click()
    run_until_done(widget)
    assert p.outputVolume is first and p.predictionSegmentation is prediction
    assert slicer.mrmlScene.GetNumberOfNodesByClass("vtkMRMLScalarVolumeNode") == volumes


def test_threshold_box_steps_within_zero_to_one(panel):
    """Item 5: the probability threshold steps by 0.05 and shows two decimals."""
    box = panel.ui.thresholdSpinBox
    assert box.singleStep <= 0.05 and box.decimals >= 2 and (box.minimum, box.maximum) == (0.01, 0.99)


def test_model_path_is_empty_and_browses_files_and_folders(panel):
    """Item 5: the model path starts empty (not '.') and its browser offers folders (nnU-Net, MONAI) and files."""
    edit, p = panel.ui.modelPathLineEdit, panel.p
    assert edit.currentPath == ""
    assert {"Dirs", "Files"} <= {f.split("::")[-1] for f in edit.property("filters").split("|")}
    edit.currentPath = "/some/model.pt"
    assert str(p.modelPath) == "/some/model.pt"
    edit.currentPath = ""
    assert str(p.modelPath) in ("", ".") and edit.currentPath == ""


def test_a_job_that_finishes_after_the_scene_closed_is_dropped(panel):
    """Item 5: a result computed for a closed scene is never written into the next one."""
    widget = panel.widget
    panel.ui.applyButton.click()
    job = widget._job
    job.wait(60)  # finished on the worker, not yet polled by the main thread
    assert job.poll().finished and job.poll().error is None
    panel.app.closeScene()
    panel.app.runEventLoop(timeout=1.0)
    assert widget._job is None and not panel.errors
    assert slicer.mrmlScene.GetNumberOfNodesByClass("vtkMRMLScalarVolumeNode") == 0
    assert not widget._timer.isActive() and not panel.ui.progressBar.visible


def test_leaving_and_entering_warns_nothing(panel):
    """Item 5: exit() then enter() removed the parameter node observer twice ('does not have observer')."""
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(2):
            panel.app.leaveModule()
            panel.app.selectModule("SegHiResCAM")
        panel.app.closeScene()
        panel.app.leaveModule()
        panel.app.selectModule("SegHiResCAM")


def test_the_panel_connects_only_real_signals(panel):
    """The stand-in fails on a signal that the widget class does not have (PythonQt would connect nothing)."""
    with pytest.raises(AttributeError, match="no signal"):
        panel.ui.applyButton.connect("clicked(int)", lambda: None)
    assert panel.ui.applyButton.connected("clicked(bool)")


def test_the_application_registers_the_module_and_runs_without_testing(panel):
    """slicer.modules holds the module, its instance and its widget as in the application; --testing is off."""
    assert not slicer.app.testingEnabled()
    assert slicer.modules.seghirescam.widget is panel.widget is slicer.modules.SegHiResCAMWidget
    assert isinstance(slicer.modules.SegHiResCAMInstance, SegHiResCAM.SegHiResCAM)
    assert panel.widget.parent.isEntered
    panel.app.leaveModule()
    assert not panel.widget.parent.isEntered


def test_a_summary_line_says_what_the_heatmap_shows(panel):
    """Under the result: method, layer, target, model (the heatmap's attribute SegHiResCAM.summary); an evaluation
    of the same target adds its verdict; a new input (no output yet) clears it."""
    widget, ui, p = panel.widget, panel.ui, panel.p
    assert ui.summaryLabel.text == ""
    ui.applyButton.click()
    run_until_done(widget)
    heatmap = p.outputVolume
    assert ui.summaryLabel.text == heatmap.GetAttribute("SegHiResCAM.summary") == (
        "seg-hires-grad-cam at layer dec | target: model prediction, class 1 | model: %s" % SPEC)
    p.evaluateSteps = 2
    ui.evaluateButton.click()
    run_until_done(widget)
    assert not panel.errors, panel.errors
    verdict = heatmap.GetAttribute("SegHiResCAM.verdict")
    assert verdict.startswith("evaluation: ") and ui.summaryLabel.text.endswith(" | " + verdict)
    assert ui.summaryLabel.text == heatmap.GetAttribute("SegHiResCAM.summary")
    scanB = slicer.util.addVolumeFromArray(
        __import__("numpy").random.RandomState(2).randn(10, 16, 12).astype("float32"), name="scanB")
    ui.inputVolumeSelector.setCurrentNode(scanB)
    assert p.outputVolume is None and ui.summaryLabel.text == ""


class StagedJob:
    """A job that reports what the test sets (stage, fraction), started ``elapsed`` seconds ago."""

    def __init__(self, fraction, stage, elapsed):
        self.status = slicer_job.JobStatus(fraction, stage, False)
        self.started = time.perf_counter() - elapsed

    def poll(self):
        return self.status

    def cancel(self):
        self.status = slicer_job.JobStatus(self.status.fraction, "cancelled", True,
                                           error=CancelledError("cancelled"))


def test_progress_shows_the_stage_and_the_time_left(panel):
    widget, ui = panel.widget, panel.ui
    job = StagedJob(0.25, "forward pass", elapsed=10.0)
    widget.runner = types.SimpleNamespace(submit=lambda method, *args: job, close=lambda: None)
    widget._startJob("compute", (), lambda result: None, "Computing the heatmap")
    panel.app.runEventLoop(timeout=2 * widget.POLL_MS / 1000.0)
    assert ui.statusLabel.text == "Forward pass: 25%, about 30 s left" and ui.progressBar.value == 25
    job.status = slicer_job.JobStatus(0.6, "gradients, window 3/8", False)
    job.started = time.perf_counter() - 90.0
    panel.app.runEventLoop(timeout=2 * widget.POLL_MS / 1000.0)
    assert ui.statusLabel.text == "Gradients, window 3/8: 60%, about 1 min 00 s left"
    ui.applyButton.click()  # Cancel
    panel.app.runEventLoop(until=lambda: widget._job is None, timeout=2.0)
    assert widget._job is None and "Cancelled" in ui.statusLabel.text


def test_tta_checkbox_adds_the_spread_map_and_the_agreement(panel):
    """Mirroring TTA (issue 18): the heatmap is the mean of the mirrorings' maps, the spread map a second volume
    referenced from it, the agreement in the summary line; a rerun with TTA off is a plain run again."""
    import numpy as np
    widget, ui, p, logic = panel.widget, panel.ui, panel.p, panel.widget.logic
    panel.ui.ttaCheckBox.checked = True  # bound to the parameter node
    assert p.tta is True
    before = node_ids()
    ui.applyButton.click()
    run_until_done(widget)
    assert not panel.errors, panel.errors
    heatmap = p.outputVolume
    spread = heatmap.GetNodeReference("SegHiResCAMSpread")
    assert spread is not None and spread.GetName() == "scan heatmap spread (TTA)"
    assert len(node_ids()) > len(before) and spread.GetID() in node_ids()
    expected = logic.compute(logic.prepareFromParameters(p))  # the same engine call: explain_ensemble, 8 mirrorings
    assert expected.spread is not None and expected.info["ensemble"]["members"] == 8
    np.testing.assert_allclose(slicer.util.arrayFromVolume(heatmap), expected.heatmap, atol=1e-6)
    np.testing.assert_allclose(slicer.util.arrayFromVolume(spread), expected.spread, atol=1e-6)
    np.testing.assert_allclose(mrml.ijk_to_ras(spread), mrml.ijk_to_ras(panel.volume))
    agreement = "%.3f" % expected.info["ensemble"]["agreement"]
    assert "TTA: mean of 8 maps, agreement %s" % agreement in ui.summaryLabel.text
    assert mrml.get_attributes(spread)["role"] == "spread" and mrml.get_attributes(heatmap)["agreement"] == agreement
    ui.ttaCheckBox.checked = False  # off: a plain run, as before
    ui.applyButton.click()
    run_until_done(widget)
    assert p.outputVolume is heatmap and heatmap.GetNodeReference("SegHiResCAMSpread") is None
    assert "TTA" not in ui.summaryLabel.text and "agreement" not in ui.summaryLabel.text
    plain = logic.compute(logic.prepareFromParameters(p))
    assert plain.spread is None and "ensemble" not in plain.info
    np.testing.assert_allclose(slicer.util.arrayFromVolume(heatmap), plain.heatmap, atol=1e-6)
    assert not np.allclose(plain.heatmap, expected.heatmap)  # the mean of the mirrorings differs from one map


def test_quick_check_checkbox_puts_the_verdict_in_the_summary(panel):
    """The Quick check checkbox (explain --check quick): the verdict of analysis/check.py in the summary line and
    the heatmap's ``checkVerdict`` attribute; unticked, the next run has none."""
    widget, ui, p, logic = panel.widget, panel.ui, panel.p, panel.widget.logic
    ui.quickCheckCheckBox.checked = True  # bound to the parameter node
    assert p.quickCheck is True
    ui.applyButton.click()
    run_until_done(widget)
    assert not panel.errors, panel.errors
    verdict = mrml.get_attributes(p.outputVolume)["checkVerdict"]
    expected = logic.compute(logic.prepareFromParameters(p)).metadata["verdict"]
    assert verdict == expected and verdict and ui.summaryLabel.text.endswith(" | check: %s" % verdict)
    ui.quickCheckCheckBox.checked = False
    ui.applyButton.click()
    run_until_done(widget)
    assert "check:" not in ui.summaryLabel.text and not mrml.get_attributes(p.outputVolume)["checkVerdict"]
