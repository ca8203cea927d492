"""deploy/k8s-training: the multi-node training Job is valid Kubernetes and its torchrun line is coherent.

Schemas: the Kubernetes OpenAPI schemas bundled by `kubernetes-validate` (strict). Coherence: the
node count torchrun waits for is the number of pods the Job runs, the processes per node are the
GPUs each pod gets, the rendezvous host is pod 0's DNS name under the headless Service, and the
arguments after the module parse with the `flowie` command's own parser.
"""

from __future__ import annotations

from typing import Any

import pytest
import yaml
from deploy_helpers import DEPLOY, skip_or_fail

JOB_FILE = DEPLOY / "k8s-training" / "train-job.yaml"
K8S_VERSIONS = ["1.29.0", "1.33.0"]


def _docs() -> dict[str, dict[str, Any]]:
    return {doc["kind"]: doc for doc in yaml.safe_load_all(JOB_FILE.read_text()) if doc}


def _flags(args: list[str]) -> dict[str, str]:
    return dict(a.removeprefix("--").split("=", 1) for a in args if a.startswith("--") and "=" in a)


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_training_manifests_match_the_kubernetes_schemas(version: str) -> None:
    try:
        import kubernetes_validate
    except ImportError:
        skip_or_fail("`kubernetes-validate` is not installed; install it with `bash .ci/deploy-tools.sh`")
    docs = _docs()
    assert set(docs) == {"Service", "Job"}
    for kind, doc in docs.items():
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{kind} is not valid for Kubernetes {version}: {exc.message} at {'/'.join(map(str, exc.path))}")


def test_torchrun_waits_for_the_pods_and_gpus_the_job_gets() -> None:
    docs = _docs()
    job, service = docs["Job"], docs["Service"]
    pod = job["spec"]["template"]["spec"]
    container = pod["containers"][0]
    launcher = container["args"][: container["args"].index("--module")]
    flags = _flags(launcher)
    assert job["spec"]["completionMode"] == "Indexed"
    assert int(flags["nnodes"]) == job["spec"]["completions"] == job["spec"]["parallelism"]
    assert int(flags["nproc-per-node"]) == int(container["resources"]["limits"]["nvidia.com/gpu"])
    assert flags["node-rank"] == "$(NODE_RANK)"
    rank_env = {e["name"]: e for e in container["env"]}["NODE_RANK"]
    assert rank_env["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.annotations['batch.kubernetes.io/job-completion-index']"
    host, port = flags["rdzv-endpoint"].split(":")
    assert host == f"{job['metadata']['name']}-0.{service['metadata']['name']}"
    assert pod["subdomain"] == service["metadata"]["name"]
    assert service["spec"]["clusterIP"] == "None"
    assert service["spec"]["selector"].items() <= job["spec"]["template"]["metadata"]["labels"].items()
    assert int(port) == service["spec"]["ports"][0]["port"] == container["ports"][0]["containerPort"]
    mounts = {m["mountPath"] for m in container["volumeMounts"]}
    assert {"/models", "/checkpoints", "/data", "/dev/shm"} <= mounts


def test_training_arguments_parse_with_the_flowie_command() -> None:
    from service.cli import build_parser

    container = _docs()["Job"]["spec"]["template"]["spec"]["containers"][0]
    args = container["args"]
    module_at = args.index("--module")
    assert args[module_at + 1] == "service.cli"
    parsed = build_parser().parse_args(args[module_at + 2 :])
    assert parsed.command == "train" and parsed.arch == "full" and parsed.resume
    assert parsed.device == "cuda" and parsed.bf16 and parsed.grad_checkpointing
    assert parsed.out.startswith("/models/") and parsed.init.startswith("/checkpoints/")
    assert int(parsed.crop) == 512
