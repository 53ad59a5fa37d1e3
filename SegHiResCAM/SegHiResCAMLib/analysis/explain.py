"""One entry point shared by the command line, the Python API and the Slicer logic.

:func:`explain_image` takes an image array with its :class:`~SegHiResCAMLib.geometry.Geometry`, a
:class:`~SegHiResCAMLib.models.base.SegModel` and :class:`TargetSpec` descriptions on the *image* grid; it moves
everything into model space, runs the engine once (one forward pass for all targets and layers) and maps the
heatmaps back onto exactly the image grid. :func:`predict_image` returns the model's label map the same way.
"""

import contextlib
import platform
import time
from dataclasses import dataclass, field
from typing import Callable, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from .. import __version__, catalog
from ..engine import (CAMSession, ComponentRegion, EmptyRegion, MaskRegion, PredictedRegion, SegmentTarget,
                     VoxelRegion, WholeRegion, main_output)
from ..engine.outputs import run_model
from ..engine.cam import check_input
from ..engine.error_targets import SuppressionTarget
from ..engine.hooks import model_guard
from ..engine.layers import auto_layer
from ..engine.targets import output_slabs
from ..engine.windows import WindowedCAM
from ..errors import InputError, TargetError
from ..geometry import Geometry
from ..models.base import SegModel
from ..models.card import apply_card, as_card
from ..models.output import resolve_divisible_by, resolve_output
from ..imaging.model_space import ModelSpace, prepare
from .errors import binary_mask, check_error_spec, component_labels, error_region, error_tables, slice_error_tables
from ..imaging.channels import image_channels, stack_channels
from .channels import channel_attribution
from .slices import explain_slices, predict_slices, runs_in_slices
from .nnunet_predict import is_nnunet, nnunet_input, nnunet_windows, predict_nnunet
from .nnunet_slices import check_nnunet_slice_options, explain_nnunet_slices, runs_nnunet_slices

ProgressCallback = Callable[[float, str], None]


@dataclass
class TargetSpec:
    """What to explain, described on the image grid.

    Attributes:
        class_index: the class whose score is explained.
        mask: optional mask or label map on the image grid (numpy order); default: the model's prediction.
        label: the label value of ``mask`` to use (default: all non-zero voxels).
        component: ``None``; ``"largest"``; a rank (0 = largest); restricts the region to one connected component.
        voxel: an image voxel index (numpy order): explain that voxel (or a ball of ``radius_mm`` around it).
        radius_mm: ball radius in mm for ``voxel``.
        threshold: EIECS threshold target: voxels with ``p_c > threshold`` (instead of the arg-max).
        whole: explain the class over the whole image.
        empty: the sanity-check target (map must be zero).
        error: ``"fp"`` (false positives: predicted as the class, not in ``reference``) or ``"fn"`` (false
            negatives: in ``reference``, not predicted; the negative class logit is explained, i.e. what
            suppressed the class there); see :mod:`.errors`. ``component`` picks one connected component.
        reference: the reference segmentation of the class on the image grid (mask or label map), for ``error``.
        reference_label: the label value of ``reference`` to use (default: all non-zero voxels).
        score: ``logits`` or ``probabilities``.
        reduction: ``sum`` or ``mean``.
        name: label for outputs.
    """

    class_index: int = 1
    mask: Optional[np.ndarray] = None
    label: Optional[float] = None
    component: Optional[Union[str, int]] = None
    voxel: Optional[Tuple[int, ...]] = None
    radius_mm: float = 0.0
    threshold: Optional[float] = None
    whole: bool = False
    empty: bool = False
    error: Optional[str] = None
    reference: Optional[np.ndarray] = None
    reference_label: Optional[float] = None
    score: str = "logits"
    reduction: str = "sum"
    name: Optional[str] = None

    def kind(self) -> str:
        if self.empty:
            return "empty"
        if self.error is not None:
            return {"fp": "false positives", "fn": "false negatives"}.get(self.error, "errors")
        if self.whole:
            return "whole image"
        if self.voxel is not None:
            return "voxel"
        if self.mask is not None:
            return "segment"
        return "threshold" if self.threshold is not None else "prediction"


