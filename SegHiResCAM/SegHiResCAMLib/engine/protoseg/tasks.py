"""Small independent tasks on a few threads, and per-thread scratch buffers: the scheduling of ProtoSeg's scoring.

Scoring is many small, memory-bound operations. torch's intra-op threads split each of them and wait for one
another at its end (on a shared, busy machine: for the slowest); here each operation runs on one thread and the
threads take independent blocks (of channels, of voxels) from a queue. Results never depend on the number of
threads: blocks are fixed and sums are taken in block order.
"""

import threading
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Dict, List, Optional, Sequence, Tuple, TypeVar

import numpy as np
import torch

SCRATCH = 1 << 20  # elements of one temporary (4 MiB of float32): close to the processor's cache
T = TypeVar("T")


def project(act: torch.Tensor, weights: torch.Tensor, threads: int = 1) -> torch.Tensor:
    """``sum_k weights[b, k] act[b, k]``: ``act [B, K, *S]``, ``weights [B, K]`` -> ``[B, *S]``, by blocks of voxels
    (the same blocks, hence the same rounding, whatever ``threads``)."""
    flat, weights = act.flatten(2), weights.to(act.dtype)
    out = act.new_empty((act.shape[0], flat.shape[2]))
    cols = max(1, SCRATCH // act.shape[1])
    blocks = -(-flat.shape[2] // cols)

    def block(item: int) -> torch.Tensor:
        b, c0 = item // blocks, item % blocks * cols
        return torch.mv(flat[b, :, c0:c0 + cols].T, weights[b], out=out[b, c0:c0 + cols])
    run_tasks(block, range(act.shape[0] * blocks), threads)
    return out.view((act.shape[0],) + act.shape[2:])


def nonzero(mask: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """``mask.nonzero(as_tuple=True)`` of a 2-D boolean tensor (row-major order); numpy's on the CPU, several times
    faster than torch's."""
    if mask.device.type != "cpu":
        return mask.nonzero(as_tuple=True)
    array = mask.numpy()
    if array.shape[0] > 256:
        rows, cols = np.divmod(np.flatnonzero(array), array.shape[1])
        return torch.from_numpy(rows), torch.from_numpy(cols)
    parts = [np.flatnonzero(row) for row in array]
    rows = np.repeat(np.arange(len(parts)), [len(part) for part in parts])
    return torch.from_numpy(rows), torch.from_numpy(np.concatenate(parts) if parts else np.zeros(0, np.int64))


def run_tasks(fn: Callable[[int], T], items: Sequence[int], threads: int) -> List[T]:
    """``[fn(item) for item in items]`` on ``threads`` threads (this one included), each torch operation on its own
    thread: many small, memory-bound operations scale better so than with intra-op threads, which wait for one
    another (and for other processes on a busy machine)."""
    items = list(items)
    if threads <= 1 or len(items) <= 1:
        return [fn(item) for item in items]
    threads = min(threads, len(items))
    queue, results, lock = deque(enumerate(items)), [None] * len(items), threading.Lock()
    failed: List[BaseException] = []

    def work(worker: int) -> None:
        if worker:
            torch.set_num_threads(1)  # per thread (OpenMP): this thread's operations stay on it
        while not failed:
            with lock:
                if not queue:
                    return
                index, item = queue.popleft()
            try:
                results[index] = fn(item)
            except BaseException as exc:  # noqa: BLE001 - re-raised by the calling thread below
                failed.append(exc)
    futures = [_pool(threads - 1).submit(work, w) for w in range(1, threads)]
    work(0)
    for future in futures:
        future.result()
    if failed:
        raise failed[0]
    return results  # type: ignore[return-value]


_POOL: List[ThreadPoolExecutor] = []
_BUFFERS: Dict[Tuple[int, int], torch.Tensor] = {}


def scratch_buffer(slot: int, numel: int, like: torch.Tensor, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """A flat scratch tensor of ``numel`` elements (``like``'s device, ``dtype`` or its dtype), kept per thread and
    ``slot`` while :class:`OneThread` is entered: allocating a large temporary anew costs more than filling it (page
    faults)."""
    key, dtype = (threading.get_ident(), slot), dtype or like.dtype
    held = _BUFFERS.get(key)
    if held is None or held.numel() < numel or held.dtype != dtype or held.device != like.device:
        held = _BUFFERS[key] = like.new_empty(max(numel, held.numel() if held is not None else 0), dtype=dtype)
    return held[:numel]


def _pool(size: int) -> ThreadPoolExecutor:
    if not _POOL or _POOL[0]._max_workers < size:  # noqa: SLF001 - grow the shared pool when needed
        if _POOL:
            _POOL.pop().shutdown(wait=False)
        _POOL.append(ThreadPoolExecutor(max_workers=size, thread_name_prefix="protoseg"))
    return _POOL[0]


class OneThread:
    """Run torch on this thread only, then restore torch's setting (the tasks of :func:`run_tasks` parallelise)."""

    def __enter__(self) -> "OneThread":
        self.threads = torch.get_num_threads()
        torch.set_num_threads(1)
        return self

    def __exit__(self, *exc) -> None:
        torch.set_num_threads(self.threads)
        _BUFFERS.clear()
