"""The engine step of the Slicer logic, without MRML: the requests, the results and the computations.

Everything here is plain data and torch, no ``slicer``, ``qt`` or ``vtk``, so that it runs in Slicer's main
process (``ExplainLogic.process``), on a worker thread, and in the persistent worker *process* of
:mod:`.worker` (a plain ``PythonSlicer`` child that cannot import ``slicer``). The requests and results are
dataclasses of numpy arrays, a :class:`~SegHiResCAMLib.geometry.Geometry` and strings: they pickle, and unpickle
in the worker without importing the MRML side (:mod:`.explain`, :mod:`.analysis`).

:class:`ComputeLogic` keeps the loaded models (one cache for the whole process) and the last forward pass (per
instance): a second target on the same scan costs a backward pass. The worker process keeps one instance, so
both survive between runs there too.
"""

import os
import threading
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np

from ..errors import InputError, ModelError
from ..geometry import Geometry

ProgressCallback = Callable[[float, str], None]

EVALUATION = "evaluation"
SEGMENTATION_ABILITY = "segmentation-ability"
ANALYSES = (EVALUATION, SEGMENTATION_ABILITY)

#: the methods of :class:`ComputeLogic` that a job (thread or worker process) may call
JOB_METHODS = ("compute", "computeAnalysis", "layerNames")


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
    modelCard: object = None  # a model card: path or JSON data (docs/model_card.md), applied in the engine step
    sliceAxis: Optional[str] = None  # a 2D model on a 3D scan: axial, coronal, sagittal (None: the card's, else axial)
    sliceAxes: List[str] = field(default_factory=list)  # a 2D model: one member per slice axis (2 or more)
    sliceContext: int = 0  # a 2.5D model: neighbouring slices on each side as input channels
    tta: bool = False  # mirroring TTA (analysis/ensemble.py): the mean map of every mirroring, and the spread map
    check: Optional[str] = None  # "quick": a one-line verdict on the map (analysis/check.py), metadata["verdict"]
    memberWeights: List[str] = field(default_factory=list)  # an ensemble: one member per weights file (2 or more)
    folds: Optional[str] = None  # an nnU-Net folder: "auto" (every fold_N, one member each) or "0,1,..."


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
    spread: Optional[np.ndarray] = None  # an ensemble or TTA: the voxel-wise spread map (std / mean) of the maps


@dataclass
class AnalysisRequest:
    """An analysis of ``explain.image``: the inputs and target of a heatmap request plus the analysis options."""

    kind: str
    explain: ExplainRequest
    methods: List[str]
    steps: int = 0  #: 0: evaluate's default steps
    cropVoxels: int = 0


def cropRequest(request: AnalysisRequest):
    """Image, geometry and target cropped to ``cropVoxels`` per axis around the target (0: unchanged)."""
    r = request.explain
    target = dict(r.target)
    if request.cropVoxels <= 0:
        return r.image, r.geometry, target
    from ..analysis.evaluate import crop_image  # imports torch
    center = target.get("voxel")
    masks = [name for name in ("mask", "reference") if target.get(name) is not None]
    if center is None and masks:
        center = [int(round(c)) for c in np.argwhere(target[masks[0]]).mean(axis=0)]
    image, geometry, box = crop_image(r.image, r.geometry, [request.cropVoxels] * r.image.ndim, center)
    for name in masks:
        target[name] = target[name][box]
    if "voxel" in target:
        target["voxel"] = tuple(int(v) - b.start for v, b in zip(target["voxel"], box))
    return image, geometry, target


