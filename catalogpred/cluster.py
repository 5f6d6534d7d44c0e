"""How to get a Dask client: a local CPU cluster (the default) or an existing scheduler.

The local default is a ``distributed.LocalCluster`` with one single-threaded worker
process per core (torch gets its threads explicitly from the tasks, since Dask
workers start with ``OMP_NUM_THREADS=1``), each with one malloc arena and less of Dask's
periodic housekeeping (:func:`local_cpu_cluster`). ``scheduler`` / ``scheduler_file``
connect to a cluster that already exists (SLURM, PBS, Kubernetes, …; see ``deploy/``
and :mod:`catalogpred.submit`).

Remote workers open the store, the model bundle and the catalog by path, so those
paths must mean the same thing on the client and on every worker:

- :func:`shared_path` makes local paths absolute on the client (a worker's working
  directory is wherever it was started) and is the one place where URLs are handled.
  Today only local paths work, on a filesystem every worker mounts at the same place
  (NFS, Lustre, GPFS, a Kubernetes ReadWriteMany volume). ``file://`` URLs become
  paths; other fsspec URLs (``s3://``, ``gs://``, …) are refused with a clear error,
  because the store, catalog and bundle are still written with local file I/O.
- :func:`check_workers` asks every connected worker whether it runs the same
  catalogpred version and sees those paths, so a missing mount or an outdated
  environment fails before any task runs instead of in every task. Workers that
  join a running job (adaptive scaling, a replaced node) are checked as they come
  (:func:`retire_unfit_workers`), and a finished task whose outputs the client
  cannot see has its worker retired and runs again (``pipeline.run_bounded``).
- Every task of a run is submitted through :func:`same_code`: it runs only on a worker
  whose catalogpred code is the client's, so a worker that joins between two of the
  run's checks cannot write part of a catalog with other code before it is retired.
"""
from __future__ import annotations

import contextlib
import functools
import logging
import os

from .errors import ConfigError, WorkerCodeError

__all__ = ["default_n_workers", "dask_client", "shared_path", "check_workers", "default_torch_threads",
           "TASKS_IN_FLIGHT_PER_WORKER", "gpu_count", "resolve_device", "GPU_RESOURCE", "BLOCKS_PER_GPU",
           "gpu_task_resources", "COMPILE_AUTO_ROWS", "resolve_compile", "IO_RESOURCE", "add_io_workers",
           "share_gpus", "check_workers_per_gpu", "DEFAULT_DASHBOARD", "wait_for_workers", "worker_problems",
           "retire_unfit_workers", "retire_workers", "worker_address", "same_code", "CPU_WORKER_ENVIRON",
           "LOCAL_CPU_CONFIG", "local_cpu_cluster"]

log = logging.getLogger(__name__)

#: where ``--dashboard`` serves a local cluster's Dask dashboard: this machine only (on a login or batch node,
#: reach it through an SSH tunnel, ``ssh -L 8787:127.0.0.1:8787 host``)
DEFAULT_DASHBOARD = "127.0.0.1:8787"

#: tasks the pipeline keeps in flight per worker (``pipeline.run_bounded`` submits at most 2 × workers)
TASKS_IN_FLIGHT_PER_WORKER = 2
#: the Dask worker resource a GPU worker offers: one per GPU (``dask cuda worker --resources GPU=1``)
GPU_RESOURCE = {"GPU": 1}
#: prediction blocks that share one GPU by default. A block spends most of its time on the CPU (reading
#: its shard from Zarr, writing Parquet) and little on the GPU, so with 2 blocks in flight one reads or
#: writes while the other runs on the GPU (kernels of both queue on the same device). Each task asks for
#: ``GPU = 1 / BLOCKS_PER_GPU`` of its worker's ``GPU=1``; the worker needs that many threads.
BLOCKS_PER_GPU = 2


#: the Dask worker resource of an I/O worker: a CPU-only worker process that reads shards and writes
#: Parquet for the GPU workers (``dask worker … --resources IO=1``, or ``--io-workers`` locally). When a
#: cluster has I/O workers, ``predict --device cuda`` runs each block as three tasks: read (I/O worker),
#: model (GPU worker), write (I/O worker). The GPU worker process then does only the model, instead of
#: also decoding the shard and writing Parquet under one interpreter lock with its other blocks
#: (measured on an H100: the model step was 37 ms of a block's 136 ms; that lock bounds a GPU worker).
IO_RESOURCE = {"IO": 1}

