"""nnU-Net v2 trained-model folders: the network rebuilt from ``plans.json``, weights read without unpickling code.

A folder as ``nnUNetv2_train`` leaves it (``nnUNet_results/DatasetXXX/Trainer__Plans__Configuration``)::

    dataset.json  plans.json  fold_0/checkpoint_final.pth  [fold_1/ ... fold_all/]

What is read, following nnU-Net's own code (``nnunetv2/inference/predict_from_raw_data.py``,
``utilities/plans_handling/plans_handler.py``, ``utilities/get_network_from_plans.py``,
``utilities/label_handling/label_handling.py``, ``preprocessing/normalization/default_normalization_schemes.py``):

- the configuration (``configuration=``; else the one the checkpoint was trained with, ``init_args``; else the
  folder name's last part; else ``3d_fullres``), with ``inherits_from`` resolved;
- the network: ``architecture.network_class_name`` with ``arch_kwargs`` (the class must be in
  ``dynamic_network_architectures.architectures``; ``_kw_requires_import`` entries must name ``torch.nn`` or
  ``dynamic_network_architectures`` objects), built with deep supervision **off** as nnU-Net predicts; the old
  plans format (``UNet_class_name``, ``n_conv_per_stage_encoder``...) is converted as nnU-Net converts it;
- input channels: ``dataset.json`` ``channel_names``; outputs: one per label (softmax), or one per region
  (sigmoid) for region-based training (a label given as a list). The cascade's second stage (its input includes
  the first stage's segmentation) is refused;
- weights: ``network_weights`` of ``fold_N/checkpoint_final.pth``. nnU-Net saves numpy scalars in its
  checkpoints (``_best_ema``, the training log), which ``weights_only=True`` refuses. Only numpy's scalar,
  dtype and array reconstruction functions are allow-listed; anything else needs ``trust_model=True``;
- preprocessing: ``spacing`` and ``patch_size`` are in nnU-Net's array order ``(z, y, x)`` after
  ``transpose_forward``: converted to ITK order ``(x, y, z)`` for :class:`Preprocessing`, array order for
  ``patch_size``; normalisation per channel from ``normalization_schemes`` (``ZScoreNormalization`` ->
  ``zscore`` or, with ``use_mask_for_norm``, ``zscore-nonzero``; ``CTNormalization`` -> ``clip-zscore`` with the
  ``foreground_intensity_properties_per_channel`` percentiles, mean and std; ``NoNormalization``,
  ``RescaleTo01Normalization``, ``RGBTo01Normalization``); reorienting readers (``*WithReorient``) -> ``RAS``.
- ``transpose_forward``: nnU-Net transposes the array before the network and back after it. The same function
  is computed here *without* a transpose, so that layer grids stay aligned with the image for the CAM: the
  network is built with per-axis kernel sizes and strides permuted, and every convolution kernel's spatial axes
  permuted likewise (exact for networks of convolutions, norms, pooling and point-wise layers, which is checked).

Inference: the loader records nnU-Net's recipe in ``SegModel.inference`` (``framework: nnunet``: patch size,
spacing, the plans' data and logit resampling, step 0.5, the checkpoint's ``inference_allowed_mirroring_axes``
mapped to array axes, ``regions_class_order``), and prediction and explanation then follow nnU-Net
(``imaging/nnunet_space.py``: crop to non-zero, normalise, then nnU-Net's resampling; ``engine/sliding.py``:
Gaussian sliding window, mirroring; ``analysis/nnunet_predict.py``; measured against ``nnunetv2`` itself in
``Testing/unit/test_nnunet_parity.py``). The ``Preprocessing`` fields remain for provenance and for readers that
reorient (``*WithReorient``), which keep the generic path. Not done: the non-zero mask of ``zscore-nonzero``
has no hole filling.
"""

import importlib
import json
import os
import pickle
import pkgutil
import re
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from ...errors import ModelError
from ..base import Preprocessing, SegModel
from ..weights import TRUST_HINT, extract_state_dict, file_sha256, load_checkpoint, load_state_dict_into

CHECKPOINT = "checkpoint_final.pth"
DEFAULT_CONFIGURATION = "3d_fullres"
ARCH_PACKAGE = "dynamic_network_architectures.architectures"
IMPORT_PREFIXES = ("torch.nn.", "dynamic_network_architectures.")
OPTIONS = ("fold", "configuration", "checkpoint")

