"""deploy/ and `catalogpred submit`: job scripts rendered by dask-jobqueue, manifests, scripts, image files.

No batch system, Kubernetes or Docker daemon is needed: job scripts are rendered with
`submit --dry-run` (a stand-in `sbatch`/`qsub` on PATH proves nothing is submitted), the Dask
operator manifests are checked against the CRD fields listed below, and the batch scripts in
deploy/slurm and deploy/pbs run for real on this machine with stand-ins for `srun`/`pbs_tmrsh`
(a whole build is marked slow: `pytest --runslow`; a worker launch that fails at once is not).
"""
from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from catalogpred.cli import main

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy"
LEGACY = ("dask" + "-worker", "dask" + "-scheduler", "dask" + "-cuda-worker")  # executables gone in distributed >= 2026.6
DASK_API = "kubernetes.dask.org/v1"
IN_VENV = sys.prefix != sys.base_prefix


def _deploy_files() -> list[Path]:
    return sorted(p for p in DEPLOY.rglob("*") if p.is_file())


def _yaml_docs(path: Path) -> list:
    with open(path) as f:
        return [d for d in yaml.safe_load_all(f) if d is not None]


# ------------------------------------------------------------------------- submit: job script rendering


@pytest.fixture
def no_batch_system(tmp_path, monkeypatch):
    """Stand-ins for the batch commands that record any call: a dry run must not make one."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "batch-calls"
    for name in ("sbatch", "scancel", "squeue", "qsub", "qdel", "qstat"):
        (bin_dir / name).write_text(f"#!/bin/sh\necho {name} \"$@\" >> {calls}\nexit 1\n")
        (bin_dir / name).chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    yield
    assert not calls.exists(), f"a dry run called the batch system: {calls.read_text()}"


def _dry_run(capsys, *argv) -> str:
    rc = main(["submit", *argv])
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert out.startswith("#!/usr/bin/env bash\n"), "stdout holds only the job script (logs go to stderr)"
    return out


def _worker_line(script: str) -> str:
    lines = [ln for ln in script.splitlines() if " -m " in ln and "tcp://" in ln]
    assert len(lines) == 1, script
    return lines[0]


def _bash_n(text: str, tmp_path: Path) -> None:
    f = tmp_path / "script.sh"
    f.write_text(text)
    subprocess.run(["bash", "-n", str(f)], check=True)


def test_slurm_gpu_job_script(capsys, tmp_path, no_batch_system):
    script = _dry_run(capsys, "slurm", "--dry-run", "--jobs", "2", "--cores", "8", "--memory", "32GB", "--gpus-per-job",
                      "1", "--walltime", "02:00:00", "--queue", "gpu", "--account", "astro", "--env", "FOO=bar baz",
                      "--", "predict", "--store", "s.zarr", "--model", "m", "--catalog", "c")
    header = [ln for ln in script.splitlines() if ln.startswith("#SBATCH")]
    assert header == ["#SBATCH -J catalogpred", "#SBATCH -p gpu", "#SBATCH -A astro", "#SBATCH -n 1",
                      "#SBATCH --cpus-per-task=8", "#SBATCH --mem=30G", "#SBATCH -t 02:00:00", "#SBATCH --gres=gpu:1"]
    worker = _worker_line(script)
    assert worker.startswith(f"{sys.executable} -m dask cuda worker tcp://<scheduler-address>:8786 ")
    assert "--resources GPU=1" in worker
    assert "--nthreads 8 " in worker and "--memory-limit 29.80GiB" in worker  # one GPU: the whole job
    assert "--nworkers" not in worker and "--nanny" not in worker  # dask cuda worker has neither
    assert "export FOO='bar baz'" in script.splitlines()
    assert "MALLOC_ARENA_MAX" not in script  # GPU workers run several blocks in threads: not measured there
    if IN_VENV:
        assert f"source {sys.prefix}/bin/activate" in script.splitlines()
    assert script.index("export FOO") < script.index(worker)
    assert not any(name in script for name in LEGACY)
    _bash_n(script, tmp_path)


def test_slurm_cpu_job_script(capsys, tmp_path, no_batch_system):
    script = _dry_run(capsys, "slurm", "--dry-run", "--jobs", "4", "--cores", "16", "--memory", "64GB",
                      "--processes", "4", "--", "ingest", "/shared/spectra", "--store", "s.zarr")
    assert "#SBATCH --cpus-per-task=16" in script and "#SBATCH --mem=60G" in script
    assert "gres" not in script and "gpu" not in script.lower()
    worker = _worker_line(script)
    assert worker.startswith(f"{sys.executable} -m distributed.cli.dask_worker tcp://<scheduler-address>:8786 ")
    assert "--nthreads 4 " in worker and "--nworkers 4" in worker and "--nanny" in worker
    assert "--memory-limit 14.90GiB" in worker and "--resources" not in worker
    # CPU workers start as the local default does: one malloc arena (cluster.CPU_WORKER_ENVIRON), set before them
    assert script.index("export MALLOC_ARENA_MAX=1\n") < script.index(worker)
    _bash_n(script, tmp_path)
    own = _dry_run(capsys, "slurm", "--dry-run", "--jobs", "1", "--cores", "16", "--memory", "64GB",
                   "--env", "MALLOC_ARENA_MAX=4")
    assert "export MALLOC_ARENA_MAX=4" in own.splitlines() and "MALLOC_ARENA_MAX=1" not in own  # the user's wins


def test_pbs_gpu_and_cpu_job_scripts(capsys, tmp_path, no_batch_system):
    script = _dry_run(capsys, "pbs", "--dry-run", "--jobs", "2", "--cores", "8", "--memory", "32GB", "--gpus-per-job", "2",
                      "--walltime", "01:00:00", "--queue", "gpuq", "--account", "astro", "--", "predict", "--store", "s",
                      "--model", "m", "--catalog", "c")
    header = [ln for ln in script.splitlines() if ln.startswith("#PBS")]
    assert header == ["#PBS -N catalogpred", "#PBS -q gpuq", "#PBS -A astro", "#PBS -l select=1:ncpus=8:ngpus=2:mem=30GB",
                      "#PBS -l walltime=01:00:00"]
    worker = _worker_line(script)
    assert " -m dask cuda worker tcp://<scheduler-address>:8786 " in worker and "--resources GPU=1" in worker
    assert "--nthreads 4 " in worker and "--memory-limit 14.90GiB" in worker  # per GPU worker
    _bash_n(script, tmp_path)

    cpu = _dry_run(capsys, "pbs", "--dry-run", "--jobs", "1", "--cores", "8", "--memory", "32GB")
    assert "#PBS -l select=1:ncpus=8:mem=30GB" in cpu and "ngpus" not in cpu
    assert " -m distributed.cli.dask_worker " in _worker_line(cpu) and "--resources" not in cpu


@pytest.mark.parametrize("system", ["slurm", "pbs"])
def test_config_file_values_and_flag_precedence(system, capsys, no_batch_system):
    cfg = DEPLOY / system / "jobqueue.yaml"
    script = _dry_run(capsys, system, "--config", str(cfg), "--dry-run", "--jobs", "3")
    worker = _worker_line(script)
    assert "--nthreads 4 " in worker and "--nworkers 4" in worker  # cores 16, processes 4
    assert "--death-timeout 120" in worker and "--local-directory ${TMPDIR:-/tmp}" in worker
    assert ("#SBATCH -t 04:00:00" if system == "slurm" else "#PBS -l walltime=04:00:00") in script
    script = _dry_run(capsys, system, "--config", str(cfg), "--dry-run", "--jobs", "3", "--cores", "8",
                      "--gpus-per-job", "2")
    worker = _worker_line(script)
    assert "--nthreads 4 " in worker and "dask cuda worker" in worker and "--nworkers" not in worker


def test_submit_errors_are_one_line(tmp_path, capsys, no_batch_system):
    def err(*argv):
        rc = main(["submit", *argv])
        lines = capsys.readouterr().err.strip().splitlines()
        assert rc == 1 and len(lines) == 1, lines
        return lines[0]

    assert "--cores 16 --memory 64GB" in err("slurm", "--jobs", "1", "--dry-run")
    typo = tmp_path / "typo.yaml"
    typo.write_text("jobqueue:\n  slurm:\n    corse: 8\n")
    assert "did you mean 'cores'" in err("slurm", "--config", str(typo), "--jobs", "1", "--dry-run")
    assert "one worker per GPU" in err("slurm", "--jobs", "1", "--cores", "8", "--memory", "8GB", "--gpus-per-job", "2",
                                       "--processes", "4", "--dry-run")
    assert "put it after `--`" in err("pbs", "--jobs", "1", "--cores", "8", "--memory", "8GB", "--", "query", "c")
    assert "--scheduler cannot be used" in err("slurm", "--jobs", "1", "--cores", "8", "--memory", "8GB", "--",
                                               "predict", "--scheduler", "tcp://x:8786")
    assert "NAME=VALUE" in err("slurm", "--jobs", "1", "--cores", "1", "--memory", "1GB", "--env", "oops", "--dry-run")


def test_submit_help_has_an_example(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["submit", "slurm", "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "examples:" in out and "catalogpred submit slurm" in out and "--gpus-per-job" in out


# ----------------------------------------------------------------------------------- static deploy/ checks


def test_every_yaml_file_parses():
    files = [p for p in _deploy_files() if p.suffix in (".yaml", ".yml")]
    assert len(files) >= 8
    for p in files:
        assert _yaml_docs(p), f"{p} is empty"


def test_no_legacy_dask_executables_anywhere_in_deploy():
    for p in _deploy_files():
        text = p.read_text()
        for name in LEGACY:
            assert name not in text, f"{p.relative_to(REPO)} mentions {name}"


def test_shell_scripts_pass_bash_n():
    scripts = [p for p in _deploy_files()
               if p.suffix in (".sh", ".sbatch", ".pbs") or p.read_text().startswith("#!/usr/bin/env bash")]
    assert {p.name for p in scripts} >= {"catalog-build.sbatch", "catalog-build.pbs", "entrypoint.sh"}
    for p in scripts:
        subprocess.run(["bash", "-n", str(p)], check=True)


def _k8s_docs() -> list[tuple[Path, dict]]:
    return [(p, d) for p in sorted((DEPLOY / "k8s").glob("*.yaml")) for d in _yaml_docs(p)]


def _get(doc: dict, dotted: str):
    node = doc
    for part in dotted.split("."):
        assert isinstance(node, dict) and part in node, f"missing {dotted}"
        node = node[part]
    return node


def _check_pod_spec(spec: dict, role: str, pvc_names: set[str]) -> list[dict]:
    containers = spec["containers"]
    assert isinstance(containers, list) and containers and all("name" in c and "image" in c for c in containers)
    if role != "scheduler":
        mounts = {m["name"]: m["mountPath"] for c in containers for m in c.get("volumeMounts", [])}
        claims = {v["name"]: v["persistentVolumeClaim"]["claimName"] for v in spec.get("volumes", [])
                  if "persistentVolumeClaim" in v}
        assert claims and set(claims.values()) <= pvc_names, f"{role} pods need the PVC volume"
        assert {mounts.get(name) for name in claims} == {"/data"}, f"{role} pods mount the data volume at /data"
    return containers


def _check_dask_cluster_spec(spec: dict, cluster_name: str, pvc_names: set[str]) -> None:
    """Fields of DaskCluster.spec in the operator's CRD: scheduler.{spec,service}, worker.{replicas,spec}."""
    sched = _check_pod_spec(_get(spec, "scheduler.spec"), "scheduler", pvc_names)
    assert sched[0]["args"][:2] == ["dask", "scheduler"]
    _check_scheduler_http_routes(sched[0], cluster_name)
    service = _get(spec, "scheduler.service")
    assert service["selector"] == {"dask.org/cluster-name": cluster_name, "dask.org/component": "scheduler"}
    assert {(p["name"], p["port"]) for p in service["ports"]} >= {("tcp-comm", 8786)}
    assert isinstance(_get(spec, "worker.replicas"), int)
    _check_worker(_check_pod_spec(_get(spec, "worker.spec"), "worker", pvc_names)[0])