#: environment a CPU worker process starts with (on top of Dask's ``distributed.nanny.pre-spawn-environ``):
#: one glibc malloc arena, so the worker's task thread allocates from the main heap, as a bare process
#: does. A thread's own arena cannot hold a chunk over 64 MiB (glibc's ``HEAP_MAX_SIZE``), so every conv
#: output of an encoder batch (128 MB at batch 64) would be a fresh ``mmap``, page-faulted in and unmapped
#: again each batch. Measured (2 cores, one torch thread, 256 SDSS spectra, a predict worker's allocator
#: settings): the encoder took 3.28-3.80 s in a thread against 3.24-3.41 s in the main thread with 615k
#: against 414k page faults; with one arena 3.03-3.45 s against 3.14-3.36 s, 376k faults in both.
#: Set before the process starts (glibc reads it once); a worker the nanny restarts gets it again.
CPU_WORKER_ENVIRON = {"MALLOC_ARENA_MAX": "1"}
#: Dask's periodic housekeeping on the local CPU cluster, less often than Dask's defaults (in brackets), where
#: the user's Dask config leaves them at those defaults. On a small machine every worker core is busy with a
#: block, so whatever else wakes up takes its time from the blocks: idle, Dask's defaults cost 0.35-0.43 CPU-s
#: per worker and 0.4-0.56 in the scheduler's process every 10 s (2 cores; 5-7 % of the machine), and in
#: 1,024-spectrum predicts of 8.3-9.1 s on 2 workers the scheduler's process alone used 0.56-0.69 CPU-s.
#: None of these changes what a run computes: ``tick`` only times the event loop (for its "unresponsive"
#: warnings), ``system-monitor`` samples CPU and memory for the dashboard, ``memory.monitor-interval`` is how
#: often a worker compares its memory with its pause/terminate limits (a CPU block grows by ~0.25 GB per
#: encoder batch of ~1 s), and work stealing balances queued tasks (predict keeps 2 per worker).
LOCAL_CPU_CONFIG = {
    "distributed.admin.tick.interval": "1s",  # [20ms]
    "distributed.admin.system-monitor.interval": "2s",  # [500ms]
    "distributed.worker.memory.monitor-interval": "500ms",  # [100ms]
    "distributed.scheduler.work-stealing-interval": "500ms",  # [100ms]
}
#: ... and without a dashboard, nobody looks at the workers' statistical profiler (it samples every 10 ms)
LOCAL_CPU_CONFIG_NO_DASHBOARD = {"distributed.worker.profile.enabled": False}


def gpu_task_resources(blocks_per_gpu: int = BLOCKS_PER_GPU) -> dict:
    """``resources=`` for one prediction task: ``{"GPU": 1 / blocks_per_gpu}`` (a share of a worker's GPU)."""
    if blocks_per_gpu < 1:
        raise ConfigError(f"blocks per GPU must be >= 1, not {blocks_per_gpu}")
    return {"GPU": GPU_RESOURCE["GPU"] / blocks_per_gpu}


#: ``compile="auto"`` compiles the encoder (``torch.compile``) when each worker has at least this many
#: spectra to predict. Compiling costs 5-11 s on an H200 and 5-22 s per CPU worker (measured), then saves
#: ~64 % of the encoder time on the H200 (bf16: 57k -> 160k spectra/s) and 10-25 % on a 1-thread CPU worker
#: (42 -> 46-55 spectra/s, two runs). At these sizes that is ~11 s saved per GPU worker (1-2x the compile)
#: and 100-280 s per CPU worker (4-55x the compile).
COMPILE_AUTO_ROWS = {"cpu": 50_000, "cuda": 1_000_000}


def resolve_compile(setting: str | bool, device: str, n_spectra: int, n_workers: int) -> bool:
    """Whether predict compiles the encoder: ``"yes"``/``True``, ``"no"``/``False``, or ``"auto"``
    (:data:`COMPILE_AUTO_ROWS` spectra per worker on ``device``)."""
    if isinstance(setting, bool):
        return setting
    if setting not in ("auto", "yes", "no"):
        raise ConfigError(f"compile must be auto, yes or no, not {setting!r}")
    if setting != "auto":
        return setting == "yes"
    return n_spectra / max(n_workers, 1) >= COMPILE_AUTO_ROWS[device]


def gpu_count() -> int:
    """NVIDIA GPUs on this machine, from NVML (``nvidia-ml-py``/``pynvml``); 0 without NVML or a driver.

    Never creates a CUDA context (no torch, no CuPy): the client process stays GPU-free, and
    workers started afterwards still choose their own device with ``CUDA_VISIBLE_DEVICES``.
    """
    try:
        import pynvml  # provided by nvidia-ml-py (a dask-cuda dependency)
    except ImportError:
        return 0
    try:
        pynvml.nvmlInit()
    except Exception:  # noqa: BLE001 - NVMLError: no driver / no device
        return 0
    try:
        n = int(pynvml.nvmlDeviceGetCount())
    except Exception:  # noqa: BLE001
        n = 0
    finally:
        try:
            pynvml.nvmlShutdown()
        except Exception:  # noqa: BLE001
            pass
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:  # "" hides every GPU; "0,1" shows two
        n = min(n, len([d for d in visible.split(",") if d.strip()]))
    return n