#: numpy globals nnU-Net checkpoints need: scalars, dtypes and plain arrays, under numpy 1 and numpy 2 names
_NUMPY_GLOBAL = re.compile(r"^numpy\.(?:_?core\.multiarray\.(?:scalar|_reconstruct)|dtype|ndarray|"
                           r"dtypes\.(?:Bool|U?Int\d+|Float\d+|Complex\d+|U?Byte|U?Short|U?Long|U?LongLong|Half|"
                           r"Double|LongDouble|Clongdouble|Cdouble|Cfloat|Float)DType)$")

#: module types through which a permutation of the spatial axes passes unchanged (see the module docstring)
_PERMUTABLE_TORCH = (nn.modules.conv._ConvNd, nn.modules.instancenorm._InstanceNorm, nn.modules.batchnorm._BatchNorm,
                     nn.GroupNorm, nn.Identity, nn.modules.dropout._DropoutNd, nn.Dropout,
                     nn.modules.pooling._AvgPoolNd, nn.modules.pooling._MaxPoolNd, nn.Sequential, nn.ModuleList)
_PERMUTABLE_DNA = ("simple_conv_blocks", "plain_conv_encoder", "unet_decoder", "residual", "residual_encoders",
                   "unet_residual_decoder", "regularization")

NORMALIZATION_SCHEMES = ("ZScoreNormalization", "CTNormalization", "NoNormalization", "RescaleTo01Normalization",
                         "RGBTo01Normalization")


def _read_json(path: str) -> Dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as handle:
            data = json.load(handle)
    except (OSError, ValueError) as exc:
        raise ModelError("cannot read %s: %s" % (path, exc)) from exc
    if not isinstance(data, dict):
        raise ModelError("%s is not a JSON object" % path)
    return data


def _folds(folder: str) -> List[str]:
    names = [n for n in os.listdir(folder) if re.fullmatch(r"fold_(\d+|all)", n)
             and os.path.isdir(os.path.join(folder, n))]
    return sorted(names, key=lambda n: (n == "fold_all", int(n[5:]) if n[5:].isdigit() else 0))


def fold_selection(folder: str, fold=None) -> List[str]:
    """The fold folders to load: ``fold`` = ``N``, ``"all"`` (nnU-Net's ``fold_all``), a list or comma-separated
    text of those (an ensemble), or ``"auto"`` (every ``fold_N`` present, as ``nnUNetv2_predict`` without ``-f``);
    default fold 0, else the first fold present."""
    folds = _folds(folder)
    if fold is None:
        return ["fold_0" if "fold_0" in folds else folds[0]]
    if fold == "auto":
        chosen = [f for f in folds if f != "fold_all"]
        if not chosen:
            raise ModelError("fold 'auto' takes every fold_N of %s; there is none (folds present: %s)"
                             % (folder, ", ".join(f[5:] for f in folds)))
        return chosen
    wanted = fold if isinstance(fold, (list, tuple)) else str(fold).split(",")
    names = ["fold_%s" % str(f).strip() for f in wanted]
    missing = [n for n in names if n not in folds]
    if missing or not names:
        raise ModelError("fold %r not found in %s; folds present: %s" % (fold, folder,
                                                                           ", ".join(f[5:] for f in folds)))
    return names


class FoldEnsemble(nn.Module):
    """Several folds' networks as one: the mean of their logits (nnU-Net averages the folds' logits; the
    sliding window and mirroring are linear, so averaging per window is the same)."""

    def __init__(self, networks: Sequence[nn.Module]):
        super().__init__()
        self.folds = nn.ModuleList(networks)

    def forward(self, x):
        out = self.folds[0](x)
        for network in self.folds[1:]:
            out = out + network(x)
        return out / len(self.folds)


def is_nnunet_folder(spec: str) -> bool:
    return (os.path.isdir(spec) and os.path.isfile(os.path.join(spec, "dataset.json"))
            and os.path.isfile(os.path.join(spec, "plans.json")) and bool(_folds(spec)))


# ----------------------------------------------------------------------------------------------- checkpoint

def _numpy_object(name: str):
    import numpy  # noqa: PLC0415
    module, _, attr = name.rpartition(".")
    if module in ("numpy.core.multiarray", "numpy._core.multiarray"):
        core = getattr(numpy, "_core", None) or numpy.core
        return getattr(core.multiarray, attr)
    if module == "numpy.dtypes":
        return getattr(importlib.import_module("numpy.dtypes"), attr)
    return getattr(numpy, attr)


