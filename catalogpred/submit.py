"""``catalogpred submit``: Dask workers as SLURM or PBS batch jobs (dask-jobqueue), then ingest/predict on them.

The scheduler runs in this process (on the login node, or wherever ``submit`` runs);
each batch job starts worker processes that connect back to it. Once the workers
are up, the given ``catalogpred ingest|predict`` command runs through
:func:`catalogpred.cli.main` with ``--scheduler <address>``, and the jobs are
cancelled when it returns.

Settings use dask-jobqueue's own keys (``jobqueue.slurm.cores``, ``jobqueue.pbs.queue``,
…): command-line flags win over a ``--config`` YAML file, which wins over the user's
``~/.config/dask/*.yaml`` and jobqueue's defaults.

GPU jobs (``gpus_per_job=G``) start ``dask cuda worker`` (dask-cuda: one worker per
visible GPU) with ``--resources GPU=1``, request the GPUs from the batch system
(SLURM ``--gres=gpu:G``, PBS ``ngpus=G``), and split the job's cores and memory
between the G workers. CPU jobs use jobqueue's default worker command
(``python -m distributed.cli.dask_worker``, what ``dask worker`` runs), and their job script
exports :data:`catalogpred.cluster.CPU_WORKER_ENVIRON` (one malloc arena per worker process, as the
local default) unless the prologue or ``--env`` sets it.

Examples
--------
>>> from catalogpred.submit import job_kwargs, render_job_script
>>> print(render_job_script("slurm", job_kwargs("slurm", cores=8, memory="32GB", gpus_per_job=1)))  # doctest: +SKIP
#!/usr/bin/env bash
<BLANKLINE>
#SBATCH -J catalogpred
...
"""
from __future__ import annotations

import contextlib
import difflib
import getpass
import logging
import os
import re
import shlex
import subprocess
import sys

from .errors import ConfigError

__all__ = ["SYSTEMS", "RUNNABLE", "job_kwargs", "render_job_script", "jobqueue_config", "run_submit"]

log = logging.getLogger(__name__)

#: batch system → (dask_jobqueue cluster class, its job class)
SYSTEMS = {"slurm": ("SLURMCluster", "SLURMJob"), "pbs": ("PBSCluster", "PBSJob")}
#: catalogpred commands that can run on a submitted cluster
RUNNABLE = ("ingest", "predict")
#: the scheduler address shown in a dry-run job script (a real run fills in the address of its scheduler)
PLACEHOLDER_ADDRESS = "tcp://<scheduler-address>:8786"
GPU_WORKER_COMMAND = "dask cuda worker"  # jobqueue runs `<python> -m <worker_command>`: python -m dask cuda worker
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
#: batch system → the command that lists this user's jobs still in the queue (pending, running, held), one id a
#: line: what :func:`_wait_for_job_workers` asks while the workers start, to notice jobs that ended without them
QUEUE_COMMANDS = {"slurm": ["squeue", "--noheader", "--format=%i", "--user={user}"], "pbs": ["qselect", "-u", "{user}"]}
#: seconds between two such questions while waiting for workers (a queue command per half minute is what SLURM
#: sites ask of their users' scripts at most)
JOB_POLL_S = 30.0


def _requests_gpus(directive: str) -> bool:
    """Whether an ``#SBATCH`` directive asks for GPUs (``--gres=gpu:N``, ``--gpus``, ``--gpus-per-node``/
    ``-task``, ``-G N``); ``--qos=gpu_normal``, ``-p gpu`` or ``--constraint=gpu`` do not."""
    words = directive.replace("=", " ").split()
    if not words:
        return False
    opt = words[0]
    return (opt == "--gres" and "gpu" in directive) or opt.startswith("--gpus") or opt == "-G"


def _flatten(tree: dict, prefix: str = ""):
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict):
            yield from _flatten(value, dotted + ".")
        else:
            yield dotted, value


def _canon(key: str) -> str:
    return key.replace("_", "-")