def resolve_device(device: str, client=None) -> str:
    """``"cpu"`` or ``"cuda"`` for ``--device auto|cpu|cuda``.

    ``auto`` is ``cuda`` when the connected workers offer the ``GPU`` resource (an existing
    cluster) or, without a client, when NVML reports a GPU on this machine (a local cluster);
    else ``cpu``.
    """
    if device not in ("auto", "cpu", "cuda"):
        raise ConfigError(f"device must be auto, cpu or cuda, not {device!r}")
    if device != "auto":
        return device
    if client is not None:
        workers = client.scheduler_info()["workers"].values()
        return "cuda" if any(w.get("resources", {}).get("GPU", 0) >= 1 for w in workers) else "cpu"
    return "cuda" if gpu_count() > 0 else "cpu"


def default_n_workers() -> int:
    """One worker per available core."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - macOS
        return max(1, os.cpu_count() or 1)


def check_scheduler_args(scheduler: str | None, scheduler_file: str | None) -> None:
    """A :class:`ConfigError` unless at most one of ``--scheduler`` and ``--scheduler-file`` is given."""
    if scheduler and scheduler_file:
        raise ConfigError("give either --scheduler or --scheduler-file, not both")


@contextlib.contextmanager
def dask_client(n_workers: int | None = None, *, threads_per_worker: int = 1, scheduler: str | None = None,
                scheduler_file: str | None = None, memory_limit: str | None = "auto", wait_workers: int | None = None,
                device: str = "cpu", blocks_per_gpu: int = BLOCKS_PER_GPU, io_workers: int = 0,
                workers_per_gpu: int = 1, dashboard: str | None = None):
    """Yield a ``distributed.Client``; a local cluster is started and closed around it.

    Parameters
    ----------
    n_workers : int, optional
        Local worker processes (default: one per core). Ignored with a scheduler.
    scheduler : str, optional
        Address of an existing scheduler, e.g. ``tcp://host:8786``.
    scheduler_file : str, optional
        A scheduler file written by ``dask scheduler --scheduler-file``.
    wait_workers : int, optional
        With a scheduler: block until this many workers are connected (batch jobs
        and pods start over minutes; the pipeline's task window follows the workers
        connected, recounted as tasks finish, so a run starts spread over them).
        Default: at least one. A line is logged every minute while waiting.
    device : "cpu" | "cuda"
        Local cluster only: ``cuda`` starts a ``dask_cuda.LocalCUDACluster`` with one worker per
        GPU (``n_workers`` caps it), each pinned to its GPU by ``CUDA_VISIBLE_DEVICES`` (it sees
        it as ``cuda:0``), with the worker resource ``GPU=1`` and ``blocks_per_gpu`` threads:
        prediction tasks each ask for ``GPU=1/blocks_per_gpu`` (:func:`gpu_task_resources`), so that
        many blocks share a GPU. Needs the ``[gpu]`` extra.
    io_workers : int
        Local cluster only: also start this many single-threaded CPU worker processes with the
        :data:`IO_RESOURCE` (see :func:`add_io_workers`).
    workers_per_gpu : int
        Local CUDA cluster only: worker processes per GPU (default 1, dask-cuda's one). More than one
        gives each GPU more host processes for reads and Parquet writes, each with its own interpreter
        lock and CUDA context (see :func:`share_gpus`).
    dashboard : str, optional
        Local cluster only: serve the Dask dashboard at this ``host:port`` (e.g. ``127.0.0.1:8787``; another
        free port when that one is taken) and log its link. Default: no dashboard. With a scheduler, the link
        to its dashboard is logged when it serves one.

    Raises
    ------
    ConfigError
        If both ``scheduler`` and ``scheduler_file`` are given, or the scheduler file is missing;
        with ``device="cuda"``, if dask-cuda is not installed or NVML sees no GPU.

    Examples
    --------
    >>> with dask_client(scheduler="tcp://10.0.0.5:8786", wait_workers=8) as client:  # doctest: +SKIP
    ...     run_predict("/shared/store.zarr", "/shared/model", "/shared/catalog", client=client)
    """
    from distributed import Client

    check_scheduler_args(scheduler, scheduler_file)
    check_workers_per_gpu(workers_per_gpu, device=device, local=not (scheduler or scheduler_file))
    if scheduler or scheduler_file:
        if scheduler_file and not os.path.exists(scheduler_file):
            raise ConfigError(f"scheduler file {scheduler_file} does not exist; start the scheduler with "
                              f"`dask scheduler --scheduler-file {scheduler_file}` first")
        client = _connect(scheduler, scheduler_file)
        try:
            wait_for_workers(client, max(1, wait_workers or 1), where=f"at {client.scheduler.address}")
            log.info("connected to %s (%d workers)", client.scheduler.address, len(client.scheduler_info()["workers"]))
            if "dashboard" in client.scheduler_info().get("services", {}) and _answers(client.dashboard_link):
                log.info("Dask dashboard: %s", client.dashboard_link)  # the port is listed even without one
            yield client
        finally:
            client.close()
        return
    _ignore_taken_port_warnings()
    if device == "cuda":
        cluster = _local_cuda_cluster(n_workers, memory_limit, blocks_per_gpu, workers_per_gpu, dashboard)
        n, threads_per_worker = len(cluster.workers) * workers_per_gpu, blocks_per_gpu
    else:
        n = n_workers or default_n_workers()
        cluster = local_cpu_cluster(n, threads_per_worker=threads_per_worker, dashboard_address=dashboard,
                                    memory_limit=memory_limit, silence_logs=logging.WARNING)
    client = Client(cluster)
    client.register_plugin(one_line_task_errors(), name="catalogpred-one-line-task-errors")
    if dashboard:
        log.info("Dask dashboard: %s", client.dashboard_link)
    if workers_per_gpu > 1:
        share_gpus(cluster, client, workers_per_gpu)
    log.info("local Dask %scluster: %d worker processes × %d thread(s)", "CUDA " if device == "cuda" else "", n,
             threads_per_worker)
    if io_workers:
        add_io_workers(cluster, client, io_workers, memory_limit=memory_limit)
    try:
        yield client
    finally:
        _quiet_shutdown(client)
        client.close()
        cluster.close()


def _answers(url: str, timeout_s: float = 2.0) -> bool:
    """Whether an HTTP GET of ``url`` succeeds within ``timeout_s``."""
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=timeout_s):
            return True
    except Exception:  # refused, 404, timeout, a proxy: no link worth printing
        return False


def _connect(scheduler: str | None, scheduler_file: str | None):
    """A ``Client`` of an existing scheduler, or a one-line :class:`ConfigError` that says why not (no scheduler
    listening there, an address without a port, an empty or half-written scheduler file)."""
    from distributed import Client

    where = f"--scheduler {scheduler}" if scheduler else f"--scheduler-file {scheduler_file}"
    try:
        return Client(address=scheduler, scheduler_file=scheduler_file)
    except (OSError, TimeoutError, ValueError, AssertionError, KeyError) as exc:  # json errors are ValueErrors
        detail = " ".join(str(exc).split()) or type(exc).__name__
        raise ConfigError(f"cannot connect to the Dask scheduler of {where} ({detail}); is it running, and is the "
                          "address tcp://HOST:PORT (a stale scheduler file names a scheduler that has ended)?") from exc


def wait_for_workers(client, want: int, *, where: str, poll_s: float = 60.0, recheck=None) -> int:
    """Block until ``want`` workers are connected to ``client``'s scheduler, with a line in the log every minute
    (``where``: which cluster, for that line). No overall timeout: batch queues take hours. ``recheck(have,
    want) -> want`` runs after every ``poll_s`` seconds without them and may lower the target or raise (``submit``
    asks the batch system which jobs are left). Returns the target that was reached."""
    import time

    last_line = -float("inf")
    while (have := len(client.scheduler_info()["workers"])) < want:
        if time.monotonic() - last_line >= 60:
            log.info("waiting for %d Dask workers %s (%d connected)", want, where, have)
            last_line = time.monotonic()
        try:
            client.wait_for_workers(want, timeout=poll_s)
        except TimeoutError:
            if recheck is not None:
                want = recheck(have, want)
    return want


def _ignore_taken_port_warnings() -> None:
    """No "Port 8787 is already in use" warning from a local cluster's scheduler. Its HTTP server (health and
    metrics routes, and the dashboard with ``--dashboard``) starts on 8787 even without a dashboard and moves to
    a free port when another run or notebook holds 8787; that is not a problem, and ``--dashboard`` logs the
    link it got."""
    import warnings

    warnings.filterwarnings("ignore", message=r"Port \d+ is already in use", category=UserWarning,
                            module=r"distributed\.node")


def _quiet_logs_below_critical() -> None:
    for name in ("distributed.worker", "distributed.core", "distributed.nanny"):
        logging.getLogger(name).setLevel(logging.CRITICAL)


def one_line_task_errors():
    """A Dask worker plugin for local clusters: a failed task is logged as one WARNING line (its key and error)
    instead of distributed's ERROR "Compute Failed" block with the task's repr and traceback. Dask retries the
    task, and catalogpred reports a block that fails every time (a ``predict_error`` reject, with the error
    text in its ``detail``), so the traceback only buried that report. ``-vv`` shows tracebacks client-side."""
    from distributed.diagnostics.plugin import WorkerPlugin

    class OneLineTaskErrors(WorkerPlugin):
        def setup(self, worker) -> None:
            logger = logging.getLogger("distributed.worker")
            if not any(isinstance(f, _OneLineComputeFailed) for f in logger.filters):
                logger.addFilter(_OneLineComputeFailed())

    return OneLineTaskErrors()


class _OneLineComputeFailed(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.msg, str) and record.msg.startswith("Compute Failed") and len(record.args or ()) >= 4:
            key, _, _, error = record.args[:4]
            first = str(error).strip().splitlines()[-1] if str(error).strip() else "?"
            record.msg, record.args = "task %s failed (Dask retries it): %s", (key, first[:500])
            record.levelno, record.levelname = logging.WARNING, "WARNING"
        return True


def _quiet_shutdown(client) -> None:
    """Before a local cluster closes, after its work: its worker processes log no errors about the scheduler
    going away (a heartbeat that meets the closing scheduler printed a traceback at the end of a good run)."""
    try:
        client.run(_quiet_logs_below_critical)
    except Exception:  # a worker already gone: nothing to quiet
        pass


def add_io_workers(cluster, client, n: int, *, memory_limit="auto") -> None:
    """Add ``n`` single-threaded CPU worker processes with the :data:`IO_RESOURCE` to a local
    ``SpecCluster`` (``LocalCluster``, ``LocalCUDACluster``) and wait for them. They see no GPU
    (``CUDA_VISIBLE_DEVICES=""``), so they never create a CUDA context."""
    from distributed import Nanny

    if n < 0:
        raise ConfigError(f"--io-workers must be >= 0, not {n}")
    for i in range(n):
        cluster.worker_spec[f"io-{i}"] = {"cls": Nanny, "options": {
            "nthreads": 1, "resources": dict(IO_RESOURCE), "memory_limit": memory_limit,
            "env": {"CUDA_VISIBLE_DEVICES": ""}, "silence_logs": logging.WARNING}}
    cluster.scale(len(cluster.worker_spec))  # starts the new specs (SpecCluster._correct_state)
    client.wait_for_workers(len(cluster.worker_spec))
    log.info("%d I/O worker processes for shard reads and Parquet writes", n)


def check_workers_per_gpu(workers_per_gpu: int, *, device: str, local: bool) -> None:
    """Raise :class:`ConfigError` unless ``workers_per_gpu`` is >= 1, and 1 except on a local CUDA cluster
    (``local``: no scheduler given; ``device``: ``cpu`` or ``cuda``)."""
    if workers_per_gpu < 1:
        raise ConfigError(f"--workers-per-gpu must be >= 1, not {workers_per_gpu}")
    if workers_per_gpu > 1 and not local:
        raise ConfigError("--workers-per-gpu starts a local CUDA cluster; on an existing cluster start that many "
                          "workers per GPU yourself (`CUDA_VISIBLE_DEVICES=0 dask worker ... --resources GPU=1`, "
                          "once per process; deploy/README.md)")
    if workers_per_gpu > 1 and device != "cuda":
        raise ConfigError("--workers-per-gpu applies to a local CUDA cluster (--device cuda)")


def share_gpus(cluster, client, workers_per_gpu: int) -> None:
    """Give every GPU worker of a local ``SpecCluster`` (``LocalCUDACluster``) ``workers_per_gpu - 1``
    twins and wait for them.

    A twin is a copy of its worker's spec under the name ``"<name>-<i>"``: the same
    ``CUDA_VISIBLE_DEVICES``, CPU affinity and ``GPU=1`` resource, so it drives the same GPU from its own
    process. Without CUDA MPS the GPU runs one process's kernels at a time (time-slicing), which costs little
    while each process keeps the GPU busy a fraction of the time: the twins are for runs bound by a worker's
    host side (shard reads, Parquet writes and Python under one interpreter lock), not by the GPU. The twins
    keep their worker's memory limit; :func:`dask_client` sizes it for all of them.
    """
    gpu_specs = {name: spec for name, spec in cluster.worker_spec.items()
                 if spec["options"].get("resources", {}).get("GPU", 0) >= 1}
    if not gpu_specs:
        raise ConfigError("share_gpus: the cluster has no worker with the GPU resource")
    for name, spec in gpu_specs.items():
        for i in range(1, workers_per_gpu):
            cluster.worker_spec[f"{name}-{i}"] = {**spec, "options": dict(spec["options"])}
    cluster.scale(len(cluster.worker_spec))  # starts the new specs (SpecCluster._correct_state)
    client.wait_for_workers(len(cluster.worker_spec))
    log.info("%d worker processes per GPU", workers_per_gpu)


def local_cpu_cluster(n_workers: int, *, threads_per_worker: int = 1, **kwargs):
    """A ``distributed.LocalCluster`` of ``n_workers`` worker processes started with :data:`CPU_WORKER_ENVIRON`
    and Dask's housekeeping at :data:`LOCAL_CPU_CONFIG` (``kwargs`` go to ``LocalCluster``;
    ``dashboard_address`` defaults to none, and then the workers' profiler is off too). The local default of
    :func:`dask_client`, and what the benchmarks time."""
    import dask
    from distributed import LocalCluster

    kwargs.setdefault("dashboard_address", None)
    config = {"distributed.nanny.pre-spawn-environ": {**dask.config.get("distributed.nanny.pre-spawn-environ", {}),
                                                      **CPU_WORKER_ENVIRON}}
    defaults = dask.config.merge(*dask.config.defaults)
    quiet = {**LOCAL_CPU_CONFIG, **({} if kwargs["dashboard_address"] else LOCAL_CPU_CONFIG_NO_DASHBOARD)}
    for key, value in quiet.items():  # what the user's Dask config sets is theirs
        if dask.config.get(key, None) == dask.config.get(key, None, config=defaults):
            config[key] = value
    with dask.config.set(config):  # read by the scheduler and each Nanny as they start; nannies pass it on
        return LocalCluster(n_workers=n_workers, threads_per_worker=threads_per_worker, processes=True, **kwargs)


def _local_cuda_cluster(n_workers: int | None, memory_limit, blocks_per_gpu: int = BLOCKS_PER_GPU,
                        workers_per_gpu: int = 1, dashboard: str | None = None):
    """A ``LocalCUDACluster``: one worker per GPU with ``blocks_per_gpu`` threads and ``resources={"GPU": 1}``;
    dask_cuda is imported only here. ``memory_limit="auto"`` gives each of the ``workers_per_gpu`` processes
    per GPU (:func:`share_gpus` adds them) an equal share of this machine's memory."""
    gpu_task_resources(blocks_per_gpu)  # validates
    try:
        from dask_cuda import LocalCUDACluster
    except ImportError as exc:
        raise ConfigError("--device cuda needs dask-cuda: pip install 'catalogpred[gpu]' (with a CUDA build of "
                          "torch; see README, Running on GPUs)") from exc
    n_gpu = gpu_count()
    if n_gpu == 0:
        raise ConfigError("--device cuda: NVML reports no GPU on this machine (check nvidia-smi and "
                          "CUDA_VISIBLE_DEVICES), or use --device cpu")
    n = min(n_gpu, n_workers) if n_workers else n_gpu
    if memory_limit == "auto" and workers_per_gpu > 1:
        memory_limit = 1 / (n * workers_per_gpu)  # a fraction of system memory (distributed's parse_memory_limit)
    return LocalCUDACluster(n_workers=n, threads_per_worker=blocks_per_gpu, memory_limit=memory_limit,
                            resources=dict(GPU_RESOURCE),
                            dashboard_address=dashboard, silence_logs=logging.WARNING)


