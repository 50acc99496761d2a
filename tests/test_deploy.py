"""Deployments of clean-labels: prefect.yaml, the Kubernetes GPU job template, and runs
triggered through a real Prefect API and executed by a real worker / served deployment."""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from noisescore.cli import main
from noisescore.jobs import JobStore
from noisescore.settings import CleanSettings, StoreSettings
from noisescore.storage import open_store

ROOT = Path(__file__).resolve().parents[1]
PREFECT_YAML = ROOT / "prefect.yaml"
K8S_TEMPLATE = ROOT / "deploy" / "prefect" / "k8s-gpu-job-template.json"
K8S_DDP_TEMPLATE = ROOT / "deploy" / "prefect" / "k8s-gpu-ddp-job-template.json"
K8S_RDZV_SERVICE = ROOT / "deploy" / "prefect" / "k8s-rendezvous-service.yaml"
BIN = Path(sys.executable).parent


def _deployments(flow: str = "clean_labels") -> dict[str, dict[str, Any]]:
    """The deployments of one flow (by its module), keyed by name: each flow has a
    ``local`` and a ``gpu`` deployment (``clean-labels/local``, ``active-clean/local``…)."""
    config = yaml.safe_load(PREFECT_YAML.read_text())
    return {d["name"]: d for d in config["deployments"] if f"flows/{flow}.py" in d["entrypoint"]}


def _placeholders(value: Any) -> set[str]:
    if isinstance(value, str):
        return set(re.findall(r"\{\{\s*([a-z_]+)\s*\}\}", value))
    if isinstance(value, dict):
        return set().union(*(_placeholders(v) for v in value.values())) if value else set()
    if isinstance(value, list):
        return set().union(*(_placeholders(v) for v in value)) if value else set()
    return set()


# --------------------------------------------------------------------------- static


def test_prefect_yaml_deploys_active_clean_with_valid_settings() -> None:
    from prefect.flows import load_flow_from_entrypoint

    from noisescore.settings import ActiveSettings

    deployments = _deployments("active_clean")
    assert set(deployments) == {"local", "gpu"}
    for deployment in deployments.values():
        flow = load_flow_from_entrypoint(str(ROOT / deployment["entrypoint"]))
        assert flow.name == "active-clean"
        ActiveSettings(**deployment["parameters"]["settings"])
    assert deployments["local"]["work_pool"]["name"] == "noisescore-local"
    assert deployments["gpu"]["work_pool"]["name"] == "noisescore-gpu"
    assert deployments["gpu"]["pull"] == _deployments()["gpu"]["pull"]


def test_prefect_yaml_deploys_lnl_benchmark_with_valid_settings() -> None:
    from prefect.flows import load_flow_from_entrypoint

    from noisescore.flows.lnl_benchmark import CELL_TAG
    from noisescore.settings import BenchSettings

    deployments = _deployments("lnl_benchmark")
    assert set(deployments) == {"local", "gpu"}
    for deployment in deployments.values():
        flow = load_flow_from_entrypoint(str(ROOT / deployment["entrypoint"]))
        assert flow.name == "lnl-benchmark"
        BenchSettings(**deployment["parameters"]["settings"])
    assert deployments["local"]["work_pool"] == _deployments("active_clean")["local"]["work_pool"]
    gpu = deployments["gpu"]
    assert gpu["work_pool"] == _deployments("active_clean")["gpu"]["work_pool"]
    assert gpu["work_pool"]["job_variables"]["gpu_count"] == 1
    assert gpu["parameters"]["settings"]["device"] == "auto"
    assert gpu["pull"] == _deployments()["gpu"]["pull"]
    # The documented command creates the limit on the tag the cell task carries.
    flows_doc = (ROOT / "docs" / "FLOWS.md").read_text()
    assert f"prefect concurrency-limit create {CELL_TAG} " in flows_doc


def test_prefect_yaml_deploys_the_flow_with_valid_settings() -> None:
    from prefect.flows import load_flow_from_entrypoint

    deployments = _deployments()
    assert set(deployments) == {"local", "gpu"}
    for deployment in deployments.values():
        flow = load_flow_from_entrypoint(str(ROOT / deployment["entrypoint"]))
        assert flow.name == "clean-labels"
        CleanSettings(**deployment["parameters"]["settings"])  # the same typed settings
    assert deployments["local"]["work_pool"]["name"] == "noisescore-local"
    gpu = deployments["gpu"]
    assert gpu["work_pool"]["name"] == "noisescore-gpu"
    assert gpu["work_pool"]["job_variables"]["gpu_count"] >= 1
    assert gpu["parameters"]["settings"]["device"] == "auto"


