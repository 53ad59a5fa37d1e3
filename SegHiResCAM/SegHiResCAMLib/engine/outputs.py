"""Running models: the main output of models that return several (deep supervision, dicts), failures turned into
one clear error, free memory, and the process settings that keep CPU passes fast (subnormal floats flushed to
zero; freed memory reused across a loop of passes)."""

import contextlib
import ctypes
import os
import threading
from typing import Any, Iterator, Optional

import torch

from torch import nn

from ..errors import InternalError, ModelError, SegHiResCAMError

#: dict keys tried, in order, when a model returns a dict and no key is given
PREFERRED_KEYS = ("out", "logits", "pred", "seg", "segmentation", "output")


def main_output(raw: Any, key: Optional[str] = None) -> torch.Tensor:
    """The full-resolution main output of a model.

    - a tensor is returned as is;
    - a tuple/list (deep supervision, e.g. nnU-Net, DynUNet): the element with the most voxels, the first one
      among equals (by convention the full-resolution head comes first);
    - a dict: ``raw[key]`` when ``key`` is given, else the first of :data:`PREFERRED_KEYS` present, else the
      tensor with the most voxels.

    Raises:
        ModelError: nothing tensor-like in the output, or an unknown key.
    """
    if torch.is_tensor(raw):
        return raw
    if isinstance(raw, dict):
        if key is not None:
            if key not in raw:
                raise ModelError("the model output has no key %r; its keys are: %s" % (key, ", ".join(map(str, raw))))
            return main_output(raw[key])
        for name in PREFERRED_KEYS:
            if name in raw and torch.is_tensor(raw[name]):
                return raw[name]
        values = [v for v in raw.values() if torch.is_tensor(v)]
    elif isinstance(raw, (list, tuple)):
        values = [v for v in raw if torch.is_tensor(v)]
    else:
        values = []
    if not values:
        raise ModelError("the model returned %s, which holds no output tensor; explainable models return a "
                         "tensor, or a tuple/list/dict of tensors" % type(raw).__name__)
    best = values[0]
    for value in values[1:]:
        if value.numel() > best.numel():
            best = value
    return best


def flush_denormals() -> bool:
    """Treat subnormal floats as zero (FTZ/DAZ) on this thread and on every torch thread started after it.

    Networks with near-dead units (HD-BET has channels with activations around 1e-37) feed subnormal values
    to the convolutions, which some processors compute 30x slower (measured here: HD-BET at 32^3 on one
    thread, 12.3 s without, 0.40 s with). Threads inherit the setting when they are created, so call this
    before the first parallel torch operation (the command line, the Slicer worker and the test suite do).
    Values below 1.2e-38 become 0; nothing a heatmap shows depends on them. Returns whether it is supported.
    """
    return bool(torch.set_flush_denormal(True))


#: glibc's ``mallopt`` parameters and their defaults (``man 3 mallopt``)
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4
_DEFAULT_TRIM_THRESHOLD, _DEFAULT_MMAP_MAX = 128 * 1024, 65536
#: set to ``system`` to keep the C library's allocation settings (:func:`reusing_freed_memory` then does nothing)
MALLOC_VARIABLE = "SEGHIRESCAM_MALLOC"
_reuse_lock = threading.Lock()
_reuse_depth = 0


def _glibc():
    """The process's GNU C library (``ctypes``), or ``None`` elsewhere (macOS, Windows, musl)."""
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # noqa: B018 - only glibc has it
        return libc
    except (OSError, AttributeError, TypeError):
        return None


@contextlib.contextmanager
def reusing_freed_memory() -> Iterator[bool]:
    """Within the block, the C library keeps freed memory for the next allocation instead of returning it to the
    system; on leaving, its settings are restored and the kept memory is returned (``malloc_trim``).

    For loops of same-sized forward passes on the CPU (deletion/insertion curves, model randomisation). glibc
    serves every allocation above 32 MiB (a 3D activation) with fresh pages from the system and returns them when
    freed, so each pass pays the kernel for zeroing its whole working set again: a quarter of the CPU time of an
    HD-BET forward pass on a 128x160x144 grid here. Kept memory makes the same deletion/insertion passes 1.27x
    faster (14.9 -> 11.7 s per pass on 2 threads, scores bit-identical; ``benchmarks/results/malloc.md``) for a
    peak resident set about 1.2x as large (2.5 -> 2.9-3.2 GB), as freed blocks are reused rather than merged.
    Yields whether it is in effect: only with glibc, and not when the environment variable ``SEGHIRESCAM_MALLOC``
    is ``system``. Nested and concurrent blocks share one setting, restored when the last one ends.
    """
    global _reuse_depth
    libc = None if os.environ.get(MALLOC_VARIABLE, "").strip().lower() == "system" else _glibc()
    if libc is None:
        yield False
        return
    with _reuse_lock:
        if _reuse_depth == 0:
            libc.mallopt(_M_MMAP_MAX, 0)
            libc.mallopt(_M_TRIM_THRESHOLD, 2 ** 31 - 1)
        _reuse_depth += 1
    try:
        yield True
    finally:
        with _reuse_lock:
            _reuse_depth -= 1
            if _reuse_depth == 0:
                libc.mallopt(_M_MMAP_MAX, _DEFAULT_MMAP_MAX)
                libc.mallopt(_M_TRIM_THRESHOLD, _DEFAULT_TRIM_THRESHOLD)
                libc.malloc_trim(0)


def run_model(model: nn.Module, x: torch.Tensor):
    """``model(x)`` with failures turned into one clear error: ModelError, or InternalError for memory."""
    try:
        return model(x)
    except SegHiResCAMError:
        raise
    except torch.cuda.OutOfMemoryError as exc:  # type: ignore[attr-defined]
        raise InternalError("out of memory on %s for an input of shape %s; run in smaller windows (--roi-size 96), "
                            "on a smaller image, or on the CPU (--device cpu)" % (x.device, tuple(x.shape))) from exc
    except (RuntimeError, ValueError, TypeError, IndexError) as exc:
        text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        if "out of memory" in text.lower():
            raise InternalError("out of memory for an input of shape %s; run in smaller windows (--roi-size 96), "
                                "on a smaller image, or on another device (--device cpu|cuda)"
                                % (tuple(x.shape),)) from exc
        raise ModelError("the model failed on an input of shape %s: %s" % (tuple(x.shape), text)) from exc


def available_bytes(device: torch.device) -> Optional[int]:
    """Memory free for a new run: free GPU memory on CUDA, ``MemAvailable`` of ``/proc/meminfo`` on the CPU;
    ``None`` where the platform does not say (callers pick their own fallback)."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None
