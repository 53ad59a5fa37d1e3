"""One function per (library, method): the same target, the way each library's documentation says to use it.

Each adapter takes ``(net, x, mask, layer)`` -- the network, the input ``[1, 1, *S]``, the target region
(boolean ``[*S]``) and a module name -- and returns ``(own, layer_map)``:

- ``own``: the library's own heatmap on the input grid (its own up-sampling and normalisation), float32 ``[*S]``;
- ``layer_map``: the map on the layer grid before up-sampling (signed where the library exposes it), used to
  compare every library after the *same* post-processing (ReLU, trilinear ``align_corners=False``, division by
  the maximum). Computing it is not timed where it needs extra work.

The explained scalar is the same everywhere: ``y = sum_{p in M} logit_1(p)`` with M the given mask. Libraries
that explain classification outputs (MONAI, Captum) get :class:`RegionSum`, a wrapper whose output ``[B, C]``
holds that sum for every class; pytorch-grad-cam takes the mask as a ``SemanticSegmentationTarget``; M3d-CAM
takes it as a class "discriminator" callable (its documented way to back-propagate masked logits).
"""

from typing import Callable, Dict, Optional, Tuple

import numpy as np
import torch
from torch import nn

Result = Tuple[np.ndarray, Optional[np.ndarray]]


class RegionSum(nn.Module):
    """``forward(x) -> [B, C]``: the logits of every class summed over the fixed mask M."""

    def __init__(self, net: nn.Module, mask: torch.Tensor):
        super().__init__()
        self.net = net
        self.register_buffer("mask", mask.to(torch.float32))

    def forward(self, x):
        out = self.net(x)
        return (out * self.mask).flatten(2).sum(2)


def module(net: nn.Module, name: str) -> nn.Module:
    return dict(net.named_modules())[name]


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().float().cpu().numpy()


# --- this project ------------------------------------------------------------------------------------------------

def ours(method: str, amp: bool = False) -> Callable[..., Result]:
    """``amp``: our ``--amp`` (bfloat16 autocast on a CPU that computes it natively; maps combined in float32):
    NOT the same arithmetic as the others, reported beside them."""
    def run(net, x, mask, layer):
        from SegHiResCAMLib.engine import MaskRegion, SegmentTarget, compute_cams
        res = compute_cams(net, x, [SegmentTarget(1, MaskRegion(mask))], layers=[layer], method=method,
                           autocast=amp)[0]
        return _np(res.map[0]), _np(res.raw[0])
    return run


def ours_windowed(method: str, roi: int, overlap: float, region_out: Optional[str] = None) -> Callable[..., Result]:
    """Sliding windows; the target is class 1 over the blended prediction's class-1 voxels (stored for others)."""
    def run(net, x, mask, layer):
        from SegHiResCAMLib.engine import SegmentTarget
        from SegHiResCAMLib.engine.windows import WindowedCAM
        cam = WindowedCAM(net, x, roi, [layer], overlap=overlap, blend="constant")
        res = cam.explain([SegmentTarget(1)], method)[0]
        if region_out:
            np.save(region_out, res.region[0].numpy())
        run.info = {"windows": res.options.get("windows"), "windows_run": res.options.get("windows_run"),
                    "target_voxels": int(res.region.sum())}
        return _np(res.map[0]), _np(res.raw[0])
    run.info = {}
    return run


# --- pytorch-grad-cam ------------------------------------------------------------------------------------------

def pytorch_grad_cam(method: str) -> Callable[..., Result]:
    """``HiResCAM`` / ``GradCAM`` with ``SemanticSegmentationTarget(1, mask)``.

    The target indexes ``model_output[category, :, :]`` and multiplies by the mask, which broadcasts over a 3D
    ``[D, H, W]`` output as it does over 2D; 5D inputs are handled by ``BaseCAM`` (3D branches, ``scipy.ndimage.zoom``
    with its default cubic spline to the input grid, min-max normalisation). No wrapper is needed.
    """
    def run(net, x, mask, layer):
        from pytorch_grad_cam import GradCAM, HiResCAM
        from pytorch_grad_cam.utils.model_targets import SemanticSegmentationTarget
        cls = HiResCAM if method == "hires" else GradCAM
        targets = [SemanticSegmentationTarget(1, mask.numpy().astype(np.float32))]
        target_layer = module(net, layer)
        with cls(model=net, target_layers=[target_layer]) as cam:
            own = cam(input_tensor=x, targets=targets)[0]
            # the library's own combination on its captured tensors, before ReLU/zoom (a few ms)
            layer_map = cam.get_cam_image(x, target_layer, targets, cam.activations_and_grads.activations[0].numpy(),
                                          cam.activations_and_grads.gradients[0].numpy(), False)[0]
        return np.asarray(own, dtype=np.float32), layer_map
    return run


# --- MONAI ----------------------------------------------------------------------------------------------------------