@contextlib.contextmanager
def jobqueue_config(path: str | os.PathLike | None, system: str | None = None):
    """Apply a dask-jobqueue YAML file (``jobqueue: {slurm: {...}, pbs: {...}}``) to ``dask.config`` inside the block.

    Keys are merged into the defaults one by one (a file that sets only ``cores``
    keeps every other default). With ``system``, unknown keys under
    ``jobqueue.<system>`` raise :class:`ConfigError` with the closest known key.
    """
    import dask
    import dask_jobqueue  # noqa: F401 - registers jobqueue's defaults with dask.config
    import yaml

    if path is None:
        yield
        return
    try:
        with open(path) as f:
            data = yaml.safe_load(f)
    except OSError as exc:
        raise ConfigError(f"cannot read jobqueue config {path}: {exc.strerror}") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path} is not valid YAML: {exc}") from exc
    if not isinstance(data, dict) or not isinstance(data.get("jobqueue"), dict):
        raise ConfigError(f"{path}: expected a top-level 'jobqueue:' mapping with dask-jobqueue keys "
                          "(see deploy/slurm/jobqueue.yaml)")
    if system is not None and isinstance(data["jobqueue"].get(system), dict):
        known = {_canon(k) for k in dask.config.get(f"jobqueue.{system}")}
        for key in data["jobqueue"][system]:
            if _canon(key) not in known:
                close = difflib.get_close_matches(_canon(key), sorted(known), n=1)
                hint = f"; did you mean '{close[0]}'?" if close else ""
                raise ConfigError(f"{path}: unknown key jobqueue.{system}.{key}{hint}")
    with dask.config.set(dict(_flatten(data))):
        yield


def _activate_lines() -> list[str]:
    """Job-script lines that put this environment first on PATH (workers import the same catalogpred)."""
    if sys.prefix != sys.base_prefix and os.path.exists(os.path.join(sys.prefix, "bin", "activate")):
        return [f"source {shlex.quote(os.path.join(sys.prefix, 'bin', 'activate'))}"]
    return []


#: a batch walltime: [D-]HH:MM[:SS] (SLURM also takes D-HH and MM; PBS HH:MM:SS)
_WALLTIME = re.compile(r"^(\d+-)?\d{1,3}(:\d{2}){0,2}$")
#: a queue, partition or account name: no spaces or shell characters (it lands in a #SBATCH/#PBS line)
_BATCH_NAME = re.compile(r"^[A-Za-z0-9_.@+-]+(,[A-Za-z0-9_.@+-]+)*$")


def _check_job_values(cores: int, memory: str, processes, gpus_per_job, walltime, queue, account) -> None:
    """One-line errors for job settings that would crash dask-jobqueue or land in the job script as nonsense."""
    from dask.utils import parse_bytes

    if cores < 1:
        raise ConfigError(f"--cores must be at least 1, not {cores}")
    if processes is not None and not 1 <= int(processes) <= cores:
        raise ConfigError(f"--processes must be 1..--cores ({cores}), not {processes}: each worker needs a core")
    if gpus_per_job is not None and int(gpus_per_job) < 0:
        raise ConfigError(f"--gpus-per-job must be 0 (CPU workers) or more, not {gpus_per_job}")
    try:
        ok = parse_bytes(str(memory)) > 0 and not str(memory).strip().isdigit()
    except (ValueError, TypeError):
        ok = False
    if not ok:
        raise ConfigError(f"--memory {memory!r}: give the memory per job with a unit, e.g. 64GB or 500MB")
    if walltime is not None and not _WALLTIME.match(str(walltime)):
        raise ConfigError(f"--walltime {walltime!r}: give HH:MM:SS (or D-HH:MM:SS), e.g. 04:00:00")
    for what, value in (("--queue", queue), ("--account", account)):
        if value is not None and not _BATCH_NAME.match(str(value)):
            raise ConfigError(f"{what} {value!r}: a name without spaces or shell characters")


