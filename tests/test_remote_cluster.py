"""catalogpred on a real multi-process Dask deployment on localhost.

`dask scheduler` and two `dask worker` processes are started with subprocess (each in its own
process group, working directory elsewhere, listening on 127.0.0.1 only) and torn down at the end.
The real SDSS files are ingested through that scheduler, `catalogpred predict --scheduler` and
`--scheduler-file` run on it, and the catalogs are compared with a LocalCluster run on the same store.
`catalogpred submit slurm` is run for real too, against a stand-in `sbatch`/`scancel` that starts
the generated job scripts as local processes.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from catalogpred.cli import main
from catalogpred.cluster import check_workers, dask_client, default_torch_threads, shared_path, worker_address
from catalogpred.errors import ConfigError
from catalogpred.pipeline import run_predict

pytestmark = pytest.mark.realdata

DASK = Path(sys.executable).parent / "dask"
PRED_COLUMNS = [f"w{i}_mag" for i in range(1, 5)] + [f"w{i}_mag_err" for i in range(1, 5)]


# ------------------------------------------------------------------------------------------ processes


def _start(cmd: list[str], log: Path, cwd: Path, env: dict | None = None) -> subprocess.Popen:
    """A child in its own process group (so the group can be torn down with everything it spawned)."""
    with open(log, "ab") as out:
        return subprocess.Popen([str(c) for c in cmd], stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                cwd=cwd, env=env, start_new_session=True)


def _stop(procs: list[subprocess.Popen]) -> None:
    """SIGTERM each process group, then SIGKILL what is left after 15 s."""
    for p in procs:
        if p.poll() is None:
            try:
                os.killpg(p.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
    deadline = time.monotonic() + 15
    for p in procs:
        try:
            p.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass
        try:  # the group may outlive its leader (nanny children)
            os.killpg(p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        p.wait()


def _tail(*logs: Path) -> str:
    return "\n".join(f"--- {log.name}\n{log.read_text()[-3000:]}" for log in logs if log.exists())


@pytest.fixture(scope="module")
def deployment(tmp_path_factory):
    """`dask scheduler --scheduler-file` + two single-threaded `dask worker` processes on 127.0.0.1."""
    from distributed import Client

    d = tmp_path_factory.mktemp("deployment")
    worker_cwd = d / "worker-cwd"  # not the client's cwd: relative paths would break here
    worker_cwd.mkdir()
    sched_file = d / "scheduler.json"
    logs = [d / "scheduler.log", d / "worker-0.log", d / "worker-1.log"]
    procs: list[subprocess.Popen] = []
    try:
        procs.append(_start([DASK, "scheduler", "--host", "127.0.0.1", "--port", "0", "--no-dashboard",
                             "--scheduler-file", sched_file], logs[0], d))
        deadline = time.monotonic() + 60
        while not (sched_file.exists() and sched_file.stat().st_size) and time.monotonic() < deadline:
            assert procs[0].poll() is None, _tail(logs[0])
            time.sleep(0.2)
        address = json.loads(sched_file.read_text())["address"]
        assert address.startswith("tcp://127.0.0.1:"), address
        for i in range(2):
            procs.append(_start([DASK, "worker", "--scheduler-file", sched_file, "--host", "127.0.0.1", "--nthreads", "1",
                                 "--no-dashboard", "--name", f"external-{i}", "--local-directory", d / f"w{i}",
                                 "--death-timeout", "60"], logs[i + 1], worker_cwd))
        with Client(address, timeout="30s") as c:
            try:
                c.wait_for_workers(2, timeout=90)
            except Exception:
                pytest.fail("workers did not connect\n" + _tail(*logs))
        yield {"address": address, "scheduler_file": str(sched_file), "dir": d, "worker_cwd": worker_cwd, "logs": logs}
    finally:
        _stop(procs)


@pytest.fixture(scope="module")
def remote_store(deployment, sdss_files):
    """The 14 real SDSS files ingested through the external scheduler, with a relative --store from another cwd."""
    client_cwd = deployment["dir"] / "client"
    client_cwd.mkdir()
    old = os.getcwd()
    os.chdir(client_cwd)
    try:
        rc = main(["-q", "ingest", *map(str, sdss_files), "--store", "store.zarr", "--shard-rows", "4",
                   "--scheduler", deployment["address"], "--no-progress"])
    finally:
        os.chdir(old)
    assert rc == 0, _tail(*deployment["logs"])
    assert not any(deployment["worker_cwd"].iterdir()), "workers wrote relative to their own cwd"
    return client_cwd / "store.zarr"


@pytest.fixture(scope="module")
def local_reference(remote_store, random_bundle, tmp_path_factory):
    """The same store predicted on a LocalCluster (torch_threads=1, as the single-threaded remote workers get)."""
    out = tmp_path_factory.mktemp("local-ref") / "catalog"
    with dask_client(2) as client:
        run_predict(str(remote_store), str(random_bundle), str(out), client=client, progress=False, torch_threads=1)
    return out


def _catalog(path: Path):
    t = pq.ParquetDataset(Path(path) / "dataset").read().to_pandas().sort_values("source_id").reset_index(drop=True)
    rejects = sorted(pq.read_table(Path(path) / "rejects.parquet").column("source_id").to_pylist())
    return t, rejects


def _assert_same_catalog(a: Path, b: Path) -> None:
    ta, ra = _catalog(a)
    tb, rb = _catalog(b)
    assert len(ta) > 0
    assert ta["source_id"].tolist() == tb["source_id"].tolist()
    assert ra == rb
    for col in PRED_COLUMNS:
        np.testing.assert_allclose(ta[col].to_numpy(), tb[col].to_numpy(), rtol=0, atol=1e-6, err_msg=col)
    np.testing.assert_allclose(np.stack(ta["latent"].to_numpy()), np.stack(tb["latent"].to_numpy()), rtol=0, atol=1e-6)


def _ran_catalogpred_tasks(address: str) -> dict:
    from distributed import Client

    with Client(address, timeout="30s") as c:
        # eval is a builtin, so it travels by reference: the workers need no test code
        return c.run(eval, "'catalogpred.tasks' in __import__('sys').modules")


# ---------------------------------------------------------------------------------------------- tests


def test_predict_on_external_scheduler_matches_local_cluster(deployment, remote_store, local_reference, random_bundle):
    client_cwd = remote_store.parent
    old = os.getcwd()
    os.chdir(client_cwd)
    try:
        rc = main(["-q", "predict", "--store", "store.zarr", "--model", str(random_bundle), "--catalog", "cat-remote",
                   "--scheduler", deployment["address"], "--wait-workers", "2", "--no-progress"])
    finally:
        os.chdir(old)
    assert rc == 0, _tail(*deployment["logs"])
    remote = client_cwd / "cat-remote"
    _assert_same_catalog(remote, local_reference)
    assert not any(deployment["worker_cwd"].iterdir())
    assert all(_ran_catalogpred_tasks(deployment["address"]).values()), "both external workers ran catalogpred tasks"
    manifest = json.loads((remote / "run_manifest.json").read_text())
    assert manifest["store"] == str(remote_store) and manifest["model"]["path"] == str(random_bundle)
    assert manifest["settings"]["torch_threads"] == 1  # from the workers' --nthreads 1


def test_predict_with_scheduler_file(deployment, remote_store, local_reference, random_bundle, tmp_path):
    rc = main(["-q", "predict", "--store", str(remote_store), "--model", str(random_bundle),
               "--catalog", str(tmp_path / "cat"), "--scheduler-file", deployment["scheduler_file"], "--no-progress"])
    assert rc == 0, _tail(*deployment["logs"])
    _assert_same_catalog(tmp_path / "cat", local_reference)


def test_object_store_urls_are_refused_with_a_fix(deployment, random_bundle, capsys):
    rc = main(["predict", "--store", "s3://bucket/store.zarr", "--model", str(random_bundle), "--catalog", "cat",
               "--scheduler", deployment["address"], "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1
    assert err[-1].startswith("catalogpred predict: error: s3://bucket/store.zarr: s3:// URLs are not supported yet")
    assert "shared" in err[-1] and "deploy/README.md" in err[-1]


def test_scheduler_and_scheduler_file_together_is_an_error(deployment, random_bundle, capsys):
    rc = main(["predict", "--store", "s.zarr", "--model", str(random_bundle), "--catalog", "c",
               "--scheduler", deployment["address"], "--scheduler-file", deployment["scheduler_file"]])
    assert rc == 1 and "not both" in capsys.readouterr().err


def test_a_scheduler_that_cannot_be_reached_is_a_one_line_error(random_bundle, tmp_path, capsys):
    """An address without a port, and an empty (half-written) scheduler file, ended in a traceback (ValueError,
    a bare AssertionError); now a one-line error that says what to check."""
    from catalogpred.store import create_survey

    from catalogpred.spectra import SDSS_GRID
    from catalogpred.store import SurveyLayout
    from catalogpred.surveys import get_reader

    sched = tmp_path / "scheduler.json"
    sched.write_text("{}")
    st = tmp_path / "s.zarr"

    create_survey(st, SurveyLayout(survey="sdss", grid=SDSS_GRID, meta_columns=get_reader("sdss").meta_columns))
    for opt, says in ((["--scheduler", "127.0.0.1"], "missing port number"), (["--scheduler-file", str(sched)], "")):
        rc = main(["predict", "--store", str(st), "--model", str(random_bundle), "--catalog", str(tmp_path / "c"),
                   *opt])
        err = capsys.readouterr().err
        assert rc == 1 and "Traceback" not in err and "cannot connect to the Dask scheduler of " + opt[0] in err, err
        assert says in err


def test_local_cluster_flags_with_an_existing_cluster_are_said_to_be_ignored(deployment, random_bundle, tmp_path,
                                                                              caplog):
    """--workers, --io-workers and --dashboard with --scheduler-file were ignored without a word; a dashboard link
    was logged for a scheduler started with --no-dashboard (its port is listed anyway)."""
    import logging

    from catalogpred.spectra import SDSS_GRID
    from catalogpred.store import SurveyLayout, create_survey
    from catalogpred.surveys import get_reader

    st = tmp_path / "s.zarr"
    create_survey(st, SurveyLayout(survey="sdss", grid=SDSS_GRID, meta_columns=get_reader("sdss").meta_columns))
    with caplog.at_level(logging.INFO, logger="catalogpred"):
        assert main(["predict", "--store", str(st), "--model", str(random_bundle), "--catalog", str(tmp_path / "c"),
                     "--scheduler-file", deployment["scheduler_file"], "--workers", "8", "--io-workers", "2",
                     "--dashboard", "--no-progress"]) == 0
    assert "--workers, --io-workers, --dashboard: for the local cluster only, ignored" in caplog.text
    assert "connected to tcp://" in caplog.text and "Dask dashboard" not in caplog.text


def test_shared_path():
    assert shared_path("file:///scratch/store.zarr") == "/scratch/store.zarr"
    assert shared_path("rel/store.zarr") == os.path.join(os.getcwd(), "rel", "store.zarr")
    assert shared_path(Path("/a/../b")) == "/b"
    with pytest.raises(ConfigError, match="gs:// URLs are not supported yet"):
        shared_path("gs://bucket/catalog")


def test_check_workers_versions_paths_and_threads(deployment, remote_store, monkeypatch):
    import catalogpred
    from distributed import Client

    with Client(deployment["address"], timeout="30s") as c:
        check_workers(c, [remote_store, remote_store.parent / "not-written-yet" / "catalog"])
        assert default_torch_threads(c) == 1  # nthreads 1 per worker
        monkeypatch.setattr(catalogpred, "__version__", "9.9.9")
        with pytest.raises(ConfigError, match=r"runs catalogpred 0\.1\.0, this client 9\.9\.9"):
            check_workers(c, [])
        monkeypatch.setattr(catalogpred, "__version__", "0.1.0")
        # the same version from other code (another commit, local edits): the source fingerprints differ
        import catalogpred.cluster as cluster

        monkeypatch.setattr(cluster, "source_fingerprint", lambda: "000000000000")
        with pytest.raises(ConfigError, match=r"runs other catalogpred code than this client .*against 000000000000"):
            check_workers(c, [])


@contextlib.contextmanager
def _blind_worker(deployment, tmp_path: Path):
    """A `dask worker` named "blind" in its own mount namespace, where ``tmp_path/outputs`` (yielded) is an empty
    tmpfs: what it writes there the client never sees (a node-local /tmp or scratch); a client connected with it
    and the two shared workers. Needs `unshare -m` and mount rights: the test is skipped without them."""
    import shutil as sh

    from distributed import Client

    out = tmp_path / "outputs"
    out.mkdir(exist_ok=True)
    probe = subprocess.run(["unshare", "-m", "sh", "-c", f"mount -t tmpfs none {out}"], capture_output=True)
    if sh.which("unshare") is None or probe.returncode != 0:
        pytest.skip(f"no private mount namespace here (unshare -m: {probe.stderr.decode().strip()[:200]})")
    blind = _start(["unshare", "-m", "sh", "-c", f"mount -t tmpfs none {out} && exec {DASK} worker "
                    f"{deployment['address']} --host 127.0.0.1 --nthreads 1 --no-dashboard --name blind "
                    f"--local-directory {tmp_path / 'wb'}"], tmp_path / "blind-worker.log", tmp_path)
    try:
        with Client(deployment["address"], timeout="30s") as c:
            c.wait_for_workers(3, timeout=90)
            yield out, c
    finally:
        _stop([blind])


def _address_of(client, name: str) -> str | None:
    return next((a for a, w in client.scheduler_info()["workers"].items() if w.get("name") == name), None)


def _until_gone(client, name: str, timeout: float = 30) -> bool:
    deadline = time.monotonic() + timeout
    while _address_of(client, name) is not None and time.monotonic() < deadline:
        time.sleep(0.5)
    return _address_of(client, name) is None


def test_check_workers_finds_a_directory_that_exists_on_a_worker_but_is_not_shared(deployment, tmp_path):
    """A directory that exists on every node but is not shared (node-local /tmp or scratch, an empty mount point)
    passed the existence check, and the blind worker's part files or shards went missing later. The client now
    writes a file there and every worker must see it."""
    from distributed import Client

    with _blind_worker(deployment, tmp_path) as (out, c):
        with pytest.raises(ConfigError, match=r"a file the client just wrote in .*outputs is not visible on Dask "
                                              r"worker .*not a node-local /tmp"):
            check_workers(c, [out / "catalog"])
        assert not list(out.iterdir())  # the file it wrote is gone
    with Client(deployment["address"], timeout="30s") as c:  # the shared workers see it
        assert _until_gone(c, "blind")
        check_workers(c, [out / "catalog"])


def _write_in(directory: str):
    """A task for the runner: after a pause, a file ``task-<i>`` in ``directory`` as its worker sees it, and that
    worker's address (made here, so that it travels to the workers by value)."""
    def task(i: int) -> dict:
        time.sleep(0.3)
        Path(directory, f"task-{i}").write_text("done")
        return {"i": i, "worker": worker_address()}

    return task