def monai_gradcam(net, x, mask, layer):
    """``monai.visualize.GradCAM`` on :class:`RegionSum`, class 1; ``__call__`` is ``compute_map`` followed by
    ``_upsample_and_post_process`` (trilinear, then MONAI's default normaliser, which maps max to 0 and min to 1:
    flipped back here before comparing)."""
    from monai.visualize import GradCAM
    cam = GradCAM(nn_module=RegionSum(net, mask), target_layers="net." + layer)
    layer_map = cam.compute_map(x, class_idx=1)
    own = cam._upsample_and_post_process(layer_map, x)
    return 1.0 - _np(own[0, 0]), _np(layer_map[0, 0])


# --- Captum -----------------------------------------------------------------------------------------------------------

def captum(method: str) -> Callable[..., Result]:
    """``LayerGradientXActivation`` (summed over channels: HiRes) or ``LayerGradCam`` on :class:`RegionSum`,
    target 1; up-sampled with ``LayerAttribution.interpolate(..., "trilinear")``, ReLU, division by the max."""
    def run(net, x, mask, layer):
        from captum.attr import LayerAttribution, LayerGradCam, LayerGradientXActivation
        wrapper = RegionSum(net, mask)
        if method == "hires":
            attr = LayerGradientXActivation(wrapper, module(wrapper, "net." + layer)).attribute(x, target=1)
            attr = attr.sum(1, keepdim=True)
        else:
            attr = LayerGradCam(wrapper, module(wrapper, "net." + layer)).attribute(x, target=1)
        up = torch.relu(LayerAttribution.interpolate(attr, tuple(x.shape[2:]), interpolate_mode="trilinear"))
        peak = up.max()
        own = up / peak if peak > 0 else up
        return _np(own[0, 0]), _np(attr[0, 0])
    return run


# --- M3d-CAM (medcam) -----------------------------------------------------------------------------------------------

_MEDCAM: Dict[int, nn.Module] = {}


def medcam_gradcam(net, x, mask, layer):
    """``medcam.inject(model, backend="gcam", layer=..., label=discriminator, return_attention=True)``; the
    discriminator returns the mask on channel 1, so ``logits.backward(gradient=mask)`` back-propagates exactly the
    region sum. M3d-CAM's first call also runs a "test run" (a second forward/backward); the warm-up absorbs it."""
    from medcam import medcam  # M3d-CAM documented import
    full = torch.zeros((1, 2) + tuple(mask.shape))
    full[0, 1] = mask.float()
    if id(net) not in _MEDCAM:  # inject once per network (a shallow copy sharing the modules)
        _MEDCAM[id(net)] = medcam.inject(net, backend="gcam", layer=layer, label=lambda out: full,
                                         return_attention=True)
    model = _MEDCAM[id(net)]
    model.medcam_dict["label"] = lambda out: full
    _, attention = model(x)
    return _np(attention[0, 0]), np.asarray(model.get_attention_map()[0, 0], dtype=np.float32)


# --- the floor: the model's own forward + backward ---------------------------------------------------------------

def forward_backward(net, x, mask, layer):
    """``loss = sum_M logit_1``; ``loss.backward()`` through the whole network into every weight."""
    net.zero_grad(set_to_none=True)
    out = net(x)
    loss = (out[:, 1] * mask.to(out.dtype)).sum()
    loss.backward()
    net.zero_grad(set_to_none=True)
    return None, None


def forward_only(net, x, mask, layer):
    with torch.no_grad():
        net(x)
    return None, None


#: (library, method) -> (label shown, adapter factory taking the case spec)
ADAPTERS: Dict[Tuple[str, str], Tuple[str, Callable]] = {
    ("ours", "hires"): ("SegHiResCAM seg-hires-grad-cam", lambda spec: ours("seg-hires-grad-cam")),
    ("ours", "grad"): ("SegHiResCAM seg-grad-cam", lambda spec: ours("seg-grad-cam")),
    ("ours-amp", "hires"): ("SegHiResCAM seg-hires-grad-cam --amp (bfloat16; not the same arithmetic)",
                            lambda spec: ours("seg-hires-grad-cam", amp=True)),
    ("pytorch-grad-cam", "hires"): ("pytorch-grad-cam HiResCAM", lambda spec: pytorch_grad_cam("hires")),
    ("pytorch-grad-cam", "grad"): ("pytorch-grad-cam GradCAM", lambda spec: pytorch_grad_cam("grad")),
    ("monai", "grad"): ("MONAI GradCAM + RegionSum", lambda spec: monai_gradcam),
    ("captum", "hires"): ("Captum LayerGradientXActivation + RegionSum", lambda spec: captum("hires")),
    ("captum", "grad"): ("Captum LayerGradCam + RegionSum", lambda spec: captum("grad")),
    ("medcam", "grad"): ("M3d-CAM gcam + mask discriminator", lambda spec: medcam_gradcam),
    ("floor", "fwd+bwd"): ("model forward + loss.backward()", lambda spec: forward_backward),
    ("floor", "fwd"): ("model forward (no_grad)", lambda spec: forward_only),
}