def test_k8s_job_template_requests_gpus_and_references_secrets() -> None:
    template = json.loads(K8S_TEMPLATE.read_text())
    variables = template["variables"]["properties"]
    assert _placeholders(template["job_configuration"]) <= set(variables)
    pod = template["job_configuration"]["job_manifest"]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "{{ gpu_count }}"
    assert variables["gpu_count"]["default"] == 1
    assert pod["tolerations"] == "{{ tolerations }}"
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in variables[
        "tolerations"
    ]["default"]
    assert container["envFrom"] == [{"secretRef": {"name": "{{ storage_secret }}"}}]
    assert pod["securityContext"]["runAsNonRoot"] is True
    # Credentials only through the Secret: no env defaults are baked into the template.
    assert container["env"] == "{{ env }}" and "default" not in variables["env"]


def test_k8s_ddp_job_template_is_the_gpu_template_under_torchrun() -> None:
    """The multi-GPU template differs from the one-GPU one only in the torchrun parts (an
    Indexed Job of ``nodes`` pods, the rendezvous subdomain, the command, GPUs per pod)."""
    base = json.loads(K8S_TEMPLATE.read_text())
    ddp = json.loads(K8S_DDP_TEMPLATE.read_text())
    variables = ddp["variables"]["properties"]
    assert _placeholders(ddp["job_configuration"]) <= set(variables)
    spec = ddp["job_configuration"]["job_manifest"]["spec"]
    assert (spec.pop("completionMode"), spec.pop("completions"), spec.pop("parallelism")) == (
        "Indexed", "{{ nodes }}", "{{ nodes }}",
    )  # fmt: skip
    pod = spec["template"]["spec"]
    assert pod.pop("subdomain") == "{{ rendezvous_service }}"
    (container,) = pod["containers"]
    assert container.pop("args") == [
        "torchrun", "--nnodes={{ nodes }}", "--nproc-per-node={{ gpus_per_job }}",
        "--max-restarts=0", "--rdzv-backend=c10d",
        "--rdzv-endpoint=$(JOB_NAME)-0.{{ rendezvous_service }}.{{ namespace }}.svc."
        "{{ cluster_domain }}:29400",
        "--rdzv-id=$(JOB_NAME)", "-m", "noisescore.cli", "flow", "execute",
    ]  # fmt: skip
    assert container["env"] == [
        {
            "name": "JOB_NAME",
            "valueFrom": {
                "fieldRef": {"fieldPath": "metadata.labels['batch.kubernetes.io/job-name']"}
            },
        }
    ]
    container["env"] = "{{ env }}"
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "{{ gpus_per_job }}"
    container["resources"]["limits"]["nvidia.com/gpu"] = "{{ gpu_count }}"
    base_pod = base["job_configuration"]["job_manifest"]["spec"]["template"]["spec"]
    base_pod["containers"][0].pop("args")
    assert ddp["job_configuration"] == base["job_configuration"]
    for name in ("gpus_per_job", "nodes"):
        assert (variables[name]["type"], variables[name]["minimum"]) == ("integer", 1)
        assert variables[name]["default"] == 1
    service = yaml.safe_load(K8S_RDZV_SERVICE.read_text())
    assert variables["rendezvous_service"]["default"] == service["metadata"]["name"]
    assert variables["cluster_domain"]["default"] == "cluster.local"
    assert service["spec"]["clusterIP"] == "None" and service["spec"]["publishNotReadyAddresses"]
    assert [p["port"] for p in service["spec"]["ports"]] == [29400]
    assert service["spec"]["selector"].items() <= spec["template"]["metadata"]["labels"].items()
    for name in ("gpus_per_job", "nodes", "rendezvous_service", "cluster_domain"):
        del variables[name]
    del base["variables"]["properties"]["gpu_count"]
    assert ddp["variables"] == base["variables"]