def test_a_worker_whose_outputs_the_client_cannot_see_is_retired_and_its_task_runs_again(deployment, tmp_path,
                                                                                         caplog):
    """A task that finished on a worker writing to a node-local directory: run_bounded's ``verify`` finds its
    output missing on the client, retires that worker and submits the task again; every output is there at the
    end and nothing counts as an error. Task 0's first try is pinned to the blind worker."""
    from catalogpred.pipeline import run_bounded

    with _blind_worker(deployment, tmp_path) as (out, c):
        addr = _address_of(c, "blind")
        task = _write_in(str(out))

        def submit(key, args):
            return c.submit(task, *args, key=key, pure=False, workers=[addr] if key == "task-0" else None)

        with caplog.at_level(logging.ERROR, logger="catalogpred.pipeline.runner"):
            results, errors = run_bounded(
                c, task, [(i,) for i in range(8)], {}, desc="t", keys=[f"task-{i}" for i in range(8)],
                progress=False, submit=submit,
                verify=lambda key, r: None if (out / f"task-{r['i']}").exists() else "its file is not there")
        assert errors == {} and sorted(results) == [f"task-{i}" for i in range(8)]
        assert sorted(p.name for p in out.iterdir()) == sorted(f"task-{i}" for i in range(8))
        assert results["task-0"]["worker"] != addr  # task 0's second try, on a worker that shares the directory
        assert f"task task-0 finished on Dask worker {addr}, but its file is not there" in caplog.text
        assert "retiring it and running the task again" in caplog.text
        assert _until_gone(c, "blind")  # retired, and its nanny did not bring it back


