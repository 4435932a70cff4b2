"""The simulated engine keeps `Engine`'s contract (indices, finish reasons, usage, echo, logprobs, best_of) and its
faults and clock behave as documented; all in-process, no Ray and no vLLM."""

from __future__ import annotations

import asyncio
import time

import pytest

from deployments.sim_engine import Fault, SimConfig, SimEngine, StepClock, parse_directive
from deployments.sim_tokenizer import sim_tokenizer
from deployments.wire import EngineFailure, GenerationRequest, InvalidSampling

TEXT = " Ottawa. The quick brown fox jumps over the lazy dog."


def request(*texts: str, max_tokens: int = 16, **kw) -> GenerationRequest:
    tok = sim_tokenizer()
    return GenerationRequest("cmpl-t", [tok.encode(t, add_special_tokens=False) for t in texts], list(texts),
                             {"temperature": 0.7}, max_tokens=max_tokens, **kw)


async def engine(**config) -> SimEngine:
    eng = SimEngine("sim-model", SimConfig(**{"step_s": 0.002, **config}))
    await eng.start()
    return eng


async def collect(eng: SimEngine, req: GenerationRequest):
    return [item async for item in eng.stream(req)]


async def settle(eng: SimEngine) -> None:
    """Lets the clock's idle step pass, then nothing but this test's task may remain."""
    await asyncio.sleep(eng.config.step_s * 5)
    assert not eng.clock.running
    assert asyncio.all_tasks() == {asyncio.current_task()}


def test_tokenizer_round_trips_and_splits_typed_special_tokens():
    tok = sim_tokenizer()
    assert tok is sim_tokenizer() and len(tok) == 261
    for text in ("hello, world . 's", "héllo wörld 日本語 🙂", TEXT):
        ids = tok.encode(text, add_special_tokens=False)
        assert len(ids) == len(text.encode())
        assert tok.decode(ids, skip_special_tokens=True) == text
        assert tok.decode(tok.encode(text), skip_special_tokens=True) == text
    im_start, im_end = tok.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"])
    assert tok.encode("<|im_start|>user", add_special_tokens=False) == [im_start] + tok.encode("user")
    typed = tok("a<|im_end|>", add_special_tokens=False, split_special_tokens=True)["input_ids"]
    assert im_end not in typed and len(typed) == len("a<|im_end|>")
    assert tok.decode(tok.encode("<|im_start|>hi<|im_end|>"), skip_special_tokens=True) == "hi"
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == ("<s>", "</s>", "<|endoftext|>")


async def test_stream_two_prompts_n2_indices_text_finish_and_usage():
    eng = await engine()
    req = request("The capital of Canada is", "Hi", n=2, max_tokens=6)
    items = await collect(eng, req)
    assert len(items) == 6
    for k, item in enumerate(items):
        assert [c["index"] for c in item.choices] == [0, 1, 2, 3]
        assert all(c["finish_reason"] == ("length" if k == 5 else None) for c in item.choices)
        assert (item.usage.prompt_tokens, item.usage.completion_tokens) == (req.prompt_tokens, 4 * (k + 1))
    for index in range(4):
        assert "".join(i.choices[index]["text"] for i in items) == TEXT[:6]
    assert items[0].choices[0] == {"text": " ", "index": 0, "logprobs": None, "finish_reason": None}
    eng.shutdown()


async def test_tokens_per_step_batches_and_text_cycles():
    eng = await engine(tokens_per_step=4, text="abc")
    items = await collect(eng, request("x", max_tokens=10))
    assert [i.choices[0]["text"] for i in items] == ["abca", "bcab", "ca"]
    assert [i.usage.completion_tokens for i in items] == [4, 8, 10]
    assert items[-1].choices[0]["finish_reason"] == "length"


async def test_multibyte_text_is_never_split_inside_a_character():
    text = "é日🙂 ok \ufffd"
    eng = await engine(text=text)
    items = await collect(eng, request("x", max_tokens=len(text.encode())))
    assert "".join(i.choices[0]["text"] for i in items) == text
    assert "\ufffd" not in "".join(i.choices[0]["text"] for i in items[:-1])
    assert items[-1].usage.completion_tokens == len(text.encode())


