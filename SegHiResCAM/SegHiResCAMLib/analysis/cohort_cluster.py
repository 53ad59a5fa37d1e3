"""The cases of a cohort on Dask: a local cluster of worker processes, a running scheduler, or batch jobs.

- ``scheduler="local"``: a :class:`distributed.LocalCluster` of worker *processes* (:func:`local_layout`: as many
  as the cores and the memory allow, one Dask thread each, and ``cores // workers`` torch threads per worker so
  that the workers do not oversubscribe the machine);
- ``scheduler="tcp://host:8786"``: the workers of a running cluster (they must see the input files and the output
  folder at the same paths, e.g. a shared file system, and have SegHiResCAM installed);
- ``cluster="slurm"`` / ``"pbs"``: workers started as batch jobs by dask-jobqueue (imported only then).

Each worker process loads the model once and keeps it for every case it runs
(:func:`~SegHiResCAMLib.analysis.cohort.cached_model`). The function and its jobs are plain picklable data; this
module knows nothing of cohorts, and imports Dask only when called.
"""

import logging
import os
import re
from typing import Callable, List, Optional, Tuple

from ..errors import InputError

#: memory a worker is planned with when none is given (a 3D U-Net gradient pass on a 128^3 patch needs ~6 GiB)
DEFAULT_WORKER_MEMORY = 4 * 2 ** 30
#: share of the machine's memory the local workers may plan with
MEMORY_SHARE = 0.8
CLUSTERS = ("slurm", "pbs")


def parse_memory(text: Optional[str]) -> Optional[int]:
    """Bytes of ``"6GiB"``, ``"512MB"``, ``"2G"`` or a plain number of bytes; ``None`` stays ``None``.

    Example:
        >>> parse_memory("1.5GiB"), parse_memory("512MB")
        (1610612736, 512000000)
    """
    if text is None:
        return None
    match = re.match(r"^\s*([0-9.]+)\s*([KMGT]?)(i?)B?\s*$", str(text), re.IGNORECASE)
    if not match:
        raise InputError("memory must look like 6GiB, 512MB or a number of bytes, got %r" % (text,))
    value, unit, binary = float(match.group(1)), match.group(2).upper(), match.group(3)
    power = "KMGT".index(unit) + 1 if unit else 0
    return int(value * (1024 if binary else 1000) ** power)


