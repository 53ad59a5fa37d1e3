"""Run the slow engine step off Slicer's main thread while the main thread polls it (no Qt, no MRML here).

The module panel hands a job -- a method of :class:`~.compute.ComputeLogic` and its plain-data arguments -- to a
:class:`JobRunner` and polls the returned job on the main thread -- at its ``QTimer`` ticks, and at once when the
job's socket (:meth:`ProcessJob.fileno`) turns readable, through a ``QSocketNotifier`` -- where it also applies the
result to the scene (MRML is not thread-safe). Two runners:

- :class:`ProcessRunner` (the panel's): the persistent worker process of :mod:`.worker`. PythonQt holds the GIL
  while Slicer's main thread idles in the Qt event loop, so a Python thread in Slicer's process crawls; a child
  process does not care. The child keeps the loaded model and the last forward pass between jobs, receives the
  request and returns the result as pickle files (arrays + geometry + strings), streams progress and log lines
  over a localhost socket that the main thread reads without blocking, and is killed to cancel (control is back
  at once; the next job starts a fresh child). A child that dies gives one clear error, never a hang.
- :class:`ThreadRunner`: :class:`BackgroundJob`, a Python thread in this process (scripts, tests). Cancelling it
  is cooperative: the progress callback raises :class:`~SegHiResCAMLib.errors.CancelledError` at the next report
  after :meth:`BackgroundJob.cancel`; the engine removes its hooks in ``finally`` and nothing is written.
"""

import atexit
import logging
import os
import pickle
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import weakref
from dataclasses import dataclass
from typing import Any, Callable, List, Optional, Protocol

from ..errors import CancelledError, InternalError
from . import worker as wire

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
        with self._lock:  # a Cancel that came while the result was being made drops it (see cancel())
            if self._cancel.is_set() and final.error is None:
                final = JobStatus(final.fraction, "cancelled", True,
                                  error=CancelledError("cancelled by the user; nothing was written"))
            self._status = final

    def start(self) -> "BackgroundJob":
        if self._thread is not None:
            raise RuntimeError("a BackgroundJob runs once; make a new one")
        self.started = time.perf_counter()
        self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
        self._thread.start()
        return self

    def cancel(self) -> None:
        """Ask the function to stop at its next progress report. A result that is ready but not yet taken by
        the main thread is dropped: after Cancel nothing reaches the scene, however the race between the
        worker finishing and the click goes."""
        with self._lock:
            self._cancel.set()
            if self._status.finished and self._status.error is None:
                self._status = JobStatus(self._status.fraction, "cancelled", True,
                                         error=CancelledError("cancelled by the user; nothing was written"))

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


# ---------------------------------------------------------------------------------------------- runners
class Job(Protocol):
    """What the panel polls: :class:`BackgroundJob` or :class:`ProcessJob`."""

    def poll(self) -> JobStatus: ...

    def cancel(self) -> None: ...

    def wait(self, timeout: Optional[float] = None) -> JobStatus: ...


class JobRunner(Protocol):
    """Where the panel's jobs run: ``submit("compute", request)`` returns a started :class:`Job`."""

    def submit(self, method: str, *args) -> Job: ...

    def close(self) -> None: ...


class ThreadRunner:
    """Jobs on a Python thread of this process (:class:`BackgroundJob`) with ``logic.runJob``."""

    def __init__(self, logic):
        self.logic = logic

    def submit(self, method: str, *args) -> BackgroundJob:
        return BackgroundJob(lambda progress: self.logic.runJob(method, args, progress)).start()

    def close(self) -> None:
        pass


def pythonExecutable() -> str:
    """The Python for the worker: ``PythonSlicer`` next to the Slicer application, else this interpreter."""
    return shutil.which("PythonSlicer") or sys.executable


def childEnvironment() -> dict:
    """The environment of the worker: Slicer's startup environment inside Slicer (as
    ``slicer.util.launchConsoleProcess`` uses), else this process's."""
    if shutil.which("PythonSlicer"):
        try:
            import slicer.util
            return dict(slicer.util.startupEnvironment())
        except Exception:  # noqa: BLE001 - an older Slicer, or slicer not importable: the current environment
            pass
    return dict(os.environ)


#: every worker process started and not yet stopped, killed when Slicer exits
LIVE_WORKERS: "weakref.WeakSet" = weakref.WeakSet()


