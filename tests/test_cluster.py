"""The local CPU cluster that ``ingest`` and ``predict`` start by default (:func:`catalogpred.cluster.dask_client`)."""
from __future__ import annotations

import ctypes
import os
import re
import tempfile
from concurrent.futures import ThreadPoolExecutor

import pytest

from catalogpred.tasks import _glibc


def _malloc_heaps_after_a_task_allocates() -> tuple[str | None, int]:
    """Run in a worker task (a thread of the worker process): allocate and free 128 MB, as an encoder batch
    does, then count the malloc arenas glibc reports (``malloc_info``'s ``<heap nr=...>`` elements)."""
    import numpy as np

    a = np.ones(32 * 2**20, np.float32)  # 128 MB, touched
    del a
    libc = _glibc()
    libc.fopen.restype = ctypes.c_void_p
    libc.fopen.argtypes = [ctypes.c_char_p, ctypes.c_char_p]
    libc.fclose.argtypes = [ctypes.c_void_p]
    libc.malloc_info.argtypes = [ctypes.c_int, ctypes.c_void_p]
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "malloc_info.xml")
        fp = libc.fopen(path.encode(), b"w")
        libc.malloc_info(0, fp)
        libc.fclose(fp)
        text = open(path).read()
    return os.environ.get("MALLOC_ARENA_MAX"), len(re.findall(r"<heap nr=", text))


@pytest.mark.skipif(not os.path.exists("/proc/self/environ"), reason="needs Linux (/proc)")
@pytest.mark.skipif(not hasattr(_glibc(), "malloc_info"), reason="needs glibc (malloc_info)")
def test_cpu_workers_allocate_from_one_malloc_arena_also_after_a_restart():
    """A CPU worker's task thread allocates from the process's main heap, as a bare process does, and not from
    an arena of its own, whose chunks over 64 MiB would be fresh mmaps each encoder batch. The nanny starts
    the worker with ``MALLOC_ARENA_MAX=1`` (``CPU_WORKER_ENVIRON``) and starts a replacement with it too."""
    from catalogpred.cluster import CPU_WORKER_ENVIRON, dask_client

    assert CPU_WORKER_ENVIRON == {"MALLOC_ARENA_MAX": "1"}
    # the check can tell: a thread of a process started without the setting gets an arena of its own
    if b"MALLOC_ARENA_MAX=" not in open("/proc/self/environ", "rb").read():  # this process's environment at start
        with ThreadPoolExecutor(1) as pool:
            assert pool.submit(_malloc_heaps_after_a_task_allocates).result()[1] >= 2
    with dask_client(1, memory_limit=None) as client:
        before = client.submit(_malloc_heaps_after_a_task_allocates, pure=False).result()
        pid = client.run(os.getpid)
        client.restart()
        assert client.run(os.getpid) != pid  # a new worker process
        after = client.submit(_malloc_heaps_after_a_task_allocates, pure=False).result()
    assert before == after == ("1", 1)


def test_local_cpu_cluster_housekeeping_is_less_frequent_unless_the_user_configured_it():
    """The scheduler and the workers run Dask's periodic housekeeping at ``LOCAL_CPU_CONFIG``; a value the user's
    Dask config sets is kept; the workers' profiler is off without a dashboard and on with one."""
    import dask
    from distributed import Client

    from catalogpred.cluster import LOCAL_CPU_CONFIG, local_cpu_cluster

    keys = [*LOCAL_CPU_CONFIG, "distributed.worker.profile.enabled"]
    with dask.config.set({"distributed.admin.tick.interval": "50ms"}):  # the user's own setting
        with local_cpu_cluster(1) as cluster, Client(cluster) as client:
            (seen,) = client.run(lambda: [dask.config.get(k) for k in keys]).values()
            scheduler_tick_ms = cluster.scheduler.periodic_callbacks["tick"].callback_time
    expected = {**LOCAL_CPU_CONFIG, "distributed.admin.tick.interval": "50ms", "distributed.worker.profile.enabled": False}
    assert dict(zip(keys, seen)) == expected
    assert scheduler_tick_ms == 50
    assert dask.config.get("distributed.worker.profile.enabled") is True  # this process's config is as it was
    with local_cpu_cluster(1, dashboard_address="127.0.0.1:0") as cluster, Client(cluster) as client:
        (seen,) = client.run(lambda: [dask.config.get(k) for k in keys]).values()
        scheduler_tick_ms = cluster.scheduler.periodic_callbacks["tick"].callback_time
    assert dict(zip(keys, seen)) == {**LOCAL_CPU_CONFIG, "distributed.worker.profile.enabled": True}
    assert scheduler_tick_ms == 1000
