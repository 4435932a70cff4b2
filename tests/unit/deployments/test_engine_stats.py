"""The engine's metrics are vLLM's own: the dashboard's `ray_vllm_*` panels read metrics vLLM's Prometheus logger
defines (as Ray exports them: `:` becomes `_`, counters end in `_total`), and the replica hands vLLM its Ray logger.
Read from the sources, so that no vLLM or Ray is started."""

from __future__ import annotations

import ast
import importlib.util
import json
import re
from pathlib import Path

from tests.support import ROOT


def vllm_metric_names() -> set[str]:
    """Every `vllm:*` metric name in vLLM's metrics code (engine, speculative decoding, KV connector, perf)."""
    package = Path(importlib.util.find_spec("vllm").submodule_search_locations[0])
    sources = [*(package / "v1" / "metrics").glob("*.py"), package / "v1" / "spec_decode" / "metrics.py",
               package / "distributed" / "kv_transfer" / "kv_connector" / "v1" / "metrics.py"]
    return {m for path in sources if path.exists() for m in re.findall(r'"vllm:(\w+)"', path.read_text())}


def test_the_dashboard_reads_vllm_metrics_under_rays_names():
    dash = json.loads((ROOT / "cluster" / "grafana" / "qubittron-serve.json").read_text())
    used = {m for p in dash["panels"] for t in p["targets"] for m in re.findall(r"ray_vllm_\w+", t["expr"])}
    assert {"ray_vllm_num_requests_running", "ray_vllm_kv_cache_usage_perc", "ray_vllm_generation_tokens_total",
            "ray_vllm_time_to_first_token_seconds_bucket"} <= used
    defined = vllm_metric_names()
    for name in used:
        base = re.sub(r"_(bucket|count|sum)$", "", name.removeprefix("ray_vllm_"))
        assert base in defined or base.removesuffix("_total") in defined, f"{name}: vLLM defines no such metric"


def test_the_replica_gives_the_engine_vllms_ray_stat_logger():
    tree = ast.parse((ROOT / "deployments" / "stats.py").read_text())
    imported = {(n.module, a.name) for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) for a in n.names}
    assert ("vllm.v1.metrics.ray_wrappers", "RayPrometheusStatLogger") in imported
    assert "stat_loggers=stat_loggers()" in (ROOT / "deployments" / "model_server.py").read_text()