ROUTES_ENV = "DASK_DISTRIBUTED__SCHEDULER__HTTP__ROUTES"
#: what the operator's autoscaler and its graceful scale-down need (/api/v1/adaptive_target, /api/v1/retire_workers)
API_ROUTES = ("distributed.http.scheduler.api", "distributed.http.health")


def _scheduler_http_routes(container: dict, label: str) -> list[str]:
    """The scheduler's distributed.scheduler.http.routes as dask reads them from the container's environment."""
    import dask

    env = {e["name"]: e["value"] for e in container.get("env", [])}
    assert ROUTES_ENV in env, f"{label}: the scheduler container does not set {ROUTES_ENV} (no HTTP API)"
    return dask.config.collect_env({ROUTES_ENV: env[ROUTES_ENV]})["distributed"]["scheduler"]["http"]["routes"]


def _check_scheduler_http_routes(container: dict, label: str) -> None:
    """The Dask operator calls the scheduler's HTTP API to autoscale and to retire workers before it deletes their
    pods; distributed serves no API by default, and without it the operator falls back to the RPC and may delete
    busy pods. The manifests add the API to distributed's default routes, so the dashboard keeps its statics."""
    import distributed

    routes = _scheduler_http_routes(container, label)
    assert isinstance(routes, list) and set(API_ROUTES) <= set(routes), f"{label}: {ROUTES_ENV} = {routes}"
    with open(Path(distributed.__file__).parent / "distributed.yaml") as f:  # what the variable replaces
        defaults = yaml.safe_load(f)["distributed"]["scheduler"]["http"]["routes"]
    assert set(defaults) <= set(routes), f"{label}: {ROUTES_ENV} drops default routes {set(defaults) - set(routes)}"


