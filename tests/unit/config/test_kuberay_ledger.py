"""The prod profile exports the ledger to PostgreSQL: its password is the Secret qbt-postgres, mounted read-only on the
head alone (where the exporter runs, beside the ingress), never in env, argv or the manifest."""

from __future__ import annotations

import copy
from pathlib import Path, PurePosixPath
from urllib.parse import urlsplit

import jsonschema
import pytest
import yaml

from serve_app.config import artefacts, catalog as catalogs, kuberay
from serve_app.config.service import ServiceConfig

ROOT = Path(__file__).resolve().parents[3]
MOUNT = "/etc/qbt/postgres"




def catalog_with_prod_ledger(ledger: dict | None, **service) -> catalogs.Catalog:
    data = yaml.safe_load(catalogs.CATALOG.read_text())
    prod = data["profiles"]["prod"]["service"]
    if ledger is None:
        prod.pop("ledger", None)
    else:
        prod["ledger"] = ledger
    prod.update(service)
    return catalogs.Catalog.model_validate(data)


def walk(node, key: str):
    """Every value under `key` anywhere in the manifest."""
    if isinstance(node, dict):
        for k, v in node.items():
            if k == key:
                yield v
            yield from walk(v, key)
    elif isinstance(node, list):
        for v in node:
            yield from walk(v, key)