def test_a_worker_that_joins_a_run_is_checked_and_retired_when_blind(deployment, tmp_path, caplog):
    """A worker the run did not check when it started (it joined later: adaptive scaling, a replaced node) is
    checked at the run's next recount, as predict and ingest wire it (``retire_unfit_workers``), and retired when
    it cannot see the outputs; the run completes on the others."""
    from distributed import Client

    from catalogpred.cluster import retire_unfit_workers
    from catalogpred.pipeline import run_bounded

    (tmp_path / "outputs").mkdir()
    with Client(deployment["address"], timeout="30s") as c:
        checked = check_workers(c, [tmp_path / "outputs"])  # the run's start: the two shared workers
    assert len(checked) == 2
    with _blind_worker(deployment, tmp_path) as (out, c):  # it joins after the start's check
        addr = _address_of(c, "blind")
        with caplog.at_level(logging.ERROR, logger="catalogpred.cluster"):
            results, errors = run_bounded(
                c, _write_in(str(out)), [(i,) for i in range(6)], {}, desc="t", keys=[f"t-{i}" for i in range(6)],
                progress=False, checked_workers=checked,
                on_new_workers=lambda addrs: retire_unfit_workers(c, addrs, [out]),
                verify=lambda key, r: None if (out / f"task-{r['i']}").exists() else "its file is not there")
        assert errors == {} and len(results) == 6 and len(list(out.iterdir())) == 6
        assert f"is not visible on Dask worker {addr}" in caplog.text and "retiring it" in caplog.text
        assert _until_gone(c, "blind")