def shared_path(path: str | os.PathLike) -> str:
    """The form of ``path`` to hand to workers: an absolute local path.

    Relative paths are resolved against the client's working directory (workers
    have their own), ``~`` is expanded, and ``file://`` URLs become paths.

    Raises
    ------
    ConfigError
        For other URLs (``s3://``, ``gs://``, ``https://``, …): the store, catalog and
        bundle are read and written with local file I/O, so object stores do not work yet.

    Examples
    --------
    >>> shared_path("file:///scratch/store.zarr")
    '/scratch/store.zarr'
    """
    text = os.fspath(path)
    if "://" in text:
        scheme, rest = text.split("://", 1)
        if scheme.lower() != "file":
            raise ConfigError(f"{text}: {scheme}:// URLs are not supported yet (store, catalog and model bundle use "
                              "local file I/O); put them on a filesystem that the client and every worker mount at "
                              "the same path, e.g. /shared/project/store.zarr (see deploy/README.md)")
        text = rest if rest.startswith("/") else "/" + rest.split("/", 1)[-1]  # file:///p or file://host/p
    return os.path.abspath(os.path.expanduser(text))


def _nearest_existing(path: str) -> str:
    """``path`` itself if it exists here, else its closest existing parent (an output that is not written yet)."""
    p = os.path.abspath(path)
    while not os.path.exists(p) and os.path.dirname(p) != p:
        p = os.path.dirname(p)
    return p


