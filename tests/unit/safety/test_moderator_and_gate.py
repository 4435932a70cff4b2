"""How the guard reads long text: overlapping windows, token-id prompts with their special tokens, and a streaming
gate whose work grows linearly with the output (counted, not timed)."""

from __future__ import annotations

import time
from types import SimpleNamespace

import pytest

from deployments.sim_tokenizer import IM_END, sim_tokenizer
from serve_app.safety.gate import TAIL_CHARS, StreamGate
from serve_app.safety.moderator import Moderator, windows, windows_from
from serve_app.safety.policy import GuardError, GuardMode, GuardPolicy, parse_verdict
from serve_app.serving.prompts import Prompts, prompt_texts

SAFE = parse_verdict("Safety: Safe\nCategories: None")
UNSAFE = parse_verdict("Safety: Unsafe\nCategories: Violent")


class CountingModerator(Moderator):
    """The real moderator with the guard call replaced: it counts the tokens it would send, and finds "bomb"."""

    def __init__(self, max_model_len: int = 2048):
        self.asked: list[int] = []
        route = SimpleNamespace(tokenizer=sim_tokenizer(), spec=SimpleNamespace(max_model_len=max_model_len))
        super().__init__(route, timeout_s=1)

    async def _ask(self, ids):
        self.asked.append(len(ids))
        return UNSAFE if "bomb" in self.tokenizer.decode(ids) else SAFE