def _check_worker(container: dict, gpu: bool | None = True) -> None:
    args = container["args"]
    if gpu:
        assert args[:3] == ["dask", "cuda", "worker"], args
        assert args[args.index("--resources") + 1] == "GPU=1"
        for kind in ("requests", "limits"):
            assert int(container["resources"][kind]["nvidia.com/gpu"]) >= 1
    else:
        assert args[:2] == ["dask", "worker"], args
        assert "nvidia.com/gpu" not in str(container.get("resources"))
    assert "$(DASK_SCHEDULER_ADDRESS)" in args and "$(DASK_WORKER_NAME)" in args  # set by the operator


def test_interactive_cluster_keeps_the_workers_its_example_waits_for():
    """The DaskAutoscaler resets the worker group to `minimum` while idle: the example's --wait-workers N must
    not exceed it, or the run waits for workers that never come."""
    path = DEPLOY / "k8s" / "daskcluster-interactive.yaml"
    wait = int(re.search(r"--wait-workers (\d+)", path.read_text()).group(1))
    auto = next(d for d in _yaml_docs(path) if d["kind"] == "DaskAutoscaler")
    assert auto["spec"]["minimum"] >= wait


def test_k8s_manifests_have_the_fields_their_kind_needs():
    docs = _k8s_docs()
    by_kind: dict[str, list[dict]] = {}
    for p, d in docs:
        for key in ("apiVersion", "kind", "metadata"):
            assert key in d, f"{p.name}: no {key}"
        assert d["metadata"].get("name"), f"{p.name}: no metadata.name"
        by_kind.setdefault(d["kind"], []).append(d)
    assert set(by_kind) == {"DaskJob", "DaskCluster", "DaskAutoscaler", "DaskWorkerGroup", "PersistentVolumeClaim", "Pod"}
    for kind in ("DaskJob", "DaskCluster", "DaskAutoscaler", "DaskWorkerGroup"):
        assert all(d["apiVersion"] == DASK_API for d in by_kind[kind])
    pvcs = {d["metadata"]["name"] for d in by_kind["PersistentVolumeClaim"]}
    for d in by_kind["PersistentVolumeClaim"]:
        assert d["apiVersion"] == "v1" and "ReadWriteMany" in d["spec"]["accessModes"]
        assert _get(d, "spec.resources.requests.storage")
    clusters = {d["metadata"]["name"] for d in by_kind["DaskCluster"]}

    for d in by_kind["DaskCluster"]:
        _check_dask_cluster_spec(d["spec"], d["metadata"]["name"], pvcs)
    for d in by_kind["DaskJob"]:
        job = _check_pod_spec(_get(d, "spec.job.spec"), "job", pvcs)[0]
        script = " ".join(job["args"])
        assert "catalogpred ingest" in script and "catalogpred predict" in script
        assert '--scheduler "$DASK_SCHEDULER_ADDRESS"' in script and "--wait-workers" in script
        workers = {e["value"] for e in job["env"] if e["name"] == "CATALOGPRED_WORKERS"}
        assert workers == {str(_get(d, "spec.cluster.spec.worker.replicas"))}
        _check_dask_cluster_spec(_get(d, "spec.cluster.spec"), d["metadata"]["name"], pvcs)
    for d in by_kind["DaskAutoscaler"]:
        assert _get(d, "spec.cluster") in clusters
        assert 0 <= _get(d, "spec.minimum") <= _get(d, "spec.maximum")
    for d in by_kind["DaskWorkerGroup"]:
        assert _get(d, "spec.cluster") in clusters
        assert isinstance(_get(d, "spec.worker.replicas"), int)
        _check_worker(_check_pod_spec(_get(d, "spec.worker.spec"), "worker", pvcs)[0], gpu=False)
    for d in by_kind["Pod"]:
        _check_pod_spec(d["spec"], "client", pvcs)
        env = {e["name"]: e["value"] for e in d["spec"]["containers"][0]["env"]}
        assert env["DASK_SCHEDULER_ADDRESS"] == f"tcp://{next(iter(clusters))}-scheduler:8786"


