"""SegHiResCAM: class-activation heatmaps for medical image segmentation models, as a 3D Slicer module.

A thin shell over ``SegHiResCAMLib`` (shipped next to it): the logic and the worker process live in
``SegHiResCAMLib.slicer_logic``. PyTorch is imported only when a computation runs, never when Slicer loads this
module, so the module loads (and offers to install PyTorch) where PyTorch is not yet installed.
"""

import logging
import time
import traceback
from typing import Annotated

import slicer
import vtk
from slicer import vtkMRMLMarkupsFiducialNode, vtkMRMLScalarVolumeNode, vtkMRMLSegmentationNode
from slicer.i18n import tr as _
from slicer.i18n import translate
from slicer.parameterNodeWrapper import Choice, WithinRange, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (ScriptedLoadableModule, ScriptedLoadableModuleLogic,
                                           ScriptedLoadableModuleTest, ScriptedLoadableModuleWidget)
from slicer.util import VTKObservationMixin

from SegHiResCAMLib.slicer_logic import selftest
from SegHiResCAMLib.errors import SegHiResCAMError
from SegHiResCAMLib.slicer_logic.analysis import EVALUATION, SEGMENTATION_ABILITY, AnalysisLogic
from SegHiResCAMLib.catalog import DEFAULT_METHOD, DEVICES, ERROR_KINDS, SCORES, SLICE_AXES, TARGET_KINDS, method_names
from SegHiResCAMLib.slicer_logic.explain import BUNDLED_MODEL, MODEL_SOURCES, installMissingPackages
from SegHiResCAMLib.slicer_logic.job import ProcessRunner
from SegHiResCAMLib.slicer_logic.panel_text import progressText
from SegHiResCAMLib.slicer_logic.channel_panel import ChannelPanel
from SegHiResCAMLib.slicer_logic.ensemble_panel import EnsemblePanel
from SegHiResCAMLib.slicer_logic.input_panel import InputPanel
from SegHiResCAMLib.slicer_logic.cohort_panel import CohortPanel

#
# SegHiResCAM
#


class SegHiResCAM(ScriptedLoadableModule):
    """Module description shown in Slicer's module selector and help panel."""

    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("SegHiResCAM")
        self.parent.categories = [translate("qSlicerAbstractCoreModule", "Segmentation")]
        self.parent.dependencies = []
        self.parent.contributors = ["SegHiResCAM developers"]
        self.parent.helpText = _("""
Explains a segmentation model's prediction with class-activation heatmaps layered over the scan
(Seg-HiRes-Grad CAM, Seg-Grad-CAM and more): pick a scan, a model and what to explain (the model's prediction of a
class, a segment, a clicked point, or its errors against a reference segment), then Apply. See the
<a href="https://github.com/seghirescam/SlicerSegHiResCAM">project page</a> for documentation.
""")
        self.parent.acknowledgementText = _("""
Built on 3D Slicer and PyTorch (installed through Slicer's PyTorch extension). The bundled example model is
HD-BET (Isensee et al., Hum. Brain Mapp. 2019), distributed under the Apache License 2.0.
""")


