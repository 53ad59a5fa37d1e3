"""TorchScript and ONNX model files, made explainable.

PyTorch refuses forward hooks on ``ScriptModule``s, and the engine explains a layer by hooking it. A loaded
TorchScript file is therefore wrapped in an *eager proxy* (:mod:`.scriptproxy`): a tree of ordinary
``nn.Module``s with the scripted module's hierarchy, dotted names and tensors, which runs its TorchScript graph
step by step so that forward hooks fire. This module checks and reads the files and registers the loaders.
Traced and scripted files work. Frozen files (``torch.jit.freeze``) have no sub-modules left: they run, but
have no layer to explain.

TorchScript archives hold TorchScript code and tensors; loading one runs only TorchScript operators, never
arbitrary Python, so it needs no ``--trust-model`` (that flag only concerns a ``--weights`` file given with it).

ONNX files are converted to an eager ``torch.fx.GraphModule`` with onnx2torch (optional; see :func:`load_onnx`).
"""

import dataclasses
import importlib.util
import os
import re
import sys
import types
import zipfile
from typing import Callable, Dict, Optional, Tuple

import torch
from torch import nn

from ...errors import ModelError
from ..base import Preprocessing, SegModel, default_class_names, infer_in_channels, infer_out_channels, infer_spatial_dims
from ..weights import extract_state_dict, file_sha256, load_checkpoint, load_state_dict_into, maybe_hash
# the proxy machinery, re-exported: callers import these names from this module
from .proxy import ScriptProxy, Step, script_to_eager, torchscript_layers  # noqa: F401

TORCHSCRIPT_SUFFIXES = (".pt", ".pth", ".ts", ".torchscript")
_CONV = re.compile(r"^Conv(Transpose)?([123])d$")