def _operator_worker_pod_specs() -> list[tuple[str, dict]]:
    """(label, pod spec) of every worker that the Dask operator starts from deploy/k8s: DaskWorkerGroup and
    DaskCluster spec.worker.spec, DaskJob spec.cluster.spec.worker.spec."""
    where = {"DaskWorkerGroup": "spec.worker.spec", "DaskCluster": "spec.worker.spec",
             "DaskJob": "spec.cluster.spec.worker.spec"}
    return [(f"{p.name}:{d['kind']}/{d['metadata']['name']}", _get(d, where[d["kind"]]))
            for p, d in _k8s_docs() if d.get("kind") in where]


def _processes_per_pod(container: dict) -> tuple[bool, str]:
    """(worker named $(DASK_WORKER_NAME)?, its --nworkers value, "1" if not given) for one worker container."""
    args = [str(a) for a in container.get("args", []) + container.get("command", [])]
    if len(args) >= 3 and args[0] in ("bash", "sh") and args[1] == "-c":  # a shell line: split it
        args = shlex.split(args[2])
    named = any(a == "--name" and b == "$(DASK_WORKER_NAME)" for a, b in zip(args, args[1:])) or \
        "--name=$(DASK_WORKER_NAME)" in args
    n = "1"
    for a, b in zip(args, args[1:] + [""]):
        if a in ("--nworkers", "--nprocs"):
            n = b
        elif a.startswith(("--nworkers=", "--nprocs=")):
            n = a.split("=", 1)[1]
    return named, n


def test_operator_workers_run_one_dask_worker_per_pod():
    """The operator scales a worker group down by asking the scheduler which workers to retire and deleting the
    worker Deployments of those names. `dask worker --name X --nworkers N` (N > 1) names its processes X-0 ... X-N-1
    (distributed/cli/dask_worker.py), which match no Deployment: one pod must be one Dask worker. `dask cuda worker`
    starts one process per visible GPU, renamed the same way, so a GPU worker pod gets exactly one GPU."""
    specs = _operator_worker_pod_specs()
    assert len(specs) >= 3, specs  # the DaskWorkerGroup, the DaskCluster and the DaskJob's cluster
    for label, spec in specs:
        for container in spec["containers"]:
            named, n = _processes_per_pod(container)
            assert named, f"{label}: the worker must be named $(DASK_WORKER_NAME), the operator's pod name"
            assert n == "1", f"{label}: --name $(DASK_WORKER_NAME) with --nworkers {n}: use replicas instead"
            if container["args"][:3] == ["dask", "cuda", "worker"]:
                for kind in ("requests", "limits"):
                    assert int(container["resources"][kind]["nvidia.com/gpu"]) == 1, f"{label}: one GPU per pod"
    # the check itself catches the pattern it is for
    bad = {"args": ["dask", "worker", "$(DASK_SCHEDULER_ADDRESS)", "--name", "$(DASK_WORKER_NAME)", "--nworkers", "4"]}
    assert _processes_per_pod(bad) == (True, "4")
    assert _processes_per_pod({"args": ["bash", "-c", "dask worker x --name=$(DASK_WORKER_NAME) --nworkers=auto"]}) \
        == (True, "auto")


