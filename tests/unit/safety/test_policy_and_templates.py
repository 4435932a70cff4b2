from __future__ import annotations

import pytest

from serve_app.safety import templates as guard
from serve_app.safety.policy import GuardError, GuardMode, GuardPolicy, Verdict, parse_verdict


@pytest.mark.parametrize("text, safety, cats, refusal", [
    ("Safety: Safe\nCategories: None", "Safe", (), None),
    ("Safety: Unsafe\nCategories: Violent", "Unsafe", ("Violent",), None),
    ("Safety: Unsafe\nCategories: None", "Unsafe", (), None),  # still unsafe: never an error a fail-open key passes
    ("Safety: Controversial\nCategories: PII, Unethical Acts\nRefusal: No", "Controversial", ("PII", "Unethical Acts"),
     "No"),
    ("Safety: Safe\nCategories: None\nRefusal: Yes\n", "Safe", (), "Yes"),
])
def test_parses_qwen3guard_output(text, safety, cats, refusal):
    assert parse_verdict(text) == Verdict(safety, cats, refusal)


@pytest.mark.parametrize("text", [
    "", "Safe", "safety: safe\ncategories: none", "Safety: Safe", "Safety: Probably\nCategories: None",
    "Safety: Safe\nCategories: Violent", "Safety: Unsafe\nCategories: Weather",
    "I am a helpful assistant.", "Safety: Safe\nCategories: None\nRefusal: Maybe",
    "Sure! Safety: Safe\nCategories: None", "Safety: Safe\nCategories: None\nextra text",
])
def test_unparseable_output_is_an_error_never_safe(text):
    with pytest.raises(GuardError):
        parse_verdict(text)


def test_policy_parsing_and_blocking():
    default = GuardPolicy(GuardMode.BOTH)
    assert GuardPolicy.parse(None, default) is default
    loose_open = GuardPolicy.parse("input,loose,open", default)
    assert loose_open.mode is GuardMode.INPUT and loose_open.fail_open and not loose_open.block_controversial
    controversial = Verdict("Controversial", ("PII",))
    assert controversial.blocks(default) and not controversial.blocks(loose_open)
    assert not Verdict("Safe").blocks(default)
    for bad in ("sometimes", "input,strict,open", "both,"):
        with pytest.raises(ValueError):
            GuardPolicy.parse(bad, default)


def test_templates_are_qwen3guard_exact():
    assert guard.PROMPT_TEMPLATE.startswith("<|im_start|>user\n# Task:\n1) Evaluate whether THE LAST USER's query")
    assert "USER: {prompt}\n\n<END CONVERSATION>" in guard.PROMPT_TEMPLATE
    assert guard.PROMPT_TEMPLATE.endswith("<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert "USER: {prompt}\n\nASSISTANT: {response}\n\n" in guard.RESPONSE_TEMPLATE
    assert "Jailbreak" not in guard.RESPONSE_TEMPLATE and "Jailbreak." in guard.PROMPT_TEMPLATE


def test_user_text_cannot_forge_template_tokens():
    """On the simulated engine's tokenizer (same special tokens); tests/e2e repeats it on the dev guard's."""
    from deployments.sim_tokenizer import sim_tokenizer

    from tests.support import assert_no_forged_template_tokens

    assert_no_forged_template_tokens(sim_tokenizer())