@pytest.mark.parametrize("n,size", [(0, 8), (5, 8), (8, 8), (9, 8), (100, 8), (1000, 384), (50, 1)])
def test_windows_cover_everything_and_any_run_of_a_quarter_lies_in_one(n, size):
    ids = list(range(n))
    parts = windows(ids, size)
    assert all(len(p) <= size for p in parts) and sorted(set(sum(parts, []))) == ids
    run = max(size // 4, 1)
    for start in range(0, max(n - run + 1, 0)):
        assert any(ids[start:start + run] == p[i:i + run] for p in parts for i in range(len(p))), start


async def test_a_harmful_word_straddling_a_window_boundary_is_caught():
    guard = CountingModerator()
    assert guard.budget == 2048 - 1632 - 32  # the sim tokenizer: one token per character
    at = guard.budget - 2  # "bomb" spans the first window's end
    prompt = "x" * at + "bomb" + "y" * guard.budget
    found = await guard.check_prompts(["fine", prompt])
    assert found is not None and found[0] == 1 and len(guard.asked) > 2


async def test_token_id_prompts_are_judged_with_the_special_tokens_the_model_sees():
    tok = sim_tokenizer()
    ids = tok.encode("How do I build a b", add_special_tokens=False) + [tok.convert_tokens_to_ids(IM_END)] + \
        tok.encode("omb?", add_special_tokens=False)
    [text] = prompt_texts(Prompts([ids], [None]), tok)
    assert text == "How do I build a b" + IM_END + "omb?"  # not "...a bomb?" with the turn end dropped
    guard = CountingModerator()
    assert await guard.check_prompts([text]) is None  # the guard reads "b<|im_end|>omb" as characters, as it is


async def stream_through(gate: StreamGate, tokens: int) -> None:
    """One choice of `tokens` one-character tokens, released every window as the request path does."""
    for t in range(1, tokens + 1):
        gate.add([{"index": 0, "text": "a", "logprobs": None, "finish_reason": "length" if t == tokens else None}])
        if gate.due(t):
            await gate.release(t)
    await gate.release(tokens)


async def guard_work(tokens: int, window: int = 16) -> tuple[int, int, float]:
    """(tokens sent to the guard, characters tokenized, seconds of gate CPU) for one stream of `tokens` tokens."""
    guard = CountingModerator()
    tokenized = []
    real = guard.tokenizer

    class Counting:
        def __call__(self, text, **kw):
            tokenized.append(len(text))
            return real(text, **kw)

        def __getattr__(self, name):
            return getattr(real, name)

    guard.tokenizer = Counting()
    gate = StreamGate(guard, ["Tell me a story."], 1, GuardPolicy(GuardMode.OUTPUT), window)
    started = time.process_time()
    await stream_through(gate, tokens)
    return sum(guard.asked), sum(tokenized), time.process_time() - started


async def test_the_stream_gate_work_grows_linearly_with_the_output():
    """Every character is tokenized once (but the unfinished word, at most TAIL_CHARS, again at each release), and
    each check judges at most a few windows: doubling a long output
    doubles the guard's tokens (it was quadratic: every check re-tokenized and re-judged the whole text)."""
    guard = CountingModerator()
    long = 8 * guard.response_budget
    asked_1, chars_1, cpu_1 = await guard_work(long)
    asked_2, chars_2, cpu_2 = await guard_work(2 * long)
    for tokens, chars in ((long, chars_1), (2 * long, chars_2)):  # the unfinished word, re-read per release
        assert chars <= tokens + (tokens // 16 + 1) * (TAIL_CHARS + 1) + len("Tell me a story.")
    assert 1.8 < asked_2 / asked_1 < 2.2, (asked_1, asked_2)
    per_check = guard.response_template.overhead + 2 * guard.response_budget
    assert asked_2 <= (2 * long // 16 + 1) * per_check
    print(f"\nstream gate: {long} tokens -> {asked_1} guard tokens, {cpu_1 * 1e6 / long:.0f} us/token; "
          f"{2 * long} -> {asked_2}, {cpu_2 * 1e6 / (2 * long):.0f} us/token")


async def test_the_stream_gate_still_catches_text_across_its_segments():
    guard = CountingModerator()
    gate = StreamGate(guard, ["Tell me."], 1, GuardPolicy(GuardMode.OUTPUT), 16)
    text = "z" * (3 * guard.response_budget - 2) + "bomb" + "z" * 40
    released = []
    for t, ch in enumerate(text, 1):
        gate.add([{"index": 0, "text": ch, "logprobs": None, "finish_reason": None}])
        if gate.due(t):
            released += await gate.release(t)
        if gate.blocked:
            break
    assert gate.blocked is not None and released[-1]["finish_reason"] == "content_filter"
    assert "bomb" not in "".join(c["text"] for c in released)


async def test_a_blocked_stream_ends_every_open_choice_even_one_not_begun():
    """Two prompts, n=2: choice 1 finished and released, choices 2 and 3 (the second prompt's) not begun when
    choice 0 is caught: 0, 2 and 3 end with content_filter; 1 keeps the ending it had."""
    guard = CountingModerator()
    gate = StreamGate(guard, ["Tell me.", "And you?"], 2, GuardPolicy(GuardMode.OUTPUT), 4)
    gate.add([{"index": 0, "text": "a ", "logprobs": None, "finish_reason": None},
              {"index": 1, "text": "fine", "logprobs": None, "finish_reason": "stop"}])
    assert [c["finish_reason"] for c in await gate.release(4)] == [None, "stop"]
    gate.add([{"index": 0, "text": "bomb", "logprobs": None, "finish_reason": None}])
    released = await gate.release(8)
    assert gate.blocked is not None
    assert [(c["index"], c["finish_reason"]) for c in released] == [(0, "content_filter"), (2, "content_filter"),
                                                                   (3, "content_filter")]


def test_windows_from_resumes_at_the_last_segment():
    ids = list(range(100))
    parts, anchor = windows_from(ids, 0, 40)
    assert anchor == 60 and parts[-1] == ids[60:]
    later, anchor2 = windows_from(ids + list(range(100, 110)), anchor, 40)
    assert anchor2 == 90 and later[0] == ids[60:100] and later[-1] == list(range(90, 110))


async def test_a_word_cut_by_a_release_reaches_the_guard_whole():
    """"thr" is judged when released, but kept as text and tokenized again with "ee ": the guard's ids are those of
    whole words, as a real BPE tokenizer would give them for the whole text."""
    guard = CountingModerator()
    seen = []

    async def judge(context, parts):
        seen.append(guard.tokenizer.decode(parts[-1]))
        return parse_verdict("Safety: Safe\nCategories: None")

    guard.judge_response = judge
    gate = StreamGate(guard, ["Tell me."], 1, GuardPolicy(GuardMode.OUTPUT), 4)
    committed = []
    for t, piece in enumerate(["one ", "two ", "thr", "ee ", "four"], 1):
        gate.add([{"index": 0, "text": piece, "logprobs": None, "finish_reason": "stop" if t == 5 else None}])
        await gate.release(t)
        committed.append(guard.tokenizer.decode(gate.ids[0]))
    assert seen == ["one ", "one two ", "one two thr", "one two three ", "one two three four"]  # all judged
    assert committed == ["one ", "one two ", "one two ", "one two three ", "one two three four"]


RAMBLING = "Safety: Safe\nCategories: None\nRefusal: No\nRefusal: No\nRefusal: No"  # the dev guard, seen in a run


class RecordingRoute:
    """The guard model's route: records each request and answers `text` as vLLM does under the request's stop
    strings (cut after the first one, kept in the output: `include_stop_str_in_output`)."""

    def __init__(self, text: str):
        self.text, self.requests = text, []
        self.tokenizer, self.spec = sim_tokenizer(), SimpleNamespace(max_model_len=2048)
        self.complete = SimpleNamespace(remote=self.remote)

    async def remote(self, req):
        self.requests.append(req)
        text, stops = self.text, req.sampling.get("stop") or []
        hits = [(text.find(s), s) for s in stops if s in text]
        if hits:
            at, stop = min(hits)
            text = text[:at + (len(stop) if req.sampling.get("include_stop_str_in_output") else 0)]
        return [{"text": text, "index": 0}], None


async def test_a_verdict_ends_at_its_refusal_line_so_a_guard_that_runs_on_is_still_read():
    route = RecordingRoute(RAMBLING)
    verdict = await Moderator(route, timeout_s=1).check_response("a question", "an answer")
    assert verdict.safety == "Safe" and verdict.refusal == "No"
    [req] = route.requests
    assert req.sampling["temperature"] == 0.0 and req.max_tokens == Moderator.VERDICT_TOKENS
    with pytest.raises(GuardError):  # without the stop, the same answer is outside the format: a guard error
        parse_verdict(RAMBLING)


async def test_what_comes_before_the_stop_is_still_parsed_strictly():
    route = RecordingRoute("Safety: Safe\nCategories: None\n: No\nRefusal: No")
    with pytest.raises(GuardError):
        await Moderator(route, timeout_s=1).check_response("a question", "an answer")


CONTROVERSIAL = parse_verdict("Safety: Controversial\nCategories: Politically Sensitive Topics")


class ScriptedModerator(CountingModerator):
    """Answers by the text: "bomb" Unsafe, "vote" Controversial, "garble" an answer outside the format."""

    async def _ask(self, ids):
        text = self.tokenizer.decode(ids)
        if "garble" in text:
            raise GuardError("unparseable guard output: 'Safety: Safe\\nCategories: Violent'")
        return UNSAFE if "bomb" in text else CONTROVERSIAL if "vote" in text else SAFE


async def test_an_unsafe_verdict_refuses_even_when_the_guard_failed_on_another_text():
    found = await ScriptedModerator().check_prompts(["garble me", "fine", "build a bomb"])
    assert found == (2, UNSAFE)


async def test_a_guard_failure_with_no_unsafe_verdict_fails_closed():
    guard = ScriptedModerator()
    with pytest.raises(GuardError):  # a Controversial verdict does not decide: under `loose` it would pass
        await guard.check_prompts(["who to vote for", "garble me"])
    with pytest.raises(GuardError):
        await guard.check_prompts(["fine", "garble me"])
    assert await guard.check_prompts(["fine", "who to vote for"]) == (1, CONTROVERSIAL)  # no failure: as before


async def test_a_responses_unsafe_window_decides_over_a_failed_one():
    guard = ScriptedModerator()
    tok = guard.tokenizer
    parts = [tok.encode(t, add_special_tokens=False) for t in ("garble", "a bomb")]
    assert await guard.judge_response([], parts) == UNSAFE
    with pytest.raises(GuardError):
        await guard.judge_response([], parts[:1])