def job_kwargs(system: str, *, cores: int | None = None, memory: str | None = None, processes: int | None = None,
               walltime: str | None = None, queue: str | None = None, account: str | None = None,
               gpus_per_job: int = 0, env: list[str] | tuple = ()) -> dict:
    """Keyword arguments for ``SLURMCluster``/``PBSCluster`` (and their job classes).

    ``None`` leaves a setting to ``dask.config`` (``jobqueue.<system>.<key>``), so call
    this inside :func:`jobqueue_config` to honour a config file.

    Parameters
    ----------
    cores, memory : int, str
        Per job, e.g. ``16`` and ``"64GB"``; required here or in the config.
    processes : int, optional
        Worker processes per job (jobqueue's default is about sqrt(cores)). With GPUs
        it is the GPU count: dask-cuda starts one worker per GPU.
    gpus_per_job : int
        GPUs per job; 0 for CPU workers.
    env : list of str
        ``NAME=VALUE`` pairs exported in the job script.

    Raises
    ------
    ConfigError
        Missing cores/memory, a GPU job whose ``processes`` differs from its GPU count,
        or a malformed ``NAME=VALUE``.
    """
    import dask

    if system not in SYSTEMS:
        raise ConfigError(f"unknown batch system {system!r}; choose one of {', '.join(SYSTEMS)}")

    def conf(key, default=None):
        return dask.config.get(f"jobqueue.{system}.{key}", default)

    cores = cores if cores is not None else conf("cores")
    memory = memory if memory is not None else conf("memory")
    if cores is None or memory is None:
        raise ConfigError(f"cores and memory per job are not set: pass e.g. --cores 16 --memory 64GB, or set "
                          f"jobqueue.{system}.cores and jobqueue.{system}.memory in --config (deploy/{system}/jobqueue.yaml)")
    kw: dict = {"cores": int(cores), "memory": str(memory)}
    _check_job_values(kw["cores"], kw["memory"], processes, gpus_per_job,
                      walltime if walltime is not None else conf("walltime"), queue, account)
    for key, value in (("walltime", walltime), ("queue", queue), ("account", account), ("processes", processes)):
        if value is not None:
            kw[key] = value
    if conf("name") in (None, "dask-worker"):  # jobqueue's default job name; ours says what the jobs are
        kw["job_name"] = "catalogpred"

    prologue = list(conf("job-script-prologue") or [])
    if conf("python") is None:  # workers run this interpreter; activate its environment for PATH too
        prologue += [line for line in _activate_lines() if line not in prologue]
    for item in env:
        name, sep, value = item.partition("=")
        if not sep or not _ENV_NAME.match(name):
            raise ConfigError(f"--env {item!r}: expected NAME=VALUE")
        prologue.append(f"export {name}={shlex.quote(value)}")
    if not gpus_per_job:  # CPU workers start as the local default does (cluster.CPU_WORKER_ENVIRON)
        from .cluster import CPU_WORKER_ENVIRON

        prologue += [f"export {name}={shlex.quote(value)}" for name, value in CPU_WORKER_ENVIRON.items()
                     if not any(re.search(rf"\b{name}=", line) for line in prologue)]
    kw["job_script_prologue"] = prologue

    extra_args = list(conf("worker-extra-args") or [])
    if gpus_per_job:
        gpus = int(gpus_per_job)
        if processes is not None and processes != gpus:
            raise ConfigError(f"--processes {processes} with --gpus-per-job {gpus}: GPU jobs run one worker per GPU")
        if kw["cores"] < gpus:
            raise ConfigError(f"--cores {kw['cores']} is less than --gpus-per-job {gpus}; give each GPU worker a core")
        kw["processes"] = gpus  # nthreads and memory-limit per worker = job cores and memory / GPUs
        kw["worker_command"] = GPU_WORKER_COMMAND
        if "--resources" not in extra_args:
            extra_args += ["--resources", "GPU=1"]
        if system == "slurm":
            directives = list(conf("job-extra-directives") or [])
            if not any(_requests_gpus(str(d)) for d in directives):
                directives.append(f"--gres=gpu:{gpus}")
            kw["job_extra_directives"] = directives
        elif conf("resource-spec") is None:
            from dask.utils import parse_bytes
            from dask_jobqueue.pbs import pbs_format_bytes_ceil

            kw["resource_spec"] = (f"select=1:ncpus={kw['cores']}:ngpus={gpus}:"
                                   f"mem={pbs_format_bytes_ceil(parse_bytes(kw['memory']))}")
        elif not re.search(r"\b(ngpus|gpus|gpu)\s*=", str(conf("resource-spec"))):
            raise ConfigError(f"--gpus-per-job {gpus}, but jobqueue.pbs.resource-spec in --config "
                              f"({conf('resource-spec')!r}) requests no GPUs: add ngpus={gpus} to its select "
                              "statement, or leave resource-spec out and catalogpred writes it")
    kw["worker_extra_args"] = extra_args
    if walltime is None and conf("walltime") in (None, "00:30:00"):  # after every error: a warning, then a job
        log.warning("no --walltime (nor jobqueue.%s.walltime in --config): the jobs get dask-jobqueue's default of "
                    "00:30:00, and their workers end with it; pass e.g. --walltime 04:00:00", system)
    return kw


def _classes(system: str):
    import dask_jobqueue

    cluster_cls = getattr(dask_jobqueue, SYSTEMS[system][0])
    return cluster_cls, cluster_cls.job_cls


def render_job_script(system: str, kwargs: dict, scheduler_address: str = PLACEHOLDER_ADDRESS) -> str:
    """The batch script one job of ``SLURMCluster(**kwargs)``/``PBSCluster(**kwargs)`` would submit.

    Built from jobqueue's job class directly (what ``cluster.job_script()`` does), so no
    scheduler is started and no batch command is called.
    """
    _, job_cls = _classes(system)
    try:
        job = job_cls(scheduler=scheduler_address, name="dummy-name", **kwargs)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"dask-jobqueue rejected the {system} settings: {exc}") from exc
    return job.job_script()