class WorkerProcess:
    """The persistent child of :mod:`.worker`, seen from the main thread; nothing here ever blocks for long.

    :meth:`start` listens on a localhost port and launches the child, which connects back; :meth:`pump` (called by
    the jobs' ``poll``) accepts it, checks its token, and returns the messages that have arrived. :meth:`kill`
    ends it at once (Cancel). ``python`` defaults to :func:`pythonExecutable`.
    """

    def __init__(self, python: Optional[str] = None, startTimeout: float = 300.0):
        self.python = python or pythonExecutable()
        self.startTimeout = startTimeout
        self.process: Optional[subprocess.Popen] = None
        self.folder = None
        self.listener = self.connection = self.reader = None
        self.token = secrets.token_hex(16)
        self.outbox: List[bytes] = []
        self.started = 0.0
        self.pid = None
        self.jobs = 0

    def start(self) -> "WorkerProcess":
        self.folder = tempfile.mkdtemp(prefix="SegHiResCAM-worker-")
        self.listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(1)
        library = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        code = ("import sys; sys.path.insert(0, %r); from SegHiResCAMLib.slicer_logic.worker import main; "
                "sys.exit(main())" % library)
        env = childEnvironment()
        env[wire.TOKEN_VARIABLE] = self.token
        env["PYTHONUNBUFFERED"] = "1"
        self.log = open(os.path.join(self.folder, "worker.log"), "wb")
        flags = getattr(subprocess, "CREATE_NO_WINDOW", 0) if os.name == "nt" else 0
        self.process = subprocess.Popen([self.python, "-c", code, "127.0.0.1", str(self.listener.getsockname()[1])],
                                        stdin=subprocess.DEVNULL, stdout=self.log, stderr=subprocess.STDOUT,
                                        env=env, creationflags=flags)
        self.started = time.perf_counter()
        LIVE_WORKERS.add(self)
        threads = sys.modules["torch"].get_num_threads() if "torch" in sys.modules else 0
        self.outbox.insert(0, wire.encode(("setup", {"path": list(sys.path), "threads": threads,
                                                     "logLevel": logging.getLogger().getEffectiveLevel()})))
        return self

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None and not (self.reader and self.reader.closed)

    def send(self, message) -> None:
        """Send now if the child is connected, else as soon as it is."""
        self.outbox.append(wire.encode(message))
        self.flush()

    def flush(self) -> None:
        try:
            while self.connection is not None and self.outbox:
                self.connection.sendall(self.outbox[0])
                self.outbox.pop(0)
        except OSError:  # the child has gone: poll() reports it
            self.reader.closed = True

    def pump(self) -> list:
        """Accept the child if it has connected, send what waits, return the messages that have arrived."""
        import select
        if self.connection is None and self.listener is not None:
            while select.select([self.listener], [], [], 0)[0]:
                sock, _ = self.listener.accept()
                hello = wire.receive(sock) if select.select([sock], [], [], 5.0)[0] else None
                if hello and hello[0] == "hello" and secrets.compare_digest(str(hello[1]), self.token):
                    self.connection, self.reader, self.pid = sock, wire.MessageReader(sock), hello[2]
                    self.listener.close()
                    self.listener = None
                    break
                sock.close()  # not our child
            if self.connection is None and time.perf_counter() - self.started > self.startTimeout:
                raise InternalError("the computation process did not start within %d s; Python: %s%s"
                                    % (self.startTimeout, self.python, self.lastOutput()))
        if self.connection is None:
            return []
        self.flush()
        return self.reader.read()

    def fileno(self) -> Optional[int]:
        """The socket that turns readable when something arrives from the child (its connection, or before it has
        connected the listening socket): what an event loop watches to :meth:`pump` at once instead of at its next
        timer tick (the panel's ``QSocketNotifier``); ``None`` when there is none."""
        sock = self.connection if self.connection is not None else self.listener
        return sock.fileno() if sock is not None else None

    def lastOutput(self, lines: int = 15) -> str:
        """The end of the child's own output (stdout/stderr), for error messages."""
        try:
            with open(os.path.join(self.folder, "worker.log"), "rb") as stream:
                text = stream.read()[-8000:].decode("utf-8", "replace").strip().splitlines()[-lines:]
        except OSError:
            return ""
        return ("\nLast output of the process:\n" + "\n".join(text)) if text else ""

    def kill(self) -> None:
        """End the child now (Cancel, or Slicer exits) and remove its files."""
        for sock in (self.connection, self.listener):
            if sock is not None:
                sock.close()
        self.connection = self.listener = None
        if self.reader is not None:
            self.reader.closed = True
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            try:
                self.process.wait(timeout=1.5)
            except subprocess.TimeoutExpired:
                pass
        if getattr(self, "log", None) is not None:
            self.log.close()
        LIVE_WORKERS.discard(self)

    def close(self) -> None:
        self.kill()
        if self.folder:
            shutil.rmtree(self.folder, ignore_errors=True)

    def diedMessage(self) -> str:
        code = self.process.poll() if self.process is not None else None
        if code is None and self.process is not None:  # the connection broke first: give it a moment to exit
            try:
                code = self.process.wait(timeout=1.0)
            except subprocess.TimeoutExpired:
                code = None
        how = ("was killed (signal %d; out of memory?)" % -code if code is not None and code < 0
               else "exited with code %s" % code if code is not None else "closed its connection")
        return ("The computation process stopped unexpectedly: it %s. Nothing was added to the scene; the next run "
                "starts a new process.%s" % (how, self.lastOutput()))


