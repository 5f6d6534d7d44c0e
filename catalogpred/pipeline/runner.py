"""The task runner that ingest and predict share: submit tasks with a bounded window, show progress, collect
results and errors (:func:`run_bounded`), and the software versions a run manifest records."""
from __future__ import annotations

import logging
import sys
import time

from .. import __version__
from ..cluster import TASKS_IN_FLIGHT_PER_WORKER
from ..errors import CatalogError

__all__ = ["PipelineError", "run_bounded", "n_workers", "progress_bar", "progress_line", "duration_text", "reasons_lines",
           "versions"]

log = logging.getLogger(__name__)

#: seconds between two progress lines in the log when the progress bar is off because stderr is not a
#: terminal (a batch job's log file); ``--no-progress`` and ``-q`` turn the lines off too
PROGRESS_LOG_S = 60.0


class PipelineError(CatalogError):
    """Some tasks failed on every retry; the run can be resumed."""


def progress_bar(total: int, desc: str, enabled: bool | None):
    """A tqdm bar of ``total`` tasks on stderr; ``enabled=None`` shows it only on a terminal."""
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="task", file=sys.stderr, disable=(None if enabled is None else not enabled),
                dynamic_ncols=True)


def duration_text(seconds: float) -> str:
    """``seconds`` for a person: ``"40 s"``, ``"12 min"``, ``"3 h 05 min"``."""
    seconds = max(0.0, float(seconds))
    if seconds < 90:
        return f"{seconds:.0f} s"
    minutes = round(seconds / 60)
    return f"{minutes} min" if minutes < 60 else f"{minutes // 60} h {minutes % 60:02d} min"


def progress_line(desc: str, done: int, total: int, elapsed_s: float) -> str:
    """One progress line for a log: tasks done of ``total``, the rate so far and the time left at that rate."""
    rate = done / elapsed_s if elapsed_s > 0 else 0.0
    left = f", about {duration_text((total - done) / rate)} left" if rate > 0 else ""
    return f"{desc}: {done:,d} of {total:,d} tasks done ({100 * done / max(total, 1):.0f} %), {rate:.3g} tasks/s{left}"


def reasons_lines(reasons: dict) -> list[str]:
    """A run summary's "rejects by reason" lines (none without rejects)."""
    if not reasons:
        return []
    return ["  rejects by reason:", *(f"    {r:<22} {n:>6,d}" for r, n in sorted(reasons.items()))]


def n_workers(client, resources: dict | None = None) -> int:
    """Connected workers (those offering ``resources``, when given). Raises :class:`PipelineError` when the
    client has lost its scheduler."""
    info = client.scheduler_info()
    if "workers" not in info:
        _lost_scheduler(client)
    workers = info["workers"].values()
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

    ``progress``: True/False shows a progress bar or not; None shows it on a terminal, and elsewhere (a batch
    job's log) logs a :func:`progress_line` every :data:`PROGRESS_LOG_S` seconds instead.
    """
    from distributed import as_completed

    results, errors = {}, {}
    pending = list(zip(keys, arg_list))[::-1]
    bar = progress_bar(len(arg_list), desc, progress)
    log_lines = progress is None and bar.disable  # no terminal: lines in the log instead of a bar
    started = last_line = time.monotonic()
    done = 0
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
            if client.status not in ("running", "newly-created"):  # not the task: the scheduler is gone
                _lost_scheduler(client)
            errors[fut.key] = f"{type(exc).__name__}: {exc}"
            log.error("task %s failed: %s", fut.key, errors[fut.key])
        else:
            results[fut.key] = res
            if on_done is not None:
                on_done(fut.key, res)
        fut.release()
        bar.update(1)
        done += 1
        now = time.monotonic()
        if log_lines and now - last_line >= PROGRESS_LOG_S and done < len(arg_list):
            log.info("%s", progress_line(desc, done, len(arg_list), now - started))
            last_line = now
        fill(ac)
    bar.close()
    return results, errors


def _lost_scheduler(client):
    """Stop a run whose client lost its scheduler: its tasks did not fail, so they must not become rejects."""
    address = getattr(client.scheduler, "address", None) if client.scheduler is not None else None
    raise PipelineError(f"lost the Dask scheduler{f' at {address}' if address else ''} (client {client.status}); "
                        "finished blocks are kept: re-run the same command to resume")


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

