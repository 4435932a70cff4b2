"""The catalog, the generated Serve configs and the RayService: checked by schema, arithmetic and drift."""

from __future__ import annotations

import copy
from pathlib import Path

import jsonschema
import pytest
import yaml
from pydantic import ValidationError

from serve_app.config import artefacts, catalog as catalogs, kuberay, sizing
from serve_app.serving.app import placement
from tests.unit.config.conftest import crd_schema

ROOT = Path(__file__).resolve().parents[3]


@pytest.fixture(scope="module")
def catalog():
    return catalogs.load()


def test_catalog_has_exactly_the_seed_models(catalog):
    assert sorted(m.id for m in catalog.models) == sorted(catalogs.SEED_MODELS)
    cats = {m.id: m.category.value for m in catalog.models}
    assert cats["Qwen3-Coder-30B-A3B-Instruct"] == "code" and cats["Qwen2.5-VL-72B-Instruct"] == "vision"
    assert cats["Qwen3Guard-Gen-8B"] == cats["Qwen3Guard-Gen-0.6B"] == "safety"
    assert all(m.completions for m in catalog.models)


def test_every_model_fits_its_accelerators(catalog):
    for spec in catalog.models:
        f = sizing.fit(spec, catalog.memory_gib())
        assert f.fits, f.row()
        assert f.max_concurrency_at_full_context >= spec.target_concurrency


def test_sizing_arithmetic_by_hand(catalog):
    llama = next(m for m in catalog.models if m.id == "Llama-3.1-8B-Instruct")
    f = sizing.fit(llama, catalog.memory_gib())
    assert f.kv_bytes_per_token == 2 * 32 * 8 * 128 * 2 == 131072
    assert f.kv_gib == pytest.approx(131072 * 16384 * 8 / 2**30) == 16.0
    assert f.budget_gib == pytest.approx(44.9 * 0.9)


def test_a_model_that_does_not_fit_fails_clearly():
    data = yaml.safe_load(catalogs.CATALOG.read_text())
    big = next(m for m in data["models"] if m["id"] == "Qwen3-32B")
    big["target_concurrency"] = 64
    with pytest.raises(ValidationError, match="Qwen3-32B does not fit 2 x H100"):
        catalogs.Catalog.model_validate(data)


def test_a_missing_seed_model_fails_clearly():
    data = yaml.safe_load(catalogs.CATALOG.read_text())
    data["models"] = [m for m in data["models"] if m["id"] != "gpt-oss-20b"]
    with pytest.raises(ValidationError, match="missing \\['gpt-oss-20b'\\]"):
        catalogs.Catalog.model_validate(data)


def test_tensor_parallel_must_match_accelerators():
    data = yaml.safe_load(catalogs.CATALOG.read_text())
    data["models"][0]["engine_args"]["tensor_parallel_size"] = 4
    with pytest.raises(ValidationError, match="tensor_parallel_size 4 must equal the accelerator count 2"):
        catalogs.Catalog.model_validate(data)


@pytest.mark.parametrize("name", ["local", "multinode", "sim", "prod"])
def test_checked_in_artefacts_match_the_catalog(catalog, name):
    for path, text in artefacts.build(name, catalog).items():
        assert path.read_text() == text, f"{path} drifted: run `qbt config build --profile {name}`"


@pytest.mark.parametrize("name", ["local", "multinode", "sim", "prod"])
def test_serve_parses_the_configs(name):
    from ray.serve.schema import ServeDeploySchema

    from serve_app.config.service import ServiceConfig

    config = yaml.safe_load(artefacts.serve_config_path(name).read_text())
    schema = ServeDeploySchema.model_validate(config)
    (app,) = schema.applications
    assert app.import_path == "serve_app.serving.app:build_app"
    ServiceConfig.model_validate(app.args)


def test_prod_app_builds_with_gpu_placement(catalog):
    from serve_app.serving.app import build_app

    build_app(catalog.serve_config("prod")["applications"][0]["args"])
    tp4 = next(m for m in catalog.models if m.id == "Meta-Llama-3_3-70B-Instruct")
    actor, options, engine = placement(tp4)
    assert len(options["placement_group_bundles"]) == 4 and options["placement_group_strategy"] == "STRICT_PACK"
    assert engine["distributed_executor_backend"] == "ray" and "num_gpus" not in actor
    one = next(m for m in catalog.models if m.id == "Qwen3Guard-Gen-0.6B")
    actor, options, engine = placement(one)
    assert actor["num_gpus"] == 1 and actor["accelerator_type"] == "L4" and not options