def _worker_job_manifest(
    template_path: Path, overrides: dict[str, Any], *, run_name: str
) -> tuple[dict[str, Any], uuid.UUID]:
    """The Job manifest prefect-kubernetes' worker builds from a base job template and a
    deployment's job variables for a new flow run named ``run_name``, and the run's id."""
    import asyncio

    from prefect.client.schemas.objects import FlowRun
    from prefect_kubernetes.worker import KubernetesWorkerJobConfiguration

    template = json.loads(template_path.read_text())
    flow_run = FlowRun(id=uuid.uuid4(), name=run_name, flow_id=uuid.uuid4())

    async def build() -> dict[str, Any]:
        config = await KubernetesWorkerJobConfiguration.from_template_and_values(
            template, overrides
        )
        config.prepare_for_flow_run(flow_run)
        return config.job_manifest

    return asyncio.run(build()), flow_run.id


def test_prefect_kubernetes_builds_a_multi_node_job_from_the_ddp_template(
    prefect_api: str,
) -> None:
    overrides = {"gpus_per_job": 4, "nodes": 2, "env": {"NCCL_DEBUG": "INFO"}}
    job, run_id = _worker_job_manifest(K8S_DDP_TEMPLATE, overrides, run_name="swift-wren")
    assert (job["spec"]["completions"], job["spec"]["parallelism"]) == (2, 2)
    pod = job["spec"]["template"]["spec"]
    assert pod["subdomain"] == "noisescore-rdzv"
    (container,) = pod["containers"]
    assert container["args"][1:3] == ["--nnodes=2", "--nproc-per-node=4"]
    host = "$(JOB_NAME)-0.noisescore-rdzv.noisescore.svc.cluster.local"
    assert f"--rdzv-endpoint={host}:29400" in container["args"]
    assert str(container["resources"]["limits"]["nvidia.com/gpu"]) == "4"
    env = {e["name"]: e for e in container["env"]}
    assert env["PREFECT__FLOW_RUN_ID"]["value"] == str(run_id)
    assert env["NCCL_DEBUG"]["value"] == "INFO"  # the env variable is merged, not lost
    assert "fieldRef" in env["JOB_NAME"]["valueFrom"]


# --------------------------------------------------------------------------- real API


