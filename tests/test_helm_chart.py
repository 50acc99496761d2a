"""The Helm chart deploy/helm/noisescore: lint, offline renders (Helm's Go SDK through
helm-python), the work pool's job template as prefect-kubernetes renders it, and the
worker's registration commands run against a real Prefect API."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import re
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import helm_python as helm
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CHART = ROOT / "deploy" / "helm" / "noisescore"
PRODUCTION = ROOT / "deploy" / "helm" / "values-gpu-production.yaml"
RELEASE, NAMESPACE = "ns", "noisescore"
BIN = Path(sys.executable).parent
SECRET_LIKE = re.compile(r"KEY|TOKEN|PASSWORD|SECRET")


def production_values() -> dict[str, Any]:
    values: dict[str, Any] = yaml.safe_load(PRODUCTION.read_text())
    return values


def render(values: dict[str, Any] | None = None, name: str = RELEASE) -> list[dict[str, Any]]:
    """Every object of an offline render, parsed. A fresh load per render: Helm drops
    disabled subcharts from the loaded chart in place (minio.enabled=false would leak)."""
    with helm.Chart.load(CHART) as chart:
        manifests = chart.render(values or {}, name=name, namespace=NAMESPACE)
    return [
        doc
        for path, text in sorted(manifests.items())
        if path.endswith(".yaml")
        for doc in yaml.safe_load_all(text)
        if doc
    ]


def render_error(values: dict[str, Any]) -> str:
    with pytest.raises(helm.HelmError) as caught:
        render(values)
    return str(caught.value)


def find(objects: list[dict[str, Any]], kind: str, name: str | None = None) -> list[dict[str, Any]]:
    return [
        o for o in objects if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)
    ]


def job_template(objects: list[dict[str, Any]]) -> dict[str, Any]:
    (config_map,) = find(objects, "ConfigMap", f"{RELEASE}-noisescore-job-template")
    template: dict[str, Any] = json.loads(config_map["data"]["job-template.json"])
    return template


def job_pod(template: dict[str, Any]) -> dict[str, Any]:
    pod: dict[str, Any] = template["job_configuration"]["job_manifest"]["spec"]["template"]["spec"]
    return pod


def pod_specs(objects: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Pod specs of every workload, and of the job template's Job, by a readable name."""
    specs = {
        f"{o['kind']}/{o['metadata']['name']}": o["spec"]["template"]["spec"]
        for o in objects
        if o["kind"] in ("Deployment", "StatefulSet", "Job")
    }
    if find(objects, "ConfigMap", f"{RELEASE}-noisescore-job-template"):
        specs["job-template"] = job_pod(job_template(objects))
    return specs


def all_containers(objects: list[dict[str, Any]]) -> Iterator[tuple[str, dict[str, Any], bool]]:
    """(where, container, is_init) for every container and init container."""
    for where, spec in pod_specs(objects).items():
        for container in spec.get("initContainers", []):
            yield f"{where}/{container['name']}", container, True
        for container in spec["containers"]:
            yield f"{where}/{container['name']}", container, False


@pytest.fixture(scope="module")
def default_objects() -> list[dict[str, Any]]:
    return render()


@pytest.fixture(scope="module")
def production_objects() -> list[dict[str, Any]]:
    return render(production_values())


@pytest.fixture(params=["default", "production"])
def objects(
    request: pytest.FixtureRequest,
    default_objects: list[dict[str, Any]],
    production_objects: list[dict[str, Any]],
) -> list[dict[str, Any]]:
    return default_objects if request.param == "default" else production_objects


# --------------------------------------------------------------------------- lint, render


@pytest.mark.parametrize("values_file", [None, PRODUCTION], ids=["default", "production"])
def test_lint_strict_passes(values_file: Path | None) -> None:
    values = yaml.safe_load(values_file.read_text()) if values_file else None
    report = helm.lint(CHART, values, strict=True, namespace=NAMESPACE, kube_version="v1.27.0")
    assert report["errors"] == []
    assert [m for m in report["messages"] if m["severity"] >= 2] == []


def test_minio_subchart_is_vendored_and_lints() -> None:
    (dependency,) = helm.dependency_list(CHART)
    # "unpacked": present as a directory under charts/ (not "missing"; no download needed).
    assert (dependency["name"], dependency["status"]) == ("minio", "unpacked")
    report = helm.lint(CHART / "charts" / "minio", None, strict=True)
    assert report["errors"] == []


def test_renders_the_expected_objects(
    default_objects: list[dict[str, Any]], production_objects: list[dict[str, Any]]
) -> None:
    kinds = {(o["kind"], o["metadata"]["name"]) for o in default_objects}
    assert {
        ("Deployment", "ns-noisescore"),
        ("Service", "ns-noisescore"),
        ("Deployment", "ns-noisescore-worker"),
        ("Role", "ns-noisescore-worker"),
        ("ServiceAccount", "ns-noisescore-job"),
        ("StatefulSet", "ns-minio"),
        ("Secret", "ns-minio"),
    } <= kinds
    production = {o["kind"] for o in production_objects}
    assert {"HorizontalPodAutoscaler", "PodDisruptionBudget", "ServiceMonitor"} <= production
    assert "StatefulSet" not in production  # minio disabled
    for o in default_objects + production_objects:
        assert o["metadata"]["labels"]["app.kubernetes.io/instance"] == RELEASE
        assert o["metadata"]["namespace"] == NAMESPACE