def load_nnunet_checkpoint(path: str, trust_model: bool = False) -> Any:
    """An nnU-Net checkpoint dict: ``weights_only`` with numpy scalars/dtypes/arrays allowed, nothing else.

    Raises:
        ModelError: corrupt file, or other Python objects in it without ``trust_model``.
    """
    if not os.path.isfile(path):
        raise ModelError("checkpoint %r does not exist" % path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, AttributeError, TypeError, EOFError, OSError, ValueError) as exc:
        if "weights only load failed" not in str(exc).lower() and "unsupported global" not in str(exc).lower():
            return load_checkpoint(path, trust_model)  # the shared loader words the corrupt-file error
    finder = getattr(torch.serialization, "get_unsafe_globals_in_checkpoint", None)
    allow = getattr(torch.serialization, "safe_globals", None)
    if finder is None or allow is None:  # torch < 2.5: no scoped allow-list
        return load_checkpoint(path, trust_model)
    try:
        names = finder(path)
    except Exception:  # noqa: BLE001 - an unreadable file is the shared loader's error
        return load_checkpoint(path, trust_model)
    other = [n for n in names if not _NUMPY_GLOBAL.match(n)]
    if other:
        if trust_model:
            return load_checkpoint(path, trust_model=True)
        raise ModelError("%r holds Python objects beyond tensors and numpy numbers (%s); %s"
                         % (path, ", ".join(other[:5]), TRUST_HINT))
    try:
        objects = [(_numpy_object(n), n) for n in names]
    except (AttributeError, ImportError) as exc:
        raise ModelError("%r needs numpy objects %s that this numpy lacks" % (path, ", ".join(names))) from exc
    if "numpy.dtype" in names:  # numpy.dtype(...) builds instances of per-type classes (numpy.dtypes.Float64DType)
        import numpy  # noqa: PLC0415
        objects += [type(numpy.dtype(code)) for code in "?bBhHiIlLqQefdgFDG"]
    with allow(objects):
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except (pickle.UnpicklingError, RuntimeError, AttributeError, TypeError, EOFError, OSError) as exc:
            raise ModelError("cannot read the nnU-Net checkpoint %r: %s" % (path, str(exc).splitlines()[0])) from exc


# -------------------------------------------------------------------------------------------------- plans

def resolve_configuration(plans: Dict[str, Any], name: str, seen: Tuple[str, ...] = ()) -> Dict[str, Any]:
    """``plans["configurations"][name]`` with ``inherits_from`` applied (as nnU-Net's ``PlansManager``)."""
    configs = plans.get("configurations") or {}
    if name not in configs:
        raise ModelError("the plans have no configuration %r; available: %s" % (name, ", ".join(configs)))
    config = dict(configs[name])
    parent = config.get("inherits_from")
    if parent:
        if parent in seen + (name,):
            raise ModelError("configuration %r inherits from itself (via %s)" % (name, ", ".join(seen)))
        merged = resolve_configuration(plans, parent, seen + (name,))
        merged.update(config)
        config = merged
    return config


def architecture(config: Dict[str, Any]) -> Tuple[str, Dict[str, Any], List[str]]:
    """``(class name, arch_kwargs, _kw_requires_import)`` of a configuration; old plans converted as nnU-Net does."""
    if "architecture" in config:
        arch = config["architecture"]
        return arch["network_class_name"], dict(arch["arch_kwargs"]), list(arch.get("_kw_requires_import", []))
    if "UNet_class_name" not in config:
        raise ModelError("the configuration has neither 'architecture' nor 'UNet_class_name'")
    unet = config["UNet_class_name"]
    if unet not in ("PlainConvUNet", "ResidualEncoderUNet"):
        raise ModelError("old-format plans with UNet_class_name %r cannot be converted; only PlainConvUNet and "
                         "ResidualEncoderUNet (re-plan with a current nnU-Net)" % unet)
    stages = len(config["n_conv_per_stage_encoder"])
    dims = len(config["patch_size"])
    kwargs = {
        "n_stages": stages,
        "features_per_stage": [min(config["UNet_base_num_features"] * 2 ** i, config["unet_max_num_features"])
                               for i in range(stages)],
        "conv_op": "torch.nn.modules.conv.Conv%dd" % dims, "kernel_sizes": config["conv_kernel_sizes"],
        "strides": config["pool_op_kernel_sizes"],
        ("n_conv_per_stage" if unet == "PlainConvUNet" else "n_blocks_per_stage"): config["n_conv_per_stage_encoder"],
        "n_conv_per_stage_decoder": config["n_conv_per_stage_decoder"], "conv_bias": True,
        "norm_op": "torch.nn.modules.instancenorm.InstanceNorm%dd" % dims,
        "norm_op_kwargs": {"eps": 1e-05, "affine": True}, "dropout_op": None, "dropout_op_kwargs": None,
        "nonlin": "torch.nn.LeakyReLU", "nonlin_kwargs": {"inplace": True},
    }
    return "%s.unet.%s" % (ARCH_PACKAGE, unet), kwargs, ["conv_op", "norm_op", "dropout_op", "nonlin"]