def test_flow_run_without_an_api_fails_fast(tmp_path: Path) -> None:
    """No PREFECT_API_URL (nor a profile setting it): exit 2 and one line saying what to
    set, without starting a temporary Prefect server that has no deployments."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env["PREFECT_HOME"] = str(tmp_path / "prefect-home")  # no profile with an API URL
    result = subprocess.run(
        [str(BIN / "noisescore"), "flow", "run", "--epochs", "3", "--warmup-epochs", "2"],
        env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 2, result.stdout + result.stderr
    assert result.stdout == ""
    assert result.stderr.count("\n") == 1, result.stderr
    assert result.stderr.startswith("noisescore: error: PREFECT_API_URL is not set")
    assert "PREFECT_API_URL=http://127.0.0.1:4200/api" in result.stderr
    # Set, but nothing listens there: exit 1, one line naming the URL.
    with socket.socket() as sock:  # a free port, closed again
        sock.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{sock.getsockname()[1]}/api"
    result = subprocess.run(
        [str(BIN / "noisescore"), "flow", "run", "--epochs", "3", "--warmup-epochs", "2"],
        env={**env, "PREFECT_API_URL": closed}, cwd=tmp_path, capture_output=True, text=True,
        timeout=120,
    )  # fmt: skip
    assert result.returncode == 1 and result.stderr.count("\n") == 1, result.stderr
    assert f"no Prefect API answers at PREFECT_API_URL={closed}" in result.stderr


def test_flow_run_of_a_missing_deployment(
    prefect_api: str, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["flow", "run", "--deployment", "clean-labels/nowhere", "--epochs", "3",
            "--warmup-epochs", "2"]  # fmt: skip
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no deployment clean-labels/nowhere at" in err
    assert "prefect --no-prompt deploy --all" in err


def _prefect(api: str, *args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PREFECT_API_URL": api, "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    return subprocess.run(
        [str(BIN / "prefect"), *args], cwd=cwd, env=env, capture_output=True, text=True,
        timeout=300,
    )  # fmt: skip


def _read(api: str, path: str) -> Any:
    response = httpx.get(f"{api}/{path}", timeout=30)
    response.raise_for_status()
    return response.json()


def _readme_setup() -> list[list[str]]:
    """The README's one-time Prefect setup (the block that creates the work pools): its
    ``.venv/bin/prefect`` commands, as a user copies them."""
    blocks = re.findall(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), re.DOTALL)
    (block,) = [b for b in blocks if "work-pool create" in b]
    commands = [
        shlex.split(line, comments=True)
        for line in block.replace("\\\n", " ").splitlines()
        if line.startswith(".venv/bin/prefect ")
    ]
    assert [c[1:] for c in commands if "deploy" in c] == [["--no-prompt", "deploy", "--all"]]
    return [c[1:] for c in commands]


@pytest.fixture(scope="module")
def deployed(prefect_api: str) -> str:
    """The README's setup, command by command, on a server without the pools: both work
    pools created, every deployment of prefect.yaml deployed (``deploy --all`` exits 0)."""
    for pool in ("noisescore-local", "noisescore-gpu"):  # as on a fresh server
        _prefect(prefect_api, "--no-prompt", "work-pool", "delete", pool)
    for args in _readme_setup():
        result = _prefect(prefect_api, *args)
        assert result.returncode == 0, (args, result.stdout + result.stderr)
    return prefect_api


@pytest.mark.slow
def test_pools_and_deployments_on_a_real_api(deployed: str) -> None:
    pool = _read(deployed, "work_pools/noisescore-gpu")
    assert pool["type"] == "kubernetes"
    assert pool["base_job_template"] == json.loads(K8S_TEMPLATE.read_text())
    gpu = _read(deployed, "deployments/name/clean-labels/gpu")
    assert gpu["work_pool_name"] == "noisescore-gpu"
    assert gpu["job_variables"] == {"gpu_count": 1}
    local = _read(deployed, "deployments/name/clean-labels/local")
    assert local["work_pool_name"] == "noisescore-local"
    assert local["pull_steps"] == [
        {"prefect.deployments.steps.set_working_directory": {"directory": str(ROOT)}}
    ]
    schema = local["parameter_openapi_schema"]
    assert set(schema["properties"]) == {"settings", "job_id"}
    assert "CleanSettings" in schema["definitions"]  # the UI's form is the typed settings
    # What the UI's Quick run trains: not the paper's 100 epochs on a laptop's worker.
    assert local["parameters"]["settings"]["epochs"] == 30
    CleanSettings(**local["parameters"]["settings"])


@pytest.fixture
def background(tmp_path: Path) -> Iterator[list[subprocess.Popen[bytes]]]:
    """Processes a test starts (worker, server); interrupted and reaped afterwards."""
    processes: list[subprocess.Popen[bytes]] = []
    yield processes
    for process in processes:
        if process.poll() is None:
            process.send_signal(signal.SIGINT)
    for process in processes:
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)


def _start(
    processes: list[subprocess.Popen[bytes]],
    args: list[str],
    api: str,
    store: Path | None,
    log: Path,
    cwd: Path = ROOT,
) -> None:
    """Start a worker or server process; ``store=None``: no store configured for it."""
    env = {
        **os.environ,
        "PREFECT_API_URL": api,
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "NOISESCORE_DATA_DIR": str(ROOT.parent / "shared" / "data"),
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    env.pop("NOISESCORE_S3_ENDPOINT", None)
    env.pop("NOISESCORE_STORE_DIR", None)
    if store is not None:
        env["NOISESCORE_STORE_DIR"] = str(store)
    with log.open("wb") as out:
        processes.append(
            subprocess.Popen(args, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT)
        )


def _run_and_verify(
    deployment: str, job_id: str, store: Path, data_dir: Path,
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
) -> str:  # fmt: skip
    """Run the deployment through `noisescore flow run --wait`; return the flow run's id."""
    monkeypatch.delenv("NOISESCORE_S3_ENDPOINT", raising=False)
    monkeypatch.setenv("NOISESCORE_STORE_DIR", str(store))  # this terminal sees the same store
    argv = [
        "flow", "run", "--deployment", deployment, "--job-id", job_id, "--wait",
        "--dataset", "medmnist://breastmnist", "--data-dir", str(data_dir),
        "--noise", "uniform:0.5", "--epochs", "2", "--warmup-epochs", "1", "--device", "cpu",
    ]  # fmt: skip
    assert main(argv) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert f"of {deployment}: Completed" in out
    job = JobStore(open_store(StoreSettings(store_dir=store)), job_id)
    job.verify()
    assert json.loads(job.get("spec.json"))["settings"]["epochs"] == 2
    # The same summary as `noisescore clean` prints.
    assert "noise     uniform:0.5 realised" in out and "LiNC      Otsu threshold" in out
    assert f"artifacts {job.url()}" in out and "trust_histogram.png" in out
    match = re.search(r"flow run \S+ \(([0-9a-f-]{36})\)", out)
    assert match, out
    return match.group(1)


