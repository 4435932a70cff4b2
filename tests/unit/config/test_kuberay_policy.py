"""Policy checks on the generated RayService and NetworkPolicies (issue #14, "a cluster nobody can take over"): Ray token
auth everywhere, no secret in the manifest, Redis's URL on the head alone, only the Serve port open to outside, a
hardened securityContext on every container, and no mutable image tag."""

from __future__ import annotations

import copy
import re
from pathlib import Path

import jsonschema
import pytest
import yaml

from serve_app.config import artefacts, kuberay
from serve_app.config import catalog as catalogs

ROOT = Path(__file__).resolve().parents[3]
RAY_PORTS = {6379, 8265, 10001, 52365}  # GCS, dashboard (Jobs API), Ray client, dashboard agent
SECRETISH = re.compile(r"PASSWORD|TOKEN|SECRET|KEY|CREDENTIAL", re.IGNORECASE)


@pytest.fixture(scope="module")
def policies() -> list[dict]:
    doc = yaml.safe_load(kuberay.NETWORK_POLICY.read_text())
    assert doc["apiVersion"] == "v1" and doc["kind"] == "List"
    return doc["items"]


def pod_specs(cluster) -> list[tuple[str, dict]]:
    """(group, pod template) for the head and every worker group."""
    return [("head", cluster["headGroupSpec"]["template"])] + [
        (g["groupName"], g["template"]) for g in cluster["workerGroupSpecs"]]


def containers(cluster) -> list[tuple[str, dict]]:
    return [(group, c) for group, template in pod_specs(cluster)
            for c in template["spec"].get("initContainers", []) + template["spec"]["containers"]]


def env_of(container: dict) -> dict[str, dict]:
    return {e["name"]: e for e in container.get("env", [])}


def secret_literals(manifest: dict) -> list[str]:
    """Env vars whose literal value looks like a secret: a URL with credentials, or a secret-sounding name."""
    found = []
    for group, container in containers(manifest["spec"]["rayClusterConfig"]):
        for var in container.get("env", []):
            if "value" not in var:
                continue
            value = str(var["value"])
            if ("://" in value and "@" in value) or SECRETISH.search(var["name"]):
                found.append(f"{group}/{container['name']}: {var['name']}")
    return found


def opened_ports(policies: list[dict], reaches) -> set:
    """Ports of the rules whose peers `reaches` (None: every port of a rule without ports)."""
    ports: set = set()
    for policy in policies:
        for rule in policy["spec"].get("ingress", []):
            if reaches(rule.get("from")):
                ports |= {p["port"] for p in rule.get("ports", [])} if "ports" in rule else {None}
    return ports


def open_to_outside(policies: list[dict]) -> set:
    """Ports that some rule opens to peers outside this service's Ray pods (None: every port)."""
    def outside(peers) -> bool:
        return not (peers and all(
            set(p) == {"podSelector"} and kuberay.POD_LABEL.items() <= p["podSelector"].get("matchLabels", {}).items()
            for p in peers))
    return opened_ports(policies, outside)


def open_to_anywhere(policies: list[dict]) -> set:
    """Ports that some rule opens to any source (None: every port)."""
    def anywhere(peers) -> bool:
        return not peers or any(not any(peer.values()) or peer.get("ipBlock", {}).get("cidr") in ("0.0.0.0/0", "::/0")
                                for peer in peers)
    return opened_ports(policies, anywhere)


# -- the RayService ---------------------------------------------------------------------------------------------------

def test_the_rayservice_validates_against_the_crd(manifest, rayservice_schema):
    schema = rayservice_schema
    jsonschema.validate(manifest, schema)
    bad = copy.deepcopy(manifest)
    bad["spec"]["rayClusterConfig"]["authOptions"]["mode"] = "password"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, schema)


def test_ray_token_auth_is_on_for_every_ray_container(cluster):
    # KubeRay's own wiring: the operator reads this Secret to authenticate to the dashboard it submits Serve through.
    assert cluster["authOptions"] == {"mode": "token", "secretName": "qbt-ray-token"}
    assert cluster.get("authOptions", {}).get("enableK8sTokenAuth") is None
    assert len(containers(cluster)) == 1 + len(cluster["workerGroupSpecs"])
    for group, container in containers(cluster):
        env = env_of(container)
        assert env["RAY_AUTH_MODE"] == {"name": "RAY_AUTH_MODE", "value": "token"}, group
        assert env["RAY_AUTH_TOKEN"] == {"name": "RAY_AUTH_TOKEN", "valueFrom": {"secretKeyRef": {
            "name": "qbt-ray-token", "key": "auth_token"}}}, group  # the key KubeRay's operator reads


