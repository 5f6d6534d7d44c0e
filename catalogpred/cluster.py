"""How to get a Dask client: a local CPU cluster (the default) or an existing scheduler.

The local default is a ``distributed.LocalCluster`` with one single-threaded worker
process per core (torch gets its threads explicitly from the tasks, since Dask
workers start with ``OMP_NUM_THREADS=1``). ``scheduler`` / ``scheduler_file``
connect to a cluster that already exists (SLURM, Kubernetes, …; see ``deploy/``).
"""
from __future__ import annotations

import contextlib
import logging
import os

__all__ = ["default_n_workers", "dask_client"]

log = logging.getLogger(__name__)


def default_n_workers() -> int:
    """One worker per available core."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - macOS
        return max(1, os.cpu_count() or 1)


@contextlib.contextmanager
def dask_client(n_workers: int | None = None, *, threads_per_worker: int = 1, scheduler: str | None = None,
                scheduler_file: str | None = None, memory_limit: str | None = "auto"):
    """Yield a ``distributed.Client``; a local cluster is started and closed around it.

    Parameters
    ----------
    n_workers : int, optional
        Local worker processes (default: one per core). Ignored with a scheduler.
    scheduler : str, optional
        Address of an existing scheduler, e.g. ``tcp://host:8786``.
    scheduler_file : str, optional
        A scheduler file written by ``dask scheduler --scheduler-file``.
    """
    from distributed import Client, LocalCluster

    if scheduler or scheduler_file:
        client = Client(address=scheduler, scheduler_file=scheduler_file)
        log.info("connected to %s (%d workers)", client.scheduler.address, len(client.scheduler_info()["workers"]))
        try:
            yield client
        finally:
            client.close()
        return
    n = n_workers or default_n_workers()
    cluster = LocalCluster(n_workers=n, threads_per_worker=threads_per_worker, processes=True,
                           dashboard_address=None, memory_limit=memory_limit, silence_logs=logging.WARNING)
    client = Client(cluster)
    log.info("local Dask cluster: %d worker processes × %d thread(s)", n, threads_per_worker)
    try:
        yield client
    finally:
        client.close()
        cluster.close()