def test_names_stay_dns_labels_with_long_names() -> None:
    release = "r" * 53  # 53 characters, Helm's longest release name
    helm.validate_release_name(release)
    objects = render(name=release)
    names = [o["metadata"]["name"] for o in objects]
    assert max(len(n) for n in names) == 63
    (minio,) = find(objects, "StatefulSet")
    assert len(minio["metadata"]["name"]) <= 52  # + "-<revision hash>" fits a label
    assert all(re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", n) for n in names)
    # Truncation keeps the suffixes apart: no two objects of a kind share a name.
    assert len({(o["kind"], o["metadata"]["name"]) for o in objects}) == len(objects)


def test_image_tags_default_to_app_version(default_objects: list[dict[str, Any]]) -> None:
    images = {c["image"] for _, c, _ in all_containers(default_objects)}
    assert "ghcr.io/noisescore/noisescore-service:0.1.0" in images
    assert "ghcr.io/noisescore/noisescore-worker:0.1.0" in images
    variables = job_template(default_objects)["variables"]["properties"]
    assert variables["image"]["default"] == "ghcr.io/noisescore/noisescore-worker:0.1.0"


# --------------------------------------------------------------------------- workloads


def test_every_container_has_resources_and_probes(objects: list[dict[str, Any]]) -> None:
    seen = 0
    for where, container, is_init in all_containers(objects):
        seen += 1
        resources = container.get("resources", {})
        assert resources.get("requests"), where
        assert resources.get("limits", {}).get("memory"), where
        if not is_init and where != "job-template/prefect-job":  # a batch job: no probes
            assert "readinessProbe" in container and "livenessProbe" in container, where
    assert seen >= 4


def test_service_probes_are_grpc_on_the_health_port(objects: list[dict[str, Any]]) -> None:
    (deployment,) = find(objects, "Deployment", "ns-noisescore")
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    for probe in ("startupProbe", "livenessProbe"):  # liveness: the process answers
        assert container[probe]["grpc"] == {"port": 8081, "service": ""}
    # Readiness: NOT_SERVING while the API is saturated (docs/SERVICE.md, Health checks).
    ready = {"port": 8081, "service": "noisescore.v1.NoiseScoring"}
    assert container["readinessProbe"]["grpc"] == ready
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["NOISESCORE_HEALTH_ADDR"] == "0.0.0.0:8081"
    assert env["NOISESCORE_JOB_RUNNER"] == "prefect"
    assert env["NOISESCORE_PREFECT_DEPLOYMENT"] == "clean-labels/gpu"
    assert env["NOISESCORE_PREFECT_ACTIVE_DEPLOYMENT"] == "active-clean/gpu"
    grace = deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert grace > int(env["NOISESCORE_SHUTDOWN_GRACE"])


def test_every_container_is_hardened(objects: list[dict[str, Any]]) -> None:
    for where, spec in pod_specs(objects).items():
        pod = spec["securityContext"]
        assert pod["runAsNonRoot"] is True, where
        assert pod["seccompProfile"] == {"type": "RuntimeDefault"}, where
        for container in spec.get("initContainers", []) + spec["containers"]:
            context = container["securityContext"]
            assert context["readOnlyRootFilesystem"] is True, where
            assert context["allowPrivilegeEscalation"] is False, where
            assert context["capabilities"]["drop"] == ["ALL"], where
            mounts = {m["mountPath"] for m in container["volumeMounts"]}
            assert "/tmp" in mounts, where  # the only writable place
    (service,) = find(objects, "Deployment", "ns-noisescore")
    assert service["spec"]["template"]["spec"]["automountServiceAccountToken"] is False
    assert service["spec"]["template"]["spec"]["securityContext"]["runAsUser"] == 10001


def test_worker_registers_pool_and_deployment(default_objects: list[dict[str, Any]]) -> None:
    (worker,) = find(default_objects, "Deployment", "ns-noisescore-worker")
    spec = worker["spec"]["template"]["spec"]
    (register,) = spec["initContainers"]
    script = register["args"][0]
    assert "--base-job-template /etc/noisescore/job-template.json --overwrite" in script
    assert "set-concurrency-limit noisescore-gpu 1" in script
    # One deploy per flow: with several --name, prefect ignores --pool.
    assert "deploy --prefect-file /app/prefect.yaml --name clean-labels/gpu --pool" in script
    assert "deploy --prefect-file /app/prefect.yaml --name active-clean/gpu --pool" in script
    assert "deploy --prefect-file /app/prefect.yaml --name lnl-benchmark/gpu --pool" in script
    (container,) = spec["containers"]
    assert container["command"][:3] == ["prefect", "worker", "start"]
    assert "--with-healthcheck" in container["command"]
    assert container["livenessProbe"]["httpGet"] == {"path": "/health", "port": "health"}
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["PREFECT_INTEGRATIONS_KUBERNETES_OBSERVER_NAMESPACES"] == NAMESPACE
    assert env["PREFECT_HOME"].startswith("/tmp")
    (role,) = find(default_objects, "Role", "ns-noisescore-worker")
    granted = {r for rule in role["rules"] for r in rule["resources"]}
    assert granted == {"jobs", "pods", "pods/log", "events"}  # no secrets, nothing else
    checksum = worker["spec"]["template"]["metadata"]["annotations"]["checksum/job-template"]
    changed = render({"worker": {"job": {"gpus": 2}}})
    (worker2,) = find(changed, "Deployment", "ns-noisescore-worker")
    assert worker2["spec"]["template"]["metadata"]["annotations"]["checksum/job-template"] != (
        checksum
    )


# --------------------------------------------------------------------------- GPUs


def test_no_gpu_anywhere_with_defaults() -> None:
    with helm.Chart.load(CHART) as chart:
        manifests = chart.render({}, name=RELEASE, namespace=NAMESPACE)
    assert "nvidia.com/gpu" not in "".join(manifests.values())


def test_production_job_template_requests_a_gpu(production_objects: list[dict[str, Any]]) -> None:
    template = job_template(production_objects)
    values = production_values()["worker"]["job"]
    (container,) = job_pod(template)["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "{{ gpu_count }}"
    variables = template["variables"]["properties"]
    assert variables["gpu_count"]["default"] == 1
    assert variables["node_selector"]["default"] == values["nodeSelector"]
    assert variables["tolerations"]["default"] == values["tolerations"]
    assert variables["affinity"]["default"] == values["affinity"]


def _placeholders(value: Any) -> set[str]:
    if isinstance(value, str):
        return set(re.findall(r"\{\{\s*([a-z_]+)\s*\}\}", value))
    if isinstance(value, dict):
        return set().union(*map(_placeholders, value.values()))
    if isinstance(value, list):
        return set().union(*map(_placeholders, value))
    return set()


@pytest.mark.parametrize("gpus", [0, 1])
def test_job_template_placeholders_are_declared(gpus: int) -> None:
    template = job_template(render({"worker": {"job": {"gpus": gpus}}}))
    assert _placeholders(template["job_configuration"]) <= set(template["variables"]["properties"])


def test_prefect_kubernetes_builds_the_gpu_job(
    production_objects: list[dict[str, Any]], prefect_api: str
) -> None:
    """The Job manifest exactly as the Kubernetes worker would submit it."""
    from prefect.client.schemas.objects import FlowRun
    from prefect_kubernetes.worker import KubernetesWorkerJobConfiguration

    template = job_template(production_objects)
    flow_run = FlowRun(id=uuid.uuid4(), name="brave-otter", flow_id=uuid.uuid4())

    async def build() -> dict[str, Any]:
        config = await KubernetesWorkerJobConfiguration.from_template_and_values(template, {})
        config.prepare_for_flow_run(flow_run)
        return config.job_manifest

    job = asyncio.run(build())
    values = production_values()["worker"]["job"]
    assert job["metadata"]["namespace"] == NAMESPACE
    assert job["spec"]["backoffLimit"] == 0
    pod = job["spec"]["template"]["spec"]
    assert pod["nodeSelector"] == values["nodeSelector"]
    assert pod["tolerations"] == values["tolerations"]
    assert pod["affinity"] == values["affinity"]
    assert pod["serviceAccountName"] == "ns-noisescore-job"
    labels = job["spec"]["template"]["metadata"]["labels"]
    assert labels["app.kubernetes.io/component"] == "cleaning-job"  # the NetworkPolicy's selector
    assert labels["app.kubernetes.io/instance"] == RELEASE
    (container,) = pod["containers"]
    assert container["image"] == "ghcr.io/noisescore/noisescore-worker:0.1.0"
    assert str(container["resources"]["limits"]["nvidia.com/gpu"]) == "1"
    assert container["resources"]["requests"] == values["resources"]["requests"]
    env = {e["name"]: e for e in container["env"]}
    assert env["PREFECT__FLOW_RUN_ID"]["value"] == str(flow_run.id)  # Prefect's env, merged
    assert env["PREFECT_API_URL"]["value"] == prefect_api
    assert env["NOISESCORE_S3_SECRET_KEY"]["valueFrom"] == {
        "secretKeyRef": {"name": "noisescore-s3", "key": "secret-key"}
    }
    assert (
        env["NOISESCORE_PUSHGATEWAY"]["value"]
        == "http://prometheus-pushgateway.monitoring.svc:9091"
    )
    assert container["envFrom"] == [{"configMapRef": {"name": "ns-noisescore-storage"}}]


# --------------------------------------------------------------------------- torchrun jobs

RDZV_SERVICE = f"{RELEASE}-noisescore-rdzv"
FLOW_EXECUTE = ["-m", "noisescore.cli", "flow", "execute"]


def job_values(**job: Any) -> dict[str, Any]:
    """Production values with these worker.job keys changed."""
    values = production_values()
    values["worker"]["job"].update(job)
    return values


def test_lint_strict_passes_for_torchrun_jobs() -> None:
    report = helm.lint(
        CHART, job_values(gpusPerJob=4, nodes=2), strict=True, namespace=NAMESPACE,
        kube_version="v1.27.0",
    )  # fmt: skip
    assert report["errors"] == []
    assert [m for m in report["messages"] if m["severity"] >= 2] == []


def test_one_gpu_per_job_is_the_default_single_process_job(
    default_objects: list[dict[str, Any]], production_objects: list[dict[str, Any]]
) -> None:
    job = yaml.safe_load((CHART / "values.yaml").read_text())["worker"]["job"]
    assert (job["gpusPerJob"], job["nodes"]) == (1, 1)
    for objects in (default_objects, production_objects):
        template = job_template(objects)
        spec = template["job_configuration"]["job_manifest"]["spec"]
        assert "completionMode" not in spec and "completions" not in spec
        pod = job_pod(template)
        assert "subdomain" not in pod
        (container,) = pod["containers"]
        assert container["args"] == "{{ command }}"  # Prefect's flow-run command, as before
        assert "JOB_NAME" not in {e["name"] for e in container["env"]}
        assert find(objects, "Service", RDZV_SERVICE) == []
    (container,) = job_pod(job_template(production_objects))["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "{{ gpu_count }}"


@pytest.mark.parametrize("base", ["default", "production"])
def test_gpus_per_job_runs_torchrun_standalone(base: str) -> None:
    alone = {"worker": {"job": {"gpusPerJob": 4}}}
    objects = render(job_values(gpusPerJob=4) if base == "production" else alone)
    template = job_template(objects)
    assert "completionMode" not in template["job_configuration"]["job_manifest"]["spec"]
    pod = job_pod(template)
    (container,) = pod["containers"]
    assert container["args"] == [
        "torchrun", "--nnodes=1", "--nproc-per-node=4", "--max-restarts=0", "--standalone",
        *FLOW_EXECUTE,
    ]  # fmt: skip
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 4  # one GPU per process
    (shm,) = [v for v in pod["volumes"] if v["name"] == "dshm"]
    assert shm["emptyDir"]["medium"] == "Memory"
    assert {"name": "dshm", "mountPath": "/dev/shm"} in container["volumeMounts"]
    # The shape is the chart's: a deployment's gpu_count cannot split GPUs from processes.
    assert "gpu_count" not in template["variables"]["properties"]
    assert _placeholders(template["job_configuration"]) <= set(template["variables"]["properties"])
    assert find(objects, "Service", RDZV_SERVICE) == []
    (policy,) = find(objects, "NetworkPolicy", "ns-noisescore-job")
    assert "ingress" not in policy["spec"]  # one pod: the ranks talk over localhost


def test_nodes_run_an_indexed_job_meeting_at_pod_0() -> None:
    objects = render(job_values(nodes=2, gpusPerJob=2))
    template = job_template(objects)
    spec = template["job_configuration"]["job_manifest"]["spec"]
    assert (spec["completionMode"], spec["completions"], spec["parallelism"]) == ("Indexed", 2, 2)
    assert spec["backoffLimit"] == 0  # one pod failing fails the job
    pod = job_pod(template)
    assert pod["subdomain"] == RDZV_SERVICE
    (container,) = pod["containers"]
    host = f"$(JOB_NAME)-0.{RDZV_SERVICE}.{NAMESPACE}.svc.cluster.local"
    assert container["args"] == [
        "torchrun", "--nnodes=2", "--nproc-per-node=2", "--max-restarts=0",
        "--rdzv-backend=c10d", f"--rdzv-endpoint={host}:29400", "--rdzv-id=$(JOB_NAME)",
        *FLOW_EXECUTE,
    ]  # fmt: skip
    env = {e["name"]: e for e in container["env"]}
    assert env["JOB_NAME"]["valueFrom"]["fieldRef"] == {
        "fieldPath": "metadata.labels['batch.kubernetes.io/job-name']"
    }
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 2
    (service,) = find(objects, "Service", RDZV_SERVICE)
    assert service["spec"]["clusterIP"] == "None"
    assert service["spec"]["publishNotReadyAddresses"] is True
    assert [p["port"] for p in service["spec"]["ports"]] == [29400]
    pod_labels = template["job_configuration"]["job_manifest"]["spec"]["template"]["metadata"][
        "labels"
    ]
    assert service["spec"]["selector"].items() <= pod_labels.items()
    assert "app.kubernetes.io/name" not in service["spec"]["selector"]  # Prefect rewrites it
    # The pods of a job reach each other (rendezvous, NCCL); nothing else reaches them.
    (policy,) = find(objects, "NetworkPolicy", "ns-noisescore-job")
    (rule,) = policy["spec"]["ingress"]
    assert rule == {"from": [{"podSelector": {"matchLabels": service["spec"]["selector"]}}]}
    # CPU pods (gloo) when no GPUs are asked for; a custom cluster domain is honoured.
    cpu = render({"worker": {"job": {"nodes": 3, "clusterDomain": "example.org"}}})
    (container,) = job_pod(job_template(cpu))["containers"]
    assert "nvidia.com/gpu" not in container["resources"]["limits"]
    assert "--nnodes=3" in container["args"] and "--nproc-per-node=1" in container["args"]
    assert any(a.endswith(".svc.example.org:29400") for a in container["args"])


@pytest.mark.parametrize(
    ("job", "message"),
    [
        ({"gpusPerJob": 0}, "at '/worker/job/gpusPerJob': minimum: got 0, want 1"),
        ({"gpusPerJob": 2.5}, "at '/worker/job/gpusPerJob': got number, want integer"),
        ({"nodes": 0}, "at '/worker/job/nodes': minimum: got 0, want 1"),
        ({"nodes": "2"}, "at '/worker/job/nodes': got string, want integer"),
        ({"clusterDomain": "Cluster_Local"}, "at '/worker/job/clusterDomain'"),
        (
            {"gpus": 2, "gpusPerJob": 4},
            "worker.job.gpus (2) disagrees with worker.job.gpusPerJob (4)",
        ),
        ({"gpus": 2, "nodes": 2}, "worker.job.gpus (2) disagrees with worker.job.gpusPerJob (1)"),
    ],
)
def test_bad_job_counts_are_refused(job: dict[str, Any], message: str) -> None:
    assert message in render_error({"worker": {"job": job}})


def test_prefect_kubernetes_builds_the_multi_node_job(prefect_api: str) -> None:
    """The Indexed Job as the worker submits it: Prefect keeps the Job-level fields and the
    literal torchrun argv, and a deployment's gpu_count (prefect.yaml sets 1) changes
    nothing."""
    from prefect.client.schemas.objects import FlowRun
    from prefect_kubernetes.worker import KubernetesWorkerJobConfiguration

    template = job_template(render(job_values(nodes=2, gpusPerJob=4)))
    flow_run = FlowRun(id=uuid.uuid4(), name="quiet-lynx", flow_id=uuid.uuid4())

    async def build() -> dict[str, Any]:
        config = await KubernetesWorkerJobConfiguration.from_template_and_values(
            template, {"gpu_count": 1}
        )
        config.prepare_for_flow_run(flow_run)
        return config.job_manifest

    job = asyncio.run(build())
    assert (job["spec"]["completionMode"], job["spec"]["completions"]) == ("Indexed", 2)
    pod = job["spec"]["template"]["spec"]
    assert pod["subdomain"] == RDZV_SERVICE
    (container,) = pod["containers"]
    assert container["args"][:3] == ["torchrun", "--nnodes=2", "--nproc-per-node=4"]
    assert container["args"][-4:] == FLOW_EXECUTE
    assert str(container["resources"]["limits"]["nvidia.com/gpu"]) == "4"
    env = {e["name"]: e for e in container["env"]}
    assert env["PREFECT__FLOW_RUN_ID"]["value"] == str(flow_run.id)  # every pod, every rank
    assert "fieldRef" in env["JOB_NAME"]["valueFrom"]
    # The rendezvous Service still selects the pods after Prefect relabels them.
    labels = job["spec"]["template"]["metadata"]["labels"]
    assert labels["app.kubernetes.io/instance"] == RELEASE
    assert labels["app.kubernetes.io/component"] == "cleaning-job"


# --------------------------------------------------------------------------- secrets


# Literal values allowed under secret-like names: where a Secret is (its name and key), or
# a file inside the read-only Secret mount (NOISESCORE_TLS_KEY is a path).
SECRET_REFERENCES = ("PREFECT_INTEGRATIONS_KUBERNETES_WORKER_API_KEY_SECRET_",)
SECRET_MOUNT = "/etc/noisescore/tls/"


def check_secrets_referenced(objects: list[dict[str, Any]]) -> int:
    checked = 0
    for where, container, _ in all_containers(objects):
        for entry in container.get("env", []):
            name = entry["name"]
            if not SECRET_LIKE.search(name) or name.startswith(SECRET_REFERENCES):
                continue
            checked += 1
            if "value" in entry:
                assert entry["value"].startswith(SECRET_MOUNT), f"{where}: {name} is inlined"
            else:
                assert "secretKeyRef" in entry["valueFrom"], f"{where}: {name}"
    for config_map in find(objects, "ConfigMap"):
        assert not any(SECRET_LIKE.search(key) for key in config_map["data"])
    return checked


def test_secrets_are_referenced_never_inlined(objects: list[dict[str, Any]]) -> None:
    assert check_secrets_referenced(objects) >= 4  # the S3 keys of the service and the jobs


def test_prefect_cloud_key_is_referenced() -> None:
    objects = render({"prefect": {"apiKey": {"existingSecret": "prefect-cloud"}}})
    check_secrets_referenced(objects)
    (worker,) = find(objects, "Deployment", "ns-noisescore-worker")
    env = {e["name"]: e for e in worker["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["PREFECT_API_KEY"]["valueFrom"]["secretKeyRef"] == {
        "name": "prefect-cloud",
        "key": "api-key",
    }
    # ...and the worker hands the jobs a reference to the same Secret, not the key.
    assert env["PREFECT_INTEGRATIONS_KUBERNETES_WORKER_API_KEY_SECRET_NAME"]["value"] == (
        "prefect-cloud"
    )


def test_only_secret_is_minios_generated_one(
    default_objects: list[dict[str, Any]], production_objects: list[dict[str, Any]]
) -> None:
    assert find(production_objects, "Secret") == []
    (secret,) = find(default_objects, "Secret")
    assert secret["metadata"]["name"] == "ns-minio"
    assert set(secret["data"]) == {"rootUser", "rootPassword"}
    (again,) = find(render(), "Secret")
    assert again["data"]["rootPassword"] != secret["data"]["rootPassword"]  # drawn at random
    password = base64.b64decode(secret["data"]["rootPassword"]).decode()
    assert len(password) == 40 and password not in json.dumps(production_values())
    # The service and the jobs read exactly that Secret's keys.
    (service,) = find(default_objects, "Deployment", "ns-noisescore")
    env = {e["name"]: e for e in service["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["NOISESCORE_S3_ACCESS_KEY"]["valueFrom"]["secretKeyRef"] == {
        "name": "ns-minio",
        "key": "rootUser",
    }


def test_auth_and_tls_mount_existing_secrets(production_objects: list[dict[str, Any]]) -> None:
    (service,) = find(production_objects, "Deployment", "ns-noisescore")
    pod = service["spec"]["template"]["spec"]
    env = {e["name"]: e for e in pod["containers"][0]["env"]}
    assert env["NOISESCORE_AUTH_TOKENS"]["valueFrom"]["secretKeyRef"] == {
        "name": "noisescore-auth",
        "key": "tokens",
    }
    assert env["NOISESCORE_TLS_CERT"]["value"] == "/etc/noisescore/tls/tls.crt"
    assert "NOISESCORE_TLS_CLIENT_CA" not in env
    (volume,) = [v for v in pod["volumes"] if v["name"] == "tls"]
    assert volume["secret"]["secretName"] == "noisescore-tls"
    (mount,) = [m for m in pod["containers"][0]["volumeMounts"] if m["name"] == "tls"]
    assert mount == {"name": "tls", "mountPath": "/etc/noisescore/tls", "readOnly": True}


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"auth": {"enabled": True}}, "auth.enabled requires auth.existingSecret"),
        ({"tls": {"enabled": True}}, "tls.enabled requires tls.existingSecret"),
        ({"tls": {"clientAuth": True}}, "tls.clientAuth requires tls.enabled"),
        ({"auth": {"insecure": False}}, "auth.insecure=false needs auth.enabled"),
    ],
)
def test_enabling_without_a_secret_fails_clearly(values: dict[str, Any], message: str) -> None:
    assert message in render_error(values)


def test_insecure_is_explicit_and_only_where_nothing_authenticates(
    default_objects: list[dict[str, Any]], production_objects: list[dict[str, Any]]
) -> None:
    """The service binds 0.0.0.0 in its pod and refuses to serve there unauthenticated
    unless NOISESCORE_INSECURE is set: the dev defaults set it, auth or mTLS do not."""

    def env(objects: list[dict[str, Any]]) -> dict[str, Any]:
        (service,) = find(objects, "Deployment", "ns-noisescore")
        return {e["name"]: e.get("value") for e in service["spec"]["template"]["spec"]
                ["containers"][0]["env"]}  # fmt: skip

    assert env(default_objects)["NOISESCORE_INSECURE"] == "true"
    assert "NOISESCORE_INSECURE" not in env(production_objects)
    assert "NOISESCORE_DATASET_ROOTS" not in env(default_objects)  # dataset names only
    assert env(production_objects)["NOISESCORE_DATASET_ROOTS"] == (
        '["s3://noisescore-artifacts/datasets"]'
    )
    mtls = {
        "tls": {"enabled": True, "existingSecret": "tls", "clientAuth": True},
        "auth": {"insecure": False},
        "server": {"datasetRoots": ["s3://datasets/a", "/mnt"]},
    }
    rendered = env(render(mtls))
    assert "NOISESCORE_INSECURE" not in rendered
    from noisescore.settings import ServiceSettings

    roots = ServiceSettings(dataset_roots=rendered["NOISESCORE_DATASET_ROOTS"]).dataset_roots
    assert roots == ("/mnt", "s3://datasets/a")


# --------------------------------------------------------------------------- schema


@pytest.mark.parametrize(
    ("values", "key"),
    [
        ({"server": {"replicaCount": -1}}, "/server/replicaCount"),
        ({"worker": {"replicaCount": -2}}, "/worker/replicaCount"),
        ({"storage": {"bucket": None}}, "'bucket'"),
        ({"storage": {"bucket": ""}}, "/storage/bucket"),
        ({"storage": {"bucket": "Not_A_Bucket"}}, "/storage/bucket"),
        ({"storage": {"bucket": "10.0.0.1"}}, "/storage/bucket"),
        ({"storage": {"accessKey": "AKIA"}}, "'accessKey'"),
        ({"storage": {"secretKey": "hunter2"}}, "'secretKey'"),
        ({"metrics": {"serviceMonitor": {"enabled": "sometimes"}}}, "/serviceMonitor/enabled"),
        ({"minio": {"enabled": False}}, "/storage/endpoint"),
        ({"minio": {"persistence": {"sise": "1Gi"}}}, "'sise'"),
    ],
)
def test_schema_rejects(values: dict[str, Any], key: str) -> None:
    message = render_error(values)
    assert "schema" in message and key in message


def test_schema_accepts_an_external_store() -> None:
    objects = render(
        {
            "minio": {"enabled": False},
            "storage": {"endpoint": "s3.example.com:443", "existingSecret": "s3", "secure": True},
        }
    )
    (config,) = find(objects, "ConfigMap", "ns-noisescore-storage")
    assert config["data"]["NOISESCORE_S3_ENDPOINT"] == "s3.example.com:443"
    assert config["data"]["NOISESCORE_S3_SECURE"] == "true"
    assert not find(objects, "Secret")


# --------------------------------------------------------------------------- metrics, network


def _scrape_annotations(objects: list[dict[str, Any]]) -> dict[str, str]:
    (deployment,) = find(objects, "Deployment", "ns-noisescore")
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    return {k: v for k, v in annotations.items() if k.startswith("prometheus.io/")}


def test_service_monitor_or_scrape_annotations(default_objects: list[dict[str, Any]]) -> None:
    # auto, and an offline render has no monitoring.coreos.com API: annotations.
    assert find(default_objects, "ServiceMonitor") == []
    assert _scrape_annotations(default_objects) == {
        "prometheus.io/scrape": "true",
        "prometheus.io/port": "9464",
        "prometheus.io/path": "/metrics",
    }
    forced = render({"metrics": {"serviceMonitor": {"enabled": True}}})
    (monitor,) = find(forced, "ServiceMonitor")
    assert monitor["spec"]["endpoints"][0]["port"] == "metrics"
    assert _scrape_annotations(forced) == {}
    off = render({"metrics": {"serviceMonitor": {"enabled": False}}})
    assert find(off, "ServiceMonitor") == [] and _scrape_annotations(off)


def test_network_policy_admits_only_grpc_and_metrics(objects: list[dict[str, Any]]) -> None:
    (policy,) = find(objects, "NetworkPolicy", "ns-noisescore")
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    ports = [p["port"] for rule in policy["spec"]["ingress"] for p in rule["ports"]]
    assert sorted(ports) == ["grpc", "metrics"]
    (deployment,) = find(objects, "Deployment", "ns-noisescore")
    named = {
        p["name"]: p["containerPort"]
        for p in deployment["spec"]["template"]["spec"]["containers"][0]["ports"]
    }
    assert named == {"grpc": 50051, "metrics": 9464, "health": 8081}
    (worker,) = find(objects, "NetworkPolicy", "ns-noisescore-worker")
    assert [p["port"] for r in worker["spec"]["ingress"] for p in r["ports"]] == ["health"]
    (jobs,) = find(objects, "NetworkPolicy", "ns-noisescore-job")
    assert "ingress" not in jobs["spec"] and jobs["spec"]["policyTypes"] == ["Ingress"]


# --------------------------------------------------------------------------- real Prefect API


def test_registration_commands_against_a_real_api(prefect_api: str, tmp_path: Path) -> None:
    """The init container's script, run as is (repository root for /app, a temp file for the
    mounted template), leaves the pool with exactly the rendered template and the deployment
    on it."""
    from prefect import get_client

    pool = "helm-chart-test"
    objects = render({"worker": {"workPool": {"name": pool, "concurrencyLimit": 3}}})
    template = job_template(objects)
    template_file = tmp_path / "job-template.json"
    template_file.write_text(json.dumps(template))
    (worker,) = find(objects, "Deployment", "ns-noisescore-worker")
    (register,) = worker["spec"]["template"]["spec"]["initContainers"]
    assert register["command"] == ["/bin/sh", "-ec"]
    script = (
        register["args"][0]
        .replace("/etc/noisescore/job-template.json", str(template_file))
        .replace("/app", str(ROOT))
    )
    env = {
        **os.environ,
        "PREFECT_API_URL": prefect_api,
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    result = subprocess.run(
        ["/bin/sh", "-ec", script], env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stdout + result.stderr

    async def read() -> tuple[Any, Any]:
        async with get_client() as client:
            work_pool = await client.read_work_pool(pool)
            deployment = await client.read_deployment_by_name("clean-labels/gpu")
            active = await client.read_deployment_by_name("active-clean/gpu")
            assert active.work_pool_name == pool
            assert active.entrypoint == "flows/active_clean.py:active_clean"
            bench = await client.read_deployment_by_name("lnl-benchmark/gpu")
            assert bench.work_pool_name == pool
            assert bench.entrypoint == "flows/lnl_benchmark.py:lnl_benchmark"
            assert bench.job_variables == {"gpu_count": 1}
            return work_pool, deployment

    work_pool, deployment = asyncio.run(read())
    assert work_pool.type == "kubernetes"
    assert work_pool.base_job_template == template
    assert work_pool.concurrency_limit == 3
    assert deployment.work_pool_name == pool
    assert deployment.entrypoint == "flows/clean_labels.py:clean_labels"


def test_optional_settings_render_where_they_belong() -> None:
    objects = render(
        {
            "server": {
                "tuning": {
                    "rpcThreads": 8,
                    "maxMessageBytes": 8388608,
                    "maxWatches": 500,
                    "maxInflightPixels": 33554432,
                    "saturationGraceSeconds": 3,
                },
                "extraEnv": [{"name": "LOG_LEVEL", "value": "debug"}],
                "podDisruptionBudget": {"enabled": True, "maxUnavailable": "25%"},
                "serviceAccount": {"create": False, "name": "existing"},
            },
            "tls": {"enabled": True, "existingSecret": "tls", "clientAuth": True},
            "networkPolicy": {"healthFrom": [{"ipBlock": {"cidr": "10.0.0.0/8"}}]},
            "worker": {
                "workPool": {"concurrencyLimit": 0},
                "job": {
                    "resources": {
                        "requests": {"cpu": "1", "memory": "1Gi"},
                        "limits": {"memory": "2Gi", "cpu": "3"},
                    },
                    "dataVolume": {"claimName": "medmnist"},
                    "activeDeadlineSeconds": 3600,
                    "ttlSecondsAfterFinished": 2592000,  # 30 days: no 2.592e+06
                },
            },
            "metrics": {"pushgateway": {"url": "pushgateway:9091"}},
        }
    )
    (service,) = find(objects, "Deployment", "ns-noisescore")
    pod = service["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == "existing"
    assert find(objects, "ServiceAccount", "ns-noisescore") == []
    env = {e["name"]: e.get("value") for e in pod["containers"][0]["env"]}
    assert env["NOISESCORE_RPC_THREADS"] == "8"
    assert env["NOISESCORE_MAX_MESSAGE_BYTES"] == "8388608"
    assert env["NOISESCORE_MAX_WATCHES"] == "500"
    assert env["NOISESCORE_MAX_INFLIGHT_PIXELS"] == "33554432"
    assert env["NOISESCORE_SATURATION_GRACE"] == "3"
    assert env["NOISESCORE_TLS_CLIENT_CA"] == "/etc/noisescore/tls/ca.crt"
    assert env["LOG_LEVEL"] == "debug"
    (pdb,) = find(objects, "PodDisruptionBudget")
    assert pdb["spec"]["maxUnavailable"] == "25%" and "minAvailable" not in pdb["spec"]
    (policy,) = find(objects, "NetworkPolicy", "ns-noisescore")
    assert [p["port"] for r in policy["spec"]["ingress"] for p in r["ports"]][-1] == "health"
    (worker,) = find(objects, "Deployment", "ns-noisescore-worker")
    script = worker["spec"]["template"]["spec"]["initContainers"][0]["args"][0]
    assert "clear-concurrency-limit noisescore-gpu" in script
    template = job_template(objects)
    job_spec = template["job_configuration"]["job_manifest"]["spec"]
    assert job_spec["activeDeadlineSeconds"] == 3600
    (container,) = job_pod(template)["containers"]
    assert container["resources"]["limits"]["cpu"] == "3"
    assert {"name": "data", "mountPath": "/data", "readOnly": True} in container["volumeMounts"]
    job_env = {e["name"]: e.get("value") for e in container["env"]}
    assert job_env["NOISESCORE_DATA_DIR"] == "/data"
    assert job_env["NOISESCORE_PUSHGATEWAY"] == "pushgateway:9091"
    assert template["variables"]["properties"]["memory_limit"]["default"] == "2Gi"
    assert template["variables"]["properties"]["finished_job_ttl"]["default"] == 2592000