@parameterNodeWrapper
class SegHiResCAMParameterNode:
    """Everything the panel shows; the only source of truth for the widget (bound through SlicerParameterName).

    modelSource: the bundled HD-BET model, or a model file or folder (``modelPath``: TorchScript/ONNX file, MONAI
    bundle or nnU-Net folder). targetKind: the model's ``prediction`` of ``classIndex`` (optionally thresholded),
    a ``segment`` of a segmentation (any grid), a clicked ``point`` with a ball of ``radiusMm`` around it, or the
    ``errors`` against the segment as reference (``errorKind`` fp/fn, ``errorComponent`` -1: all, K: K-th largest).
    """

    inputVolume: vtkMRMLScalarVolumeNode
    modelSource: Annotated[str, Choice(MODEL_SOURCES)] = BUNDLED_MODEL
    modelPath: str = ""  # synchronised by hand: the Path connector would show "." for no path
    modelCardPath: str = ""  # the model card (JSON), "" for none; synchronised by hand (slicer_logic.channel_panel)
    weightsPaths: str = ""  # weights files joined by ";" (2+: an ensemble); by hand (slicer_logic.ensemble_panel)
    allFolds: bool = False  # an nnU-Net folder: every fold_N, one ensemble member each
    folds: str = ""  # an nnU-Net folder's folds, e.g. "0,2" ("": all when allFolds, else fold 0); by hand
    channel2Volume: vtkMRMLScalarVolumeNode  # input channels 2-4 of a multi-channel model (inputVolume is channel 1)
    channel3Volume: vtkMRMLScalarVolumeNode
    channel4Volume: vtkMRMLScalarVolumeNode
    targetKind: Annotated[str, Choice(TARGET_KINDS)] = "prediction"
    classIndex: Annotated[int, WithinRange(0, 255)] = 1
    segmentationNode: vtkMRMLSegmentationNode
    segmentId: str = ""
    errorKind: Annotated[str, Choice(ERROR_KINDS)] = "fp"
    errorComponent: Annotated[int, WithinRange(-1, 999)] = -1
    pointNode: vtkMRMLMarkupsFiducialNode
    radiusMm: Annotated[float, WithinRange(0.0, 50.0)] = 5.0
    method: Annotated[str, Choice(method_names())] = DEFAULT_METHOD
    layer: str = "auto"
    useThreshold: bool = False
    threshold: Annotated[float, WithinRange(0.01, 0.99)] = 0.5
    score: Annotated[str, Choice(SCORES)] = "logits"
    device: Annotated[str, Choice(DEVICES)] = "auto"
    sliceAxis: Annotated[str, Choice(("auto",) + SLICE_AXES + ("all",))] = "auto"  # 2D models; all: an ensemble
    sliceContext: Annotated[int, WithinRange(0, 10)] = 0  # a 2.5D model: neighbouring slices on each side as channels
    addPrediction: bool = True
    outputVolume: vtkMRMLScalarVolumeNode
    predictionSegmentation: vtkMRMLSegmentationNode
    evaluateSteps: Annotated[int, WithinRange(0, 50)] = 0  # 0: evaluate's default (1/8, 3/8, 5/8, 7/8); 1 refused
    evaluateAllMethods: bool = False
    evaluateCropVoxels: Annotated[int, WithinRange(0, 512)] = 0
    tta: bool = False  # mirroring TTA: the mean map, plus the spread map as a second volume
    quickCheck: bool = False  # a one-line verdict on the map (explain --check quick) in the summary line
    cohortFolder: str = ""  # a finished cohort's output folder; with cohortCase: bound by hand (cohort_panel)
    cohortCase: str = ""


#
# SegHiResCAMWidget
#


class SegHiResCAMWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """Module panel: binds the .ui to the parameter node; runs heatmaps and analyses in a worker process."""

    POLL_MS = 50  # progress ticks; a message of the worker wakes the panel at once (QSocketNotifier, _watchJob)

    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = self._parameterNode = self._parameterNodeGuiTag = None
        self._job = self._onJobSuccess = self._observedPoints = None
        self.runner = ProcessRunner()  # a JobRunner: the persistent worker process (tests may put another)
        self._timer = self._notifier = None

    def setup(self) -> None:
        import qt
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/SegHiResCAM.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = SegHiResCAMLogic()
        self._timer = qt.QTimer()
        self._timer.setInterval(self.POLL_MS)
        self._timer.connect("timeout()", self._pollJob)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        # widgets without a parameter-node connector: synchronised by hand
        self.inputPanel = InputPanel(self.ui, lambda: self._parameterNode, BUNDLED_MODEL)
        self.channelPanel = ChannelPanel(self.ui, lambda: self._parameterNode)  # model card and channels 2-4
        self.ensemblePanel = EnsemblePanel(self.ui, lambda: self._parameterNode)  # weights files (ensembles)
        self.cohortPanel = CohortPanel(self.ui, lambda: self._parameterNode,  # browse a finished cohort's cases
                                       lambda: slicer.util.tryWithErrorDisplay(_("Cannot show the case.")))
        self.ui.loadLayersButton.connect("clicked(bool)", self.onLoadLayers)
        self.ui.applyButton.connect("clicked(bool)", self.onApplyButton)
        self.ui.evaluateButton.connect("clicked(bool)", lambda: self.onAnalysis(EVALUATION))
        self.ui.segmentationAbilityButton.connect("clicked(bool)", lambda: self.onAnalysis(SEGMENTATION_ABILITY))
        self.ui.progressBar.hide()
        self.initializeParameterNode()

    def cleanup(self) -> None:
        self.removeObservers()
        if self._job is not None:
            self._job.cancel()
            self._finishJob()
        self.runner.close()  # the worker process ends with the panel

    def enter(self) -> None:
        self.initializeParameterNode()

    def exit(self) -> None:
        self._disconnectParameterNode()

    def onSceneStartClose(self, caller, event) -> None:
        if self._job is not None:  # its result belongs to the closed scene: drop it, even if already finished
            self._job.cancel()
            self._finishJob()
            self.ui.statusLabel.text = _("The scene was closed; the computation was dropped.")
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self) -> None:
        self.setParameterNode(self.logic.getParameterNode())
        if not self._parameterNode.inputVolume:
            firstVolume = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")
            if firstVolume:
                self._parameterNode.inputVolume = firstVolume

    def setParameterNode(self, inputParameterNode) -> None:
        self._disconnectParameterNode()
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            # not connectGui: it returns no tag on Slicer 5.8, so each enter() connected again (resets combo boxes)
            bound = {w.property("SlicerParameterName"): w for w in vars(self.ui).values()}
            bound.pop(None, None)
            self._parameterNodeGuiTag = self._parameterNode.connectParametersToGui(bound)
            self.addObserver(self._parameterNode.parameterNode, vtk.vtkCommand.ModifiedEvent, self._updateGUI)
            self._updateGUI()

    def _disconnectParameterNode(self) -> None:
        if self._parameterNodeGuiTag is not None:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode.parameterNode, vtk.vtkCommand.ModifiedEvent, self._updateGUI)
        self._observePoints(None)

    def _observePoints(self, node) -> None:
        """Observe the point list, so that placing, moving or removing a point updates Apply."""
        if node is not self._observedPoints:
            for event in ("PointAddedEvent", "PointRemovedEvent", "PointPositionDefinedEvent", "PointModifiedEvent"):
                event = getattr(slicer.vtkMRMLMarkupsNode, event)
                if self._observedPoints is not None:
                    self.removeObserver(self._observedPoints, event, self._updateGUI)
                if node is not None:
                    self.addObserver(node, event, self._updateGUI)
            self._observedPoints = node

    # ------------------------------------------------------------------ GUI <-> parameter node
    def _updateGUI(self, caller=None, event=None) -> None:
        p = self._parameterNode
        if p is None:
            return
        self.logic.dropOutputsOfOtherInputs(p)  # a new input gets new output nodes
        self._observePoints(p.pointNode)
        self.inputPanel.update(p)
        self.channelPanel.update(p)
        self.ensemblePanel.update(p)
        self.cohortPanel.update(p)
        self.ui.summaryLabel.text = self.logic.summaryOf(p.outputVolume)  # what am I looking at
        reason = self.logic.whyCannotApply(p)
        running = self._job is not None
        self.ui.applyButton.enabled = running or reason is None
        self.ui.loadLayersButton.enabled = not running
        self.ui.evaluateButton.enabled = self.ui.segmentationAbilityButton.enabled = not running and reason is None
        self.ui.applyButton.text = _("Cancel") if running else _("Apply")
        self.ui.applyButton.toolTip = (_("Stop the computation; nothing is added to the scene") if running
                                       else reason or _("Compute the heatmap and show it over the scan"))

    # ------------------------------------------------------------------ actions
    def onLoadLayers(self) -> None:
        spec = self.logic.modelSpec(self._parameterNode)
        with slicer.util.tryWithErrorDisplay(_("Cannot load the model.")):
            if self._job is None and self._installMissingPackages(spec):
                self._startJob("layerNames", (spec,), self._setLayers, _("Loading the model"))

    def _setLayers(self, names) -> None:
        self.inputPanel.setLayers(names)
        self.ui.statusLabel.text = _("The model has {count} layers.").format(count=len(names) - 1)

    def onApplyButton(self) -> None:
        if self._job is not None:
            self._job.cancel()  # the worker process is killed: the next poll reports it
            self._watchJob()  # its socket is closed: stop watching it
            self.ui.statusLabel.text = _("Cancelling...")
            return
        with slicer.util.tryWithErrorDisplay(_("Cannot compute the heatmap.")):
            if not self._installMissingPackages(self.logic.modelSpec(self._parameterNode)):
                return
            request = self.logic.prepareFromParameters(self._parameterNode)  # reads MRML: main thread
            self._startJob("compute", (request,),
                           lambda result: self._applyResult(request, result), _("Computing the heatmap"))

    def _applyResult(self, request, result) -> None:
        heatmap = self.logic.apply(request, result)  # writes MRML: main thread
        self._parameterNode.outputVolume = heatmap
        prediction = heatmap.GetNodeReference("SegHiResCAMPrediction")
        if prediction is not None:
            self._parameterNode.predictionSegmentation = prediction
        self.ui.statusLabel.text = _("Done: {method} at layer {layer}.").format(method=result.method,
                                                                               layer=result.layer)

    def onAnalysis(self, kind) -> None:
        with slicer.util.tryWithErrorDisplay(_("Cannot start the analysis.")):
            if self._job is None and self._installMissingPackages(self.logic.modelSpec(self._parameterNode)):
                request = self.logic.prepareAnalysisFromParameters(self._parameterNode, kind)  # main thread
                self._startJob("computeAnalysis", (request,),
                               lambda result: self._applyAnalysis(request, result), _("Analysing the model"))

    def _applyAnalysis(self, request, result) -> None:
        text = self.ui.statusLabel.text = self.logic.summary(self.logic.applyAnalysis(request, result))  # main thread
        if request.kind == SEGMENTATION_ABILITY:
            self.ui.meanSALabel.text = text

    def _startJob(self, method, args, onSuccess, message) -> None:
        self._job = self.runner.submit(method, *args)  # ComputeLogic.<method>(*args) off the main thread
        self._onJobSuccess = onSuccess
        self.ui.progressBar.value = 0
        self.ui.progressBar.show()
        self.ui.statusLabel.text = message
        self._timer.start()
        self._updateGUI()
        self._watchJob()

    def _watchJob(self) -> None:
        """Poll as soon as the worker's socket is readable (a QSocketNotifier), not only at the timer's next tick."""
        import qt
        fd = self._job.fileno() if self._job is not None and hasattr(self._job, "fileno") else None
        if self._notifier is not None and self._notifier.socket() != fd:
            self._notifier.setEnabled(False)
            self._notifier = None
        if fd is not None and self._notifier is None and hasattr(qt, "QSocketNotifier"):
            self._notifier = qt.QSocketNotifier(fd, qt.QSocketNotifier.Read)
            self._notifier.connect("activated(int)", self._pollJob)

    def _pollJob(self) -> None:
        if self._job is None:  # an activation queued before the job ended
            return
        status = self._job.poll()
        self._watchJob()  # the socket changes once: when a starting worker connects
        self.ui.progressBar.value = int(round(100 * status.fraction))
        if not status.finished:  # the stage, the percentage and the time left
            elapsed = time.perf_counter() - self._job.started
            self.ui.statusLabel.text = progressText(status.message, status.fraction, elapsed)
            return
        self._finishJob()
        if status.cancelled:
            self.ui.statusLabel.text = _("Cancelled; nothing was added to the scene.")
        elif status.error is not None:
            self.ui.statusLabel.text = _("Failed; nothing was added to the scene.")
            error = status.error
            details = "".join(traceback.format_exception(type(error), error, error.__traceback__))
            logging.error(details)
            slicer.util.errorDisplay(str(error) if isinstance(error, SegHiResCAMError)
                                     else _("Unexpected error: {error}").format(error=error), detailedText=details)
        else:
            with slicer.util.tryWithErrorDisplay(_("Cannot add the heatmap to the scene.")):
                self._onJobSuccess(status.result)
            self._updateGUI()  # the summary line of the (new or newly evaluated) heatmap

    def _finishJob(self) -> None:
        self._timer.stop()
        self._job = None
        self._watchJob()
        self.ui.progressBar.hide()
        self._updateGUI()

    def _installMissingPackages(self, model) -> bool:
        """Install what the model needs after asking: torch through the PyTorch extension, the rest with pip."""
        return installMissingPackages(model, lambda names: slicer.util.confirmOkCancelDisplay(_(
            "This model needs the Python packages {names}. Install them now? This may take several minutes."
        ).format(names=names)))


