"""The persistent worker process of the Slicer module: the engine step runs here, outside Slicer's process.

Why a process: PythonQt never releases the GIL while Slicer's main thread sits in the Qt event loop, so a Python
worker *thread* runs only while the main thread happens to execute Python (the panel's 200 ms polls): a run took
1.5x (HD-BET) to 20x (a small model) as long as from the command line. A child process has its own interpreter
and GIL. It is a plain Python (``PythonSlicer`` next to the application; ``sys.executable`` outside Slicer) that
never imports ``slicer``, ``qt`` or ``vtk``: MRML stays in Slicer's main thread.

The main process side is :class:`SegHiResCAMLib.slicer_logic.job.WorkerProcess`; this module holds the child's
loop and the wire format both sides share. The child connects back to a localhost socket that the main process
listens on (non-blocking there, read when the panel's socket notifier or timer fires), proves it was started by
the panel with a random token (given in the environment, never on the command line), then serves jobs one at a
time::

    child -> main   ("hello", token, pid)
    main  -> child  ("setup", {"path": sys.path of Slicer, "threads": torch threads or 0, "logLevel": level})
    main  -> child  ("run", job id, request file)       # the file: pickle of (method, args), arrays included
    child -> main   ("progress", job id, fraction, message)    # at most ~10 a second, and at every new stage
    child -> main   ("log", level, logger name, text, origin)   # every record at >= the main's log level
    child -> main   ("done", job id, result file)     # or ("error", job id, exception, traceback text)
    main  -> child  ("stop",)                          # or the main process kills the child: that is Cancel

Every message is a pickle behind an 8-byte length. The arrays travel as pickle files in the worker's temporary
folder, never through the socket. :class:`~.compute.ComputeLogic` keeps the loaded models and the last forward
pass for the life of the process: a second run (another target on the same scan) reuses both.
"""

import logging
import os
import pickle
import socket
import struct
import sys
import threading
import time
import traceback

#: the environment variable that carries the handshake token to the child
TOKEN_VARIABLE = "SEGHIRESCAM_WORKER_TOKEN"
#: the length prefix of every message
HEADER = struct.Struct("!Q")
#: pickle protocol of messages and files (both ends run the same interpreter)
PROTOCOL = 4
#: the attributes of a child's log record that travel with it (where it was logged, when, by which process)
LOG_ORIGIN = ("pathname", "filename", "module", "lineno", "funcName", "created", "msecs", "process", "processName",
              "thread", "threadName")
#: the child sends a progress report at most this often (seconds), plus one at every new stage message
PROGRESS_INTERVAL_S = 0.1


def encode(message) -> bytes:
    data = pickle.dumps(message, protocol=PROTOCOL)
    return HEADER.pack(len(data)) + data


def receiveExactly(sock: socket.socket, size: int) -> bytes:
    """``size`` bytes from a blocking socket; ``EOFError`` when the other side has gone."""
    chunks, left = [], size
    while left:
        chunk = sock.recv(min(left, 1 << 20))
        if not chunk:
            raise EOFError("the other process closed the connection")
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def receive(sock: socket.socket):
    """The next message from a blocking socket (the child's way of waiting for work)."""
    (size,) = HEADER.unpack(receiveExactly(sock, HEADER.size))
    return pickle.loads(receiveExactly(sock, size))


class MessageReader:
    """The complete messages that have arrived on a socket so far, without ever blocking (the main thread's way).

    ``closed`` turns true when the other side has gone (end of stream or a connection error).
    """

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.buffer = bytearray()
        self.closed = False

    def read(self) -> list:
        import select
        while not self.closed:
            try:
                readable, _, _ = select.select([self.sock], [], [], 0)
                if not readable:
                    break
                chunk = self.sock.recv(1 << 20)
            except (OSError, ValueError):
                chunk = b""
            if not chunk:
                self.closed = True
            self.buffer += chunk
        messages = []
        while len(self.buffer) >= HEADER.size:
            (size,) = HEADER.unpack_from(self.buffer)
            if len(self.buffer) < HEADER.size + size:
                break
            messages.append(pickle.loads(bytes(self.buffer[HEADER.size:HEADER.size + size])))
            del self.buffer[:HEADER.size + size]
        return messages


