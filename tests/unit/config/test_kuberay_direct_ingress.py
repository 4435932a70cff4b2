"""Production runs what is benchmarked: the RayService runs Serve throughput-optimized with direct ingress, as `qbt
serve` does. The flag in every Ray container, the head's port range for one ingress replica on the Serve port, the
proxy moved off it, the gateway Service onto it, and GPU workers Ready without a Serve port."""

from __future__ import annotations

import copy

import jsonschema
import pytest
import yaml

from serve_app.config import artefacts, kuberay
from serve_app.config import catalog as catalogs
from serve_app.ops import launcher
from tests.unit.config.test_kuberay_policy import containers, env_of, secret_literals

FLAG = "RAY_SERVE_THROUGHPUT_OPTIMIZED"
RANGE = ("RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT", "RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT")


@pytest.fixture(scope="module")
def prod() -> dict:
    return yaml.safe_load(artefacts.serve_config_path("prod").read_text())


@pytest.fixture(scope="module")
def gateway() -> dict:
    return yaml.safe_load(kuberay.GATEWAY_SERVICE.read_text())


def head_container(cluster) -> dict:
    (container,) = cluster["headGroupSpec"]["template"]["spec"]["containers"]
    return container


def literal(container: dict, name: str) -> str | None:
    var = env_of(container).get(name)
    return None if var is None else var["value"]


def catalog_with_prod(**changes) -> catalogs.Catalog:
    data = yaml.safe_load(catalogs.CATALOG.read_text())
    prod = data["profiles"]["prod"]
    for key, value in changes.items():
        if key == "ingress":
            prod["service"]["ingress"].update(value)
        else:
            prod[key] = value
    return catalogs.Catalog.model_validate(data)


def test_every_ray_container_runs_throughput_optimized(cluster):
    assert len(containers(cluster)) == 1 + len(cluster["workerGroupSpecs"]) >= 2
    for group, container in containers(cluster):
        assert env_of(container)[FLAG] == {"name": FLAG, "value": "1"}, group
    assert kuberay.SERVE_ENV == {FLAG: "1"}


def test_the_local_launcher_sets_the_same_flag():
    # `qbt serve` (the benchmarked mode) and the manifest must agree; the launcher spells the flag itself.
    import inspect

    source = inspect.getsource(launcher)
    for name, value in kuberay.SERVE_ENV.items():
        assert f'"{name}", "{value}"' in source


def test_the_head_gives_one_ingress_replica_the_serve_port(cluster, prod):
    head = head_container(cluster)
    low, high = (int(literal(head, name)) for name in RANGE)
    replicas = prod["applications"][0]["args"]["ingress"].get("num_replicas", 1)  # 1 is the default, left out
    assert catalogs.load().service_config("prod").ingress.num_replicas == replicas == 1
    assert (low, high) == (kuberay.SERVE_PORT, kuberay.SERVE_PORT + 1) and high - low == replicas
    # A restarted ingress gets the port back at once; the drain keeps Serve's default (30 s) for the load balancer.
    assert literal(head, "RAY_SERVE_PORT_QUARANTINE_S") == "0"
    for group, container in containers(cluster):
        assert "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S" not in env_of(container), group
        if group != "head":  # the controller (head) hands the ports out; workers run no ingress
            assert not {*RANGE, "RAY_SERVE_PORT_QUARANTINE_S"} & env_of(container).keys(), group


def test_the_range_matches_what_the_launcher_sets_locally(monkeypatch):
    for name in (FLAG, "RAY_SERVE_ENABLE_DIRECT_INGRESS", *RANGE, "RAY_SERVE_PORT_QUARANTINE_S",
                 "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S"):
        monkeypatch.delenv(name, raising=False)  # recorded, so that what the launcher sets is undone
    monkeypatch.setenv(FLAG, "1")
    launcher.direct_ingress("127.0.0.1", kuberay.SERVE_PORT, 1)
    assert {k: launcher.os.environ[k] for k in kuberay.direct_ingress_env(1)} == kuberay.direct_ingress_env(1)


def test_the_proxy_is_moved_off_the_serve_port(prod, manifest):
    served = yaml.safe_load(manifest["spec"]["serveConfigV2"])
    for config in (prod, served):
        assert config["proxy_location"] == "HeadOnly"
        assert config["http_options"] == {"host": "0.0.0.0", "port": 8001}
        assert config["http_options"]["port"] != kuberay.SERVE_PORT
    # The proxy's port stays internal: no containerPort, and no NetworkPolicy rule names it.
    cluster = manifest["spec"]["rayClusterConfig"]
    ports = [p["containerPort"] for _, c in containers(cluster) for p in c.get("ports", [])]
    assert 8001 not in ports
    assert "8001" not in kuberay.NETWORK_POLICY.read_text()