def _flow_logs(api: str, flow_run_id: str, until: str = "artifacts go to") -> list[str]:
    """The messages of a flow run's own logs (not its tasks'), oldest first, once one
    containing ``until`` has arrived (logs reach the API in batches, after the state)."""
    body = {"logs": {"flow_run_id": {"any_": [flow_run_id]}}, "sort": "TIMESTAMP_ASC"}
    deadline = time.monotonic() + 60
    while True:
        response = httpx.post(f"{api}/logs/filter", json=body, timeout=30)
        response.raise_for_status()
        messages = [log["message"] for log in response.json() if log["task_run_id"] is None]
        if any(until in m for m in messages) or time.monotonic() > deadline:
            return messages
        time.sleep(0.5)


def _after_start(messages: list[str]) -> list[str]:
    """What the flow logged after Prefect's own start lines (pull steps, "Beginning…")."""
    ours = [i for i, m in enumerate(messages) if "artifacts go to" in m]
    assert ours, messages
    return messages[ours[0] :]


@pytest.mark.slow
def test_run_on_the_process_pool_through_a_worker(
    deployed: str, data_dir: Path, tmp_path: Path, background: list[subprocess.Popen[bytes]],
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    store = tmp_path / "store"
    worker = [str(BIN / "prefect"), "worker", "start", "--pool", "noisescore-local"]
    _start(background, worker, deployed, store, tmp_path / "worker.log")
    run_id = _run_and_verify(
        "clean-labels/local", "via-worker", store, data_dir, capsys, monkeypatch
    )
    logs = _after_start(_flow_logs(deployed, run_id))
    assert logs[0] == f"job via-worker: artifacts go to {store.resolve().as_uri()}/jobs/via-worker/"
    assert not any("no store is configured" in m for m in logs)  # the worker has a store


@pytest.mark.slow
def test_served_deployment_runs(
    prefect_api: str, data_dir: Path, tmp_path: Path,
    background: list[subprocess.Popen[bytes]], capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    """Served with no store configured: the runs go to the serving process's ./artifacts,
    and each run's first log line says where, with a warning; bad parameters (as the UI's
    Custom run sends them) fail in the first step with one line."""
    from prefect.client.schemas.objects import FlowRun
    from prefect.deployments import run_deployment

    cwd = tmp_path / "serving"
    cwd.mkdir()
    store = cwd / "artifacts"
    serve = [str(BIN / "noisescore"), "flow", "serve", "--name", "served-test"]
    _start(background, serve, prefect_api, None, tmp_path / "serve.log", cwd=cwd)
    deadline = time.monotonic() + 120
    while True:  # the deployment exists once `serve` has registered it
        response = httpx.get(f"{prefect_api}/deployments/name/clean-labels/served-test")
        if response.status_code == 200:
            break
        assert background[0].poll() is None, (tmp_path / "serve.log").read_text()
        assert time.monotonic() < deadline, (tmp_path / "serve.log").read_text()
        time.sleep(0.5)
    run_id = _run_and_verify(
        "clean-labels/served-test", "via-serve", store, data_dir, capsys, monkeypatch
    )
    logs = _after_start(_flow_logs(prefect_api, run_id, until="no store is configured"))
    assert logs[0] == f"job via-serve: artifacts go to {store.resolve().as_uri()}/jobs/via-serve/"
    assert logs[1].startswith("no store is configured where this flow runs") and (
        "NOISESCORE_STORE_DIR in the environment of the worker" in logs[1]
    )

    bad = run_deployment(
        "clean-labels/served-test",
        parameters={"settings": {"epochs": 3, "warmup_epochs": 10}},
        timeout=120,
    )
    assert isinstance(bad, FlowRun) and bad.state is not None and bad.state.is_failed()
    message = "invalid parameters: warmup_epochs (10) must not exceed epochs (3)"
    assert bad.state.message == message
    logs = _flow_logs(prefect_api, str(bad.id), until="invalid parameters")
    assert [m for m in logs if m.startswith("invalid")] == [message]  # one line
    assert not any("Traceback" in m for m in logs)


@pytest.mark.slow
def test_service_in_prefect_mode_submits_deployment_runs(
    prefect_api: str, data_dir: Path, tmp_path: Path,
    background: list[subprocess.Popen[bytes]],
) -> None:  # fmt: skip
    """With a Prefect API, SubmitCleaningJob creates a deployment run; state comes back
    from Prefect and results from the shared store, across a restart of the service."""
    from noisescore.client import NoiseScoringClient
    from noisescore.service.app import create_app
    from noisescore.settings import ServiceSettings
    from noisescore.storage import LocalStore
    from noisescore.v1 import noise_scoring_pb2 as pb

    store = tmp_path / "store"
    serve = [str(BIN / "noisescore"), "flow", "serve", "--name", "svc-prefect"]
    _start(background, serve, prefect_api, store, tmp_path / "serve.log")
    deadline = time.monotonic() + 120
    while httpx.get(f"{prefect_api}/deployments/name/clean-labels/svc-prefect").status_code != 200:
        assert background[0].poll() is None, (tmp_path / "serve.log").read_text()
        assert time.monotonic() < deadline, (tmp_path / "serve.log").read_text()
        time.sleep(0.5)

    settings = ServiceSettings(
        grpc_addr="127.0.0.1:0", metrics_addr=None, job_runner="prefect",
        prefect_deployment="clean-labels/svc-prefect",
    )  # fmt: skip
    app = create_app(settings, store=LocalStore(store)).start()
    try:
        with NoiseScoringClient(f"127.0.0.1:{app.port}") as client:
            job = client.submit(
                "medmnist://breastmnist", epochs=2, warmup_epochs=1, device="cpu",
                noise="uniform:0.5",
            )  # fmt: skip
            deadline = time.monotonic() + 240
            while (job := client.get(job.name)).state not in (pb.Job.SUCCEEDED, pb.Job.FAILED):
                assert time.monotonic() < deadline, job
                time.sleep(0.5)
            assert job.state == pb.Job.SUCCEEDED, job.error
            assert sum(1 for _ in client.corrections(job.name)) == 546
            # Cancelling a running deployment run: Prefect stops it, the job ends CANCELLED.
            long = client.submit("medmnist://breastmnist", epochs=500, warmup_epochs=10)
            deadline = time.monotonic() + 120
            while client.get(long.name).state != pb.Job.RUNNING:
                assert time.monotonic() < deadline, client.get(long.name)
                time.sleep(0.5)
            client.cancel(long.name)
            deadline = time.monotonic() + 120
            while (cancelled := client.get(long.name)).state != pb.Job.CANCELLED:
                assert cancelled.state == pb.Job.RUNNING, cancelled
                assert time.monotonic() < deadline, cancelled
                time.sleep(0.5)
    finally:
        app.stop(grace=1)
    again = create_app(settings, store=LocalStore(store)).start()  # a restart keeps it
    try:
        with NoiseScoringClient(f"127.0.0.1:{again.port}") as client:
            assert client.get(job.name).state == pb.Job.SUCCEEDED
    finally:
        again.stop(grace=1)


def test_prefect_kubernetes_builds_a_gpu_job_from_the_template(prefect_api: str) -> None:
    """The Job manifest the Kubernetes worker would submit for a run of the GPU pool."""
    overrides = {"gpu_count": 2, "env": {"NOISESCORE_PUSHGATEWAY": "pgw:9091"}}
    job, run_id = _worker_job_manifest(K8S_TEMPLATE, overrides, run_name="calm-heron")
    pod = job["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert str(container["resources"]["limits"]["nvidia.com/gpu"]) == "2"
    assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert pod["tolerations"][0]["key"] == "nvidia.com/gpu"
    assert container["envFrom"] == [{"secretRef": {"name": "noisescore-storage"}}]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["PREFECT__FLOW_RUN_ID"] == str(run_id)
    assert env["NOISESCORE_PUSHGATEWAY"] == "pgw:9091"
    assert container["image"] == "ghcr.io/noisescore/noisescore-worker:0.1.0"
