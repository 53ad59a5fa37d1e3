"""Run a slow function on a worker thread while the Slicer main thread polls it (no Qt, no MRML here).

The module panel starts a :class:`BackgroundJob` for the engine step of the logic and polls it from a ``QTimer``
on the main thread, where it also applies the result to the scene (MRML is not thread-safe). A thread rather than
a child process: the engine spends its time inside torch operations, which release the GIL, so Slicer's event
loop keeps running; the model stays loaded between runs; and no second copy of the volume is pickled.

Cancelling is cooperative: the progress callback handed to the function raises
:class:`~SegHiResCAMLib.errors.CancelledError` at the next progress report after :meth:`BackgroundJob.cancel`;
the engine removes its hooks in ``finally`` and nothing is written.
"""

import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional

from ..errors import CancelledError

#: how long ``wait`` sleeps between polls, in seconds
_WAIT_STEP_S = 0.05


@dataclass
class JobStatus:
    """What :meth:`BackgroundJob.poll` reports: the latest progress and, once finished, the outcome."""

    fraction: float
    message: str
    finished: bool
    result: Any = None
    error: Optional[BaseException] = None

    @property
    def cancelled(self) -> bool:
        return isinstance(self.error, CancelledError)


class BackgroundJob:
    """``function(progress)`` on a daemon thread; :meth:`poll` from the main thread; :meth:`cancel` to stop.

    Example:
        >>> job = BackgroundJob(lambda progress: (progress(0.5, "half way"), 42)[1])
        >>> job.start().wait().result
        42
    """

    def __init__(self, function: Callable[[Callable[[float, str], None]], Any], name: str = "SegHiResCAM"):
        self._function = function
        self._name = name
        self._lock = threading.Lock()
        self._cancel = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._status = JobStatus(0.0, "waiting", False)
        self.started = 0.0

    def _progress(self, fraction: float, message: str) -> None:
        if self._cancel.is_set():
            raise CancelledError("cancelled by the user; nothing was written")
        with self._lock:
            self._status = JobStatus(float(fraction), str(message), False)

    def _run(self) -> None:
        try:
            result = self._function(self._progress)
            if self._cancel.is_set():  # cancelled after the last progress report: drop the result
                raise CancelledError("cancelled by the user; nothing was written")
            final = JobStatus(1.0, "done", True, result=result)
        except BaseException as exc:  # noqa: BLE001 - handed to the main thread, which reports it
            with self._lock:
                final = JobStatus(self._status.fraction, "cancelled" if isinstance(exc, CancelledError)
                                  else "failed", True, error=exc)
        with self._lock:
            self._status = final

    def start(self) -> "BackgroundJob":
        if self._thread is not None:
            raise RuntimeError("a BackgroundJob runs once; make a new one")
        self.started = time.perf_counter()
        self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
        self._thread.start()
        return self

    def cancel(self) -> None:
        """Ask the function to stop at its next progress report."""
        self._cancel.set()

    @property
    def cancelling(self) -> bool:
        return self._cancel.is_set()

    def poll(self) -> JobStatus:
        """The latest status (never blocks)."""
        with self._lock:
            return self._status

    def wait(self, timeout: Optional[float] = None) -> JobStatus:
        """Block until finished (tests and scripts; the panel polls instead)."""
        deadline = None if timeout is None else time.perf_counter() + timeout
        while not self.poll().finished:
            if deadline is not None and time.perf_counter() > deadline:
                break
            time.sleep(_WAIT_STEP_S)
        return self.poll()