def worker_problems(client, paths=(), workers: list[str] | None = None) -> dict[str, str]:
    """``{worker address: what is wrong with it}`` for the connected workers (only ``workers`` if given) that do not
    run this catalogpred version and code, or do not see ``paths``; empty when all are fit.

    A path that does not exist yet on the client (an output) is checked through its closest existing parent
    directory, by a file the client writes there: a directory that exists on every node but is not shared (a
    node-local /tmp or scratch) passes an existence check, not this one.
    """
    import importlib.metadata as md

    from . import __version__

    if workers is None:
        workers = sorted(client.scheduler_info()["workers"])
    if not workers:
        return {}
    problems: dict[str, str] = {}
    versions = client.run(md.version, "catalogpred", workers=workers, on_error="return")
    for addr, v in sorted(versions.items()):
        if isinstance(v, (md.PackageNotFoundError, ImportError)):
            problems[addr] = (f"Dask worker {addr} cannot find catalogpred ({type(v).__name__}: {v}); start the "
                              "workers from an environment with catalogpred installed (deploy/README.md)")
        elif isinstance(v, BaseException):  # it left, or its connection failed
            problems[addr] = f"Dask worker {addr} did not answer the client's check ({type(v).__name__}: {v})"
        elif v != __version__:
            problems[addr] = (f"Dask worker {addr} runs catalogpred {v}, this client {__version__}; client, "
                              "scheduler and workers must run the same versions (deploy/README.md, version table)")
    # the same version string from another commit (or a client with local edits): compare the code itself
    mine = source_fingerprint()
    fit = [w for w in workers if w not in problems]
    theirs = client.run(_worker_fingerprint, workers=fit, on_error="return") if fit else {}
    for addr, fp in sorted(theirs.items()):
        if not isinstance(fp, BaseException) and fp != mine:
            problems[addr] = (f"Dask worker {addr} runs other catalogpred code than this client (version "
                              f"{__version__} both, source {fp} against {mine}): install the same commit for client "
                              "and workers (deploy/README.md, version table)")
    for path in dict.fromkeys(_nearest_existing(os.fspath(p)) for p in paths):
        fit = [w for w in workers if w not in problems]
        if not fit:
            break
        token = _write_token(path)
        try:
            seen = client.run(os.path.exists, token or path, workers=fit, on_error="return")
        finally:
            if token:
                os.unlink(token)
        what = f"a file the client just wrote in {path}" if token else path
        for addr, ok in sorted(seen.items()):
            if ok is not True:
                problems[addr] = (f"{what} is not visible on Dask worker {addr}: store, catalog and model must be "
                                  "on a filesystem that the client and every worker mount at the same path (not a "
                                  "node-local /tmp or scratch)")
    return problems