def test_no_env_var_holds_a_secret_literal(manifest):
    assert secret_literals(manifest) == []
    # The check does catch one.
    for var in ({"name": "REDIS_URL", "value": "redis://:hunter2@redis:6379/0"},
                {"name": "RAY_AUTH_TOKEN", "value": "abc"}, {"name": "PG_PASSWORD", "value": "x"}):
        bad = copy.deepcopy(manifest)
        group = bad["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]
        group["template"]["spec"]["containers"][0]["env"].append(var)
        assert secret_literals(bad) == [f"{group['groupName']}/ray-worker: {var['name']}"]
    # Every other env var comes from a Secret, but the auth mode and Serve's mode and ports (no secrets).
    literals = {"RAY_AUTH_MODE", *kuberay.SERVE_ENV, *kuberay.direct_ingress_env(1)}
    for _, container in containers(manifest["spec"]["rayClusterConfig"]):
        for var in container["env"]:
            assert var["name"] in literals or set(var) == {"name", "valueFrom"}, var["name"]


def test_redis_url_only_on_the_head_where_the_ingress_runs(cluster):
    head = env_of(cluster["headGroupSpec"]["template"]["spec"]["containers"][0])
    assert head["REDIS_URL"]["valueFrom"]["secretKeyRef"] == {"name": "qbt-redis", "key": "url"}
    assert cluster["workerGroupSpecs"]
    for group in cluster["workerGroupSpecs"]:
        for container in group["template"]["spec"]["containers"]:
            assert "REDIS_URL" not in env_of(container), group["groupName"]
        assert "qbt-redis" not in yaml.safe_dump(group)
    # The model replicas (what GPU workers run) never reach Redis.
    for path in (ROOT / "deployments").rglob("*.py"):
        text = path.read_text()
        assert not re.search(r"^\s*(import|from)\s+(redis|serve_app\.money)", text, re.MULTILINE), path


def test_only_the_serve_port_is_meant_for_outside(cluster, policies):
    head = cluster["headGroupSpec"]
    ports = {p["name"]: p["containerPort"] for p in head["template"]["spec"]["containers"][0]["ports"]}
    assert ports == {"serve": 8000, "gcs": 6379, "dashboard": 8265, "metrics": 8080}  # no Ray client (10001)
    assert head.get("serviceType", "ClusterIP") == "ClusterIP" and "headService" not in head
    assert not [g for g in cluster["workerGroupSpecs"] if g["template"]["spec"]["containers"][0].get("ports")]
    # Beyond this service's Ray pods, only the Serve port, metrics (the monitoring namespace) and the dashboard (the
    # KubeRay operator) are reachable, and only the Serve port from anywhere.
    assert open_to_outside(policies) == {8000, 8080, 8265}
    assert open_to_anywhere(policies) == {8000}


def test_the_dashboard_is_open_to_the_operator_alone(cluster, policies):
    # dashboard-host 0.0.0.0 is needed (the operator reaches it over the pod network), so a policy must fence it.
    assert cluster["headGroupSpec"]["rayStartParams"]["dashboard-host"] == "0.0.0.0"
    rules = [(p, r) for p in policies for r in p["spec"]["ingress"]
             if any(port["port"] == 8265 for port in r.get("ports", []))]
    (policy, rule), = rules
    assert policy["spec"]["podSelector"]["matchLabels"] == {**kuberay.POD_LABEL, "ray.io/node-type": "head"}
    # One peer with both selectors: the operator's pods in the operator's namespace (not any pod, nor any namespace).
    assert rule["from"] == [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "kuberay-system"}},
                             "podSelector": {"matchLabels": {"app.kubernetes.io/component": "kuberay-operator"}}}]


@pytest.mark.parametrize("rule, caught", [
    ({"ports": [{"protocol": "TCP", "port": 8265}]}, lambda p: 8265 in open_to_anywhere(p)),
    ({"from": [{"namespaceSelector": {}}]}, lambda p: None in open_to_anywhere(p)),
    ({"from": [{"ipBlock": {"cidr": "0.0.0.0/0"}}], "ports": [{"protocol": "TCP", "port": 10001}]},
     lambda p: 10001 in open_to_anywhere(p)),
    ({"from": [{"podSelector": {}}], "ports": [{"protocol": "TCP", "port": 6379}]},
     lambda p: 6379 in open_to_outside(p)),
])
def test_the_policy_check_catches_an_open_ray_port(policies, rule, caught):
    assert not caught(policies)
    bad = copy.deepcopy(policies)
    bad[0]["spec"]["ingress"].append(rule)
    assert caught(bad)