def _split_command(command: list[str]) -> list[str]:
    cmd = list(command)
    if cmd and cmd[0] == "--":
        cmd = cmd[1:]
    sub = next((c for c in cmd if not c.startswith("-")), None)
    if sub not in RUNNABLE:
        raise ConfigError(f"submit runs `catalogpred ingest ...` or `catalogpred predict ...` on the new cluster; "
                          f"put it after `--`, e.g. `catalogpred submit slurm --jobs 4 -- predict --store ...` "
                          f"(got {' '.join(cmd) or 'nothing'})")
    for flag in ("--scheduler", "--scheduler-file", "--workers"):
        if any(c == flag or c.startswith(flag + "=") for c in cmd):
            raise ConfigError(f"{flag} cannot be used after `--` in submit: the command runs on the submitted cluster")
    from .cli import parse_command

    try:  # the command's own parser and value checks, before anything is submitted
        parse_command(cmd)
    except ConfigError as exc:
        raise ConfigError(f"the command after `--`: {exc}") from exc
    return cmd


def _check_submit_command(system: str, job_cls) -> None:
    """A :class:`ConfigError` unless the batch system's submit command (``sbatch``, ``qsub``) is on PATH."""
    import shutil

    exe = shlex.split(job_cls.submit_command)[0]
    if shutil.which(exe) is None:
        raise ConfigError(f"`{exe}` is not on PATH: submit {system} runs where {system.upper()} jobs can be submitted "
                          f"(a login node with `{exe}`); --dry-run prints the job script without it")


def _submit_jobs(cluster, n_jobs: int, system: str) -> None:
    """Submit ``n_jobs`` jobs and wait until the batch system has taken each (what ``cluster.scale(jobs=n)``
    does, but a refused submission raises here instead of being logged in the cluster's event loop while the
    command waits for workers that never come)."""
    while len(cluster.worker_spec) < n_jobs:
        cluster.worker_spec.update(cluster.new_worker_spec())
    try:
        cluster.sync(cluster._correct_state)  # starts every job: runs the submit command once per job
    except (OSError, RuntimeError, ValueError) as exc:
        from distributed.core import Status

        # closing the cluster cancels the jobs that were submitted (scancel/qdel), then asserts that every job
        # it started is closed or failed: jobqueue's Job.close does not say so, and this one's traceback keeps them
        submitted = sum(bool(getattr(job, "job_id", None)) for job in cluster.workers.values())
        for job in cluster.workers.values():
            job.status = Status.failed
        text = str(exc)
        if isinstance(exc, RuntimeError) and "stderr:" in text:  # jobqueue's "Command exited with ..." message
            code = re.search(r"Exit code: (\S+)", text)
            detail = " ".join(text.split("stderr:", 1)[1].split()) or "no message"
            text = f"exited with code {code.group(1) if code else '?'}: {detail}"
        raise ConfigError(f"submitting the {system} jobs failed ({submitted} of {n_jobs} submitted, now cancelled): "
                          f"{type(exc).__name__ + ': ' if not isinstance(exc, RuntimeError) else ''}{text}") from exc


def queued_job_ids(system: str) -> set[str] | None:
    """Ids of this user's jobs that the batch system still lists (:data:`QUEUE_COMMANDS`), each without a PBS
    ``.server`` suffix, or None when it cannot be asked (the command is missing, fails or takes over a minute)."""
    cmd = [part.format(user=getpass.getuser()) for part in QUEUE_COMMANDS[system]]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=True).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        log.debug("cannot list the %s queue with `%s`: %s", system, " ".join(cmd), exc)
        return None
    return {word.split(".")[0] for word in out.split()}


def _job_workers(cluster) -> dict[str, tuple[str, int]]:
    """``{job name: (batch job id, worker processes it starts)}`` of the submitted jobs of a jobqueue cluster."""
    return {name: (str(job.job_id).split(".")[0], len(cluster.worker_spec[name].get("group", [""])))
            for name, job in cluster.workers.items() if getattr(job, "job_id", None)}


