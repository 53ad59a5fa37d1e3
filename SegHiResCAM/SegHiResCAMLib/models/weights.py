"""Reading weight files safely: state dicts with ``weights_only=True``; pickled models only when trusted."""

import hashlib
import os
import pickle
from typing import Any, Dict, Optional

import torch
from torch import nn

from ..errors import ModelError

TRUST_HINT = ("a pickled model can run arbitrary code when it is loaded; pass --trust-model "
              "(trust_model=True in Python) only if you trust where the file came from")


def file_sha256(path: str, chunk: int = 1 << 20) -> str:
    """SHA-256 of a file (streamed), for provenance."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()


def _require_file(path: str, what: str = "weights file") -> None:
    if not os.path.isfile(path):
        raise ModelError("%s %r does not exist; check the path" % (what, path))


def load_checkpoint(path: str, trust_model: bool = False) -> Any:
    """``torch.load`` on CPU with ``weights_only=True``; a clear error for corrupt or pickled-object files.

    Args:
        path: the file.
        trust_model: allow full unpickling (``weights_only=False``) for files that hold model objects.
    """
    _require_file(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, AttributeError, TypeError) as exc:
        text = str(exc)
        # a file that holds pickled objects names the class it would import ("Unsupported global: GLOBAL x.y");
        # a corrupt file fails on an opcode or the zip structure instead
        unsafe = "unsupported global" in text.lower()
        if unsafe and trust_model:
            try:
                return torch.load(path, map_location="cpu", weights_only=False)
            except Exception as inner:  # noqa: BLE001 - any failure of an untrusted unpickle is a model error
                raise ModelError("cannot load %r even as a trusted pickle: %s" % (path, _first_line(inner))) from inner
        if unsafe:
            raise ModelError("%r holds pickled Python objects, not only tensors; %s" % (path, TRUST_HINT)) from exc
        raise ModelError("cannot read weights file %r (corrupt, truncated or not a PyTorch file): %s"
                         % (path, _first_line(exc))) from exc
    except (EOFError, OSError, ValueError, pickle.PickleError) as exc:
        raise ModelError("cannot read weights file %r (corrupt, truncated or not a PyTorch file): %s"
                         % (path, _first_line(exc))) from exc


def extract_state_dict(checkpoint: Any, path: str = "checkpoint") -> Dict[str, torch.Tensor]:
    """The state dict inside a checkpoint: the dict itself, or under ``state_dict``/``model``/``network_weights``,
    with a DataParallel ``module.`` prefix removed."""
    if isinstance(checkpoint, nn.Module):
        return checkpoint.state_dict()
    if not isinstance(checkpoint, dict):
        raise ModelError("%s holds a %s, not a state dict" % (path, type(checkpoint).__name__))
    for key in ("state_dict", "model", "network_weights", "model_state_dict", "net"):
        if key in checkpoint and isinstance(checkpoint[key], dict):
            checkpoint = checkpoint[key]
            break
    tensors = {k: v for k, v in checkpoint.items() if torch.is_tensor(v)}
    if not tensors:
        raise ModelError("%s holds no tensors; expected a state dict (name -> tensor)" % path)
    if all(k.startswith("module.") for k in tensors):
        tensors = {k[len("module."):]: v for k, v in tensors.items()}
    return tensors


def load_state_dict_into(network: nn.Module, state: Dict[str, torch.Tensor], path: str = "weights") -> None:
    """Strict ``load_state_dict`` with a readable message on mismatching names or shapes."""
    own = network.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    wrong = [k for k in own if k in state and tuple(own[k].shape) != tuple(state[k].shape)]
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append("missing %d (e.g. %s)" % (len(missing), ", ".join(missing[:3])))
        if unexpected:
            parts.append("unexpected %d (e.g. %s)" % (len(unexpected), ", ".join(unexpected[:3])))
        if wrong:
            k = wrong[0]
            parts.append("%d with other shapes (e.g. %s: file %s, network %s)"
                         % (len(wrong), k, tuple(state[k].shape), tuple(own[k].shape)))
        raise ModelError("the weights in %s do not fit the network: %s; check that the factory builds the "
                         "architecture these weights were trained with" % (path, "; ".join(parts)))
    network.load_state_dict(state, strict=True)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def maybe_hash(path: Optional[str]) -> Dict[str, str]:
    return {} if not path else {os.path.abspath(path): file_sha256(path)}


#: ``dtype: (integer dtype of the same width, exponent bits, fraction bits)``: subnormal = exponent 0, fraction not 0
_FLOAT_BITS = {torch.float16: (torch.int16, 0x7C00, 0x03FF), torch.bfloat16: (torch.int16, 0x7F80, 0x007F),
               torch.float32: (torch.int32, 0x7F800000, 0x007FFFFF),
               torch.float64: (torch.int64, 0x7FF0000000000000, 0x000FFFFFFFFFFFFF)}


def _subnormal(tensor: torch.Tensor) -> torch.Tensor:
    """Where ``tensor`` holds a subnormal number, read from its bits (a comparison would see zero wherever the
    processor treats subnormals as zero, as :func:`~SegHiResCAMLib.engine.outputs.flush_denormals` makes it)."""
    int_dtype, exponent, fraction = _FLOAT_BITS[tensor.dtype]
    bits = tensor.detach().contiguous().view(int_dtype)
    return ((bits & exponent) == 0) & ((bits & fraction) != 0)


def zero_subnormal_parameters(network: nn.Module) -> int:
    """Set every subnormal floating-point parameter and buffer of ``network`` to zero, in place; returns how many.

    Subnormal numbers (below ``torch.finfo(dtype).tiny`` in magnitude, e.g. 1e-44 in float32) can be many in a
    trained network: 45% of HD-BET's parameters are subnormal. Unless subnormals are treated as
    zero on every torch thread (:func:`~SegHiResCAMLib.engine.outputs.flush_denormals`, which a Python session
    may call too late), x86 CPUs take a slow path for them: HD-BET's forward pass ran 33x slower with them
    (``benchmarks/results/subnormal.md``). Their products with activations below ``1e8`` are below ``1e-30`` and
    vanish in any sum that is not itself that small, so the network's outputs stay the same (bit-identical in that
    benchmark)."""
    count = 0
    with torch.no_grad():
        for tensor in list(network.parameters()) + list(network.buffers()):
            if tensor.dtype not in _FLOAT_BITS:
                continue
            subnormal = _subnormal(tensor)
            found = int(subnormal.sum())
            if found:
                tensor.masked_fill_(subnormal.view(tensor.shape), 0.0)
                count += found
    return count