def test_the_network_policies_are_well_formed_and_select_the_ray_pods(cluster, policies):
    assert {p["metadata"]["name"] for p in policies} == {
        "qubittron-serve-ray-internal", "qubittron-serve-serve", "qubittron-serve-metrics",
        "qubittron-serve-kuberay-operator"}
    for policy in policies:
        assert policy["apiVersion"] == "networking.k8s.io/v1" and policy["kind"] == "NetworkPolicy"
        spec = policy["spec"]
        assert set(spec) == {"podSelector", "policyTypes", "ingress"} and spec["policyTypes"] == ["Ingress"]
        assert kuberay.POD_LABEL.items() <= spec["podSelector"]["matchLabels"].items()
        for rule in spec["ingress"]:
            assert set(rule) <= {"from", "ports"}
            for port in rule.get("ports", []):
                assert port["protocol"] == "TCP" and isinstance(port["port"], int) and 0 < port["port"] < 65536
            for peer in rule.get("from", []):
                assert set(peer) <= {"podSelector", "namespaceSelector", "ipBlock"} and peer
    # The pods carry the label the policies select (KubeRay's ray.io/cluster names the generated RayCluster).
    for group, template in pod_specs(cluster):
        assert template["metadata"]["labels"] == kuberay.POD_LABEL, group


def test_a_serve_source_narrows_the_serve_port(monkeypatch):
    monkeypatch.setattr(kuberay, "SERVE_FROM", {"kubernetes.io/metadata.name": "ingress-nginx"})
    policies = yaml.safe_load(kuberay.render_network_policies())["items"]
    (serve,) = [p for p in policies if p["metadata"]["name"] == "qubittron-serve-serve"]
    assert serve["spec"]["ingress"][0]["from"] == [
        {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "ingress-nginx"}}}]


def test_every_container_runs_unprivileged(manifest, cluster):
    expected = {"runAsNonRoot": True, "runAsUser": 1000, "allowPrivilegeEscalation": False,
                "capabilities": {"drop": ["ALL"]}, "seccompProfile": {"type": "RuntimeDefault"}}
    contexts = [(f"{group}/{c['name']}", c.get("securityContext", {})) for group, c in containers(cluster)]
    contexts.append(("autoscaler", cluster["autoscalerOptions"].get("securityContext", {})))
    for name, context in contexts:
        assert expected.items() <= context.items(), name
        assert context.get("privileged") is not True, name
    for group, template in pod_specs(cluster):
        # The ledger's (and any) Secret file belongs to root; fsGroup 100 lets the `ray` user read it.
        assert template["spec"]["securityContext"] == {"fsGroup": 100}, group
        assert not template["spec"].get("hostNetwork") and not template["spec"].get("hostPID"), group
    assert "&id0" not in kuberay.MANIFEST.read_text()  # no YAML anchors: each container's fields spelled out


def test_the_image_is_pinned(cluster):
    images = {c["image"] for _, c in containers(cluster)}
    assert images == {kuberay.image()}
    (image,) = images
    if "@" in image:
        assert re.fullmatch(r"[^@]+@sha256:[0-9a-f]{64}", image)
    else:
        tag = image.rsplit("/", 1)[-1].partition(":")[2]
        assert tag and tag != "latest", image


@pytest.mark.parametrize("tag", ["latest", "", None])
def test_a_mutable_or_missing_tag_fails_the_build(monkeypatch, tag):
    with pytest.raises(ValueError, match="needs a fixed tag"):
        kuberay.image_reference("ghcr.io/qubittron/qubittron-serve", tag)
    monkeypatch.setattr(kuberay, "IMAGE_TAG", tag)
    with pytest.raises(ValueError, match="needs a fixed tag"):
        artefacts.build("prod", catalogs.load())


def test_a_digest_pins_the_image(monkeypatch):
    digest = "sha256:" + "ab" * 32
    monkeypatch.setattr(kuberay, "IMAGE_DIGEST", digest)
    monkeypatch.setattr(kuberay, "IMAGE_TAG", "latest")  # the digest wins; the tag is not used
    catalog = catalogs.load()
    cluster = kuberay.manifest(catalog, catalog.serve_config("prod"))["spec"]["rayClusterConfig"]
    assert {c["image"] for _, c in containers(cluster)} == {f"ghcr.io/qubittron/qubittron-serve@{digest}"}
    with pytest.raises(ValueError, match="is not sha256"):
        kuberay.image_reference("ghcr.io/qubittron/qubittron-serve", "0.1.0", "sha256:xyz")


def test_the_header_names_the_token_secret():
    header = "".join(line for line in kuberay.MANIFEST.read_text().splitlines(True)[:5] if line.startswith("#"))
    assert "qbt-ray-token (key auth_token" in header
    assert "NetworkPolicy" in kuberay.NETWORK_POLICY.read_text().splitlines()[1]
