"""The task runner that ingest and predict share: submit tasks with a bounded window, show progress, collect
results and errors (:func:`run_bounded`), and the software versions a run manifest records."""
from __future__ import annotations

import contextlib
import logging
import sys
import threading
import time

from .. import __version__
from ..cluster import TASKS_IN_FLIGHT_PER_WORKER, retire_workers, same_code
from ..errors import CatalogError, WorkerCodeError

__all__ = ["PipelineError", "run_bounded", "n_workers", "progress_bar", "progress_line", "duration_text", "reasons_lines",
           "versions"]

log = logging.getLogger(__name__)

#: seconds between two progress lines in the log when the progress bar is off because stderr is not a
#: terminal (a batch job's log file); ``--no-progress`` and ``-q`` turn the lines off too
PROGRESS_LOG_S = 60.0


#: seconds during which no connected worker can take the tasks of a run before :func:`run_bounded` says so in the
#: log, and again after as many: the workers of a batch job end with its walltime, and the run waits for new ones
WORKERLESS_LOG_S = 60.0


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
    return _count(_workers_info(client), resources)


def _workers_info(client) -> dict:
    info = client.scheduler_info()
    if "workers" not in info:
        _lost_scheduler(client)
    return info["workers"]


def _count(workers: dict, resources: dict | None) -> int:
    if not resources:
        return len(workers)
    return sum(all(w.get("resources", {}).get(k, 0) >= v for k, v in resources.items()) for w in workers.values())


#: times a task whose outputs the client cannot see (:func:`run_bounded`'s ``verify``), or that reached a worker
#: with other catalogpred code, is submitted again
RESUBMITS = 2