# --------------------------------------------------------------------------------------------- files
def _archive_state(path: str) -> str:
    """``torchscript``, ``zip`` (another zip, e.g. a state dict), ``pickle`` (legacy torch.save) or ``damaged``."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(4)
        if not zipfile.is_zipfile(path):
            return "pickle" if head[:1] == b"\x80" else "damaged"
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except (OSError, zipfile.BadZipFile, ValueError):
        return "damaged"
    for name in names:
        parts = name.split("/")
        if "code" in parts[:2] or parts[-1] == "constants.pkl":
            return "torchscript"
    return "zip"


def jit_load(path: str):
    """``torch.jit.load(path, map_location="cpu")``, also returning the compilation unit that holds the file's
    free functions (as torch.jit.load does internally; plain torch.jit.load and ``None`` where this PyTorch's
    internals differ)."""
    try:  # torch.jit.load's own steps (torch/jit/_serialization.py), private API: guarded
        from torch.jit._recursive import wrap_cpp_module
        importer = torch._C.import_ir_module
    except (ImportError, AttributeError):
        importer = None
    for extra in ([False], []) if importer is not None else ():  # the trailing restore_shapes came in 2.x
        functions = torch._C.CompilationUnit()
        try:
            return wrap_cpp_module(importer(functions, path, torch.device("cpu"), {}, *extra)), functions
        except TypeError:  # another signature in this PyTorch version
            continue
    return torch.jit.load(path, map_location="cpu"), None


def _suffixed_path(spec) -> Optional[str]:
    try:
        spec = os.fspath(spec)
    except TypeError:
        return None
    return spec if isinstance(spec, str) and spec.lower().endswith(TORCHSCRIPT_SUFFIXES) else None


def is_torchscript_file(spec) -> bool:
    """A ``.pt``/``.pth``/``.ts``/``.torchscript`` file that is a TorchScript archive (a zip with ``code/`` or
    ``constants.pkl``; checked with zipfile, nothing is unpickled)."""
    path = _suffixed_path(spec)
    return path is not None and os.path.isfile(path) and _archive_state(path) == "torchscript"


def accepts_torchscript_spec(spec) -> bool:
    """What the ``torchscript`` loader takes: any path with a TorchScript suffix that is not a folder, so that a
    missing, damaged or non-TorchScript ``.pt`` file gets a clear message from :func:`load_torchscript`."""
    path = _suffixed_path(spec)
    return path is not None and not os.path.isdir(path)


def _conv_geometry(network: nn.Module) -> Tuple[Optional[int], Optional[int], Optional[int]]:
    """(spatial dims, input channels, output channels) from the first and last convolution proxies."""
    convs = []
    for module in network.modules():
        match = _CONV.match(type(module).__name__)
        weight = getattr(module, "_parameters", {}).get("weight")
        if isinstance(module, ScriptProxy) and match and weight is not None:
            groups = getattr(module._ts_script, "groups", 1)  # scripted modules keep it; traced ones do not
            convs.append((bool(match.group(1)), int(match.group(2)), weight, int(groups)))
    if not convs:
        return None, None, None
    transposed, dims, weight, groups = convs[0]
    channels = weight.shape[0] if transposed else weight.shape[1] * groups
    transposed, _, weight, groups = convs[-1]
    classes = weight.shape[1] * groups if transposed else weight.shape[0]
    return dims, int(channels), int(classes)


def _segmodel(network: nn.Module, path: str, name: Optional[str], source: str, hashes: dict, meta: dict) -> SegModel:
    allowed = sorted({f.name for f in dataclasses.fields(SegModel)} - {"network", "name", "source", "file_hashes"})
    unknown = sorted(set(meta) - set(allowed))
    if unknown:
        raise ModelError("option(s) %s do not apply to the model file %r (model arguments are for "
                         "package.module:factory models; a model file holds a built network); allowed: %s"
                         % (", ".join(unknown), path, ", ".join(allowed)))
    dims, channels, classes = _conv_geometry(network)
    dims = dims or infer_spatial_dims(network)
    channels = channels or infer_in_channels(network)
    classes = classes or infer_out_channels(network) or 2
    activation = meta.pop("activation", "sigmoid" if classes == 1 else "softmax")
    class_names = meta.pop("class_names", ["background", "foreground"] if classes == 1 else default_class_names(classes))
    return SegModel(network=network, name=name or path, spatial_dims=meta.pop("spatial_dims", dims or 3),
                    in_channels=meta.pop("in_channels", channels or 1), activation=activation, class_names=class_names,
                    preprocessing=meta.pop("preprocessing", Preprocessing(divisible_by="auto")), source=source, file_hashes=hashes,
                    **meta)


def load_torchscript(path: str, weights: Optional[str] = None, trust_model: bool = False, name: Optional[str] = None,
                     interpret: bool = True, **meta) -> SegModel:
    """Load a TorchScript file (traced or scripted) as an explainable eager model.

    The file is read with ``torch.jit.load(path, map_location="cpu")`` and wrapped by :func:`script_to_eager`:
    layer names are the original module names; :func:`torchscript_layers` lists which can be explained.
    A TorchScript archive executes only TorchScript operators, not arbitrary Python, so it needs no
    ``trust_model``.

    Args:
        path: the ``.pt``/``.pth``/``.ts``/``.torchscript`` file.
        weights: optional state dict (read with ``weights_only=True``) loaded into the model; names as in
            ``state_dict()`` of the original eager model.
        trust_model: allow a ``weights`` file that holds pickled objects (see ``weights.load_checkpoint``).
        name: model id for provenance; defaults to the path.
        interpret: ``False`` runs the file as one opaque call (predictions only, no layer to explain).
        **meta: :class:`SegModel` fields (``activation``, ``class_names``, ``preprocessing``, ``default_layer``...).

    Example::

        torch.jit.trace(net.eval(), x).save("unet.pt")
        model = load_model("unet.pt")                 # model.network.named_modules() == net.named_modules()
        explain(model.network, x, SegmentTarget(1), layer="dec")
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ModelError("TorchScript file %r does not exist; check the path" % path)
    state = _archive_state(path)
    if state == "pickle":
        raise ModelError("%r is a pickled file, not a TorchScript archive; for a state dict use --model "
                         "package.module:factory --weights %s" % (path, path))
    if state == "zip":
        raise ModelError("%r is a zip archive without TorchScript code (a state dict saved with torch.save?); "
                         "use --model package.module:factory --weights %s, or save the model with "
                         "torch.jit.trace(...).save()" % (path, path))
    if state == "damaged":
        raise ModelError("%r is not a readable TorchScript archive (truncated or damaged; not a zip file); "
                         "copy or export it again" % path)
    try:
        script, functions = jit_load(path)
    except Exception as exc:  # noqa: BLE001 - any failure of the TorchScript reader means an unusable file
        text = str(exc).strip().splitlines()
        raise ModelError("cannot load TorchScript file %r (damaged, or saved by a newer PyTorch than %s?): %s"
                         % (path, torch.__version__, text[0] if text else type(exc).__name__)) from exc
    network = script_to_eager(script, interpret=interpret, functions=functions)
    if weights:
        load_state_dict_into(network, extract_state_dict(load_checkpoint(weights, trust_model), weights), weights)
    network.eval()
    rows = torchscript_layers(network)
    opaque = ["%s (%s)" % (row["name"], row["note"]) for row in rows if row["mode"] == "opaque" and row["hookable"]]
    if network._ts_mode == "opaque":
        opaque.insert(0, "<root> (%s)" % network._ts_note)
    summary = "%d of %d layers explainable%s" % (sum(r["hookable"] for r in rows), len(rows),
                                                 "; opaque: " + ", ".join(opaque) if opaque else "")
    hashes = {os.path.abspath(path): file_sha256(path)}
    hashes.update(maybe_hash(weights))
    source = "torchscript %s%s [%s]" % (path, " + %s" % weights if weights else "", summary)
    return _segmodel(network, path, name, source, hashes, meta)