def _wait_for_job_workers(cluster, want: int, system: str, *, poll_s: float | None = None) -> int:
    """Wait until ``want`` workers are connected to the cluster's scheduler (:func:`~catalogpred.cluster.
    wait_for_workers`), asking the batch system every ``poll_s`` seconds (:data:`JOB_POLL_S`) which of the
    submitted jobs are still queued or running. A job that ended before its workers connected (a wrong
    partition, an environment missing on the nodes, a worker that cannot start) lowers the target to what the
    other jobs can still bring, with a warning that names it; when no job is left, a :class:`ConfigError` says
    so instead of waiting for ever. Returns the number of workers the command then waits for (``want`` or
    fewer)."""
    from distributed import Client

    from .cluster import wait_for_workers

    jobs, ended = _job_workers(cluster), set()
    where = ("SLURM writes slurm-<id>.out in the directory it was submitted from" if system == "slurm"
             else "PBS writes <name>.o<id> in the directory it was submitted from")

    def recheck(have: int, want: int) -> int:
        queued = queued_job_ids(system)
        gone = sorted(name for name, (job_id, _) in jobs.items()
                      if queued is not None and job_id not in queued and name not in ended)
        if not gone:
            return want  # all still queued or running, or the queue cannot be asked: wait as before
        ended.update(gone)
        left = sum(n for name, (_, n) in jobs.items() if name not in ended)
        ids = ", ".join(jobs[name][0] for name in gone)
        if left == 0:
            raise ConfigError(f"every {system} job ended before its Dask workers connected ({len(jobs)} jobs, last "
                              f"ids {ids}; {have} workers connected): see the jobs' output ({where}, unless the "
                              f"job script sets another); --dry-run prints the job script")
        log.warning("%s job(s) %s ended before their Dask workers connected; waiting for %d workers from the "
                    "other jobs (%s)", system, ids, min(want, left), where)
        return min(want, left)

    with Client(cluster.scheduler_address, timeout="60s") as client:
        return wait_for_workers(client, want, where=f"from {len(jobs)} {system} jobs",
                                poll_s=JOB_POLL_S if poll_s is None else poll_s, recheck=recheck)


def _pop_option(cmd: list[str], flag: str) -> tuple[list[str], str | None]:
    """``cmd`` without ``flag VALUE``/``flag=VALUE``, and that value (None if absent; the last one wins)."""
    out, value, it = [], None, iter(cmd)
    for word in it:
        if word == flag:
            value = next(it, None)
        elif word.startswith(flag + "="):
            value = word.split("=", 1)[1]
        else:
            out.append(word)
    return out, value


def run_submit(args) -> int:
    """``catalogpred submit``: see the module docstring. Returns the exit code of the command it ran."""
    want_command = not args.dry_run or args.run_args not in ([], ["--"])
    cmd = _split_command(args.run_args) if want_command else []
    if args.jobs < 1:
        raise ConfigError("--jobs must be at least 1")
    if getattr(args, "wait_workers", None) is not None and args.wait_workers < 1:
        raise ConfigError(f"--wait-workers must be at least 1, not {args.wait_workers}")
    with jobqueue_config(args.config, args.system):
        kw = job_kwargs(args.system, cores=args.cores, memory=args.memory, processes=args.processes,
                        walltime=args.walltime, queue=args.queue, account=args.account,
                        gpus_per_job=args.gpus_per_job, env=args.env)
        if args.dry_run:
            print(render_job_script(args.system, kw), end="")
            log.info("dry run: would submit %d %s jobs like this one%s", args.jobs, args.system,
                     f", then run `catalogpred {' '.join(cmd)}` on them" if cmd else "")
            return 0
        return _run_on_jobs(args, kw, cmd)


def _run_on_jobs(args, kw: dict, cmd: list[str]) -> int:
    from .cli import main

    cluster_cls, job_cls = _classes(args.system)
    _check_submit_command(args.system, job_cls)
    try:
        cluster = cluster_cls(**kw)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"dask-jobqueue rejected the {args.system} settings: {exc}") from exc
    with cluster:
        log.debug("job script:\n%s", cluster.job_script())
        _submit_jobs(cluster, args.jobs, args.system)
        n_workers = len(cluster.plan)  # worker names the submitted jobs will bring (jobs x processes per job)
        log.info("Dask scheduler at %s; submitted %d %s jobs for %d workers", cluster.scheduler_address, args.jobs,
                 args.system, n_workers)
        cmd, theirs = _pop_option(cmd, "--wait-workers")  # checked by parse_command: a positive integer
        want = min(n_workers, int(theirs) if theirs else args.wait_workers or n_workers)
        try:
            want = _wait_for_job_workers(cluster, want, args.system)
            argv = (["-v"] * args.verbose + (["-q"] if args.quiet else []) + cmd
                    + ["--scheduler", cluster.scheduler_address, "--wait-workers", str(want)])
            return main(argv)
        finally:
            log.info("cancelling the %s jobs", args.system)