class ComputeLogic:
    """Load models (cached) and run the engine on requests; no MRML, so any thread or process may call it.

    Loaded models are cached (per spec, weights and file time) for the whole process, shared by every instance:
    the second run skips loading. A changed model or weights file (newer modification time) is loaded again.
    """

    _modelCache: Dict[tuple, object] = {}
    _modelLock = threading.Lock()

    def loadModel(self, model: object = "hd-bet", weights: Optional[str] = None, folds: Optional[str] = None):
        """The :class:`~SegHiResCAMLib.models.SegModel` for a spec (cached), or ``model`` itself if already loaded;
        ``folds``: the folds of an nnU-Net folder (``"auto"``: every ``fold_N``, a fold ensemble)."""
        if not isinstance(model, str):
            return model
        stamp = tuple(os.path.getmtime(p) if p and os.path.exists(p) else None for p in (model, weights))
        key = (model, weights, folds, stamp)
        with self._modelLock:
            if key not in self._modelCache:
                from ..models import load_model  # imports torch
                try:
                    loaded = load_model(model, weights=weights, **({"fold": folds} if folds else {}))
                except ImportError as exc:
                    raise ModelError("model %r needs the Python package %r, which is not installed: %s"
                                     % (model, getattr(exc, "name", "") or "?", exc)) from exc
                for stale in [k for k in self._modelCache if k[:3] == key[:3]]:  # the file changed: drop the old one
                    del self._modelCache[stale]
                self._modelCache[key] = loaded
            return self._modelCache[key]

    def requestModel(self, request: ExplainRequest, weights: Optional[str] = None):
        """The request's model (cached; ``weights``: this file instead of the request's) with the request's model
        card applied (to a copy: class names, channels, preprocessing are the card's)."""
        model = self.loadModel(request.model, weights or request.weights, getattr(request, "folds", None))
        if request.modelCard is not None:
            from ..models.card import apply_card, as_card
            model = apply_card(model, as_card(request.modelCard))
        return model

    def requestModels(self, request: ExplainRequest) -> list:
        """The request's models: one per weights file of an ensemble (``memberWeights``), else the one model."""
        given = list(getattr(request, "memberWeights", None) or [])
        return [self.requestModel(request, path) for path in given] if len(given) > 1 else [self.requestModel(request)]

    def layerNames(self, model: object = "hd-bet", weights: Optional[str] = None,
                   progress: Optional[ProgressCallback] = None) -> List[str]:
        """``auto``, the model's default layer, then every named sub-module (for the layer list of the panel)."""
        from ..engine import named_layers
        loaded = self.loadModel(model, weights)
        names = ["auto"]
        if loaded.default_layer not in names:
            names.append(loaded.default_layer)
        names += [name for name in named_layers(loaded.network) if name not in names]
        return names

    def compute(self, request: ExplainRequest, progress: Optional[ProgressCallback] = None) -> ExplainResult:
        """Load the model (cached) and run the engine; no MRML, so it may run in a worker thread or process.

        ``progress(fraction, message)`` may raise :class:`~SegHiResCAMLib.errors.CancelledError` to cancel.
        """
        report = progress or (lambda fraction, message: None)
        report(0.0, "loading the model")
        models = self.requestModels(request)
        model = models[0]
        from ..analysis.ensemble import explain_ensemble, fold_members  # imports torch
        from ..analysis.explain import TargetSpec, explain_image
        if request.target["class_index"] >= model.num_classes and model.num_classes > 1:
            raise InputError("class %d does not exist: model %r has the classes %s" % (
                request.target["class_index"], model.name,
                ", ".join("%d=%s" % item for item in enumerate(model.class_names))))
        spec = TargetSpec(**request.target)
        if not hasattr(self, "_sessionCache"):
            self._sessionCache = {}  # the last forward pass: a new target on the same scan costs a backward pass
        options = dict(layers=request.layer, method=request.method, device=request.device,
                       progress=lambda f, m: report(0.02 + 0.98 * f, m), slice_axis=request.sliceAxis,
                       slice_context=request.sliceContext, check=getattr(request, "check", None))
        tta = bool(getattr(request, "tta", False))
        axes = list(getattr(request, "sliceAxes", None) or [])  # as `explain --slice-axes all`
        if tta or axes or sum(len(fold_members(m)) for m in models) > 1:  # `explain --tta`, `--weights A --weights B`,
            # an nnU-Net fold ensemble: every member's map, combined (mean, spread, agreement)
            explanation = explain_ensemble(models, request.image, request.geometry, [spec], tta=tta,
                                           slice_axes=axes or None, **options)
        else:
            explanation = explain_image(model, request.image, request.geometry, [spec],
                                        session_cache=self._sessionCache, **options)
        heat = explanation.heatmaps[0]
        array = np.nan_to_num(heat.array.astype(np.float32, copy=False), nan=0.0, posinf=1.0, neginf=0.0)
        spread = (None if heat.spread is None
                  else np.nan_to_num(heat.spread.astype(np.float32, copy=False), nan=0.0, posinf=0.0, neginf=0.0))
        return ExplainResult(heatmap=np.clip(array, 0.0, 1.0), prediction=explanation.prediction, layer=heat.layer,
                             method=heat.method, info=heat.info, metadata=explanation.metadata,
                             classNames=list(model.class_names), spread=spread)

    def computeAnalysis(self, request: AnalysisRequest, progress: Optional[ProgressCallback] = None):
        """The evaluation (``Evaluation``) or the segmentation ability (``ImageSA``); no MRML (any thread)."""
        report = progress or (lambda fraction, message: None)
        report(0.0, "loading the model")
        r = request.explain
        model = self.requestModel(r)
        # a 2D model on a 3D scan: the axis and context of the request, as for the heatmap (compute)
        slices = dict(slice_axis=getattr(r, "sliceAxis", None), slice_context=getattr(r, "sliceContext", 0))
        if request.kind == EVALUATION:
            from ..analysis.evaluate import evaluate_image
            from ..analysis.explain import TargetSpec
            image, geometry, target = cropRequest(request)
            return evaluate_image(model, image, geometry, TargetSpec(**target), methods=request.methods,
                                  layers=r.layer, steps=request.steps or None, device=r.device,
                                  progress=lambda f, m: report(0.02 + 0.98 * f, m), **slices)
        from ..engine.protoseg import LAST_FEATURE
        from ..analysis.segmentation_ability import sa_score_image
        return sa_score_image(model, r.image, r.geometry, reference=r.target.get("mask"),
                              class_index=r.target["class_index"], layers="all",
                              map_layer=LAST_FEATURE if r.layer == "auto" else r.layer, device=r.device,
                              progress=lambda f, m: report(0.02 + 0.98 * f, m), **slices)

    def runJob(self, method: str, args: Sequence[object], progress: Optional[ProgressCallback] = None):
        """``method(*args, progress)`` for one of :data:`JOB_METHODS` (what a thread or worker-process job runs)."""
        if method not in JOB_METHODS:
            raise InputError("a job runs one of %s, got %r" % (", ".join(JOB_METHODS), method))
        return getattr(self, method)(*args, progress=progress)