def test_the_gateway_service_targets_the_heads_serve_port(cluster, gateway):
    assert gateway["apiVersion"] == "v1" and gateway["kind"] == "Service"
    assert gateway["metadata"]["name"] == "qubittron-serve-gateway"
    spec = gateway["spec"]
    assert spec["type"] == "ClusterIP"
    # The head of this service, while the operator's probe of its ingress (/-/healthz) passes.
    assert spec["selector"] == {**kuberay.POD_LABEL, "ray.io/node-type": "head", "ray.io/serve": "true"}
    assert cluster["headGroupSpec"]["template"]["metadata"]["labels"].items() <= spec["selector"].items()
    (port,) = spec["ports"]
    assert port["port"] == port["targetPort"] == kuberay.SERVE_PORT and port["protocol"] == "TCP"
    serve = {p["name"]: p["containerPort"] for p in head_container(cluster)["ports"]}["serve"]
    assert serve == kuberay.SERVE_PORT
    # Nothing may exclude the head from the `ray.io/serve` label the Service follows.
    assert "excludeHeadPodFromServeSvc" not in yaml.safe_load(kuberay.MANIFEST.read_text())["spec"]


def test_the_operator_reaches_the_heads_serve_port_whatever_serve_from_says(monkeypatch):
    # The `ray.io/serve` probe comes from the operator; a narrowed SERVE_FROM must not empty the gateway.
    monkeypatch.setattr(kuberay, "SERVE_FROM", {"kubernetes.io/metadata.name": "ingress-nginx"})
    (operator,) = [p for p in kuberay.network_policies() if p["metadata"]["name"] == "qubittron-serve-kuberay-operator"]
    assert operator["spec"]["podSelector"]["matchLabels"]["ray.io/node-type"] == "head"
    assert {p["port"] for p in operator["spec"]["ingress"][0]["ports"]} == {kuberay.DASHBOARD_PORT, kuberay.SERVE_PORT}


def test_the_headers_name_the_entry_point():
    gateway = kuberay.GATEWAY_SERVICE.read_text().splitlines()
    assert gateway[0].startswith("# Generated") and "do not edit" in gateway[0]
    assert "qubittron-serve-serve-svc is not" in " ".join(gateway[1:3])
    header = " ".join(line for line in kuberay.MANIFEST.read_text().splitlines() if line.startswith("#"))
    assert "entry point is the Service qubittron-serve-gateway" in header
    assert "gateway-service.yaml" in kuberay.__doc__
    assert "serve-svc` is NOT the entry point" in kuberay.__doc__


def test_gpu_workers_are_ready_without_a_serve_port(cluster):
    assert cluster["workerGroupSpecs"]
    for group in cluster["workerGroupSpecs"]:
        (container,) = group["template"]["spec"]["containers"]
        probe = container["readinessProbe"]
        command = " ".join(probe["exec"]["command"])
        assert "localhost:52365/api/local_raylet_healthz" in command and "grep success" in command
        assert str(kuberay.SERVE_PORT) not in command and "healthz" not in command.replace("raylet_healthz", "")
        assert probe["periodSeconds"] == 5 and probe["timeoutSeconds"] == 2 and probe["failureThreshold"] >= 3
    # The head keeps KubeRay's own probes (its ingress answers on the Serve port).
    assert "readinessProbe" not in head_container(cluster)


def test_no_env_value_holds_a_secret(manifest):
    assert secret_literals(manifest) == []
    allowed = {"RAY_AUTH_MODE": "token", **kuberay.SERVE_ENV, **kuberay.direct_ingress_env(1)}
    for group, container in containers(manifest["spec"]["rayClusterConfig"]):
        for var in container["env"]:
            if "value" in var:
                assert allowed.get(var["name"]) == var["value"], f"{group}: {var['name']}"
                assert var["value"].isdigit() or var["value"] == "token"
            else:
                assert set(var) == {"name", "valueFrom"} and set(var["valueFrom"]) == {"secretKeyRef"}


def test_the_manifest_validates_against_the_crd(manifest, rayservice_schema):
    jsonschema.validate(manifest, rayservice_schema)
    bad = copy.deepcopy(manifest)
    probe = bad["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]
    probe["readinessProbe"]["periodSeconds"] = "5s"  # the schema does cover the probe
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, rayservice_schema)


@pytest.mark.parametrize("changes, message", [
    ({"ingress": {"num_replicas": 2}}, "ingress has num_replicas 2"),
    ({"proxy_location": "EveryNode"}, "must be HeadOnly"),
    ({"http": {"host": "0.0.0.0", "port": 8000}}, "http.port 8000 is the ingress replica's"),
    ({"http": {"host": "127.0.0.1", "port": 8001}}, "must be 0.0.0.0"),
])
def test_a_prod_profile_off_direct_ingress_fails_the_build(changes, message):
    catalog = catalog_with_prod(**changes)
    with pytest.raises(ValueError, match=message):
        artefacts.build("prod", catalog)