def _locate(dotted: str, prefixes: Sequence[str] = IMPORT_PREFIXES, trust_model: bool = False):
    """The object at ``package.module.Name``, importing only from ``prefixes`` (unless trusted)."""
    if not trust_model and not any(dotted.startswith(p) for p in prefixes):
        raise ModelError("the plans name %r; only objects of %s are imported without --trust-model"
                         % (dotted, " or ".join(p.rstrip(".") for p in prefixes)))
    parts = dotted.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        try:
            for attr in parts[cut:]:
                obj = getattr(obj, attr)
            return obj
        except AttributeError:
            break
    return None


def network_class(name: str, trust_model: bool = False):
    """The architecture class; like nnU-Net, a moved class is searched by its last name in the package."""
    try:
        cls = _locate(name, (ARCH_PACKAGE + ".",), trust_model)
    except ModelError:
        raise ModelError("the plans ask for the network class %r; only classes of %s are built without "
                         "--trust-model" % (name, ARCH_PACKAGE)) from None
    if cls is None and name.startswith(ARCH_PACKAGE + "."):
        try:
            package = importlib.import_module(ARCH_PACKAGE)
        except ImportError as exc:
            raise ModelError("nnU-Net models need dynamic_network_architectures; install it with `pip install "
                             "dynamic-network-architectures`") from exc
        short = name.rsplit(".", 1)[-1]
        for info in pkgutil.iter_modules(package.__path__):
            try:
                module = importlib.import_module("%s.%s" % (ARCH_PACKAGE, info.name))
            except ImportError:
                continue
            cls = getattr(module, short, None)
            if cls is not None:
                break
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise ModelError("network class %r not found; is dynamic-network-architectures installed and recent "
                         "enough for these plans?" % name)
    return cls


def labels(dataset: Dict[str, Any]) -> Tuple[List[str], str, int, Optional[list]]:
    """``(class names, activation, output channels, regions_class_order)``, as nnU-Net's ``LabelManager``.

    Class ``i`` is output channel ``i`` (labels sorted by value); a single sigmoid region becomes
    ``["background", region]`` (SegHiResCAM's convention for one-channel sigmoid models)."""
    table = {k: v for k, v in (dataset.get("labels") or {}).items() if k != "ignore"}
    if "background" not in table:
        raise ModelError("dataset.json declares no 'background' label (nnU-Net requires label 0 = background)")
    regions = any(isinstance(v, (list, tuple)) and len(v) > 1 for v in table.values())
    if regions:
        names = [k for k, v in table.items()
                 if not (v == 0 or (isinstance(v, (list, tuple)) and set(int(i) for i in v) == {0}))]
        order = dataset.get("regions_class_order")
        return (["background"] + names if len(names) == 1 else names), "sigmoid", len(names), order
    by_value: Dict[int, str] = {}
    for name, value in table.items():
        value = int(value[0] if isinstance(value, (list, tuple)) else value)
        by_value.setdefault(value, name)
    return [by_value[v] for v in sorted(by_value)], "softmax", len(by_value), None


def _normalization(scheme: str, use_mask: bool, props: Dict[str, Any], channel: int) -> Preprocessing:
    if scheme == "ZScoreNormalization":
        return Preprocessing(normalization="zscore-nonzero" if use_mask else "zscore")
    if scheme == "CTNormalization":
        try:
            return Preprocessing(normalization="clip-zscore",
                                 intensity_range=(props["percentile_00_5"], props["percentile_99_5"]),
                                 mean_std=(props["mean"], props["std"]))
        except KeyError as exc:
            raise ModelError("CTNormalization of channel %d needs foreground_intensity_properties_per_channel "
                             "with %s in plans.json" % (channel, exc)) from exc
    if scheme == "NoNormalization":
        return Preprocessing()
    if scheme == "RescaleTo01Normalization":
        return Preprocessing(normalization="minmax")
    if scheme == "RGBTo01Normalization":
        return Preprocessing(normalization="range", intensity_range=(0.0, 255.0), clip=False)
    raise ModelError("normalization scheme %r of channel %d is not supported; supported: %s"
                     % (scheme, channel, ", ".join(NORMALIZATION_SCHEMES)))


