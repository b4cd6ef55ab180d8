"""deploy/k8s, offline: every manifest parses, built-in kinds validate against the Kubernetes
schemas kubernetes-validate ships (strict: unknown fields fail), the Prometheus Operator's CRDs
(ServiceMonitor, PrometheusRule) get structural checks, and the pieces agree with each other.

Run as a script with ``--write-prometheusrule`` to regenerate deploy/k8s/prometheusrule.yaml from
deploy/prometheus/rules.yml.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from tests.deploy.support import DEPLOY

K8S = DEPLOY / "k8s"
RULES = DEPLOY / "prometheus" / "rules.yml"
CRDS = {
    ("monitoring.coreos.com/v1", "ServiceMonitor"),
    ("monitoring.coreos.com/v1", "PrometheusRule"),
    ("monitoring.coreos.com/v1", "PodMonitor"),
}
KUBERNETES_VERSIONS = ["1.29.0", kubernetes_validate.latest_version()]
DRAIN_DEADLINE_S = 30.0
"""The router's and the worker's default drain deadline (the manifests set it explicitly)."""


def documents() -> list[tuple[str, dict[str, Any]]]:
    docs = []
    for path in sorted(K8S.glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        for doc in yaml.safe_load_all(path.read_text()):
            if doc is not None:
                docs.append((path.name, doc))
    return docs


def one(kind: str, name: str | None = None) -> dict[str, Any]:
    found = [
        d for _, d in documents() if d["kind"] == kind and name in (None, d["metadata"]["name"])
    ]
    assert len(found) == 1, (kind, name, len(found))
    return found[0]


def container(workload: dict[str, Any]) -> dict[str, Any]:
    (only,) = workload["spec"]["template"]["spec"]["containers"]
    c: dict[str, Any] = only
    return c


def env(c: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in c.get("env", [])}


def test_kustomization_lists_every_manifest() -> None:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    files = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert set(kustomization["resources"]) == files


def test_every_document_has_the_basics() -> None:
    docs = documents()
    assert {d["kind"] for _, d in docs} >= {
        "Deployment",
        "Service",
        "DaemonSet",
        "ServiceMonitor",
        "PrometheusRule",
    }
    for name, doc in docs:
        assert doc.get("apiVersion"), name
        assert doc.get("kind"), name
        assert doc.get("metadata", {}).get("name"), name


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize(
    ("path", "doc"),
    [(p, d) for p, d in documents() if (d["apiVersion"], d["kind"]) not in CRDS],
    ids=lambda v: v if isinstance(v, str) else None,
)
def test_builtin_kinds_validate_strictly(path: str, doc: dict[str, Any], version: str) -> None:
    try:
        kubernetes_validate.validate(doc, version, strict=True)
    except kubernetes_validate.ValidationError as exc:
        pytest.fail(f"{path} against Kubernetes {version}: {exc.message} at {list(exc.path)}")


def test_router_deployment() -> None:
    deployment = one("Deployment", "credit-router")
    spec = deployment["spec"]
    assert spec["replicas"] == 1, "one router owns the session table"
    assert spec["strategy"] == {"type": "Recreate"}, "never two routers at once"
    pod = spec["template"]["spec"]
    assert spec["selector"]["matchLabels"].items() <= spec["template"]["metadata"]["labels"].items()
    c = container(deployment)
    variables = env(c)
    drain = float(variables["CREDIT_ROUTER_DRAIN_DEADLINE_S"])
    assert pod["terminationGracePeriodSeconds"] > drain + 5
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports == {"zmq-workers": 5557, "zmq-producers": 5558, "http": 9464}
    assert variables["CREDIT_ROUTER_WORKER_ENDPOINT"].endswith(f":{ports['zmq-workers']}")
    assert variables["CREDIT_ROUTER_PRODUCER_ENDPOINT"].endswith(f":{ports['zmq-producers']}")
    assert variables["CREDIT_ROUTER_HTTP_PORT"] == str(ports["http"])
    assert variables["CREDIT_ROUTER_HTTP_HOST"] == "0.0.0.0", "probes come from the kubelet"
    assert c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    assert c["livenessProbe"]["httpGet"] == {"path": "/livez", "port": "http"}
    assert c["resources"]["requests"]["cpu"]
    assert c["resources"]["requests"]["memory"]
    assert c["resources"]["limits"]["memory"]
    security = c["securityContext"]
    assert security["allowPrivilegeEscalation"] is False
    assert security["readOnlyRootFilesystem"] is True
    assert pod["securityContext"]["runAsNonRoot"] is True


def test_router_service_exposes_the_ports_by_name() -> None:
    service = one("Service", "credit-router")
    deployment = one("Deployment", "credit-router")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= pod_labels.items()
    container_ports = {p["name"] for p in container(deployment)["ports"]}
    ports = {p["name"]: p for p in service["spec"]["ports"]}
    assert set(ports) == {"zmq-workers", "zmq-producers", "http"}
    for name, port in ports.items():
        assert port["targetPort"] in container_ports, name


def test_worker_daemonset_on_gpu_nodes() -> None:
    daemonset = one("DaemonSet", "credit-worker")
    pod = daemonset["spec"]["template"]["spec"]
    assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod[
        "tolerations"
    ]
    c = container(daemonset)
    variables = env(c)
    service = one("Service", "credit-router")
    worker_port = next(p["port"] for p in service["spec"]["ports"] if p["name"] == "zmq-workers")
    endpoint = variables["CREDIT_ROUTER_WORKER_ENDPOINT"]
    assert endpoint == f"tcp://{service['metadata']['name']}:{worker_port}"
    assert variables["NODE_NAME"] == {"fieldRef": {"fieldPath": "spec.nodeName"}}
    args = c["args"]
    assert args[0] == "worker"
    assert args[args.index("--router") + 1] == "$(CREDIT_ROUTER_WORKER_ENDPOINT)"
    assert args[args.index("--name") + 1] == "$(NODE_NAME)"
    drain = float(args[args.index("--drain-deadline-s") + 1])
    assert pod["terminationGracePeriodSeconds"] > drain + 5


def test_worker_args_are_accepted_by_the_worker() -> None:
    """The DaemonSet's args, with $(VAR) expanded as the kubelet does, parse."""
    from worker_agent.__main__ import build_parser

    c = container(one("DaemonSet", "credit-worker"))
    values = {
        **env(c),
        "NODE_NAME": "gpu-node-1",
        # What DEPLOY.md's ConfigMap holds.
        "INFERENCE_ENDPOINT": "http://vllm.inference:8000/v1",
        "INFERENCE_MODEL": "meta-llama/Llama-3.1-8B-Instruct",
    }
    argv = [re.sub(r"\$\((\w+)\)", lambda m: str(values[m.group(1)]), a) for a in c["args"][1:]]
    args = build_parser().parse_args(argv)
    assert args.router == "tcp://credit-router:5557"
    assert args.name == "gpu-node-1"
    assert args.curve_key.name == "gpu-node-1.key_secret"


