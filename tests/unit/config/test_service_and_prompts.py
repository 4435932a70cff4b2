from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from serve_app.config.service import ModelSpec, ServiceConfig
from serve_app.api.errors import ApiError
from serve_app.serving.prompts import tokenize
from serve_app.api.protocol import parse_completion_request

ROOT = Path(__file__).resolve().parents[3]
SPEC = {"id": "m", "category": "llm", "source": "dev://qbt-dev-llm", "max_model_len": 32,
        "prices": {"input_usd_per_mtok": "0.5", "output_usd_per_mtok": "1.5"}}


def test_local_serve_config_validates():
    cfg = yaml.safe_load((ROOT / "cluster" / "serve-local.yaml").read_text())
    (app,) = cfg["applications"]
    assert app["import_path"] == "serve_app.serving.app:build_app"
    config = ServiceConfig.model_validate(app["args"])
    assert config.models[0].prices.input_micros == 500_000


@pytest.mark.parametrize("patch, field", [
    ({"engine_args": {"model": "x"}}, "engine_args"),
    ({"prices": {"input_usd_per_mtok": "0.0000001", "output_usd_per_mtok": "1"}}, "prices"),
    ({"category": "toaster"}, "category"),
    ({"fim_template": "{prefix} only"}, "fim_template"),
    ({"num_replicas": 1, "autoscaling": {"min_replicas": 1, "max_replicas": 2}}, ""),
    ({"autoscaling": {"min_replicas": 3, "max_replicas": 2}}, "autoscaling"),
])
def test_bad_model_entries_fail_clearly(patch, field):
    with pytest.raises(ValidationError) as info:
        ModelSpec.model_validate({**SPEC, **patch})
    assert field in str(info.value)


def test_duplicate_ids_refused():
    with pytest.raises(ValidationError, match="repeated"):
        ServiceConfig.model_validate({"models": [SPEC, SPEC]})


class FakeTokenizer:
    """Unit-test stand-in: one token per character, plus a BOS of id 0."""

    def __len__(self):
        return 300

    def encode(self, text):
        return [0] + [ord(c) % 256 + 1 for c in text]


def run(body, **spec):
    return tokenize(parse_completion_request({"model": "m", **body}), ModelSpec.model_validate({**SPEC, **spec}),
                    FakeTokenizer())


def test_prompt_forms_become_id_lists():
    assert run({"prompt": "ab"}).ids == [[0, 98, 99]]
    assert run({"prompt": [[5, 6], [7]]}).ids == [[5, 6], [7]]
    assert run({"prompt": [5, 6]}).texts == [None]


def test_context_overflow_and_vocab():
    with pytest.raises(ApiError) as info:
        run({"prompt": "abc", "max_tokens": 29})
    assert info.value.param == "max_tokens"
    with pytest.raises(ApiError) as info:
        run({"prompt": "a" * 40})
    assert info.value.param == "prompt"
    with pytest.raises(ApiError) as info:
        run({"prompt": [299, 300]})
    assert info.value.param == "prompt"


def test_suffix_needs_a_fim_template():
    with pytest.raises(ApiError) as info:
        run({"prompt": "a", "suffix": "b"})
    assert info.value.param == "suffix"
    assert run({"prompt": "a", "suffix": "b"}, fim_template="<P>{prefix}<S>{suffix}<M>").texts == ["<P>a<S>b<M>"]
