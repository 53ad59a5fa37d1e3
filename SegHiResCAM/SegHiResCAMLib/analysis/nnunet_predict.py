"""Prediction of nnU-Net models as ``nnUNetv2_predict`` makes it: nnU-Net's preprocessing
(:mod:`..imaging.nnunet_space`), its Gaussian sliding window with step 0.5 and optional mirroring
(:mod:`..engine.sliding`), a 2d configuration slice by slice, and the logits resampled back before the arg-max
(or, region-based, the regions painted in ``regions_class_order``).
"""

from typing import Callable, Optional, Tuple

import numpy as np
import torch

from ..engine.hooks import model_guard
from ..engine.sliding import nnunet_gaussian, sliding_window_logits, window_count
from ..errors import InputError
from ..geometry import Geometry
from ..imaging.nnunet_space import NnunetSpace, pad_to_multiple, prepare_nnunet
from ..models.base import SegModel
from ..models.nnunet.loader import FoldEnsemble


def is_nnunet(model: SegModel) -> bool:
    """A model to run as nnU-Net runs it (an nnU-Net folder, not reoriented by its reader)."""
    return bool(model.inference) and model.inference.get("framework") == "nnunet" \
        and model.preprocessing.orientation in (None, "keep")


def nnunet_input(model: SegModel, image: np.ndarray, geometry: Geometry,
                 whole: bool = False) -> Tuple[np.ndarray, NnunetSpace]:
    """nnU-Net's network input and space; ``whole``: also padded (at the end) to what one pass over the whole
    image needs (the network's down-sampling), for explanations without windows."""
    x, space = prepare_nnunet(image, geometry, model.preprocessing, model.inference, model.in_channels)
    if whole:
        x, space = pad_to_multiple(x, space, model.preprocessing.divisible_by)
    return x, space


def nnunet_windows(model: SegModel, image_dims: int, roi_size, overlap: float, blend: str):
    """``(roi_size, overlap, blend, importance)`` of an nnU-Net model's windowed explanation: by default its
    patch, overlap 0.5 and its Gaussian (the windows start on multiples of the layer's down-sampling, so they
    may sit a few voxels from ``nnUNetv2_predict``'s)."""
    info = model.inference
    if info["dims"] != image_dims:
        raise InputError("explaining a 2d nnU-Net configuration on a 3D image is not supported; explain the "
                         "3d_fullres configuration (configuration=3d_fullres)")
    if roi_size is not None:
        return roi_size, overlap, blend, None
    patch = tuple(int(p) for p in info["patch_size"])
    return patch, 0.5, "gaussian", nnunet_gaussian(patch).float()


def nnunet_logits(model: SegModel, x: torch.Tensor, tta: bool = False, dtype=torch.float32,
                  progress: Optional[Callable[[float, str], None]] = None) -> torch.Tensor:
    """Blended logits ``[1, C, *S]`` of the preprocessed input ``x`` ``[1, C, *S]`` (CPU float32 result)."""
    networks = list(model.network.folds) if isinstance(model.network, FoldEnsemble) else [model.network]
    total = None
    for network in networks:  # folds one after the other, their logits averaged in ``dtype`` as nnU-Net does
        logits = _logits(network, model, x, tta, dtype, progress).to(dtype)
        total = logits if total is None else total.add_(logits)
    return total.div_(len(networks)).float() if len(networks) > 1 else total.float()


def _logits(network, model: SegModel, x: torch.Tensor, tta: bool, dtype, progress) -> torch.Tensor:
    info = model.inference
    patch, step = info["patch_size"], float(info.get("step", 0.5))
    mirror = info.get("mirror_axes") if tta else None
    report = progress or (lambda f, m: None)
    with model_guard(network, freeze_parameters=False), torch.no_grad():
        if len(patch) == x.ndim - 2:
            return sliding_window_logits(network, x, patch, step, True, mirror, model.output_key, dtype,
                                         report).cpu()
        slices = []  # a 2d configuration on a 3D image: slice by slice along the first array axis
        for z in range(x.shape[2]):
            report(z / x.shape[2], "slice %d/%d" % (z + 1, x.shape[2]))
            slices.append(sliding_window_logits(network, x[:, :, z], patch, step, True, mirror,
                                                model.output_key, dtype).cpu())
        return torch.stack(slices, 2)


def labels_from_logits(logits: torch.Tensor, model: SegModel, space) -> np.ndarray:
    """The label map on the image grid (logits resampled back, then arg-max / regions painted in order)."""
    out = logits[0]
    order = (model.inference or {}).get("regions_class_order")
    if model.activation == "sigmoid" and order:
        labels = np.zeros(space.image.array_shape, dtype=np.uint8 if max(order) < 256 else np.uint16)
        for i, value in enumerate(order):  # nnU-Net: convert_probabilities_to_segmentation, later regions win
            for part, values in space.channel_to_image(out[i].float().numpy(), space.outside_score(i, 2, "sigmoid")):
                labels[part][values > 0] = value
        return labels
    activation = "sigmoid" if model.activation == "sigmoid" else "softmax"
    return space.labels_to_image(lambda c: out[c].float().numpy(), int(out.shape[0]), activation)


def predict_nnunet(model: SegModel, image: np.ndarray, geometry: Geometry, device: torch.device,
                   tta: bool = False, probabilities: bool = False, dtype=torch.float16,
                   progress: Optional[Callable[[float, str], None]] = None) -> dict:
    """``{"labels", "probabilities" (when asked), "space", "windows"}`` on the image grid.

    ``dtype``: the sliding window's accumulators; float16 as nnU-Net keeps them, which is what reproduces its
    output (measured on the parity test's model: float32 accumulators differ from nnU-Net by up to 0.17 in
    probability near the image corners, where nnU-Net's half-precision Gaussian weights are coarsest)."""
    x_np, space = nnunet_input(model, image, geometry)
    x = torch.from_numpy(x_np)[None].to(device)
    model.network.to(device)
    logits = nnunet_logits(model, x, tta, dtype, progress)
    spatial = tuple(x.shape[2:]) if len(model.inference["patch_size"]) == x.ndim - 2 else tuple(x.shape[3:])
    out = {"labels": labels_from_logits(logits, model, space), "space": space,
           "windows": window_count(spatial, model.inference["patch_size"], model.inference.get("step", 0.5))
           * (1 if len(spatial) == x.ndim - 2 else x.shape[2])}
    if probabilities:
        activation = "sigmoid" if model.activation == "sigmoid" else "softmax"
        out["probabilities"] = space.scores_to_image(lambda c: logits[0, c].float().numpy(), int(logits.shape[1]),
                                                     activation)
    return out