def test_every_operator_scheduler_serves_the_http_api():
    """Every scheduler the operator starts from deploy/k8s sets the routes env var (checked also by the CRD test)."""
    where = {"DaskCluster": "spec.scheduler.spec", "DaskJob": "spec.cluster.spec.scheduler.spec"}
    specs = [(f"{p.name}:{d['kind']}/{d['metadata']['name']}", _get(d, where[d["kind"]]))
             for p, d in _k8s_docs() if d.get("kind") in where]
    assert len(specs) >= 2, specs  # the DaskCluster and the DaskJob's cluster
    for label, spec in specs:
        for container in spec["containers"]:
            _check_scheduler_http_routes(container, label)


def test_scheduler_with_the_manifests_routes_serves_api_health_and_dashboard(tmp_path):
    """A real `dask scheduler` with the manifests' routes answers the operator's API calls, /health (the probes)
    and the dashboard's statics."""
    doc = next(d for _, d in _k8s_docs() if d["kind"] == "DaskCluster")
    scheduler = doc["spec"]["scheduler"]["spec"]["containers"][0]
    value = next(e["value"] for e in scheduler["env"] if e["name"] == ROUTES_ENV)
    sched_file = tmp_path / "scheduler.json"
    env = dict(os.environ, **{ROUTES_ENV: value})
    proc = subprocess.Popen([sys.executable, "-m", "distributed.cli.dask_scheduler", "--host", "127.0.0.1", "--port",
                             "0", "--dashboard-address", "127.0.0.1:0", "--scheduler-file", str(sched_file)],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while not (sched_file.exists() and sched_file.stat().st_size) and time.monotonic() < deadline:
            assert proc.poll() is None, "dask scheduler exited"
            time.sleep(0.2)
        time.sleep(0.2)  # the file is written in one go, but be safe about a partial read
        port = json.loads(sched_file.read_text())["services"]["dashboard"]

        def get(path: str) -> tuple[int, str]:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as r:
                return r.status, r.read().decode(errors="replace")

        assert get("/health") == (200, "ok")
        status, body = get("/api/v1/adaptive_target")
        assert status == 200 and json.loads(body) == {"workers": 0}
        assert get("/statics/css/base.css")[0] == 200  # the dashboard pages' stylesheet
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


_K8S_UNITS = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12}


def _k8s_bytes(quantity) -> int:
    """A Kubernetes memory quantity ("32Gi", "4G", "512Mi", 1073741824) in bytes."""
    m = re.fullmatch(r"(\d+(?:\.\d+)?)([KMGT]i|[kMGT])?", str(quantity))
    assert m, f"not a memory quantity: {quantity!r}"
    return int(float(m.group(1)) * _K8S_UNITS.get(m.group(2) or "", 1))


def _last_option(args: list, name: str):
    """The value of the last `name VALUE` / `name=VALUE` in args (the one click uses), or None."""
    args = [str(a) for a in args]
    value = None
    for a, b in zip(args, args[1:] + [None]):
        if a == name:
            value = b
        elif a.startswith(name + "="):
            value = a.split("=", 1)[1]
    return value


def _dask_and_pod_memory_limits() -> list[tuple[str, str, object]]:
    """(label, the worker's Dask --memory-limit, its pod's memory limit) for every worker in deploy/ that sets both:
    the operator manifests' workers and the Helm chart's worker."""
    out = []
    for label, spec in _operator_worker_pod_specs():
        for c in spec["containers"]:
            dask_limit = _last_option(c.get("command", []) + c.get("args", []), "--memory-limit")
            pod_limit = c.get("resources", {}).get("limits", {}).get("memory")
            if dask_limit is not None and pod_limit is not None:
                out.append((label, dask_limit, pod_limit))

    def merged(group: dict, base: dict) -> dict:  # the chart's `merge group worker`: the group's values win
        return {k: merged(group[k], base[k]) if isinstance(group.get(k), dict) and isinstance(base.get(k), dict)
                else group.get(k, base.get(k)) for k in {*group, *base}}

    values = _yaml_docs(DEPLOY / "helm" / "values.yaml")[0]
    groups = [("worker", values["worker"])] + [(f"additional_worker_groups[{i}]", merged(g, values["worker"]))
                                               for i, g in enumerate(values.get("additional_worker_groups") or [])]
    for group, worker in groups:
        pod_limit = ((worker.get("resources") or {}).get("limits") or {}).get("memory")
        if pod_limit is None:
            continue
        # the chart passes limits.memory as --memory-limit, then extraArgs: the last --memory-limit counts
        dask_limit = _last_option(["--memory-limit", pod_limit, *(worker.get("extraArgs") or [])], "--memory-limit")
        out.append((f"helm/values.yaml:{group}", dask_limit, pod_limit))
    return out


def test_dask_memory_limit_leaves_headroom_under_the_pod_limit():
    """A Dask memory limit equal to the pod's lets the kernel OOM-kill the pod before Dask spills, pauses or
    restarts the worker: every worker in deploy/ keeps Dask's limit at most ~90 % of the pod's (28GiB of 32Gi)."""
    from dask.utils import parse_bytes

    limits = _dask_and_pod_memory_limits()
    labels = {label.split(":")[0] for label, _, _ in limits}
    assert {"daskjob-catalog-build.yaml", "daskcluster-interactive.yaml", "daskworkergroup-cpu.yaml",
            "helm/values.yaml"} <= labels, limits
    for label, dask_limit, pod_limit in limits:
        assert parse_bytes(str(dask_limit)) <= 0.9 * _k8s_bytes(pod_limit), \
            f"{label}: Dask --memory-limit {dask_limit} leaves too little of the pod's {pod_limit}"
    # the check itself: the chart's own --memory-limit (= limits.memory) alone fails it
    assert parse_bytes("32Gi") > 0.9 * _k8s_bytes("32Gi")
    assert _last_option(["--memory-limit", "32Gi", "--resources", "GPU=1", "--memory-limit=28GiB"],
                        "--memory-limit") == "28GiB"
    assert _k8s_bytes("3584Mi") == parse_bytes("3584MiB") and _k8s_bytes("4G") == 4 * 10**9