def machine() -> Tuple[int, int]:
    """(usable cores, physical memory in bytes) of this machine."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # pragma: no cover - not Linux/macOS
        memory = 8 * 2 ** 30
    return max(1, cores), int(memory)


def local_layout(workers: Optional[int] = None, worker_memory: Optional[int] = None,
                 cores: Optional[int] = None, memory: Optional[int] = None) -> Tuple[int, int, int]:
    """(worker processes, torch threads per worker, memory limit per worker in bytes) for a local cluster.

    Without ``workers``: as many as there are cores, and no more than ``MEMORY_SHARE`` of the memory holds at
    ``worker_memory`` each (default :data:`DEFAULT_WORKER_MEMORY`). Threads: ``cores // workers`` (at least 1).

    Example:
        >>> local_layout(cores=16, memory=64 * 2 ** 30, worker_memory=8 * 2 ** 30)[:2]
        (6, 2)
        >>> local_layout(workers=2, cores=2, memory=23 * 2 ** 30)[:2]
        (2, 1)
    """
    found_cores, found_memory = machine()
    cores, memory = cores or found_cores, memory or found_memory
    if workers is not None and workers < 1:
        raise InputError("--workers must be >= 1 for a Dask cluster (0 runs the plain loop), got %d" % workers)
    if workers is None:
        per = worker_memory or DEFAULT_WORKER_MEMORY
        workers = max(1, min(cores, int(MEMORY_SHARE * memory // per)))
    limit = worker_memory or int(MEMORY_SHARE * memory / workers)
    return workers, max(1, cores // workers), limit


def _dashboard(client) -> Optional[str]:
    """The dashboard link when the scheduler serves one (it needs bokeh)."""
    import importlib.util
    link = getattr(client, "dashboard_link", None)
    return link if link and importlib.util.find_spec("bokeh") is not None else None


def _jobqueue_cluster(kind: str, workers: int, threads: int, memory: int):
    if kind not in CLUSTERS:
        raise InputError("--cluster must be one of %s, got %r" % (", ".join(CLUSTERS), kind))
    try:
        import dask_jobqueue
    except ImportError as exc:
        raise InputError("--cluster %s needs dask-jobqueue, which is not installed: pip install dask-jobqueue "
                         "(or start a cluster yourself and pass --scheduler tcp://host:8786)" % kind) from exc
    make = dask_jobqueue.SLURMCluster if kind == "slurm" else dask_jobqueue.PBSCluster
    cluster = make(cores=threads, processes=1, memory="%dB" % memory)
    cluster.scale(jobs=workers)
    return cluster


def _remote_threads(client) -> int:
    """Torch threads per task on a running cluster: each host's cores shared by the Dask threads on it."""
    import collections
    workers = client.scheduler_info()["workers"]
    per_host = collections.Counter()
    for info in workers.values():
        per_host[info.get("host")] += info.get("nthreads", 1)
    cores = client.run(lambda: len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count())
    host_cores = {}
    for address, count in cores.items():
        host_cores[workers.get(address, {}).get("host")] = count
    return max(1, min((host_cores.get(h, 1) // n for h, n in per_host.items()), default=1))


def run_on_dask(function: Callable[..., dict], jobs: List[tuple], done: Callable[[dict], None],
                scheduler: str = "local", workers: Optional[int] = None, cluster: Optional[str] = None,
                worker_memory: Optional[str] = None, threads: Optional[int] = None,
                log: Callable[[str], None] = print,
                on_error: Optional[Callable[[tuple, BaseException], dict]] = None) -> None:
    """Run ``function(*job)`` for every job on Dask, calling ``done(result)`` as each finishes.

    ``on_error(job, exception)``: the result of a job whose task failed on Dask (its worker died, or ``function``
    raised); without it the exception stops the run.

    ``threads``: torch threads per task (``None``: from :func:`local_layout`, or the running cluster's cores per
    Dask thread); it is set inside the task through the job's options (the last-but-one tuple entries are left
    as they are: the function receives exactly ``job``).
    """
    try:
        from distributed import Client, LocalCluster, as_completed
    except ImportError as exc:
        raise InputError("running a cohort on Dask needs dask and distributed: pip install 'dask[distributed]' "
                         "(or use --scheduler none for a plain loop)") from exc
    owned = None
    memory = parse_memory(worker_memory)
    if cluster:
        threads = threads or 1
        owned = _jobqueue_cluster(cluster, workers or 1, threads, memory or DEFAULT_WORKER_MEMORY)
        address = owned
    elif scheduler in (None, "local"):
        n, per_threads, limit = local_layout(workers, memory)
        threads = threads or per_threads
        # a free port for the scheduler's web server (the dashboard, where bokeh is installed): several cohorts
        # (or a running cluster on 8787) may share the machine; worker shutdown notes are not errors
        owned = LocalCluster(n_workers=n, threads_per_worker=1, processes=True, memory_limit=limit,
                             dashboard_address=":0", silence_logs=logging.ERROR)
        address = owned
        log("seghirescam: local Dask cluster: %d worker process%s, %d torch thread%s each, %.1f GiB memory limit "
            "each" % (n, "es" if n != 1 else "", threads, "s" if threads != 1 else "", limit / 2 ** 30))
    elif isinstance(scheduler, str) and "://" in scheduler:
        address = scheduler
    else:
        raise InputError("--scheduler must be local, none or a scheduler address such as tcp://host:8786, got %r"
                         % (scheduler,))
    try:
        try:
            client = Client(address, timeout="30s")
        except OSError as exc:
            raise InputError("cannot reach the Dask scheduler %s: %s; is it running (dask scheduler)?"
                             % (address, exc)) from exc
        try:
            link = _dashboard(client)
            if link:
                log("seghirescam: Dask dashboard: %s" % link)
            if threads is None:
                threads = _remote_threads(client)
            jobs = [_with_threads(job, threads) for job in jobs]
            futures = {client.submit(function, *job, pure=False, key="case-%s" % _case_id(job)): job
                       for job in jobs}
            for future in as_completed(futures):
                try:
                    result = future.result()
                except Exception as exc:  # noqa: BLE001 - e.g. KilledWorker: recorded, the others go on
                    if on_error is None:
                        raise
                    result = on_error(futures[future], exc)
                done(result)
        finally:
            client.close()
    finally:
        if owned is not None:
            owned.close()


def _case_id(job: tuple) -> str:
    return "%s-%s" % (getattr(job[0], "case_id", "job"), os.urandom(4).hex())


def _with_threads(job: tuple, threads: int) -> tuple:
    """The job with ``threads`` set on its options (the first dataclass entry that has a ``threads`` field)."""
    import dataclasses
    out = []
    for entry in job:
        if dataclasses.is_dataclass(entry) and any(f.name == "threads" for f in dataclasses.fields(entry)) \
                and getattr(entry, "threads") is None:
            entry = dataclasses.replace(entry, threads=threads)
        out.append(entry)
    return tuple(out)