def test_workers_run_a_real_server_by_default() -> None:
    """Issue 13: the DaemonSet ran the simulator. Executor, endpoint and model are required:
    openai, and the other two from a ConfigMap the pod cannot start without."""
    c = container(one("DaemonSet", "credit-worker"))
    args, variables = c["args"], env(c)
    assert args[args.index("--executor") + 1] == "openai"
    for flag, var in (("--endpoint", "INFERENCE_ENDPOINT"), ("--model", "INFERENCE_MODEL")):
        assert args[args.index(flag) + 1] == f"$({var})"
        ref = variables[var]["configMapKeyRef"]
        assert ref["name"] == "credit-worker-inference"
        assert ref["optional"] is False


def test_no_plaintext_and_keys_from_secrets() -> None:
    """Issue 13: the manifests ran plaintext ZeroMQ (CREDIT_ROUTER_INSECURE=true)."""
    router = one("Deployment", "credit-router")
    variables = env(container(router))
    assert "CREDIT_ROUTER_INSECURE" not in variables
    assert variables["CREDIT_ROUTER_CURVE__SECRET_KEY_FILE"].startswith("/etc/credit-router/keys/")
    volumes = {v["name"]: v for v in router["spec"]["template"]["spec"]["volumes"]}
    assert volumes["keys"]["secret"]["secretName"] == "credit-router-keys"
    assert volumes["keys"]["secret"]["defaultMode"] & 0o007 == 0, "not world-readable"
    worker = one("DaemonSet", "credit-worker")
    volumes = {v["name"]: v for v in worker["spec"]["template"]["spec"]["volumes"]}
    assert volumes["keys"]["secret"]["secretName"] == "credit-worker-keys"
    assert volumes["keys"]["secret"]["defaultMode"] & 0o007 == 0