#
# SegHiResCAMLogic
#


class SegHiResCAMLogic(ScriptedLoadableModuleLogic, AnalysisLogic):
    """Headless logic (no Qt, no dialogs), usable from Slicer's Python console:
    ``slicer.util.getModuleLogic("SegHiResCAM").process(volume, model="hd-bet", classIndex=1)``. ``process`` and its
    three steps (``prepare`` / ``compute`` / ``apply``) are documented in ``SegHiResCAMLib.slicer_logic.explain``
    (``ExplainLogic``); ``evaluate`` and ``segmentationAbility`` in ``SegHiResCAMLib.slicer_logic.analysis``."""

    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        AnalysisLogic.__init__(self)

    def getParameterNode(self):
        return SegHiResCAMParameterNode(super().getParameterNode())


class SegHiResCAMTest(ScriptedLoadableModuleTest):
    """Self-test: HD-BET on a real brain MRI (MRHead in Slicer, the ROBEX atlas outside it)."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_PredictionTarget()
        self.setUp()
        self.test_SegmentOnOtherGridAndClickedPoint()

    def test_PredictionTarget(self):
        """Explain HD-BET's own brain prediction: heat on the scan's grid, hotter inside the brain than outside."""
        selftest.runPredictionTarget(self, SegHiResCAMLogic(), BUNDLED_MODEL)

    def test_SegmentOnOtherGridAndClickedPoint(self):
        """A user segment drawn on another (coarser, rotated) grid, then a clicked point; a rerun reuses the node."""
        selftest.runSegmentAndPoint(self, SegHiResCAMLogic(), BUNDLED_MODEL)
