"""Explaining an nnU-Net ``2d`` configuration on a 3D image as ``nnUNetv2_predict`` runs it.

The generic slice path (:mod:`.slices`) preprocesses every slice on its own; nnU-Net does not. Here, with the
functions :mod:`.nnunet_predict` uses for ``predict``:

1. the whole volume is preprocessed once, as nnU-Net does (:func:`~.nnunet_predict.nnunet_input`: crop to the
   non-zero box, one normalisation over the volume, nnU-Net's resampling in-plane, the slice spacing kept, padding
   to the patch); the slices are the first array axis of that volume (nnU-Net's ``transpose_forward`` is folded
   into the network by the loader, whose 2d configurations slice along the first axis);
2. the prediction is nnU-Net's (:func:`~.nnunet_predict.nnunet_logits`: every slice through the Gaussian sliding
   window with step 0.5, float16 accumulators) and goes back to the image grid as ``predict`` does (logits
   resampled, then arg-max);
3. each target's region is found on that prediction's model grid (the same :class:`SegmentTarget` as for a 3D
   image); only the slices holding region voxels are explained, each slice by the sliding-window CAM
   (:class:`~SegHiResCAMLib.engine.windows.WindowedCAM`) with nnU-Net's patch, overlap 0.5 and Gaussian; the
   other slices stay zero;
4. one normalisation over the whole volume (``max``, ``minmax``, ``none``; ``per-slice``: each slice by its own
   maximum), then the map goes back to the image grid as nnU-Net's probabilities do
   (:meth:`~SegHiResCAMLib.imaging.nnunet_space.NnunetSpace.channel_to_image`).
"""

import copy
import time
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from .. import catalog
from ..engine import MaskRegion
from ..engine.layers import auto_layer
from ..engine.postprocess import normalize
from ..engine.sliding import nnunet_gaussian
from ..engine.windows import WindowedCAM
from ..errors import InputError, TargetError
from ..geometry import Geometry
from ..models.base import SegModel
from ..models.output import resolve_output
from .nnunet_predict import is_nnunet, labels_from_logits, nnunet_input, nnunet_logits
from .slices import NORMALIZATIONS, SliceHeatmap, SliceRun


def runs_nnunet_slices(model: SegModel, geometry: Geometry) -> bool:
    """Whether ``model`` is an nnU-Net 2d configuration explained on a 3D image (this module's path)."""
    return geometry.ndim == 3 and is_nnunet(model) and int(model.inference.get("dims", 3)) == 2


def nnunet_slice_volume(maps: torch.Tensor, normalization: str) -> Tuple[torch.Tensor, bool]:
    """The per-slice maps ``[Z, Y, X]`` normalised over the whole volume (``per-slice``: each slice alone);
    returns ``(maps, flat)``."""
    if normalization == catalog.PER_SLICE:
        out, flat = normalize(maps, "max")
        return out, bool(flat.all())
    out, flat = normalize(maps[None], normalization)
    return out[0], bool(flat[0])


def _image_map(space, volume: np.ndarray) -> np.ndarray:
    out = np.zeros(space.image.array_shape, dtype=np.float32)
    for part, values in space.channel_to_image(volume, 0.0):
        out[part] = values
    return out