def portableError(error: BaseException) -> BaseException:
    """``error`` if it survives a pickle round trip, else an :class:`~..errors.InternalError` that names it."""
    try:
        pickle.loads(pickle.dumps(error, protocol=PROTOCOL))
        return error
    except Exception:  # noqa: BLE001 - any exception type may refuse to pickle
        from ..errors import InternalError
        return InternalError("%s: %s" % (type(error).__name__, error))


class Connection:
    """The child's end: sends are serialised (torch may log from its own threads)."""

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.lock = threading.Lock()

    def send(self, message) -> None:
        data = encode(message)
        with self.lock:
            self.sock.sendall(data)


class ForwardLogs(logging.Handler):
    """Every log record of the child (and every warning, through ``logging.captureWarnings``) as a
    ``("log", level, logger name, text, origin)`` message; the main process re-emits it through its own
    ``logging`` (:func:`~.job.reemitLog`), where Slicer shows it in its Python console and log."""

    def __init__(self, connection: Connection, level: int = logging.INFO):
        super().__init__(level)
        self.connection = connection

    def emit(self, record: logging.LogRecord) -> None:
        try:
            origin = {key: getattr(record, key) for key in LOG_ORIGIN}
            self.connection.send(("log", record.levelno, record.name, self.format(record), origin))
        except Exception:  # noqa: BLE001 - a log line never breaks the computation
            pass


def progressSender(connection: Connection, jobId: int):
    """The ``progress(fraction, message)`` callback of a job: throttled, every new stage message sent."""
    last = {"time": 0.0, "message": None}

    def progress(fraction: float, message: str) -> None:
        now = time.perf_counter()
        if message != last["message"] or fraction >= 1.0 or now - last["time"] >= PROGRESS_INTERVAL_S:
            last.update(time=now, message=message)
            connection.send(("progress", jobId, float(fraction), str(message)))

    return progress


def runJob(logic, connection: Connection, jobId: int, requestFile: str) -> None:
    """One job: read the request file, compute, write the result file next to it, report."""
    try:
        with open(requestFile, "rb") as stream:
            method, args = pickle.load(stream)
        os.remove(requestFile)
        result = logic.runJob(method, args, progressSender(connection, jobId))
        resultFile = requestFile[:-len("request.pkl")] + "result.pkl"
        with open(resultFile + ".part", "wb") as stream:
            pickle.dump(result, stream, protocol=PROTOCOL)
        os.replace(resultFile + ".part", resultFile)
        connection.send(("done", jobId, resultFile))
    except Exception as error:  # noqa: BLE001 - handed to the main process, which shows it
        connection.send(("error", jobId, portableError(error), traceback.format_exc()))


def main(argv=None) -> int:
    """The child: connect to ``host port`` (argv), say hello with the token, then serve jobs until told to stop."""
    host, port = (argv if argv is not None else sys.argv[1:])[:2]
    token = os.environ.pop(TOKEN_VARIABLE, "")
    sock = socket.create_connection((host, int(port)))
    connection = Connection(sock)
    connection.send(("hello", token, os.getpid()))
    kind, setup = receive(sock)
    sys.path.extend(entry for entry in setup.get("path", []) if entry not in sys.path)  # factory models of Slicer
    level = int(setup.get("logLevel", logging.INFO))  # what the main process would show: DEBUG if Slicer logs it
    handler = ForwardLogs(connection, level)
    handler.setFormatter(logging.Formatter("%(message)s"))  # the traceback of an exception record is appended
    logging.getLogger().addHandler(handler)
    logging.getLogger().setLevel(level)
    logging.captureWarnings(True)
    from .compute import ComputeLogic  # numpy; torch comes with the first job
    from ..engine.outputs import flush_denormals  # imports torch, before it starts its threads (they inherit it)
    flush_denormals()
    if setup.get("threads"):
        import torch
        torch.set_num_threads(int(setup["threads"]))
    logic = ComputeLogic()
    while True:
        try:
            message = receive(sock)
        except (EOFError, OSError):  # Slicer has gone: nothing left to do
            return 0
        if message[0] == "stop":
            return 0
        if message[0] == "run":
            runJob(logic, connection, message[1], message[2])