def check_workers(client, paths=()) -> list[str]:
    """Check that every connected worker runs this catalogpred version and code and sees ``paths``
    (:func:`worker_problems`), and return their addresses. Workers that have not connected yet are not checked
    here: a run checks those that join later with :func:`retire_unfit_workers`. With none connected this does
    nothing.

    Raises
    ------
    ConfigError
        Naming the first worker without catalogpred, with another version or code, or without a path (and how
        many more have that problem).
    """
    workers = sorted(client.scheduler_info()["workers"])
    problems = worker_problems(client, paths, workers=workers)
    if problems:
        first = min(problems)
        same = [a for a in problems if a != first and problems[a].replace(a, first) == problems[first]]
        more = f" (and {len(same)} more)" if same else ""
        raise ConfigError(problems[first].replace(f"worker {first}", f"worker {first}{more}", 1))
    log.debug("%d workers run catalogpred and see %s", len(workers), list(paths))
    return workers


def retire_unfit_workers(client, workers: list[str], paths=()) -> list[str]:
    """Check ``workers`` (workers that joined a running job) like :func:`check_workers`, and retire those that
    fail, with the reason in the log, so that the run goes on without them instead of losing their output (a
    worker writing to a node-local directory) or failing every task it takes. Returns the retired addresses."""
    problems = worker_problems(client, paths, workers=workers)
    for addr, why in sorted(problems.items()):
        log.error("%s; retiring it: the run goes on without it", why)
    if problems:
        retire_workers(client, sorted(problems))
    return sorted(problems)