# --------------------------------------------------------------------------------------------- ONNX
ONNX_HINT = ("ONNX files are converted to PyTorch by the optional onnx2torch package: pip install onnx onnx2torch "
             "(in Slicer: slicer.util.pip_install('onnx onnx2torch')); where pip would pull a torchvision that does "
             "not match the installed torch (e.g. a CPU-only torch), use pip install onnx and pip install --no-deps "
             "onnx2torch. Or export the network to TorchScript (torch.jit.trace(net, x).save('net.pt')) instead")


def is_onnx_file(spec) -> bool:
    """A path ending in ``.onnx``."""
    try:
        return os.fspath(spec).lower().endswith(".onnx")
    except TypeError:
        return False


def _torchvision_placeholder() -> Dict[str, types.ModuleType]:
    """Stand-ins for the torchvision functions onnx2torch imports at import time (only its NonMaxSuppression and
    RoiAlign converters use them; segmentation networks need neither)."""
    def missing(*args, **kwargs):
        raise ModelError("this ONNX model uses NonMaxSuppression/RoiAlign, which need torchvision; install a "
                         "torchvision that matches your torch")
    package, ops = types.ModuleType("torchvision"), types.ModuleType("torchvision.ops")
    for attr in ("nms", "batched_nms", "box_convert", "roi_align", "roi_pool", "deform_conv2d"):
        setattr(ops, attr, missing)
    package.ops = ops
    return {"torchvision": package, "torchvision.ops": ops}


def _onnx2torch_convert() -> Callable:
    """``onnx2torch.convert``. onnx2torch imports torchvision at import time, and PyPI's torchvision does not load
    beside every torch build (a CPU-only torch: "operator torchvision::nms does not exist"). Where torchvision
    cannot be imported, onnx2torch is imported against :func:`_torchvision_placeholder` (removed from
    ``sys.modules`` right after), so that ``pip install --no-deps onnx2torch`` is enough for segmentation models."""
    for module in ("onnx", "onnx2torch"):
        if importlib.util.find_spec(module) is None:
            raise ModelError("cannot read ONNX files: the %s package is not installed. %s" % (module, ONNX_HINT))
    try:
        import onnx2torch
        return onnx2torch.convert
    except Exception as first:  # noqa: BLE001 - see below
        try:
            import torchvision  # noqa: F401
        except Exception:  # noqa: BLE001 - missing, or built for another torch ("torchvision::nms does not exist")
            saved = {name: sys.modules.get(name) for name in ("torchvision", "torchvision.ops")}
            sys.modules.update(_torchvision_placeholder())
            try:
                import onnx2torch
                return onnx2torch.convert
            except Exception as exc:  # noqa: BLE001
                raise ModelError("cannot import onnx2torch: %s. %s" % (exc, ONNX_HINT)) from exc
            finally:
                for name, module in saved.items():
                    if module is None:
                        sys.modules.pop(name, None)
                    else:
                        sys.modules[name] = module
        raise ModelError("cannot import onnx2torch: %s. %s" % (first, ONNX_HINT)) from first


def load_onnx(path: str, weights: Optional[str] = None, trust_model: bool = False, name: Optional[str] = None,
              **meta) -> SegModel:
    """Load an ONNX file as an eager ``torch.fx.GraphModule`` converted by onnx2torch (optional dependency).

    Layer names are onnx2torch's module names (from the ONNX node names, e.g. ``dec/dec/1/Relu``). ``weights``
    does not apply (an ONNX file holds its weights). ``**meta`` as in :func:`load_torchscript`.

    Raises:
        ModelError: missing file; onnx2torch not installed (the message says how to install it); an operator or
            opset onnx2torch cannot convert.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ModelError("ONNX file %r does not exist; check the path" % path)
    if weights:
        raise ModelError("--weights does not apply to ONNX files (%r holds its own weights); leave it out" % path)
    convert = _onnx2torch_convert()
    try:
        network = convert(path)
    except Exception as exc:  # noqa: BLE001 - any converter failure means this file cannot be used
        text = str(exc).strip().splitlines()
        raise ModelError("onnx2torch cannot convert %r: %s; re-export it with an older opset (e.g. "
                         "torch.onnx.export(..., opset_version=17)) or as TorchScript"
                         % (path, text[0] if text else type(exc).__name__)) from exc
    network.eval()
    return _segmodel(network, path, name, "onnx %s (converted by onnx2torch)" % path,
                     {os.path.abspath(path): file_sha256(path)}, meta)