def test_one_image_everywhere_and_helm_values():
    def walk(node):
        if isinstance(node, dict):
            yield from ([node["image"]] if isinstance(node.get("image"), str) else [])
            for v in node.values():
                yield from walk(v)
        elif isinstance(node, list):
            for v in node:
                yield from walk(v)

    images = {img for _, d in _k8s_docs() for img in walk(d)}
    values = _yaml_docs(DEPLOY / "helm" / "values.yaml")[0]
    for part in ("scheduler", "worker"):
        images.add(f"{values[part]['image']['repository']}:{values[part]['image']['tag']}")
    assert len(images) == 1, images  # client, scheduler and workers run the same versions
    worker = values["worker"]
    assert worker["image"]["dask_worker"] == "dask cuda worker"  # one argument, split by the image's entry point
    assert worker["extraArgs"][worker["extraArgs"].index("--resources") + 1] == "GPU=1"
    assert worker["resources"]["limits"]["nvidia.com/gpu"] == 1
    pvc = _yaml_docs(DEPLOY / "k8s" / "pvc.yaml")[0]["metadata"]["name"]
    assert worker["mounts"]["volumes"][0]["persistentVolumeClaim"]["claimName"] == pvc
    assert worker["mounts"]["volumeMounts"][0]["mountPath"] == "/data"
    assert values["fullnameOverride"] == "catalogpred" and values["jupyter"]["enabled"] is False


def test_dockerfile_pins_match_the_version_table():
    text = (DEPLOY / "docker" / "Dockerfile").read_text()
    pins = dict(re.findall(r"^([A-Za-z0-9_.-]+)==(\S+)$", (REPO / "constraints.txt").read_text(), re.M))
    arg = dict(re.findall(r"^ARG (\w+)=(\S+)$", text, re.M))
    assert arg["CUDA_IMAGE"].startswith("nvidia/cuda:13.")
    assert arg["TORCH_VERSION"] == pins["torch"] and arg["DASK_VERSION"] == pins["dask"] == pins["distributed"]
    assert arg["DASK_CUDA_VERSION"].startswith("26.10")
    assert '"/src[gpu]"' in text and "dask-cuda[cu13]" in text
    assert re.search(r'^ENTRYPOINT \[.*"/usr/local/bin/catalogpred-entrypoint"\]$', text, re.M)
    for src in re.findall(r"^COPY (?:--\S+ )*(.+) \S+$", text, re.M):
        for path in src.split():
            assert (REPO / path).exists(), f"Dockerfile copies {path}, which does not exist"
    readme = (DEPLOY / "README.md").read_text()
    for version in (pins["dask"], pins["torch"], "26.10"):
        assert version in readme, f"deploy/README.md version table lacks {version}"


def test_readme_names_every_deploy_file():
    readme = (DEPLOY / "README.md").read_text()
    for p in _deploy_files():
        if p.name != "README.md":
            assert str(p.relative_to(DEPLOY)) in readme, f"deploy/README.md does not say when to use {p.relative_to(DEPLOY)}"


