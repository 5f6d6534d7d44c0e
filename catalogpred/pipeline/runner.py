"""The task runner that ingest and predict share: submit tasks with a bounded window, show progress, collect
results and errors (:func:`run_bounded`), and the software versions a run manifest records."""
from __future__ import annotations

import logging
import sys
import time

from .. import __version__
from ..cluster import TASKS_IN_FLIGHT_PER_WORKER
from ..errors import CatalogError

__all__ = ["PipelineError", "run_bounded", "n_workers", "progress_bar", "versions"]

log = logging.getLogger(__name__)


class PipelineError(CatalogError):
    """Some tasks failed on every retry; the run can be resumed."""


def progress_bar(total: int, desc: str, enabled: bool | None):
    """A tqdm bar of ``total`` tasks on stderr; ``enabled=None`` shows it only on a terminal."""
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="task", file=sys.stderr, disable=(None if enabled is None else not enabled),
                dynamic_ncols=True)


def n_workers(client, resources: dict | None = None) -> int:
    """Connected workers (those offering ``resources``, when given)."""
    workers = client.scheduler_info()["workers"].values()
    if not resources:
        return len(workers)
    return sum(all(w.get("resources", {}).get(k, 0) >= v for k, v in resources.items()) for w in workers)


def run_bounded(client, fn, arg_list: list[tuple], kwargs: dict, *, desc: str, keys: list[str], progress,
                on_done=None, max_in_flight: int | None = None, resources: dict | None = None, recount_s: float = 1.0,
                tasks_per_worker: int = 1, submit=None, io_resources: dict | None = None):
    """Submit ``fn(*args, **kwargs)`` for every args tuple, at most ``max_in_flight`` at once.

    The default window is :data:`~.cluster.TASKS_IN_FLIGHT_PER_WORKER` × workers × ``tasks_per_worker``
    (tasks that run at once on one worker, e.g. blocks sharing a GPU), recounted (at
    most every ``recount_s``) as tasks finish, so workers that join later get work and lost ones
    stop counting. ``resources`` (e.g. ``{"GPU": 1}``) goes on every ``client.submit``. Only the
    futures in flight are held; a result is handed to ``on_done`` and kept (small dicts only).
    ``submit(key, args) -> Future`` replaces the one ``client.submit`` per item (e.g. a chain of tasks
    whose last one has ``key``); then ``io_resources`` workers count towards the window too.
    Returns ``(results by key, errors by key)``. Failed tasks (after retries) do not stop the others.
    """
    from distributed import as_completed

    results, errors = {}, {}
    pending = list(zip(keys, arg_list))[::-1]
    bar = progress_bar(len(arg_list), desc, progress)
    window = {"n": 0, "at": float("-inf")}
    in_flight = 0

    def limit() -> int:
        if max_in_flight:
            return max_in_flight
        now = time.monotonic()
        if now - window["at"] >= recount_s:
            slots = tasks_per_worker * max(1, n_workers(client, resources))
            if io_resources:
                slots = max(slots, n_workers(client, io_resources))
            window["n"] = TASKS_IN_FLIGHT_PER_WORKER * slots
            window["at"] = now
        return window["n"]

    def fill(ac):
        nonlocal in_flight
        n = limit()
        while pending and in_flight < n:
            key, args = pending.pop()
            ac.add(submit(key, args) if submit is not None
                   else client.submit(fn, *args, **kwargs, key=key, retries=2, pure=False, resources=resources))
            in_flight += 1

    ac = as_completed(loop=client.loop)  # not the default client's loop: a process may hold several clients
    fill(ac)
    for fut in ac:
        in_flight -= 1
        try:
            res = fut.result()
        except Exception as exc:  # noqa: BLE001 - a task failed on every retry: report, keep going
            errors[fut.key] = f"{type(exc).__name__}: {exc}"
            log.error("task %s failed: %s", fut.key, errors[fut.key])
        else:
            results[fut.key] = res
            if on_done is not None:
                on_done(fut.key, res)
        fut.release()
        bar.update(1)
        fill(ac)
    bar.close()
    return results, errors


def versions() -> dict:
    """Versions of catalogpred, Python and the libraries that shape a catalog, for the run manifest."""
    import importlib.metadata as md

    out = {"catalogpred": __version__, "python": sys.version.split()[0]}
    for pkg in ("numpy", "torch", "dask", "distributed", "zarr", "tensorstore", "pyarrow", "astropy", "hats",
                "fitsio"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return out