async def test_complete_best_of_bills_all_candidates_and_reindexes():
    eng = await engine(tokens_per_step=3)
    choices, usage = await eng.complete(request("a", "bb", n=2, best_of=3, max_tokens=5))
    assert [c["index"] for c in choices] == [0, 1, 2, 3]
    assert all(c["text"] == TEXT[:5] and c["finish_reason"] == "length" for c in choices)
    assert (usage.prompt_tokens, usage.completion_tokens) == (3, 2 * 3 * 5)
    choices, usage = await eng.complete(request("a", n=2, max_tokens=3))
    assert [(c["index"], c["text"]) for c in choices] == [(0, TEXT[:3]), (1, TEXT[:3])]
    assert usage.completion_tokens == 6


async def test_echo_and_logprobs_offsets_run_per_choice():
    eng = await engine(tokens_per_step=2, text="xyz")
    items = await collect(eng, request("Hi", n=2, max_tokens=3, echo=True, logprobs=1))
    first, second = items
    for c in first.choices:
        assert c["text"] == "Hixy"
        lp = c["logprobs"]
        assert lp["tokens"] == ["H", "i", "x", "y"] and lp["text_offset"] == [0, 1, 2, 3]
        assert lp["token_logprobs"] == [None, -0.5, -0.5, -0.5]
        assert lp["top_logprobs"] == [None, {"i": -0.5}, {"x": -0.5}, {"y": -0.5}]
    for c in second.choices:
        assert c["text"] == "z" and c["logprobs"]["text_offset"] == [4] and c["finish_reason"] == "length"
    choices, _ = await eng.complete(request("Hi", max_tokens=2, logprobs=0))
    assert choices[0]["logprobs"] == {"tokens": ["x", "y"], "token_logprobs": [-0.5, -0.5],
                                      "top_logprobs": [{"x": -0.5}, {"y": -0.5}], "text_offset": [0, 1]}


async def test_echo_without_prompt_text_decodes_the_ids():
    eng = await engine()
    req = request("Hello", max_tokens=1, echo=True)
    req.prompt_texts = [None]
    choices, _ = await eng.complete(req)
    assert choices[0]["text"] == "Hello" + TEXT[0]


async def test_scoring_mode_returns_no_output():
    eng = await engine()
    items = await collect(eng, request("a b", "c", max_tokens=0, echo=True))
    assert len(items) == 1 and items[0].usage.completion_tokens == 0
    assert [(c["text"], c["finish_reason"]) for c in items[0].choices] == [("a b", "length"), ("c", "length")]
    choices, usage = await eng.complete(request("a b", max_tokens=0))
    assert choices == [{"text": "", "index": 0, "logprobs": None, "finish_reason": "length"}]
    assert usage.completion_tokens == 0


async def test_safety_mode_answers_verdicts_in_one_step():
    eng = await engine(unsafe_words=["Bomb"])
    tok = sim_tokenizer()
    ids = tok.encode("<|im_start|>user\nhow to build a BOMB<|im_end|>", add_special_tokens=False)
    req = GenerationRequest("guard-1", [ids], [None], {"temperature": 0.0}, max_tokens=32)
    choices, usage = await eng.complete(req)
    assert choices[0]["text"] == "Safety: Unsafe\nCategories: Violent" and choices[0]["finish_reason"] == "stop"
    assert usage.completion_tokens == len(choices[0]["text"])
    items = await collect(eng, request("a nice day", "bomb", max_tokens=32))
    assert len(items) == 1
    assert [c["text"] for c in items[0].choices] == ["Safety: Safe\nCategories: None",
                                                     "Safety: Unsafe\nCategories: Violent"]


async def test_die_calls_on_die_mid_stream():
    died = []

    def on_die():
        died.append(True)
        raise RuntimeError("replica gone")

    eng = SimEngine("sim", SimConfig(step_s=0.002, fault=Fault.DIE, fault_after_tokens=3), on_die=on_die)
    await eng.start()
    got = []
    with pytest.raises(RuntimeError, match="replica gone"):
        async for item in eng.stream(request("x", max_tokens=10)):
            got.append(item)
    assert died == [True] and len(got) == 3
    with pytest.raises(EngineFailure, match="replica death"):  # the default on_die never kills the test process
        await (await engine(fault="die")).complete(request("x", max_tokens=2))
    await settle(eng)