@pytest.mark.parametrize("argv, expect", [
    (["predict", "--store", "s"], "catalogpred:predict --store s"),
    (["--version"], "catalogpred:--version"),
    ([], "catalogpred:--help"),
    (["dask", "scheduler", "--port", "8786"], "dask:scheduler --port 8786"),
    (["dask", "cuda", "worker", "tcp://s:8786"], "dask:cuda worker tcp://s:8786"),
    (["dask cuda worker", "tcp://s:8786", "--nthreads", "4"], "dask:cuda worker tcp://s:8786 --nthreads 4"),
    (["dask" + "-scheduler", "--port=8786"], "dask:scheduler --port=8786"),
    (["dask" + "-cuda-worker", "tcp://s:8786"], "dask:cuda worker tcp://s:8786"),
    (["bash", "-c", "echo other"], "other"),
])
def test_image_entrypoint_dispatch(argv, expect, tmp_path):
    for name in ("dask", "catalogpred"):
        (tmp_path / name).write_text(f'#!/usr/bin/env bash\necho "{name}:$*"\n')
        (tmp_path / name).chmod(0o755)
    env = dict(os.environ, PATH=f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    out = subprocess.run(["bash", str(DEPLOY / "docker" / "entrypoint.sh"), *argv], env=env, capture_output=True,
                         text=True, check=True).stdout.strip()
    assert out == expect


def test_image_entrypoint_runs_every_catalogpred_command(tmp_path):
    """`docker run IMAGE <command> ...` is catalogpred's command for every subcommand the CLI has."""
    from catalogpred.cli import COMMANDS

    (tmp_path / "catalogpred").write_text('#!/usr/bin/env bash\necho "catalogpred:$*"\n')
    (tmp_path / "catalogpred").chmod(0o755)
    env = dict(os.environ, PATH=f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    for command in COMMANDS:
        out = subprocess.run(["bash", str(DEPLOY / "docker" / "entrypoint.sh"), command, "--help"], env=env,
                             capture_output=True, text=True).stdout.strip()
        assert out == f"catalogpred:{command} --help", command


def test_docker_image_user_and_slurm_worker_cpus():
    """The image's UID 1000 user exists once (ubuntu:24.04 ships "ubuntu" with it); srun gets --cpus-per-task
    again (since Slurm 22.05 it is not inherited from sbatch, and the workers would share one CPU)."""
    docker = (DEPLOY / "docker" / "Dockerfile").read_text()
    assert docker.index("userdel --remove ubuntu") < docker.index("useradd --create-home --uid 1000")
    sbatch = (DEPLOY / "slurm" / "catalog-build.sbatch").read_text()
    sruns = [ln for ln in sbatch.splitlines() if ln.strip().startswith("srun ")]
    assert len(sruns) == 2 and all('--cpus-per-task="$CPUS"' in ln for ln in sruns)
    assert "#PBS -l place=scatter" in (DEPLOY / "pbs" / "catalog-build.pbs").read_text()


def test_gpu_request_detection_in_slurm_directives():
    from catalogpred.submit import _requests_gpus

    for d in ("--gres=gpu:4", "--gres gpu:a100:2", "--gpus=2", "--gpus-per-node=4", "--gpus-per-task 1", "-G 2"):
        assert _requests_gpus(d), d
    for d in ("--qos=gpu_normal", "-p gpu", "--constraint=gpu", "--partition=gpu-long", "--gres=nvme:1", ""):
        assert not _requests_gpus(d), d


# ------------------------------------------------------------------ the batch scripts, run on this machine


FAKE_SRUN = """#!/usr/bin/env bash
# stand-in for srun inside a one-node allocation: drop srun's options, run the step here
while [[ $# -gt 0 && $1 == -* ]]; do shift; done
exec "$@"
"""
FAKE_TMRSH = """#!/usr/bin/env bash
# stand-in for pbs_tmrsh: ignore the host, run the command here
shift
exec "$@"
"""


def _run_batch_script(script: Path, env: dict, tmp_path: Path, timeout: float = 400,
                      left_over: list | None = None) -> subprocess.CompletedProcess:
    """Run a batch script as the batch system would (own process group), tear the group down whatever happens.
    `left_over`, if given, gets whether any process of the group outlived the script (checked before tear-down)."""
    log = tmp_path / "job.out"
    with open(log, "w") as out:
        proc = subprocess.Popen(["bash", str(script)], env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=out,
                                text=True, start_new_session=True)
        try:
            stdout, _ = proc.communicate(timeout=timeout)
            if left_over is not None:
                left_over.append(_group_alive(proc.pid))
        finally:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait()
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, log.read_text())


def _group_alive(pgid: int, grace_s: float = 5.0) -> bool:
    """Whether a process of group `pgid` is still there `grace_s` seconds on (processes that exit on SIGTERM
    may take a moment)."""
    deadline = time.monotonic() + grace_s
    while True:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return False
        if time.monotonic() > deadline:
            return True
        time.sleep(0.2)


def _batch_env(tmp_path: Path, inputs: Path, bundle: Path, fake: dict[str, str]) -> dict:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in fake.items():
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    (tmp_path / "scratch").mkdir()
    return dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", CATALOGPRED_VENV=sys.prefix,
                CATALOGPRED_INPUTS=str(inputs), CATALOGPRED_STORE=str(tmp_path / "store.zarr"),
                CATALOGPRED_MODEL=str(bundle), CATALOGPRED_CATALOG=str(tmp_path / "catalog"), CATALOGPRED_WORKER="cpu",
                CATALOGPRED_SCHEDULER_ARGS="--host 127.0.0.1 --port 0 --no-dashboard",
                CATALOGPRED_WORKER_ARGS="--host 127.0.0.1 --no-dashboard", TMPDIR=str(tmp_path / "scratch"))


def _check_built_catalog(result, tmp_path: Path, run_dir: Path) -> None:
    assert result.returncode == 0, result.stderr[-4000:] + "".join(
        f"\n--- {p.name}\n{p.read_text()[-2000:]}" for p in sorted(run_dir.glob("*.log")))
    assert "Scheduler at:" in (run_dir / "scheduler.log").read_text()  # the file itself is removed at shutdown
    rows = pq.ParquetDataset(tmp_path / "catalog" / "dataset").read().num_rows
    rejects = pq.read_table(tmp_path / "catalog" / "rejects.parquet").num_rows
    assert rows + rejects == 14 and rows == 9  # the 5 QSOs are not_galaxy rejects (the default selection)
    assert "rows" in result.stdout and "9" in result.stdout  # `catalogpred info` at the end


@pytest.mark.realdata
@pytest.mark.slow  # about a minute each on 2 cores: run with --runslow
def test_slurm_batch_script_builds_a_catalog(tmp_path, sdss_files, random_bundle):
    env = _batch_env(tmp_path, sdss_files[0].parent, random_bundle, {"srun": FAKE_SRUN})
    env.update(SLURM_JOB_ID="4242", SLURM_JOB_NUM_NODES="1", SLURM_CPUS_PER_TASK="2", SLURM_SUBMIT_DIR=str(tmp_path))
    result = _run_batch_script(DEPLOY / "slurm" / "catalog-build.sbatch", env, tmp_path)
    _check_built_catalog(result, tmp_path, tmp_path / "catalogpred-run-4242")