def test_workers_are_probed_and_scraped() -> None:
    """Issue 13: workers had no probes and no scrape job."""
    worker = one("DaemonSet", "credit-worker")
    c = container(worker)
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert env(c)["CREDIT_ROUTER_WORKER_HTTP_PORT"] == str(ports["http"])
    assert env(c)["CREDIT_ROUTER_WORKER_HTTP_HOST"] == "0.0.0.0"
    assert c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    assert c["livenessProbe"]["httpGet"] == {"path": "/livez", "port": "http"}
    monitor = one("PodMonitor", "credit-worker")
    labels = worker["spec"]["template"]["metadata"]["labels"]
    assert monitor["spec"]["selector"]["matchLabels"].items() <= labels.items()
    (endpoint,) = monitor["spec"]["podMetricsEndpoints"]
    assert endpoint["port"] == "http"
    assert endpoint["path"] == "/metrics"


def test_network_policy_admits_the_workers() -> None:
    policy = one("NetworkPolicy", "credit-router")
    worker_labels = one("DaemonSet", "credit-worker")["spec"]["template"]["metadata"]["labels"]
    router_labels = one("Deployment", "credit-router")["spec"]["template"]["metadata"]["labels"]
    assert policy["spec"]["podSelector"]["matchLabels"].items() <= router_labels.items()
    rule = next(
        r for r in policy["spec"]["ingress"] if r.get("ports", [{}])[0].get("port") == "zmq-workers"
    )
    selector = rule["from"][0]["podSelector"]["matchLabels"]
    assert selector.items() <= worker_labels.items()


def test_service_monitor_scrapes_http() -> None:
    monitor = one("ServiceMonitor", "credit-router")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    service = one("Service", "credit-router")
    assert (
        monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    )
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["port"] == "http"
    assert endpoint["path"] == "/metrics"
    assert endpoint["interval"].endswith("s")
    # The job label is the Service's name, which the alert rules select.
    assert service["metadata"]["name"] == "credit-router"
    assert 'job="credit-router"' in RULES.read_text()


def test_prometheus_rule_equals_rules_yml() -> None:
    rule = one("PrometheusRule", "credit-router")
    assert rule["apiVersion"] == "monitoring.coreos.com/v1"
    assert set(rule["spec"]) == {"groups"}
    expected = yaml.safe_load(RULES.read_text())["groups"]
    assert rule["spec"]["groups"] == expected, (
        "deploy/k8s/prometheusrule.yaml is out of date: "
        "python tests/deploy/test_k8s.py --write-prometheusrule"
    )
    for group in rule["spec"]["groups"]:
        assert group["name"]
        for r in group["rules"]:
            assert set(r) <= {"alert", "record", "expr", "for", "labels", "annotations"}
            assert isinstance(r["expr"], str)


def test_kustomize_builds() -> None:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl (with its built-in kustomize) is not installed")
    done = subprocess.run(
        [kubectl, "kustomize", str(K8S)], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr
    built = [d for d in yaml.safe_load_all(done.stdout) if d]
    assert len(built) == len(documents())
    for doc in built:
        if doc["kind"] != "Namespace":
            assert doc["metadata"]["namespace"] == "credit-router", doc["metadata"]
        assert doc["metadata"]["labels"]["app.kubernetes.io/part-of"] == "credit-router"


HEADER = """\
# The alert rules of deploy/prometheus/rules.yml for the Prometheus Operator. spec.groups must
# equal that file's groups (tests/deploy/test_k8s.py checks it); after editing rules.yml,
# regenerate with `python tests/deploy/test_k8s.py --write-prometheusrule`.
apiVersion: monitoring.coreos.com/v1
kind: PrometheusRule
metadata:
  name: credit-router
  labels:
    app.kubernetes.io/name: credit-router
    app.kubernetes.io/component: router
spec:
"""


def write_prometheusrule(target: Path = K8S / "prometheusrule.yaml") -> None:
    """Wrap rules.yml's groups (comments and layout kept) in a PrometheusRule."""
    lines = RULES.read_text().splitlines()
    body = lines[lines.index("groups:") :]
    target.write_text(HEADER + "\n".join(f"  {line}" if line else "" for line in body) + "\n")


if __name__ == "__main__":
    if sys.argv[1:] == ["--write-prometheusrule"]:
        write_prometheusrule()
    else:
        sys.exit("usage: python tests/deploy/test_k8s.py --write-prometheusrule")
