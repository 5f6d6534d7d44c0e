"""One writer at a time: a lock file beside a store or catalog while ``ingest`` or ``predict`` writes it.

Two ingest runs into one store at once would be given the same shards (:func:`catalogpred.store.allocate_shards`)
and overwrite each other's spectra; two predict runs into one catalog would write the same part files. So a
writer first creates ``<path>.lock`` beside what it writes (``store.zarr.lock``, ``catalog.lock``, like git's
``index.lock``), atomically (``O_CREAT | O_EXCL``, which local disks, NFS v3+, Lustre and GPFS honour), with who
holds it: host, process id, run, command and start time (JSON). It is removed when the run ends, whether it
succeeded or failed.

A second writer stops at once with :class:`BusyError`, naming the holder. The holder refreshes the file's
modification time every :data:`HEARTBEAT_S` seconds, so a lock left by a dead run is taken over, with a warning:
at once when the run was on this host and its process is gone, and after :data:`STALE_S` seconds without a refresh
when it was on another host (a batch job killed at its walltime, a lost node), so that a resubmitted job goes on
by itself. A frozen or suspended holder loses its lock the same way once it has not refreshed it for that long.

The lock sits beside the directory rather than in it, because ingest creates the store and ``predict
--overwrite`` clears the catalog, and neither must take the lock away. Readers (``query``, ``info``) take no lock.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import sys
import threading
import time
from pathlib import Path

from .errors import CatalogpredError

__all__ = ["BusyError", "lock_path", "holder", "write_lock", "check_not_written", "HEARTBEAT_S", "STALE_S"]

log = logging.getLogger(__name__)

#: seconds between two refreshes of a held lock's modification time
HEARTBEAT_S = 30.0
#: a lock not refreshed for this long belongs to a dead run, wherever it ran (10 heartbeats: room for a slow
#: shared filesystem and for clocks of nodes and file server that differ by a minute)
STALE_S = 300.0


class BusyError(CatalogpredError, OSError):
    """Another run is writing this store or catalog (its lock file exists)."""


def lock_path(path: str | os.PathLike) -> Path:
    """``<path>.lock``: the lock file of a store or catalog directory (absolute)."""
    p = Path(os.path.abspath(os.fspath(path)))
    return p.with_name(p.name + ".lock")


def holder(path: str | os.PathLike) -> dict | None:
    """Who holds the lock of ``path``: ``{"host", "pid", "run", "command", "started"}``, ``{}`` for a lock file that
    cannot be read (e.g. left empty by a run killed while writing it), ``None`` when there is no lock."""
    try:
        text = lock_path(path).read_text()
    except FileNotFoundError:
        return None
    except OSError:
        return {}
    try:
        held = json.loads(text)
    except ValueError:
        return {}
    return held if isinstance(held, dict) else {}


def _alive(pid: int) -> bool:
    """Whether process ``pid`` exists on this host (one of another user's counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _age(path) -> float:
    """Seconds since the lock of ``path`` was last refreshed (0 when it is gone)."""
    try:
        return time.time() - lock_path(path).stat().st_mtime
    except FileNotFoundError:
        return 0.0


def _dead(path, held: dict) -> str | None:
    """Why the lock's run is known to be dead (None when it may be alive): its process is gone from this host, or
    the lock has not been refreshed for :data:`STALE_S` seconds (a run on any host, killed or lost)."""
    if held.get("host") == socket.gethostname() and isinstance(held.get("pid"), int) and not _alive(held["pid"]):
        return "its process is gone"
    age = _age(path)
    if age > STALE_S:
        return f"its lock was last refreshed {age:.0f} s ago"
    return None


def _describe(path, held: dict) -> str:
    lock = lock_path(path)
    if not held:
        return (f"{path} has a lock file that cannot be read ({lock}); if no ingest or predict is writing it, "
                f"delete {lock} and run again")
    return (f"{path} is being written by `catalogpred {held.get('run', '?')}` (process {held.get('pid', '?')} on "
            f"host {held.get('host', '?')}, since {held.get('started', '?')}): wait for it to finish; if that run is "
            f"dead, delete {lock} and run again (a lock not refreshed for {STALE_S:.0f} s is taken over by itself)")


@contextlib.contextmanager
def write_lock(path: str | os.PathLike, run: str):
    """Hold the lock of the store or catalog at ``path`` for the ``with`` block (``run``: "ingest", "predict").

    Raises
    ------
    BusyError
        If another run holds it (a lock left by a dead run on this host is taken over instead).
    """
    lock = lock_path(path)
    lock.parent.mkdir(parents=True, exist_ok=True)
    me = {"host": socket.gethostname(), "pid": os.getpid(), "run": run, "command": " ".join(sys.argv),
          "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    for attempt in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            held = holder(path)
            if held is None:  # removed meanwhile: the other run just ended
                continue
            why = _dead(path, held) if attempt == 0 else None
            if why:
                log.warning("%s: taking over the lock of `catalogpred %s` (process %s on host %s, started %s), which "
                            "ended without removing it: %s", path, held.get("run"), held.get("pid"), held.get("host"),
                            held.get("started"), why)
                lock.unlink(missing_ok=True)
                continue
            raise BusyError(_describe(path, held)) from None
        with os.fdopen(fd, "w") as f:
            json.dump(me, f)
        break
    else:
        raise BusyError(_describe(path, holder(path) or {}))
    stop = threading.Event()
    beat = threading.Thread(target=_heartbeat, args=(lock, stop), name="catalogpred-lock-heartbeat", daemon=True)
    beat.start()
    try:
        yield
    finally:
        stop.set()
        beat.join()
        if holder(path) == me:  # ours still (not deleted and taken by another run meanwhile)
            lock.unlink(missing_ok=True)


def _heartbeat(lock: Path, stop: threading.Event) -> None:
    """Refresh the lock's modification time every :data:`HEARTBEAT_S` s until ``stop`` (a lock that is gone, or
    unreachable for a moment on a shared filesystem, is left to the next refresh)."""
    while not stop.wait(HEARTBEAT_S):
        with contextlib.suppress(OSError):
            os.utime(lock)


def check_not_written(path: str | os.PathLike) -> None:
    """Raise :class:`BusyError` if a live run holds the lock of ``path`` (``predict`` checks that no ingest is
    writing its store; it does not lock the store, so that several predicts can read one store at once)."""
    held = holder(path)
    if held is not None and not _dead(path, held):
        raise BusyError(_describe(path, held))
