"""Ray Serve LLM's `build_openai_app` on the dev model with the same engine settings, for the side-by-side runs.

Run by `benchmarks/compare.py`, with `RAY_SERVE_THROUGHPUT_OPTIMIZED=1` (the Serve settings `qbt serve` uses) or
without (Serve's defaults). It owns its own local Ray instance and stops it on SIGTERM/SIGINT.
"""

from __future__ import annotations

import os
import signal
import socket
import sys
import time


def main(model_dir: str, port: int) -> None:
    proxy_port = port
    if os.environ.get("RAY_SERVE_THROUGHPUT_OPTIMIZED") == "1":  # as `qbt serve` runs: the ingress replica on `port`
        os.environ["RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT"] = str(port)
        os.environ["RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT"] = str(port + 1)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            proxy_port = s.getsockname()[1]
    import ray
    from ray import serve
    from ray.serve.llm import LLMConfig, build_openai_app

    ray.init(num_cpus=8, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"VLLM_CPU_KVCACHE_SPACE": "1"}})
    serve.start(http_options={"host": "127.0.0.1", "port": proxy_port})
    config = LLMConfig(
        model_loading_config={"model_id": "qbt-dev-llm", "model_source": model_dir},
        engine_kwargs={"dtype": "float32", "max_model_len": 512, "enforce_eager": True},
        placement_group_config={"bundles": [{"CPU": 1}]},
        deployment_config={"num_replicas": 1, "max_ongoing_requests": 256},
    )
    serve.run(build_openai_app({"llm_configs": [config]}), name="rayllm", route_prefix="/")
    print("rayllm ready", flush=True)

    def stop(*_):
        serve.shutdown()
        ray.shutdown()
        sys.exit(0)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    while True:
        time.sleep(3600)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
