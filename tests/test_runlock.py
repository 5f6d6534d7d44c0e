"""One writer at a time per store and per catalog (:mod:`catalogpred.runlock`): a second ingest or predict stops
with :class:`BusyError` naming the first and writes nothing; a lock left by a dead run on this host is taken over,
one from another host is not. The other writer is a real second process holding the lock."""
from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from catalogpred import runlock, store
from catalogpred.cli import main
from catalogpred.mock import write_sdss_survey
from catalogpred.pipeline import run_ingest, run_predict
from catalogpred.runlock import BusyError

HOLD = """
import sys, time
from catalogpred import runlock
with runlock.write_lock(sys.argv[1], sys.argv[2]):
    print("held", flush=True)
    time.sleep(120)
"""


@pytest.fixture
def local():
    from distributed import Client

    with Client(processes=False, n_workers=1, threads_per_worker=2, dashboard_address=None) as c:
        yield c


class _Holder:
    """Another process holding the lock of ``target`` as ``run`` until :meth:`kill`."""

    def __init__(self, target: Path, run: str):
        self.proc = subprocess.Popen([sys.executable, "-c", HOLD, str(target), run], stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout.readline().strip() == "held"
        self.pid = self.proc.pid

    def kill(self):
        self.proc.kill()  # as a job killed at its walltime: no chance to remove the lock
        self.proc.wait()


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_the_lock_names_its_holder_and_is_removed_after_the_run(tmp_path):
    target = tmp_path / "store.zarr"
    assert runlock.lock_path(target) == tmp_path / "store.zarr.lock"
    with runlock.write_lock(target, "ingest"):
        held = runlock.holder(target)
        assert held["pid"] == os.getpid() and held["host"] == socket.gethostname() and held["run"] == "ingest"
        with pytest.raises(BusyError, match=rf"catalogpred ingest` \(process {os.getpid()} on host .*delete "
                                            rf".*store\.zarr\.lock"):
            with runlock.write_lock(target, "ingest"):
                pass
        assert runlock.holder(target) == held  # the refused run left the holder's lock alone
    assert runlock.holder(target) is None
    with pytest.raises(RuntimeError, match="boom"):
        with runlock.write_lock(target, "predict"):
            raise RuntimeError("boom")
    assert not runlock.lock_path(target).exists()  # removed after a failed run too


def test_a_dead_runs_lock_is_taken_over_and_another_hosts_is_not(tmp_path, caplog):
    target, lock = tmp_path / "catalog", runlock.lock_path(tmp_path / "catalog")
    lock.write_text(json.dumps({"host": socket.gethostname(), "pid": _dead_pid(), "run": "predict", "started": "t"}))
    with caplog.at_level(logging.WARNING, logger="catalogpred.runlock"):
        with runlock.write_lock(target, "predict"):
            assert runlock.holder(target)["pid"] == os.getpid()
    assert "taking over the lock of `catalogpred predict`" in caplog.text and not lock.exists()
    runlock.check_not_written(target)  # no lock: nothing to say
    other = {"host": "gpu-node-17", "pid": _dead_pid(), "run": "ingest", "started": "t"}
    lock.write_text(json.dumps(other))
    for attempt in (lambda: runlock.write_lock(target, "predict").__enter__(), lambda: runlock.check_not_written(target)):
        with pytest.raises(BusyError, match="on host gpu-node-17"):
            attempt()
    assert json.loads(lock.read_text()) == other
    # a job killed at its walltime on another node: its lock is no longer refreshed, and a resubmitted job goes on
    old = time.time() - runlock.STALE_S - 60
    os.utime(lock, (old, old))
    runlock.check_not_written(target)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="catalogpred.runlock"):
        with runlock.write_lock(target, "predict"):
            assert runlock.holder(target)["pid"] == os.getpid()
    assert "on host gpu-node-17" in caplog.text and "last refreshed" in caplog.text
    lock.write_text("")  # a run killed between creating the file and writing it
    with pytest.raises(BusyError, match="cannot be read"):
        with runlock.write_lock(target, "predict"):
            pass


def test_a_held_lock_is_refreshed(tmp_path, monkeypatch):
    monkeypatch.setattr(runlock, "HEARTBEAT_S", 0.05)
    target = tmp_path / "store.zarr"
    with runlock.write_lock(target, "ingest"):
        old = time.time() - 3600
        os.utime(runlock.lock_path(target), (old, old))
        deadline = time.time() + 10
        while runlock.lock_path(target).stat().st_mtime < old + 1 and time.time() < deadline:
            time.sleep(0.05)
        assert runlock.lock_path(target).stat().st_mtime > time.time() - 60
        runlock.check_not_written(target.parent / "other")  # no lock there
        with pytest.raises(BusyError):
            runlock.check_not_written(target)


def test_a_second_ingest_or_predict_stops_and_writes_nothing(tmp_path, local, random_bundle, capsys):
    inputs = tmp_path / "sdss"
    write_sdss_survey(inputs, 6, seed=8)
    st, cat = tmp_path / "store.zarr", tmp_path / "catalog"

    holder = _Holder(st, "ingest")
    try:
        with pytest.raises(BusyError, match=rf"process {holder.pid} on host"):
            run_ingest([str(inputs)], str(st), client=local, progress=False)
        assert not st.exists()
        # the command line says so in one line, before a cluster starts
        assert main(["ingest", str(inputs), "--store", str(st), "--workers", "1"]) == 1
        err = capsys.readouterr().err
        assert f"process {holder.pid}" in err and "store.zarr.lock" in err and "Traceback" not in err
        assert "Dask cluster" not in err
    finally:
        holder.kill()
    # killed at its walltime, the holder left its lock: the next ingest takes it over and stores every spectrum
    summary = run_ingest([str(inputs)], str(st), client=local, progress=False)
    assert summary.rows == 6 and not runlock.lock_path(st).exists()
    assert store.read_meta(str(st), "sdss", ["source_id"]).num_rows == 6

    holder = _Holder(st, "ingest")  # an ingest writing the store: predict does not start
    try:
        with pytest.raises(BusyError, match="catalogpred ingest"):
            run_predict(str(st), str(random_bundle), str(cat), client=local, progress=False)
        assert main(["predict", "--store", str(st), "--model", str(random_bundle), "--catalog", str(cat),
                     "--dry-run"]) == 1
        assert f"process {holder.pid}" in capsys.readouterr().err
    finally:
        holder.kill()
    runlock.lock_path(st).unlink()
    holder = _Holder(cat, "predict")  # a predict writing the catalog: a second one does not start
    try:
        with pytest.raises(BusyError, match="catalogpred predict"):
            run_predict(str(st), str(random_bundle), str(cat), client=local, progress=False)
        assert not cat.exists()
    finally:
        holder.kill()
    runlock.lock_path(cat).unlink()
    summary = run_predict(str(st), str(random_bundle), str(cat), client=local, progress=False, torch_threads=1)
    assert summary.rows + summary.rejects == 6 and not runlock.lock_path(cat).exists()