def test_the_manifest_with_the_secret_volume_validates_against_the_crd(manifest, rayservice_schema):
    schema = rayservice_schema
    jsonschema.validate(manifest, schema)
    # The schema does cover the head's volumes: a mistyped file mode is refused.
    bad = copy.deepcopy(manifest)
    bad["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]["volumes"][0]["secret"]["defaultMode"] = "0400"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, schema)


def test_the_head_mounts_the_postgres_secret_read_only(cluster):
    spec = cluster["headGroupSpec"]["template"]["spec"]
    (volume,) = [v for v in spec["volumes"] if v["name"] == "qbt-postgres"]
    assert volume["secret"] == {"secretName": "qbt-postgres", "defaultMode": 0o400,
                                "items": [{"key": "password", "path": "password", "mode": 0o400}]}
    (container,) = spec["containers"]
    assert container["volumeMounts"] == [{"name": "qbt-postgres", "mountPath": MOUNT, "readOnly": True}]
    # Secret files belong to root; the fsGroup lets the image's `ray` user (gid 100) read the file.
    assert spec["securityContext"] == {"fsGroup": 100}


def test_no_worker_group_gets_the_secret(cluster):
    assert cluster["workerGroupSpecs"]
    for group in cluster["workerGroupSpecs"]:
        spec = group["template"]["spec"]
        volumes = spec.get("volumes", [])
        assert all("secret" not in v and v["name"] != "qbt-postgres" for v in volumes), group["groupName"]
        for container in spec["containers"]:
            mounts = container.get("volumeMounts", [])
            assert all(m["name"] != "qbt-postgres" and not m["mountPath"].startswith("/etc/qbt") for m in mounts)
        assert "qbt-postgres" not in yaml.safe_dump(group)


def test_no_password_in_env_argv_or_the_manifest(manifest):
    text = kuberay.MANIFEST.read_text()
    # The literals say "token" and Serve's mode and ports; they hold no secret.
    literals = {"RAY_AUTH_MODE": "token", **kuberay.SERVE_ENV, **kuberay.direct_ingress_env(1)}
    for env in walk(manifest, "env"):
        for var in env:
            if var["name"] in literals:
                assert var == {"name": var["name"], "value": literals[var["name"]]}
                continue
            assert "value" not in var, f"{var['name']} is a literal; every env var must come from a Secret"
            ref = var["valueFrom"]["secretKeyRef"]
            assert ref["name"] != "qbt-postgres" and "password" not in var["name"].lower()
    for params in walk(manifest, "rayStartParams"):
        assert not any("postgres" in str(v) or "password" in str(v) for v in params.values())
    # No container command or args; the only command is the GPU workers' readiness probe (the raylet's health).
    probes = [" ".join(c) for c in walk(manifest, "command")]
    assert probes and all("local_raylet_healthz" in c and "postgres" not in c and "password" not in c for c in probes)
    assert not list(walk(manifest, "args"))
    assert all("command" not in c for group in walk(manifest, "containers") for c in group)
    database = yaml.safe_load(manifest["spec"]["serveConfigV2"])["applications"][0]["args"]["ledger"]["database"]
    url = urlsplit(database)
    assert url.password is None and "password" not in url.query
    assert text.count("postgresql://") == 1  # only the serveConfigV2's ledger URL, with no credentials but the user
    assert f"postgresql://{url.username}@{url.hostname}:" in text


def test_the_served_ledger_reads_its_password_from_the_mount(manifest, cluster):
    args = yaml.safe_load(manifest["spec"]["serveConfigV2"])["applications"][0]["args"]
    ledger = ServiceConfig.model_validate(args).ledger
    assert ledger.kind == "postgresql"
    (volume,) = cluster["headGroupSpec"]["template"]["spec"]["volumes"]
    (mount,) = cluster["headGroupSpec"]["template"]["spec"]["containers"][0]["volumeMounts"]
    path = PurePosixPath(args["ledger"]["password_file"])
    assert str(path.parent) == mount["mountPath"] == MOUNT
    assert path.name == volume["secret"]["items"][0]["path"]
    assert set(args["ledger"]) == {"database", "password_file"}


def test_the_prod_service_config_validates_and_places_the_exporter_on_the_head(cluster):
    from serve_app.serving.app import build_app

    catalog = catalogs.load()
    config = catalog.service_config("prod")
    assert config.ledger.kind == "postgresql" and str(config.ledger.password_file) == f"{MOUNT}/password"
    served = yaml.safe_load(artefacts.serve_config_path("prod").read_text())["applications"][0]["args"]
    assert ServiceConfig.model_validate(served).ledger == config.ledger
    app = build_app(catalog.serve_config("prod")["applications"][0]["args"])
    exporter = app._bound_deployment.init_args[2]._bound_deployment
    assert exporter.name == "LedgerExporter"
    selector = exporter.ray_actor_options["label_selector"]
    head = dict(kv.split("=") for kv in cluster["headGroupSpec"]["rayStartParams"]["labels"].split(","))
    assert selector and selector.items() <= head.items()
    assert all("labels" not in g["rayStartParams"] for g in cluster["workerGroupSpecs"])


def test_the_header_names_the_secrets():
    header = "".join(line for line in kuberay.MANIFEST.read_text().splitlines(True)[:4] if line.startswith("#"))
    assert "qbt-redis (key url" in header and "qbt-postgres (key password" in header and MOUNT in header
    assert "optionally hf-token (key token)" in header


def test_the_checked_in_artefacts_are_up_to_date():
    from serve_app.ops import cli

    profiles = [arg for name in ("local", "multinode", "sim", "prod") for arg in ("--profile", name)]
    assert cli.main(["config", "build", "--check", *profiles]) == 0


def test_a_postgres_ledger_without_password_file_fails_the_build(monkeypatch, capsys):
    catalog = catalog_with_prod_ledger({"database": "postgresql://qbt@db:5432/qbt"})
    with pytest.raises(ValueError, match="ledger is PostgreSQL but has no password_file"):
        artefacts.build("prod", catalog)
    from serve_app.ops import cli

    monkeypatch.setattr(catalogs, "load", lambda *a, **k: catalog)
    assert cli.main(["config", "build", "--check", "--profile", "prod"]) == 2  # --check: never writes
    err = capsys.readouterr().err
    assert "no password_file" in err and "qbt-postgres" in err


@pytest.mark.parametrize("password_file", ["secrets/password", "/password", "/etc/qbt/../password"])
def test_a_password_file_that_cannot_be_mounted_fails_the_build(password_file):
    catalog = catalog_with_prod_ledger({"database": "postgresql://qbt@db:5432/qbt", "password_file": password_file})
    with pytest.raises(ValueError, match="must be an absolute path in a directory of its own"):
        artefacts.build("prod", catalog)


def test_an_unpinned_ingress_fails_the_build():
    catalog = catalog_with_prod_ledger({"database": "postgresql://qbt@db:5432/qbt",
                                        "password_file": "/etc/qbt/postgres/password"},
                                       ingress={"num_replicas": 1, "num_cpus": 1})
    with pytest.raises(ValueError, match="ingress has no label_selector"):
        artefacts.build("prod", catalog)


def test_the_mount_follows_password_file():
    catalog = catalog_with_prod_ledger({"database": "postgresql://qbt@db:5432/qbt",
                                        "password_file": "/run/secrets/pg/pw"})
    head = kuberay.manifest(catalog, catalog.serve_config("prod"))["spec"]["rayClusterConfig"]["headGroupSpec"]
    spec = head["template"]["spec"]
    assert spec["containers"][0]["volumeMounts"][0]["mountPath"] == "/run/secrets/pg"
    assert spec["volumes"][0]["secret"]["items"] == [{"key": "password", "path": "pw", "mode": 0o400}]


def test_a_sqlite_ledger_mounts_nothing():
    catalog = catalog_with_prod_ledger(None)
    text = kuberay.render(catalog, catalog.serve_config("prod"))
    head = yaml.safe_load(text)["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]
    assert "volumes" not in head and "volumeMounts" not in head["containers"][0]
    assert "qbt-postgres" not in text