def _permute(values, order: Sequence[int]):
    """``values`` per network axis -> per array axis: ``out[order[i]] = values[i]`` (scalars unchanged)."""
    if not isinstance(values, (list, tuple)):
        return values
    out = [None] * len(order)
    for i, axis in enumerate(order):
        out[axis] = values[i]
    return out


def axis_order(plans: Dict[str, Any], dims: int) -> List[int]:
    """``P``: network axis ``i`` is array axis ``P[i]`` (nnU-Net's ``transpose_forward``; 2D: the last two)."""
    forward = [int(a) for a in plans.get("transpose_forward", [0, 1, 2])]
    if sorted(forward) != list(range(len(forward))):
        raise ModelError("transpose_forward %s in plans.json is not a permutation" % (forward,))
    if dims == len(forward):
        return forward
    if dims == 2 and len(forward) == 3:
        if forward[0] != 0:
            raise ModelError("a 2d configuration with transpose_forward %s slices along another axis than the "
                             "first; this cannot run on 2D images" % (forward,))
        return [forward[1] - 1, forward[2] - 1]
    raise ModelError("transpose_forward %s does not fit a %dD configuration" % (forward, dims))


def _check_permutable(network: nn.Module) -> None:
    for name, module in network.named_modules():
        mod = type(module).__module__
        ok = (isinstance(module, _PERMUTABLE_TORCH) or mod.startswith("torch.nn.modules.activation")
              or mod == ARCH_PACKAGE + ".unet"
              or any(mod == "dynamic_network_architectures.building_blocks." + m for m in _PERMUTABLE_DNA))
        if not ok:
            raise ModelError("plans.json has transpose_forward that is not the identity and the network contains "
                             "%s (%s), through which the axes cannot be permuted exactly; not supported"
                             % (name or "the root", type(module).__name__))


def permute_weights(network: nn.Module, state: Dict[str, torch.Tensor],
                    order: Sequence[int]) -> Dict[str, torch.Tensor]:
    """Kernels trained on transposed arrays -> kernels for untransposed arrays (``order`` = ``axis_order``)."""
    inverse = [order.index(j) for j in range(len(order))]
    # remove_duplicate=False: nnU-Net networks register each convolution under several names (``conv`` and
    # ``all_modules.0``; the decoder holds the encoder), and every name is a key of the state dict
    convs = {n for n, m in network.named_modules(remove_duplicate=False) if isinstance(m, nn.modules.conv._ConvNd)}
    out = {}
    for key, value in state.items():
        owner = key.rsplit(".", 1)[0] if "." in key else ""
        if owner in convs and key.endswith("weight") and value.ndim == 2 + len(order):
            value = value.permute(0, 1, *[2 + i for i in inverse]).contiguous()
        out[key] = value
    return out


def _resampling(config: Dict[str, Any], key: str, default: Dict[str, Any]) -> Dict[str, Any]:
    """The plans' resampling of the data or of the logits: ``order``, ``order_z``, ``force_separate_z``."""
    name = config.get(key, "resample_data_or_seg_to_shape")
    if name not in ("resample_data_or_seg_to_shape", "resample_data_or_seg_to_spacing"):
        raise ModelError("the plans resample with %r (%s); only nnU-Net's default resample_data_or_seg_to_shape is "
                         "supported" % (name, key))
    kwargs = dict(default, force_separate_z=None)
    kwargs.update({k: v for k, v in (config.get(key + "_kwargs") or {}).items() if k != "is_seg"})
    return {k: kwargs[k] for k in ("order", "order_z", "force_separate_z")}


def _lcm(values) -> int:
    import math  # noqa: PLC0415
    out = 1
    for v in values:
        out = out * int(v) // math.gcd(out, int(v))
    return out


def _downsampling(strides, dims: int) -> List[int]:
    total = [1] * dims
    for s in strides:
        s = list(s) if isinstance(s, (list, tuple)) else [s] * dims
        total = [a * int(b) for a, b in zip(total, s)]
    return total