def run_bounded(client, fn, arg_list: list[tuple], kwargs: dict, *, desc: str, keys: list[str], progress,
                on_done=None, max_in_flight: int | None = None, resources: dict | None = None, recount_s: float = 1.0,
                tasks_per_worker: int = 1, submit=None, io_resources: dict | None = None, verify=None,
                on_new_workers=None, checked_workers=()):
    """Submit ``fn(*args, **kwargs)`` for every args tuple, at most ``max_in_flight`` at once.

    The default window is :data:`~.cluster.TASKS_IN_FLIGHT_PER_WORKER` × workers × ``tasks_per_worker``
    (tasks that run at once on one worker, e.g. blocks sharing a GPU), recounted (at
    most every ``recount_s``) as tasks finish, so workers that join later get work and lost ones
    stop counting. ``resources`` (e.g. ``{"GPU": 1}``) goes on every ``client.submit``. Only the
    futures in flight are held; a result is handed to ``on_done`` and kept (small dicts only).
    ``submit(key, args) -> Future`` replaces the one ``client.submit`` per item (e.g. a chain of tasks
    whose last one has ``key``); then ``io_resources`` workers count towards the window too.
    Returns ``(results by key, errors by key)``. Failed tasks (after retries) do not stop the others.

    Workers that join while it runs (any not in ``checked_workers``) are handed to ``on_new_workers(addresses)``
    at the same recounts (e.g. :func:`~catalogpred.cluster.retire_unfit_workers`). ``verify(key, result)``
    checks a finished task from the client's side and returns what is wrong, or None (asked again for a few
    seconds, :func:`_verified`). A task whose outputs the client cannot see (its worker wrote to a node-local
    directory) has that worker retired and is submitted again, at most :data:`RESUBMITS` times; after that the
    run stops with a :class:`PipelineError` once the other tasks are done (not an error of the task's data:
    nothing is rejected). The worker is the task's own report, ``result["worker"]``: the scheduler's ``who_has``
    names whoever holds the result, and retiring a worker moves its results to others (tried: it retired a
    shared worker in ``tests/test_remote_cluster.py``).

    Every task runs through :func:`~catalogpred.cluster.same_code` (a ``submit`` must do the same): a task that
    reaches a worker with other catalogpred code does not run there; that worker is retired and the task submitted
    again, at most :data:`RESUBMITS` times, as above.

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
    seen_workers = set(checked_workers)
    in_flight: dict[str, tuple] = {}  # Dask key -> (item key, args)
    tries: dict[str, int] = {}  # item key -> submissions so far
    unseen: dict[str, str] = {}  # item key -> why its outputs are not visible, after its last try
    wrong_code: dict[str, str] = {}  # item key -> the error of its last try, on a worker with other code
    retired: set[str] = set()
    task = same_code(fn)

    def again(key, args, worker) -> bool:
        """Retire ``worker`` (once) and queue the item again if it has tries left; False if it has none."""
        if worker and worker not in retired:
            retired.add(worker)
            retire_workers(client, [worker])
        if tries[key] > RESUBMITS:
            return False
        pending.append((key, args))
        return True

    def recount():
        now = time.monotonic()
        if now - window["at"] < recount_s:
            return
        window["at"] = now
        workers = _workers_info(client)
        slots = tasks_per_worker * max(1, _count(workers, resources))
        if io_resources:
            slots = max(slots, _count(workers, io_resources))
        window["n"] = max_in_flight or TASKS_IN_FLIGHT_PER_WORKER * slots
        new = sorted(set(workers) - seen_workers)
        seen_workers.update(workers)
        if new and on_new_workers is not None:
            on_new_workers(new)

    def fill(ac):
        recount()
        while pending and len(in_flight) < window["n"]:
            key, args = pending.pop()
            n = tries[key] = tries.get(key, 0) + 1
            dkey = key if n == 1 else f"{key}~{n}"  # a new Dask key: the finished first try may still be known
            ac.add(submit(dkey, args) if submit is not None
                   else client.submit(task, *args, **kwargs, key=dkey, retries=2, pure=False, resources=resources))
            in_flight[dkey] = (key, args)

    ac = as_completed(loop=client.loop)  # not the default client's loop: a process may hold several clients
    with _say_when_workerless(client, resources, desc, lambda: len(in_flight) + len(pending)):
        fill(ac)
        for fut in ac:
            key, args = in_flight.pop(fut.key)
            try:
                res = fut.result()
            except WorkerCodeError as exc:  # not the task's data: the worker's software
                retried = again(key, args, exc.worker)
                log.error("task %s: %s; %s", key, exc, "retiring that worker and running the task again" if retried
                          else "giving up on the task")
                if not retried:
                    wrong_code[key] = str(exc)
            except Exception as exc:  # noqa: BLE001 - a task failed on every retry: report, keep going
                if client.status not in ("running", "newly-created"):  # not the task: the scheduler is gone
                    _lost_scheduler(client)
                errors[key] = f"{type(exc).__name__}: {exc}"
                log.error("task %s failed: %s", key, errors[key])
            else:
                problem = _verified(verify, key, res) if verify is not None else None
                if problem is None:
                    results[key] = res
                    if on_done is not None:
                        on_done(key, res)
                else:
                    worker = res.get("worker") if isinstance(res, dict) else None
                    retried = again(key, args, worker)
                    log.error("task %s finished on Dask worker %s, but %s: that worker does not write where this "
                              "client reads (a node-local /tmp or scratch?); %s", key, worker or "(unknown)", problem,
                              "retiring it and running the task again" if retried else "giving up on the task")
                    if not retried:
                        unseen[key] = f"{problem} (last on Dask worker {worker or '(unknown)'})"
            fut.release()
            if key in results or key in errors or key in unseen or key in wrong_code:
                bar.update(1)
                done += 1
            now = time.monotonic()
            if log_lines and now - last_line >= PROGRESS_LOG_S and done < len(arg_list):
                log.info("%s", progress_line(desc, done, len(arg_list), now - started))
                last_line = now
            fill(ac)
    bar.close()
    if wrong_code:
        key, why = next(iter(wrong_code.items()))
        raise PipelineError(f"{len(wrong_code)} tasks reached only Dask workers with other catalogpred code than "
                            f"this client, {RESUBMITS + 1} times (e.g. {key}: {why}); those workers are retired. "
                            "Install the same commit for client and workers (deploy/README.md, version table); "
                            "finished tasks are kept: re-run the same command to resume")
    if unseen:
        key, why = next(iter(unseen.items()))
        raise PipelineError(f"{len(unseen)} tasks finished {RESUBMITS + 1} times, but their outputs are not visible "
                            f"to this client (e.g. {key}: {why}); the workers that wrote them are retired. Check that "
                            "every worker mounts the store and catalog at the same path (deploy/README.md); finished "
                            "tasks are kept: re-run the same command to resume")
    return results, errors


@contextlib.contextmanager
def _say_when_workerless(client, resources: dict | None, desc: str, waiting):
    """While in the block, a thread logs a warning every :data:`WORKERLESS_LOG_S` seconds during which no connected
    worker offers ``resources`` (any worker when None) and ``waiting()`` tasks wait: a run that waits for workers
    says so instead of showing a progress bar that does not move."""
    stop = threading.Event()

    def watch():
        since = None
        while not stop.wait(min(5.0, WORKERLESS_LOG_S / 4)):
            try:
                n = _count(client.scheduler_info().get("workers", {}), resources)
            except Exception:  # noqa: BLE001 - the scheduler is gone: the run's own loop reports that
                return
            now, n_waiting = time.monotonic(), waiting()
            if n or not n_waiting:
                since = None
            elif since is None:
                since = now
            elif now - since >= WORKERLESS_LOG_S:
                what = " offering " + ", ".join(f"{k}={v}" for k, v in resources.items()) if resources else ""
                log.warning("%s: no Dask worker%s has been connected for %s; %d tasks wait for one. The run goes on "
                            "when workers join (a batch job's workers end with its walltime: submit more); Ctrl-C "
                            "stops it, finished work is kept and a re-run resumes", desc, what,
                            duration_text(now - since), n_waiting)
                since = now

    thread = threading.Thread(target=watch, name="catalogpred-workerless", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=10)


#: seconds :func:`_verified` waits before each new look at a finished task's missing output
VERIFY_WAITS_S = (0.2, 0.5, 1.0, 2.0)


def _verified(verify, key: str, result) -> str | None:
    """``verify(key, result)``, asked again after each of :data:`VERIFY_WAITS_S` while it finds a problem: a file
    that another host has just written may take a moment to show on some shared filesystems (NFS attribute
    caches), and retiring a worker for that would be wrong."""
    problem = verify(key, result)
    for wait in VERIFY_WAITS_S:
        if problem is None:
            break
        time.sleep(wait)
        problem = verify(key, result)
    return problem


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