def test_multinode_places_replicas_on_the_stand_in_accelerator_and_the_ingress_on_the_gateway(catalog):
    from ray.serve.schema import ServeDeploySchema

    from serve_app.serving.app import build_app

    config = catalog.serve_config("multinode")
    assert config["proxy_location"] == "HeadOnly"
    args = config["applications"][0]["args"]
    app = build_app(args)
    ingress = app._bound_deployment
    assert ingress.ray_actor_options["label_selector"] == {"qubittron.io/role": "gateway"}
    warm, cold = catalogs.Catalog.model_validate(catalog.model_dump()).profile_models("multinode")
    actor, options, _ = placement(warm)
    assert actor["resources"] == {"qbt_dev_accel": 1} and "num_gpus" not in actor and not options
    # vLLM must not reconfigure logging in a replica: it would close Serve's handlers (a leak per request).
    assert actor["runtime_env"]["env_vars"] == {"VLLM_CONFIGURE_LOGGING": "0", "VLLM_CPU_KVCACHE_SPACE": "1"}
    assert (warm.autoscaling.min_replicas, warm.autoscaling.max_replicas) == (1, 2)
    assert cold.scales_from_zero and not warm.scales_from_zero
    ServeDeploySchema.model_validate(config)


def test_prod_ingress_is_pinned_to_the_labelled_head(catalog):
    args = catalog.serve_config("prod")["applications"][0]["args"]
    assert args["ingress"]["label_selector"] == {"qubittron.io/role": "gateway"}
    manifest = yaml.safe_load(kuberay.MANIFEST.read_text())
    head = manifest["spec"]["rayClusterConfig"]["headGroupSpec"]["rayStartParams"]
    assert head["labels"] == "qubittron.io/role=gateway"
    assert all("labels" not in g["rayStartParams"]
               for g in manifest["spec"]["rayClusterConfig"]["workerGroupSpecs"])


def test_rayservice_validates_against_kuberay_crd():
    manifest = yaml.safe_load(kuberay.MANIFEST.read_text())
    jsonschema.validate(manifest, crd_schema("ray.io_rayservices.yaml"))
    bad = copy.deepcopy(manifest)
    bad["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["maxReplicas"] = "many"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, crd_schema("ray.io_rayservices.yaml"))


def test_rayservice_shape(catalog):
    manifest = yaml.safe_load(kuberay.MANIFEST.read_text())
    cluster = manifest["spec"]["rayClusterConfig"]
    assert cluster["enableInTreeAutoscaling"] is True
    head = cluster["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert "nvidia.com/gpu" not in head["resources"]["limits"]
    groups = {g["groupName"]: g for g in cluster["workerGroupSpecs"]}
    assert set(groups) == {"gpu-h100", "gpu-l40s", "gpu-l4"}
    for g in groups.values():
        assert 0 <= g["minReplicas"] <= g["maxReplicas"]
        spec = g["template"]["spec"]
        assert spec["tolerations"][0]["key"] == "nvidia.com/gpu"
        env = {e["name"]: e for e in spec["containers"][0]["env"]}
        assert "REDIS_URL" not in env  # model replicas never touch Redis: only the head (the ingress) gets it
    head_env = {e["name"]: e for e in head["env"]}
    assert head_env["REDIS_URL"]["valueFrom"]["secretKeyRef"]["name"] == "qbt-redis"
    h100_gpus_max = sum(m.accelerator.count * m.autoscaling.max_replicas for m in catalog.models
                        if m.accelerator.type == "H100")
    assert groups["gpu-h100"]["maxReplicas"] * 8 >= h100_gpus_max
    served = yaml.safe_load(manifest["spec"]["serveConfigV2"])
    assert len(served["applications"][0]["args"]["models"]) == 12


def test_grafana_dashboard_uses_only_exported_metrics():
    import json
    import re

    dash = json.loads((ROOT / "cluster" / "grafana" / "qubittron-serve.json").read_text())
    names = {m for p in dash["panels"] for t in p["targets"] for m in re.findall(r"ray_qbt_\w+", t["expr"])}
    source = "".join(p.read_text() for p in [*(ROOT / "serve_app" / "telemetry").glob("*.py"), ROOT / "deployments" / "stats.py"])
    for name in names:
        base = re.sub(r"_(bucket|count|sum)$", "", name.removeprefix("ray_"))
        assert f'"{base}"' in source, f"{name} is not a metric the service exports"