def _options(model_args, options: Dict[str, Any]) -> Dict[str, Any]:
    merged = {}
    if model_args:
        try:
            args = json.loads(model_args) if isinstance(model_args, str) else dict(model_args)
        except (ValueError, TypeError) as exc:
            raise ModelError("nnU-Net model arguments must be a JSON object such as '{\"fold\": 1}', got %r"
                             % (model_args,)) from exc
        if not isinstance(args, dict):
            raise ModelError("nnU-Net model arguments must be a JSON object, got %r" % (model_args,))
        merged.update(args)
    merged.update({k: v for k, v in options.items() if v is not None})
    unknown = sorted(set(merged) - set(OPTIONS))
    if unknown:
        raise ModelError("an nnU-Net model takes only the options %s, got %s"
                         % (", ".join(OPTIONS), ", ".join(unknown)))
    return merged


def load_nnunet(spec: str, weights: Optional[str] = None, trust_model: bool = False, fold=None,
                configuration: Optional[str] = None, checkpoint: Optional[str] = None, model_args=None,
                **options) -> SegModel:
    """An nnU-Net v2 trained-model folder as a :class:`SegModel` (see the module docstring).

    Args:
        spec: the folder (holding ``dataset.json``, ``plans.json``, ``fold_N/``).
        weights: another checkpoint file instead of ``fold_N/<checkpoint>``.
        trust_model: allow checkpoints with arbitrary pickled objects, and classes outside the allow-lists.
        fold: ``0``..``N``, ``"all"``, several (``"0,1,2"`` or a list: an ensemble, the mean of the folds'
            logits) or ``"auto"`` (every ``fold_N``); default fold 0, else the first fold present.
        configuration: e.g. ``3d_fullres``, ``2d``, ``3d_lowres``; default see the module docstring.
        checkpoint: file name inside the fold folder (default ``checkpoint_final.pth``).
        model_args: a dict (or JSON) with the same options (``--model-args '{"fold": 1}'``).
    """
    opts = _options(model_args, dict(options, fold=fold, configuration=configuration, checkpoint=checkpoint))
    folder = os.path.abspath(spec)
    dataset = _read_json(os.path.join(folder, "dataset.json"))
    plans = _read_json(os.path.join(folder, "plans.json"))
    fold_names = fold_selection(folder, opts.get("fold"))
    fold_name = fold_names[0] if len(fold_names) == 1 else "folds_%s" % "+".join(f[5:] for f in fold_names)
    name = opts.get("checkpoint", CHECKPOINT)
    if weights and len(fold_names) > 1:
        raise ModelError("weights= replaces one checkpoint; it cannot be combined with the fold ensemble %s"
                         % ", ".join(fold_names))
    paths = [os.path.abspath(weights)] if weights else [os.path.join(folder, f, name) for f in fold_names]
    for path in paths:
        if not os.path.isfile(path):
            present = sorted(f for f in os.listdir(os.path.dirname(path)) if f.endswith(".pth")) \
                if os.path.isdir(os.path.dirname(path)) else []
            raise ModelError("checkpoint %s does not exist%s" % (path, "; present: %s (choose one with checkpoint=)"
                                                                   % ", ".join(present) if present else ""))
    path = paths[0]
    ckpt = load_nnunet_checkpoint(path, trust_model)
    init_args = ckpt.get("init_args") if isinstance(ckpt, dict) and isinstance(ckpt.get("init_args"), dict) else {}
    parts = os.path.basename(folder).split("__")
    config_name = (opts.get("configuration") or init_args.get("configuration")
                   or (parts[2] if len(parts) == 3 else None) or DEFAULT_CONFIGURATION)
    config = resolve_configuration(plans, config_name)
    if config.get("previous_stage"):
        raise ModelError("configuration %r is the second stage of a cascade (its input includes the segmentation "
                         "of %r); explain %r or 3d_fullres instead" % (config_name, config["previous_stage"],
                                                                       config["previous_stage"]))
    class_name, kwargs, to_import = architecture(config)
    cls = network_class(class_name, trust_model)
    for key in to_import:
        if kwargs.get(key) is not None:
            located = _locate(kwargs[key], IMPORT_PREFIXES, trust_model)
            if located is None:
                raise ModelError("plans.json names %s = %r, which cannot be imported" % (key, kwargs[key]))
            kwargs[key] = located
    channel_names = dataset.get("channel_names") or dataset.get("modality") or {}
    in_channels = len(channel_names)
    class_names, activation, heads, region_order = labels(dataset)
    dims = len(config["patch_size"])
    order = axis_order(plans, dims)
    identity = order == sorted(order)
    if not identity:  # per-axis hyper-parameters follow the axes to the array order
        for key in ("kernel_sizes", "strides"):
            if key in kwargs:
                kwargs[key] = [_permute(v, order) for v in kwargs[key]]
    kwargs["deep_supervision"] = False
    networks = []
    for index, path in enumerate(paths):
        try:
            network = cls(input_channels=in_channels, num_classes=heads, **kwargs)
        except Exception as exc:  # noqa: BLE001 - the plans do not fit the class
            raise ModelError("cannot build %s from the plans (%s): %s" % (class_name, config_name, exc)) from exc
        state = extract_state_dict(ckpt if index == 0 else load_nnunet_checkpoint(path, trust_model), path)
        state = {k[len("_orig_mod."):] if k.startswith("_orig_mod.") else k: v for k, v in state.items()}
        if not identity:
            _check_permutable(network)
            state = permute_weights(network, state, order)
        load_state_dict_into(network, state, path)
        networks.append(network.eval())
    network = networks[0] if len(networks) == 1 else FoldEnsemble(networks).eval()
    spacing_array = _permute([float(s) for s in config["spacing"]], order)
    patch = tuple(int(p) for p in _permute(list(config["patch_size"]), order))
    props = plans.get("foreground_intensity_properties_per_channel") or \
        plans.get("foreground_intensity_properties_by_modality") or {}
    schemes = config.get("normalization_schemes") or ["NoNormalization"] * in_channels
    masks = config.get("use_mask_for_norm") or [False] * in_channels
    per_channel = [_normalization(s, bool(m), props.get(str(c), {}), c)
                   for c, (s, m) in enumerate(zip(schemes, masks))]
    if len(per_channel) != in_channels:
        raise ModelError("the plans give %d normalization schemes for %d input channels"
                         % (len(per_channel), in_channels))
    reorient = str(plans.get("image_reader_writer", "")).endswith("WithReorient") and dims == 3
    intensity = {} if in_channels > 1 else {
        k: getattr(per_channel[0], k) for k in ("normalization", "intensity_range", "output_range", "clip", "mean_std")}
    prep = Preprocessing(orientation="RAS" if reorient else None, spacing=tuple(spacing_array[::-1]),
                         divisible_by=_lcm(_downsampling(kwargs.get("strides", []), dims)),
                         pad_side="both", pad_value=0.0, min_size=patch,  # nnU-Net's pad_nd_image centres
                         channels=tuple(per_channel) if in_channels > 1 else None,
                         **intensity)
    mirror = ckpt.get("inference_allowed_mirroring_axes") if isinstance(ckpt, dict) else None
    inference = {
        "framework": "nnunet", "dims": dims, "configuration": config_name, "patch_size": list(patch),
        "spacing": [float(s) for s in spacing_array], "step": 0.5,
        "data_resampling": _resampling(config, "resampling_fn_data", {"order": 3, "order_z": 0}),
        "probability_resampling": _resampling(config, "resampling_fn_probabilities", {"order": 1, "order_z": 0}),
        # nnU-Net's mirror axes are axes of the transposed array: network axis i is array axis order[i]
        "mirror_axes": sorted(order[int(a)] for a in mirror if int(a) < dims) if mirror is not None
        else list(range(dims)),
        "regions_class_order": list(region_order) if region_order is not None else None,
    }
    trainer = ckpt.get("trainer_name", parts[0] if len(parts) == 3 else "unknown")
    source = "nnU-Net v2 %s, %s, configuration %s, %s (epoch %s), %s%s" % (
        plans.get("dataset_name", os.path.basename(os.path.dirname(folder))), trainer, config_name, fold_name,
        ckpt.get("current_epoch", "?"), path,
        "; regions_class_order %s" % (region_order,) if region_order is not None else "")
    return SegModel(network=network, name="nnunet:%s/%s" % (os.path.basename(folder), fold_name), spatial_dims=dims,
                    in_channels=in_channels, activation=activation, class_names=class_names, preprocessing=prep,
                    source=source, file_hashes={p: file_sha256(p) for p in paths}, patch_size=patch,
                    inference=inference)