# ----------------------------------------------------------------------------- submit on fake sbatch

FAKE_SBATCH = """\
#!/usr/bin/env bash
# stand-in for sbatch: run the job script here, in its own session, and answer like sbatch
set -euo pipefail
job=$FAKE_BATCH_DIR/job-$$
cp "$1" "$job.sh"
setsid bash "$job.sh" >"$job.log" 2>&1 </dev/null &
echo "$!" >"$job.pid"
echo "Submitted batch job $!"
"""
FAKE_SCANCEL = """\
#!/usr/bin/env bash
# stand-in for scancel: end the job's process group
echo "$1" >>"$FAKE_BATCH_DIR/cancelled"
kill -TERM -- "-$1" 2>/dev/null || true
"""


def _kill_fake_jobs(batch_dir: Path) -> None:
    """SIGKILL the process group of every fake job that is still a bash running our job script."""
    for pid_file in batch_dir.glob("job-*.pid"):
        pid = int(pid_file.read_text())
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if pid_file.with_suffix(".sh").name.encode() in cmdline:
            try:
                os.killpg(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


FAKE_SQUEUE = """\
#!/usr/bin/env bash
# stand-in for squeue --noheader --format=%i --user=...: the fake jobs whose process is alive (not a zombie)
for f in "$FAKE_BATCH_DIR"/job-*.pid; do
  [ -e "$f" ] || continue
  pid=$(cat "$f")
  state=$(awk '{print $3}' "/proc/$pid/stat" 2>/dev/null || true)
  if [ -n "$state" ] && [ "$state" != Z ]; then echo "$pid"; fi
done
"""


def _fake_slurm(tmp_path: Path, monkeypatch, prologue: tuple[str, ...] = ()) -> tuple[Path, Path]:
    """sbatch, scancel and squeue stand-ins on PATH and a jobqueue config for them: ``(batch dir, config)``.
    ``prologue``: job-script lines that run before the worker starts."""
    bin_dir, batch_dir = tmp_path / "bin", tmp_path / "batch"
    bin_dir.mkdir()
    batch_dir.mkdir()
    for name, text in (("sbatch", FAKE_SBATCH), ("scancel", FAKE_SCANCEL), ("squeue", FAKE_SQUEUE)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    config = tmp_path / "jobqueue.yaml"
    config.write_text(textwrap.dedent(f"""\
        jobqueue:
          slurm:
            death-timeout: 30
            local-directory: {tmp_path / "scratch"}
            worker-extra-args: ["--host", "127.0.0.1", "--no-dashboard"]
            job-script-prologue: {json.dumps(list(prologue))}
            scheduler-options:
              host: 127.0.0.1
              dashboard_address: "127.0.0.1:0"
        """))
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_BATCH_DIR", str(batch_dir))
    return batch_dir, config


def _submit_predict(batch_dir: Path, config: Path, catalog: Path, remote_store, random_bundle, jobs: int = 2) -> int:
    try:
        return main(["-q", "submit", "slurm", "--config", str(config), "--jobs", str(jobs), "--cores", "1",
                     "--memory", "2GB", "--walltime", "00:10:00", "--", "predict", "--store", str(remote_store),
                     "--model", str(random_bundle), "--catalog", str(catalog), "--no-progress"])
    finally:
        time.sleep(1)  # let the scancel'ed workers exit on their own first
        _kill_fake_jobs(batch_dir)


def test_submit_slurm_runs_predict_on_batch_jobs(tmp_path, monkeypatch, remote_store, local_reference, random_bundle):
    batch_dir, config = _fake_slurm(tmp_path, monkeypatch)
    catalog = tmp_path / "cat-submit"
    rc = _submit_predict(batch_dir, config, catalog, remote_store, random_bundle)
    logs = _tail(*sorted(batch_dir.glob("job-*.log")))
    assert rc == 0, logs
    _assert_same_catalog(catalog, local_reference)
    scripts = sorted(batch_dir.glob("job-*.sh"))
    assert len(scripts) == 2
    for s in scripts:
        text = s.read_text()
        assert "#SBATCH -J catalogpred" in text and "#SBATCH --cpus-per-task=1" in text and "#SBATCH -t 00:10:00" in text
        assert f"{sys.executable} -m distributed.cli.dask_worker tcp://127.0.0.1:" in text
    cancelled = (batch_dir / "cancelled").read_text().split()
    assert sorted(cancelled) == sorted(p.read_text().strip() for p in batch_dir.glob("job-*.pid"))


def test_submit_stops_when_every_job_ends_before_its_workers(tmp_path, monkeypatch, remote_store, random_bundle,
                                                             capsys):
    """Jobs that the batch system ends before a worker connects (here: their script exits at once) make submit
    fail with a one-line error naming the jobs, instead of waiting for workers for ever."""
    monkeypatch.setattr("catalogpred.submit.JOB_POLL_S", 0.5)
    batch_dir, config = _fake_slurm(tmp_path, monkeypatch, prologue=("exit 3",))
    t0 = time.monotonic()
    rc = _submit_predict(batch_dir, config, tmp_path / "cat", remote_store, random_bundle)
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1 and time.monotonic() - t0 < 60
    assert err[-1].startswith("catalogpred submit: error: every slurm job ended before its Dask workers connected "
                              "(2 jobs, last ids ")
    assert "slurm-<id>.out" in err[-1]
    ids = sorted(p.read_text().strip() for p in batch_dir.glob("job-*.pid"))
    assert len(ids) == 2 and all(i in err[-1] for i in ids)
    assert not (tmp_path / "cat").exists()  # predict never started


def test_submit_goes_on_with_the_jobs_left_when_one_ends(tmp_path, monkeypatch, remote_store, local_reference,
                                                        random_bundle, caplog):
    """One of two jobs ends before its worker connects: submit waits for the other job's worker only and the
    catalog is the same as a local run's."""
    monkeypatch.setattr("catalogpred.submit.JOB_POLL_S", 0.5)
    # the first job to take the lock exits; the other starts its worker
    batch_dir, config = _fake_slurm(tmp_path, monkeypatch, prologue=('mkdir "$FAKE_BATCH_DIR/lock" && exit 3',))
    catalog = tmp_path / "cat"
    with caplog.at_level(logging.WARNING, logger="catalogpred.submit"):
        rc = _submit_predict(batch_dir, config, catalog, remote_store, random_bundle)
    assert rc == 0, _tail(*sorted(batch_dir.glob("job-*.log")))
    ended = [r.getMessage() for r in caplog.records if "ended before their Dask workers connected" in r.getMessage()]
    assert len(ended) == 1 and "waiting for 1 workers from the other jobs" in ended[0]
    _assert_same_catalog(catalog, local_reference)


def test_losing_the_scheduler_mid_run_stops_the_run_without_rejects(random_bundle, tmp_path):
    """Killing the scheduler mid-predict ended in a KeyError traceback ('workers'), and tasks cut off by the lost
    connection could be counted as blocks that failed on every retry (predict_error rejects). Now the run stops
    with a PipelineError that says to re-run, and writes no rejects for those blocks."""
    import threading

    import bench_pipeline
    from distributed import Client

    from catalogpred.pipeline.runner import PipelineError

    st = tmp_path / "store.zarr"
    bench_pipeline.write_synthetic_store(st, 48, shard_rows=4, chunk_rows=4)
    sched_file = tmp_path / "scheduler.json"
    logs = [tmp_path / "scheduler.log", tmp_path / "worker.log"]
    procs = [_start([DASK, "scheduler", "--host", "127.0.0.1", "--port", "0", "--no-dashboard", "--scheduler-file",
                     sched_file], logs[0], tmp_path)]
    try:
        deadline = time.monotonic() + 60
        while not (sched_file.exists() and sched_file.stat().st_size) and time.monotonic() < deadline:
            time.sleep(0.2)
        procs.append(_start([DASK, "worker", "--scheduler-file", sched_file, "--host", "127.0.0.1", "--nthreads", "1",
                             "--no-dashboard", "--local-directory", tmp_path / "w", "--death-timeout", "30"],
                            logs[1], tmp_path))
        cat = tmp_path / "catalog"
        blocks = cat / "_run" / "blocks"

        def kill_scheduler_after_a_block():
            end = time.monotonic() + 120
            while not (blocks.exists() and any(blocks.glob("*.json"))) and time.monotonic() < end:
                time.sleep(0.05)
            os.killpg(procs[0].pid, signal.SIGKILL)

        with Client(scheduler_file=str(sched_file), timeout="30s") as c:
            c.wait_for_workers(1, timeout=90)
            killer = threading.Thread(target=kill_scheduler_after_a_block, daemon=True)
            killer.start()
            with pytest.raises(PipelineError, match="lost the Dask scheduler.*re-run the same command"):
                run_predict(str(st), str(random_bundle), str(cat), client=c, progress=False, torch_threads=1)
            killer.join(10)
        markers = [json.loads(p.read_text()) for p in blocks.glob("*.json")]
        assert markers and not any(m.get("error") for m in markers), _tail(*logs)
        assert not (cat / "rejects.parquet").exists()
    finally:
        _stop(procs)