@pytest.mark.realdata
@pytest.mark.slow  # about a minute each on 2 cores: run with --runslow
def test_pbs_batch_script_builds_a_catalog(tmp_path, sdss_files, random_bundle):
    env = _batch_env(tmp_path, sdss_files[0].parent, random_bundle, {"pbs_tmrsh": FAKE_TMRSH})
    nodefile = tmp_path / "nodefile"
    nodefile.write_text("localhost\nlocalhost\n")
    env.update(PBS_JOBID="77.fake", PBS_NODEFILE=str(nodefile), NCPUS="2", PBS_O_WORKDIR=str(tmp_path))
    result = _run_batch_script(DEPLOY / "pbs" / "catalog-build.pbs", env, tmp_path)
    _check_built_catalog(result, tmp_path, tmp_path / "catalogpred-run-77.fake")


@pytest.mark.parametrize("system", ["slurm", "pbs"])
def test_batch_script_stops_when_the_worker_launch_fails(system, tmp_path):
    """`--wait-workers` has no timeout: when the worker launch dies (here `dask cuda worker` without dask-cuda:
    "Error: No such command 'cuda'"), the script must not wait for those workers until the walltime but stop with
    one line that names the workers' log, kill the client and the scheduler, and fail. Needs no data: the client
    waits for the workers before it reads anything."""
    import importlib.util

    inputs = tmp_path / "spectra"
    inputs.mkdir()
    (inputs / "spec-0000-00000-0000.fits").write_bytes(b"never read")
    fake = {"srun": FAKE_SRUN} if system == "slurm" else {"pbs_tmrsh": FAKE_TMRSH}
    env = _batch_env(tmp_path, inputs, tmp_path / "no-model", fake)
    if importlib.util.find_spec("dask_cuda") is None:
        env["CATALOGPRED_WORKER"] = "gpu"  # the reported case: "Error: No such command 'cuda'"
        expect_in_log = "No such command 'cuda'"
    else:  # dask-cuda installed: any worker command that fails at once
        env["CATALOGPRED_WORKER_ARGS"] += " --no-such-option"
        expect_in_log = "No such option"
    if system == "slurm":
        env.update(SLURM_JOB_ID="4243", SLURM_JOB_NUM_NODES="1", SLURM_CPUS_PER_TASK="2",
                   SLURM_SUBMIT_DIR=str(tmp_path))
        script, run_dir, log = DEPLOY / "slurm" / "catalog-build.sbatch", tmp_path / "catalogpred-run-4243", \
            "workers.log"
    else:
        nodefile = tmp_path / "nodefile"
        nodefile.write_text("localhost\nlocalhost\n")
        env.update(PBS_JOBID="78.fake", PBS_NODEFILE=str(nodefile), NCPUS="2", PBS_O_WORKDIR=str(tmp_path))
        script, run_dir, log = DEPLOY / "pbs" / "catalog-build.pbs", tmp_path / "catalogpred-run-78.fake", \
            "workers-0.log"
    start = time.monotonic()
    left_over: list = []
    try:
        result = _run_batch_script(script, env, tmp_path, timeout=60, left_over=left_over)
    except subprocess.TimeoutExpired:
        pytest.fail(f"the script still waited for the workers after 60 s:\n{(tmp_path / 'job.out').read_text()}")
    took = time.monotonic() - start
    assert result.returncode != 0, result.stderr
    assert expect_in_log in (run_dir / log).read_text()
    errors = [ln for ln in result.stderr.splitlines() if "exited with status" in ln]
    assert len(errors) == 1, result.stderr
    assert errors[0].startswith("error: the Dask workers") and "catalogpred ingest" in errors[0], errors[0]
    assert errors[0].endswith(f"see {run_dir / log}"), errors[0]
    assert left_over == [False], "the client or the scheduler outlived the script"
    assert not (tmp_path / "store.zarr").exists() and took < 60


def test_queued_job_ids_asks_the_batch_system(tmp_path, monkeypatch):
    """submit's job watch: the ids the queue command prints (a PBS id without its server), None when it cannot ask."""
    from catalogpred.submit import _pop_option, queued_job_ids

    monkeypatch.setenv("PATH", str(tmp_path))
    assert queued_job_ids("slurm") is None and queued_job_ids("pbs") is None  # no squeue, no qselect
    (tmp_path / "qselect").write_text('#!/bin/sh\n[ "$1" = -u ] && printf "123.pbs01\\n124.pbs01\\n"\n')
    (tmp_path / "squeue").write_text("#!/bin/sh\necho 'squeue: error: slurm_load_jobs error' >&2\nexit 1\n")
    for name in ("qselect", "squeue"):
        (tmp_path / name).chmod(0o755)
    assert queued_job_ids("pbs") == {"123", "124"}
    assert queued_job_ids("slurm") is None  # a failing squeue: keep waiting, do not treat the jobs as ended
    assert _pop_option(["predict", "--wait-workers", "3", "--store", "s"], "--wait-workers") == (
        ["predict", "--store", "s"], "3")
    assert _pop_option(["predict", "--wait-workers=4"], "--wait-workers") == (["predict"], "4")
    assert _pop_option(["predict"], "--wait-workers") == (["predict"], None)