def retire_workers(client, workers: list[str]) -> None:
    """Close ``workers`` (and their nannies) after their tasks move elsewhere; errors are logged, not raised
    (a worker may already be gone)."""
    try:
        client.retire_workers(workers=workers, close_workers=True)
    except Exception as exc:  # noqa: BLE001 - best effort: the run goes on either way
        log.warning("could not retire Dask workers %s: %s", workers, exc)


@functools.lru_cache(maxsize=1)
def source_fingerprint() -> str:
    """12 hex digits of a SHA-256 over catalogpred's own ``.py`` files (names and contents, in order): equal for
    two installs of one commit, different for another commit or local edits, which the version string is not."""
    import hashlib
    from pathlib import Path

    root = Path(__file__).resolve().parent
    h = hashlib.sha256()
    for f in sorted(root.rglob("*.py")):
        h.update(f.relative_to(root).as_posix().encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()[:12]


def _worker_fingerprint() -> str:
    """:func:`source_fingerprint` as the worker that runs this computes it (sent by reference, run there)."""
    return source_fingerprint()


def same_code(fn):
    """``fn`` as a Dask task that runs only where catalogpred's code is this process's: a callable for
    ``client.submit`` that, in the worker, compares the worker's :func:`source_fingerprint` with this one and
    raises :class:`~catalogpred.errors.WorkerCodeError` (with the worker's address) instead of calling ``fn``
    where they differ. :func:`check_workers` checks the workers at the start of a run and
    :func:`retire_unfit_workers` those that join at the run's recounts; this covers a worker that joins between
    two recounts and is handed a task at once (the scheduler's queue, work stealing). The check costs one
    string comparison per task (a worker computes its fingerprint once)."""
    return functools.partial(_run_if_same_code, fn, source_fingerprint())


def _run_if_same_code(fn, source: str, /, *args, **kwargs):
    theirs = source_fingerprint()
    if theirs != source:
        addr = worker_address()
        raise WorkerCodeError(f"Dask worker {addr} runs other catalogpred code than the client that submitted the "
                              f"task {getattr(fn, '__name__', fn)} (source {theirs} against {source}); the task did "
                              "not run there: install the same commit for client and workers (deploy/README.md, "
                              "version table)", addr)
    return fn(*args, **kwargs)


def _write_token(directory: str) -> str | None:
    """An empty file the client writes in ``directory`` (for the workers to look for), or None where it cannot."""
    import uuid

    if not os.path.isdir(directory):
        return None
    token = os.path.join(directory, f".catalogpred-shared-{uuid.uuid4().hex}")
    try:
        with open(token, "x"):
            pass
    except OSError:
        return None
    return token


def default_torch_threads(client) -> int | None:
    """Torch threads per prediction task when ``--torch-threads`` is not given.

    On a ``LocalCluster`` this machine's cores are split between the worker processes.
    On any other cluster each worker's ``nthreads`` is the CPU budget it was started
    with (``dask worker --nthreads``, ``jobqueue cores / processes``); the pipeline keeps
    up to :data:`TASKS_IN_FLIGHT_PER_WORKER` tasks on each worker, so each task gets
    ``nthreads // min(nthreads, TASKS_IN_FLIGHT_PER_WORKER)`` threads (the smallest worker
    decides). ``None`` when no worker is connected (torch keeps its default).
    """
    from distributed import LocalCluster

    workers = list(client.scheduler_info()["workers"].values())
    if isinstance(client.cluster, LocalCluster):
        return max(1, (os.cpu_count() or 1) // max(1, len(workers)))
    if not workers:
        return None
    nthreads = max(1, min(int(w.get("nthreads") or 1) for w in workers))
    return max(1, nthreads // min(nthreads, TASKS_IN_FLIGHT_PER_WORKER))


def worker_address() -> str | None:
    """The address of the Dask worker running the calling task; None outside a worker."""
    try:
        from distributed import get_worker

        return get_worker().address
    except (ImportError, ValueError):
        return None


def peak_rss_bytes() -> int:
    """Peak resident set size of this process, bytes (run it on workers with ``client.run``).

    On Linux this is ``VmHWM`` from ``/proc/self/status``, the high-water mark of the process's own memory
    since it started. ``getrusage(RUSAGE_SELF).ru_maxrss`` is not: Linux keeps it across ``fork`` + ``exec``,
    so a Dask worker spawned by a 1.5 GB client process reports at least 1.5 GB however little it uses.
    Elsewhere, ``ru_maxrss`` (kilobytes on Linux, bytes on macOS).
    """
    import resource
    import sys

    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024  # kB
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024