async def test_hang_never_yields_and_is_cancellable():
    eng = await engine(fault="hang")
    with pytest.raises(asyncio.TimeoutError):
        await asyncio.wait_for(eng.stream(request("x")).__anext__(), 0.05)
    with pytest.raises(asyncio.TimeoutError):
        await asyncio.wait_for(eng.complete(request("x")), 0.05)
    await settle(eng)
    hung = asyncio.create_task(eng.complete(request("x")))
    await asyncio.sleep(0.01)
    eng.shutdown()  # a hung request fails once the engine is shut down
    with pytest.raises(EngineFailure, match="shut down"):
        await hung


async def test_raise_after_tokens():
    eng = await engine(fault="raise", fault_after_tokens=2)
    got = []
    with pytest.raises(EngineFailure, match="after 2 tokens"):
        async for item in eng.stream(request("x", max_tokens=5)):
            got.append(item)
    assert len(got) == 2
    with pytest.raises(EngineFailure):
        await eng.complete(request("x", max_tokens=5))
    choices, _ = await eng.complete(request("x", max_tokens=1))  # finished before the fault engages
    assert choices[0]["text"] == TEXT[0]


async def test_slow_is_measurably_slower():
    async def timed(**config) -> float:
        eng = await engine(step_s=0.003, slow_factor=5, **config)
        started = time.monotonic()
        await eng.complete(request("x", max_tokens=5))
        return time.monotonic() - started

    normal = min([await timed() for _ in range(3)])  # the fastest of three: one scheduling hiccup is not the engine
    slow = await timed(fault="slow")
    assert slow > 3 * normal and slow >= 5 * 5 * 0.003


async def test_prompt_directive_overrides_the_config():
    assert parse_directive("no directive") == {}
    assert parse_directive("hi [[sim fault=raise after=3]]") == {"fault": Fault.RAISE, "fault_after_tokens": 3}
    eng = await engine()
    got = []
    with pytest.raises(EngineFailure):
        async for item in eng.stream(request("please [[sim fault=raise after=2]] go", "y", max_tokens=5)):
            got.append(item)
    assert [i.usage.completion_tokens for i in got] == [2]  # two prompts: two tokens per step
    faulty = await engine(fault="raise")
    choices, _ = await faulty.complete(request("[[sim fault=none]]", max_tokens=2))
    assert choices[0]["text"] == TEXT[:2]
    for bad in ("[[sim fault=explode]]", "[[sim after=-1]]", "[[sim color=red]]", "[[sim fault]]"):
        with pytest.raises(InvalidSampling):
            await eng.complete(request(bad))


async def test_cancellation_leaves_no_task_and_clock_stops_when_idle():
    eng = await engine()
    assert not eng.clock.running
    gen = eng.stream(request("x", max_tokens=1000))
    await gen.__anext__()
    assert eng.clock.running
    await gen.aclose()
    await settle(eng)
    task = asyncio.create_task(eng.complete(request("x", "y", n=3, max_tokens=1000)))
    await asyncio.sleep(0.02)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await settle(eng)
    steps = eng.clock.steps
    await asyncio.sleep(0.02)
    assert eng.clock.steps == steps  # idle: no ticking


async def test_streams_share_the_step_clock():
    eng = await engine(step_s=0.005)
    reqs = [request("x", max_tokens=8) for _ in range(3)]
    await asyncio.gather(*(eng.complete(r) for r in reqs))
    assert 8 <= eng.clock.steps <= 10  # three requests of eight steps in about eight shared steps
    clock = StepClock(0.001)
    await clock.tick()
    await clock.tick(slow=True)
    assert clock.steps == 11


async def test_health_and_shutdown():
    eng = SimEngine("sim", SimConfig())
    with pytest.raises(EngineFailure):
        await eng.check_health()
    await eng.start()
    await eng.check_health()
    gen = eng.stream(request("x", max_tokens=1000))
    await gen.__anext__()
    eng.shutdown()
    with pytest.raises(EngineFailure):
        await gen.__anext__()
    with pytest.raises(EngineFailure):
        await eng.check_health()
    with pytest.raises(EngineFailure):
        await eng.complete(request("x"))
    await asyncio.sleep(0.01)  # the cancelled clock task finishes on the next loop iterations
    assert asyncio.all_tasks() == {asyncio.current_task()}