def reemitLog(message) -> None:
    """A ``("log", level, logger name, text, origin)`` message of the worker as a record of this process's
    ``logging``: the worker's logger name, level and text (marked ``[worker]``), where it was logged (file, line,
    function, time, process id); Slicer shows it in its Python console and log like any record of the module."""
    levelno, name, text = message[1:4]
    logger = logging.getLogger(name or "SegHiResCAM")
    if logger.isEnabledFor(levelno):
        origin = message[4] if len(message) > 4 else {}
        logger.handle(logging.makeLogRecord(dict(origin, name=logger.name, levelno=levelno, args=None,
                                                 levelname=logging.getLevelName(levelno), msg="[worker] %s" % text)))


class RemoteTraceback(Exception):
    """The traceback of an error in the worker process (the ``__cause__`` of the error it raised)."""

    def __str__(self) -> str:
        return "\n\n" + str(self.args[0])


class ProcessJob:
    """One job in a :class:`WorkerProcess`; the same ``poll`` / ``cancel`` / ``wait`` as :class:`BackgroundJob`."""

    def __init__(self, worker: WorkerProcess, method: str, args: tuple):
        self.worker = worker
        self.method, self.args = method, args
        self.id = worker.jobs = worker.jobs + 1
        self._status = JobStatus(0.0, "waiting", False)
        self._cancelled = False
        self.started = 0.0
        self.requestFile = None

    def start(self) -> "ProcessJob":
        """Write the request file and send it to the worker (which may still be starting)."""
        self.started = time.perf_counter()
        self.requestFile = os.path.join(self.worker.folder, "job-%d-request.pkl" % self.id)
        with open(self.requestFile + ".part", "wb") as stream:
            pickle.dump((self.method, self.args), stream, protocol=wire.PROTOCOL)
        os.replace(self.requestFile + ".part", self.requestFile)
        self.worker.send(("run", self.id, self.requestFile))
        return self

    def _finish(self, result=None, error: Optional[BaseException] = None) -> None:
        message = "done" if error is None else "cancelled" if isinstance(error, CancelledError) else "failed"
        self._status = JobStatus(1.0 if error is None else self._status.fraction, message, True, result, error)

    def poll(self) -> JobStatus:
        """Read what the worker sent (never blocks); the latest status."""
        if self._status.finished:
            return self._status
        try:
            messages = self.worker.pump()
        except Exception as error:  # noqa: BLE001 - the worker did not start: reported like any failure
            self.worker.close()
            self._finish(error=error)
            return self._status
        for message in messages:
            kind = message[0]
            if kind == "log":
                reemitLog(message)
            elif message[1] != self.id:
                continue
            elif kind == "progress":
                self._status = JobStatus(message[2], message[3], False)
            elif kind == "done":
                with open(message[2], "rb") as stream:
                    result = pickle.load(stream)
                os.remove(message[2])
                self._finish(result=result)
            elif kind == "error":
                error = message[2]
                error.__cause__ = RemoteTraceback(message[3])
                self._finish(error=error)
        if not self._status.finished and (self.worker.reader is not None or self.worker.process.poll() is not None) \
                and not self.worker.alive:
            died = InternalError(self.worker.diedMessage())
            self.worker.close()
            self._finish(error=died)
        return self._status

    def fileno(self) -> Optional[int]:
        """:meth:`WorkerProcess.fileno` while the job runs (watch it to poll as soon as a message is readable; the
        socket changes once, when the starting worker connects); ``None`` once the job has finished."""
        return None if self._status.finished else self.worker.fileno()

    def cancel(self) -> None:
        """Kill the worker now: the job ends as cancelled, nothing is returned; the next job starts a new worker."""
        self._cancelled = True
        if not self._status.finished:
            self.worker.close()
            self._finish(error=CancelledError("cancelled by the user; nothing was written"))

    @property
    def cancelling(self) -> bool:
        return self._cancelled

    def wait(self, timeout: Optional[float] = None) -> JobStatus:
        """Block until finished (tests and scripts; the panel polls instead)."""
        deadline = None if timeout is None else time.perf_counter() + timeout
        while not self.poll().finished:
            if deadline is not None and time.perf_counter() > deadline:
                break
            time.sleep(0.01)
        return self.poll()


class ProcessRunner:
    """Jobs in one persistent :class:`WorkerProcess`, started at the first job and again after a cancel or crash.

    Example (outside Slicer the worker is this Python)::

        runner = ProcessRunner()
        status = runner.submit("compute", logic.prepare(volume, model="hd-bet")).wait()
        heatmap = logic.apply(request, status.result)
        runner.close()
    """

    def __init__(self, python: Optional[str] = None):
        self.python = python
        self.worker: Optional[WorkerProcess] = None

    def submit(self, method: str, *args) -> ProcessJob:
        if self.worker is None or self.worker.process is None or self.worker.process.poll() is not None \
                or (self.worker.reader is not None and self.worker.reader.closed):
            if self.worker is not None:
                self.worker.close()
            self.worker = WorkerProcess(self.python).start()
        return ProcessJob(self.worker, method, args).start()

    def close(self) -> None:
        """Stop the worker (the panel's ``cleanup``)."""
        if self.worker is not None:
            self.worker.close()
            self.worker = None


@atexit.register
def killWorkers() -> None:
    """No worker outlives Slicer."""
    for worker in list(LIVE_WORKERS):
        worker.close()