@dataclass
class Heatmap:
    """One heatmap on the image grid, with its provenance."""

    array: np.ndarray  # float32, image grid (numpy order)
    layer: str
    method: str
    target: TargetSpec
    info: dict
    spread: Optional[np.ndarray] = None  # ensembles and TTA (analysis/ensemble.py): std / mean of the members


@dataclass
class ImageExplanation:
    heatmaps: List[Heatmap]
    prediction: np.ndarray  # uint8/uint16 label map on the image grid
    space: ModelSpace
    metadata: dict = field(default_factory=dict)
    channels: list = field(default_factory=list)  # per target, a ChannelAttribution (per_channel=True)


def resolve_device(device: str = "auto") -> torch.device:
    """``auto`` picks CUDA when available, else CPU; ``cuda`` without a GPU is a clear error."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise InputError("device %r requested but no CUDA GPU is available; use --device cpu" % device)
    try:
        return torch.device(device)
    except RuntimeError as exc:
        raise InputError("unknown device %r; use auto, cpu or cuda" % device) from exc


def build_target(spec: TargetSpec, space: ModelSpace, model: SegModel) -> SegmentTarget:
    """A model-space :class:`SegmentTarget` from an image-space description. A model whose probabilities
    cannot be bypassed (``model.resolved["output"]["explained"] == "probabilities"``) is explained on them."""
    check_error_spec(spec)
    if spec.error is not None:
        region = error_region(spec, space)
    elif spec.empty:
        region = EmptyRegion()
    elif spec.whole:
        region = WholeRegion()
    elif spec.voxel is not None:
        index = tuple(int(i) for i in spec.voxel)
        if len(index) != space.image.ndim or any(not 0 <= i < s for i, s in zip(index, space.image.array_shape)):
            raise TargetError("voxel %s lies outside the image (shape %s, numpy order)" % (index, space.image.array_shape))
        spacing = space.grid.spacing[::-1]
        region = VoxelRegion(space.image_index_to_model(index), radius=spec.radius_mm, spacing=spacing)
    elif spec.mask is not None:
        mask = binary_mask(spec.mask, spec.label, "mask")
        if not mask.any():
            raise TargetError("the target segment is empty; choose a segment with voxels, or another label")
        model_mask = space.to_model(mask, "nearest")
        if not model_mask.any():
            raise TargetError("the target segment vanishes on the model grid (it is smaller than one model voxel);"
                              " use a larger segment or a voxel target with a radius")
        region = MaskRegion(torch.from_numpy(model_mask.astype(bool)))
    else:
        region = PredictedRegion(spec.threshold)
    if spec.component is not None and not (spec.empty or spec.whole):
        region = ComponentRegion(region, spec.component, labeller=component_labels)
    name = spec.name or "%s-%s" % (model.class_names[spec.class_index] if 0 <= spec.class_index < model.num_classes
                                   else "class%d" % spec.class_index, spec.kind().replace(" ", "-"))
    kind = SuppressionTarget if spec.error == "fn" else SegmentTarget
    return kind(spec.class_index, region, score=explained_score(model, spec.score),
                reduction=spec.reduction, activation=model.activation, name=name)


def explained_score(model: SegModel, score: str) -> str:
    """``probabilities`` for a model whose final sigmoid/softmax could not be bypassed, else ``score``."""
    return "probabilities" if model.resolved.get("output", {}).get("explained") == "probabilities" else score



def _fingerprint(array: np.ndarray) -> str:
    """A content hash of the input image (cheap next to a forward pass) for the session cache."""
    import hashlib
    digest = hashlib.blake2b(np.ascontiguousarray(array).view(np.uint8), digest_size=16)
    return "%s:%s:%s" % (array.shape, array.dtype, digest.hexdigest())


def label_map(output: torch.Tensor, model: SegModel) -> np.ndarray:
    """The label map of batch element 0, slab by slab (an int64 arg-max of a whole CT would cost twice its
    float32 prediction)."""
    out = output[0].detach()
    dtype = np.uint8 if model.num_classes < 256 else np.uint16
    labels = np.empty(tuple(out.shape[1:]), dtype=dtype)
    for part in output_slabs(output):
        block = out[:, part]
        if model.activation == "sigmoid" and block.shape[0] == 1:
            values = block[0] > 0
        elif model.activation == "sigmoid":  # multi-label: the highest-scoring class above 0.5, else background
            best = block.argmax(0)
            values = torch.where(block.max(0).values > 0, best + 1, torch.zeros_like(best))
        else:
            values = block.argmax(0)
        labels[part] = values.cpu().numpy()
    return labels


def labels_on_image(output: torch.Tensor, model: SegModel, space: ModelSpace) -> np.ndarray:
    """The label map of batch element 0 on the image grid: the logits resampled onto it class by class, then the
    arg-max (:meth:`ModelSpace.labels_to_image`; nnU-Net's order), not the model grid's labels resampled."""
    out = output[0].detach()
    activation = "sigmoid" if model.activation == "sigmoid" else "softmax"
    return space.labels_to_image(lambda c: out[c].float().cpu().numpy(), int(out.shape[0]), activation)


def _to_tensor(x: np.ndarray, device: torch.device, model: SegModel) -> torch.Tensor:
    dtype = next((p.dtype for p in model.network.parameters()), torch.float32)
    return torch.from_numpy(x)[None].to(device=device, dtype=dtype)


def model_input(model: SegModel, image: np.ndarray, geometry: Geometry, device: str = "auto",
                windows: bool = False) -> Tuple[torch.Tensor, ModelSpace, torch.device]:
    """The network input ``[1, C, *S_model]`` on the chosen device (the network is moved there too), and the
    :class:`ModelSpace` that maps results back onto the image grid. ``windows``: the input goes through windows
    (an nnU-Net input is then not padded beyond nnU-Net's own padding: zeros inside a window change its instance
    normalisation)."""
    dev = resolve_device(device)
    model.network.to(dev)
    if is_nnunet(model):  # nnU-Net's own preprocessing (normalise, then its resampling)
        x_np, space = nnunet_input(model, image, geometry, whole=not windows)
        x = _to_tensor(x_np, dev, model)
        resolve_output(model, x)
        return x, space, dev
    resolve_divisible_by(model)
    x_np, space = prepare(image, geometry, model.preprocessing, model.spatial_dims, model.in_channels)
    x = _to_tensor(x_np, dev, model)
    resolve_output(model, x)
    return x, space, dev


def explain_image(model: SegModel, image: np.ndarray, geometry: Geometry, targets: Sequence[TargetSpec],
                  layers: Union[str, Sequence[str]] = "auto",
                  method: Union[str, Sequence[str]] = "seg-hires-grad-cam",
                  device: str = "auto", relu: bool = True, normalization: str = "max",
                  progress: Optional[ProgressCallback] = None, roi_size: Optional[Sequence[int]] = None,
                  overlap: float = 0.25, blend: str = "constant", amp: bool = False,
                  session_cache: Optional[dict] = None, model_card=None, per_channel: bool = False,
                  slice_axis: Optional[str] = None, slice_context: int = 0, slice_batch: Optional[int] = None,
                  memory_budget=None, check: Optional[str] = None, **method_options) -> ImageExplanation:
    """Explain ``targets`` on an image; heatmaps come back on exactly the image grid (float32).

    ``layers="auto"`` uses the model's known-good default layer when it declares one. With ``roi_size`` the
    model runs in overlapping windows (exact sliding-window CAM, :mod:`.engine.windows`): memory is bounded
    by the window instead of the volume.

    ``session_cache``: a dict owned by the caller (e.g. the Slicer logic). When given, the forward pass (or,
    with windows, the blended prediction) is kept there and reused by the next call on the same image, model,
    layers and device, so a new target costs only the target-dependent work. The cache holds one entry, and
    its memory, until the next call with other inputs or until the caller clears it.

    ``model_card``: a :class:`~SegHiResCAMLib.models.card.ModelCard`, card file or its JSON data applied to (a copy
    of) ``model`` first (``docs/model_card.md``); its ``patch_size`` is the default ``roi_size``.

    Several input channels: ``image`` may also be a channel-first array, a list of channels (arrays on
    ``geometry``, or ``(array, Geometry)`` pairs resampled onto the first one's grid) or a dict by the card's
    channel names (:func:`~SegHiResCAMLib.imaging.channels.stack_channels`). ``per_channel=True`` also returns,
    per target, the gradient x input map of every input channel on the image grid and the channel shares
    (``ImageExplanation.channels``, ``metadata["channel_shares"]``; :mod:`.channels`).

    An nnU-Net 2d configuration on a 3D image is explained as nnU-Net predicts it (:mod:`.nnunet_slices`). Any
    other 2D model on a 3D image runs slice by slice (:mod:`.slices`, ``docs/slice_models.md``): ``slice_axis``
    (axial, coronal, sagittal; default the card's, else axial), ``slice_context`` (neighbouring slices on each
    side as channels), ``slice_batch`` (slices per forward pass) and ``normalization="per-slice"`` apply there.

    ``memory_budget``: bytes or a size (``"4G"``); ``None``/``"auto"``: half the available memory; ``"none"``: no
    budget. Without ``roi_size``, the run's memory is estimated first (:mod:`.memory`) and windows are chosen when
    the estimate exceeds the budget; ``metadata["memory"]`` records the estimate, the budget and the choice.

    ``check="quick"``: a one-line verdict on the first heatmap (:mod:`.check`: model randomisation of the layer's
    downstream and a partial deletion AUC against a random ranking; 0.9-2.9 explain runs' time in
    ``benchmarks/results/check.md``) in
    ``metadata["verdict"]``, its numbers in ``metadata["check"]``.
    """
    from .check import check_name
    from .memory import parse_memory_budget, plan_model_run
    budget = parse_memory_budget(memory_budget)  # a bad budget fails before any work
    check = check_name(check)
    if model_card is not None:
        model = apply_card(model, as_card(model_card))
    channels = stack_channels(image, geometry, (model.card or {}).get("channels"),
                              image_channels(model.in_channels, slice_context))
    image = channels.array
    if per_channel and (roi_size is not None or model.roi_size is not None):
        raise InputError("per-channel maps run the whole image in one pass; they cannot be combined with windows "
                         "(--roi-size or the card's patch_size): leave per_channel off, or run without windows")
    if runs_nnunet_slices(model, geometry):  # nnU-Net 2d: nnU-Net's volume preprocessing and windows per slice
        check_nnunet_slice_options(roi_size, per_channel, slice_axis, slice_context)
        if session_cache is not None:
            session_cache.clear()
        run = explain_nnunet_slices(model, image, geometry, targets, layers, method, resolve_device(device), relu,
                                    normalization, progress or (lambda f, m: None), build_target, amp,
                                    **method_options)
        heatmaps = [Heatmap(*h) for h in run.heatmaps]
        slice_error_tables(heatmaps, targets, run.prediction, geometry)
        return ImageExplanation(heatmaps, run.prediction, run.space, run.metadata)
    if runs_in_slices(model, geometry):
        if per_channel:
            raise InputError("per-channel maps are not available for a 2D model on a 3D scan yet; leave "
                             "per_channel off")
        if roi_size is not None:
            raise InputError("windows (roi_size) are for 3D models; a 2D model runs slice by slice, in batches of "
                             "slice_batch slices")
        if session_cache is not None:  # slices keep no forward pass: drop the one of an earlier run
            session_cache.clear()
        run = explain_slices(model, image, geometry, targets, layers, method, resolve_device(device), relu,
                             normalization, progress or (lambda f, m: None), labels_on_image, explained_score,
                             slice_axis, slice_context, slice_batch, amp, **method_options)
        heatmaps = [Heatmap(*h) for h in run.heatmaps]
        slice_error_tables(heatmaps, targets, run.prediction, geometry)
        return ImageExplanation(heatmaps, run.prediction, run.space, run.metadata)
    if normalization == catalog.PER_SLICE:
        raise InputError("per-slice normalisation is for a 2D model on a 3D scan; this model runs on the whole "
                         "image: use max, minmax or none")
    if roi_size is None and model.roi_size is not None:
        roi_size = model.roi_size
    importance = None
    if is_nnunet(model):  # nnU-Net's windows: its patch, step 0.5, its Gaussian (analysis/nnunet_predict.py)
        roi_size, overlap, blend, importance = nnunet_windows(model, geometry.ndim, roi_size, overlap, blend)
    report = progress or (lambda f, m: None)
    timings = {}
    started = time.perf_counter()
    report(0.0, "preparing the image")
    x, space, dev = model_input(model, image, geometry, device, windows=roi_size is not None)
    timings["preprocess_s"] = time.perf_counter() - started
    names = [layers] if isinstance(layers, str) else list(layers)
    names = [model.default_layer if (n == "auto" and model.default_layer != "auto") else n for n in names]
    cam_targets = [build_target(t, space, model) for t in targets]
    memory = {"choice": "windows given (roi_size)"} if roi_size is not None else {"choice": "no budget"}
    plan = None
    plan_key = (id(model.network), _fingerprint(np.asarray(image)), geometry, tuple(names), str(dev), budget)
    if roi_size is None and budget != 0 and not per_channel:
        stored = (session_cache or {}).get("memory")
        if stored is not None and stored[0] == plan_key:
            plan = stored[1]
        else:
            report(0.02, "estimating memory")
            plan = plan_model_run(model, x, np.asarray(image), memory_budget, "explain", names, method,
                                  len(cam_targets), targets[0].class_index if targets else 1, **method_options)
        memory = plan.describe()
        if plan.windowed:
            roi_size = plan.roi_size
            report(0.04, plan.message())
    t0 = time.perf_counter()
    engine_progress = lambda f, m: report(0.05 + 0.85 * f, m)  # noqa: E731
    key = None
    if session_cache is not None:
        key = (id(model.network), repr(model.preprocessing), _fingerprint(np.asarray(image)), geometry, tuple(names),
               str(dev), amp, None if roi_size is None else (tuple(roi_size), overlap, blend))  # + a card's steps
        if session_cache.get("key") != key:
            session_cache.clear()  # one entry: drop the previous graph before building the next one
    cached = session_cache.get("session") if session_cache is not None else None
    timings["reused_forward"] = cached is not None
    upstream = None
    if roi_size is None:
        if check is not None and cached is None and not amp:  # the check's randomised copy reuses this pass
            from ..engine.faithfulness import UpstreamRecorder
            upstream = UpstreamRecorder(model.network, names[0])
        with upstream or contextlib.nullcontext():
            session = cached or CAMSession(model.network, x, names, output_key=model.output_key,
                                           progress=engine_progress, autocast=amp)
        session.report = engine_progress
        results = session.explain(cam_targets, method, relu=relu, normalization=normalization,
                                  keep_graph=session_cache is not None, **method_options)
    else:
        roi = tuple(int(r) for r in roi_size)
        if "auto" in names:
            first = x[(slice(None), slice(None)) + tuple(slice(0, r) for r in roi)]
            chosen = auto_layer(model.network, first, model.output_key)
            names = [chosen if n == "auto" else n for n in names]
        session = cached or WindowedCAM(model.network, x, roi, names, overlap=overlap, blend=blend,
                                        output_key=model.output_key, progress=engine_progress, autocast=amp,
                                        importance=importance)
        session.report = engine_progress
        results = session.explain(cam_targets, method, relu=relu, normalization=normalization, **method_options)
    if session_cache is not None:
        session_cache.update(key=key, session=session)
        if plan is not None:
            session_cache["memory"] = (plan_key, plan)
    timings["cam_s"] = time.perf_counter() - t0
    report(0.92, "mapping back to the image grid")
    t0 = time.perf_counter()
    prediction = labels_on_image(results[0].output, model, space)
    heatmaps = []
    per_target = len(results) // len(cam_targets)  # results are target-major
    for i, res in enumerate(results):
        spec = targets[i // per_target]
        array = space.to_image(res.map[0].float().cpu().numpy(), "linear", copy=False)  # the map itself, no copy
        info = res.describe()
        info["flat"] = bool(res.flat[0])
        info["warnings"] = list(res.warnings)
        heatmaps.append(Heatmap(array.astype(np.float32, copy=False), res.layer, res.method, spec, info))
    error_tables(results[0].output, cam_targets, targets, space, heatmaps)
    attributions = [channel_attribution(model, x, space, t, channels.names) for t in cam_targets] if per_channel else []
    timings["postprocess_s"] = time.perf_counter() - t0
    checked = None
    if check is not None:
        from .check import image_domain, quick_check
        report(0.95, "quick check: model randomisation and deletion")
        if roi_size is not None:
            checked = {"verdict": "not checked: the check runs on the whole input, this run used windows"}
        else:
            divisible = model.preprocessing.divisible_by
            checked = quick_check(model.network, x, cam_targets[0], results[0], image_domain(space, dev),
                                  model.output_key, divisible if isinstance(divisible, int) else 1,
                                  upstream=upstream, **method_options)
        if upstream is not None:
            upstream.clear()
        timings["check_s"] = time.perf_counter() - t0 - timings["postprocess_s"]
    timings["total_s"] = time.perf_counter() - started
    report(1.0, "done")
    metadata = {
        "seghirescam_version": __version__, "torch_version": torch.__version__, "python": platform.python_version(),
        "device": str(dev), "model": model.describe(), "model_space": space.describe(), "timings": timings,
        "model_output": dict(model.resolved.get("output", {})), "memory": memory,
    }
    if checked is not None:
        from .check import with_agreement
        metadata["check"] = with_agreement(checked, metadata)
        metadata["verdict"] = metadata["check"]["verdict"]
    if channels.channels > 1:
        metadata["channels"] = channels.describe()
    if attributions:
        shares = [a.describe() for a in attributions]
        metadata["channel_shares"] = shares[0] if len(shares) == 1 else shares
    return ImageExplanation(heatmaps, prediction, space, metadata, attributions)


def predict_image(model: SegModel, image: np.ndarray, geometry: Geometry, device: str = "auto",
                  progress: Optional[ProgressCallback] = None, model_card=None, slice_axis: Optional[str] = None,
                  slice_context: int = 0, slice_batch: Optional[int] = None,
                  tta: bool = False, memory_budget=None) -> Tuple[np.ndarray, dict]:
    """The model's label map on the image grid, and metadata (one forward pass, no gradients);
    ``model_card`` and the ``slice_*`` options (a 2D model on a 3D image) as in :func:`explain_image`. An nnU-Net
    model predicts as ``nnUNetv2_predict`` (:mod:`.nnunet_predict`; ``tta``: its mirroring; a 2d configuration
    slice by slice along the first array axis, as nnU-Net). ``memory_budget`` as in :func:`explain_image`: windows
    (blended as in windowed CAM) when the estimate exceeds it."""
    from .memory import parse_memory_budget, plan_model_run, windowed_prediction
    budget = parse_memory_budget(memory_budget)
    if model_card is not None:
        model = apply_card(model, as_card(model_card))
    image = stack_channels(image, geometry, (model.card or {}).get("channels"),
                           image_channels(model.in_channels, slice_context)).array
    report = progress or (lambda f, m: None)
    started = time.perf_counter()
    if is_nnunet(model):
        dev = resolve_device(device)
        result = predict_nnunet(model, image, geometry, dev, tta=tta, progress=report)
        report(1.0, "done")
        meta = {"seghirescam_version": __version__, "device": str(dev), "model": model.describe(),
                "model_space": result["space"].describe(), "timings": {"total_s": time.perf_counter() - started},
                "inference": dict(model.inference, windows=result["windows"], tta=bool(tta))}
        return result["labels"], meta
    if tta:
        raise InputError("--tta (nnU-Net's mirroring) applies to nnU-Net models only; %s is not one" % model.name)
    if runs_in_slices(model, geometry):
        return predict_slices(model, image, geometry, resolve_device(device), progress or (lambda f, m: None),
                              labels_on_image, slice_axis, slice_context, slice_batch)
    report(0.0, "preparing the image")
    x, space, dev = model_input(model, image, geometry, device)
    check_input(model.network, x)
    memory = {"choice": "no budget"}
    plan = None
    if budget != 0:
        report(0.05, "estimating memory")
        plan = plan_model_run(model, x, np.asarray(image), memory_budget, "predict")
        memory = plan.describe()
    report(0.1, plan.message() if plan is not None and plan.windowed else "forward pass")
    if plan is not None and plan.windowed:
        output = windowed_prediction(model.network, x, plan.roi_size, model.output_key)
    else:
        with model_guard(model.network, freeze_parameters=False), torch.no_grad():
            output = main_output(run_model(model.network, x), model.output_key)
    labels = labels_on_image(output, model, space)
    report(1.0, "done")
    meta = {"seghirescam_version": __version__, "device": str(dev), "model": model.describe(),
            "model_space": space.describe(), "timings": {"total_s": time.perf_counter() - started},
            "model_output": dict(model.resolved.get("output", {})), "memory": memory}
    return labels, meta