def explain_nnunet_slices(model: SegModel, image: np.ndarray, geometry: Geometry, targets: Sequence, layers, method,
                          device: torch.device, relu: bool, normalization: str,
                          progress: Callable[[float, str], None], build_target: Callable,
                          amp: bool = False, **method_options) -> SliceRun:
    """Explain ``targets`` of an nnU-Net 2d ``model`` on a 3D ``image`` (see the module docstring).

    ``build_target(spec, space, model)``: :func:`~SegHiResCAMLib.analysis.explain.build_target` (the image-space
    description of a target -> its model-space :class:`SegmentTarget`)."""
    if normalization not in NORMALIZATIONS:
        raise InputError("normalisation must be one of %s, got %r" % (", ".join(NORMALIZATIONS), normalization))
    started = time.perf_counter()
    progress(0.0, "preparing the volume as nnU-Net does")
    x_np, space = nnunet_input(model, image, geometry)
    param = next(model.network.parameters(), None)
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
    x = torch.from_numpy(x_np)[None].to(device=device, dtype=dtype)  # [1, C, Z, Y, X]
    model.network.to(device)
    patch = tuple(int(p) for p in model.inference["patch_size"])
    first = x[:, :, x.shape[2] // 2, :patch[0], :patch[1]]
    resolve_output(model, first)
    progress(0.02, "predicting the slices (nnU-Net's sliding window)")
    logits = nnunet_logits(model, x, False, torch.float16)  # what predict computes: [1, C, Z, Y, X] on the CPU
    prediction = labels_from_logits(logits, model, space)
    names = [layers] if isinstance(layers, str) else list(layers)
    names = [model.default_layer if (n == "auto" and model.default_layer != "auto") else n for n in names]
    if "auto" in names:
        chosen = auto_layer(model.network, first, model.output_key)
        names = [chosen if n == "auto" else n for n in names]
    names = list(dict.fromkeys(names))
    importance = nnunet_gaussian(patch).float()
    heatmaps: List[SliceHeatmap] = []
    slices_run, cam_slices, windows = [], 0, 0
    count = int(x.shape[2])
    for i, spec in enumerate(targets):
        target = build_target(spec, space, model)
        region = target.region(logits).cpu()  # [1, Z, Y, X] on the model grid
        ks = [z for z in range(count) if bool(region[0, z].any())]
        slices_run.append(len(ks))
        vols: Dict[Tuple[str, str], torch.Tensor] = {}
        firsts: Dict[Tuple[str, str], dict] = {}
        scores: Dict[Tuple[str, str], List[float]] = {}
        warnings: Dict[Tuple[str, str], List[str]] = {}
        for j, z in enumerate(ks):
            progress(0.1 + 0.85 * (i + j / len(ks)) / len(targets), "gradients for %s, slice %d" % (target.name, z))
            one = copy.copy(target)
            one.region_spec, one.reduction = MaskRegion(region[:, z].to(device)), "sum"
            session = WindowedCAM(model.network, x[:, :, z], patch, names, overlap=0.5, blend="gaussian",
                                  output_key=model.output_key, autocast=amp, importance=importance)
            results = session.explain([one], method, relu=relu, normalization="none", **method_options)
            cam_slices += 1
            windows += session.windows_run
            for res in results:
                key = (res.layer, res.method)
                if key not in vols:
                    vols[key] = torch.zeros(tuple(x.shape[2:]), dtype=torch.float32)
                    firsts[key], scores[key], warnings[key] = res.describe(), [], []
                vols[key][z] = res.map[0].float().cpu()
                scores[key].append(float(res.score[0]))
                warnings[key].extend(w for w in res.warnings if w not in warnings[key])
        if not vols:
            if not target.region_spec.allow_empty:
                raise TargetError("the target region is empty on every slice; choose another class, segment or voxel")
            for layer in names:
                for m in ([method] if isinstance(method, str) else list(method)):
                    vols[(layer, m if isinstance(m, str) else m.name)] = torch.zeros(tuple(x.shape[2:]))
        voxels = int(region.sum())
        for (layer, method_name), vol in vols.items():
            if spec.reduction == "mean" and voxels and normalization == "none":
                vol = vol / voxels
            vol, flat = nnunet_slice_volume(vol, normalization)
            info = dict(firsts.get((layer, method_name)) or {"method": method_name, "layer": layer, "options": {},
                        "target": {"name": target.name, "class": spec.class_index, "region": "empty"}})
            total = float(np.sum(scores.get((layer, method_name), [0.0])))
            info.update(score=[total / voxels if spec.reduction == "mean" and voxels else total],
                        region_voxels=[voxels], flat=flat, warnings=list(warnings.get((layer, method_name), [])),
                        slices={"axis": "nnunet", "run": len(ks), "count": count, "normalization": normalization})
            info["options"] = dict(info.get("options") or {}, normalization=normalization)
            if isinstance(info.get("target"), dict):
                info["target"] = dict(info["target"], reduction=spec.reduction)
            heatmaps.append(SliceHeatmap(_image_map(space, vol.numpy()), layer, method_name, spec, info))
    progress(1.0, "done")
    from .. import __version__
    import platform
    metadata = {"seghirescam_version": __version__, "torch_version": torch.__version__,
                "python": platform.python_version(), "device": str(device), "model": model.describe(),
                "model_space": dict(space.describe(), slices=True),
                "timings": {"total_s": time.perf_counter() - started},
                "model_output": dict(model.resolved.get("output", {})),
                "slices": {"axis": "nnunet", "array_axis": 0, "count": count, "normalization": normalization,
                           "slices_run": slices_run, "cam_slices": cam_slices, "windows_run": windows,
                           "preprocessing": "nnU-Net (whole volume)"}}
    return SliceRun(heatmaps, prediction, space, metadata)


def check_nnunet_slice_options(roi_size, per_channel: bool, slice_axis: Optional[str], slice_context) -> None:
    """One clear error for options that do not apply to an nnU-Net 2d configuration on a 3D image."""
    if per_channel:
        raise InputError("per-channel maps are not available for a 2D model on a 3D scan yet; leave per_channel off")
    if roi_size is not None:
        raise InputError("an nnU-Net 2d configuration runs in nnU-Net's own windows (its patch, step 0.5); leave "
                         "roi_size (--roi-size) unset")
    if slice_axis not in (None, "auto") or slice_context:
        raise InputError("an nnU-Net 2d configuration slices as nnU-Net does (its first array axis, no context); "
                         "leave slice_axis (--slice-axis) and slice_context (--slice-context) unset, got %r and %r"
                         % (slice_axis, slice_context))


__all__ = ["check_nnunet_slice_options", "explain_nnunet_slices", "nnunet_slice_volume", "runs_nnunet_slices"]
