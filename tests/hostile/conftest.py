"""The hostile-client tier's stack: `qbt serve` on the simulated models (real Ray Serve, the real ingress, no vLLM)
with its own Redis, a body-read deadline of 3 s (so that trickled bodies are answered in seconds), the shipped
auth-failure throttle; and the tally of the run: printed as a table at the end and written as JSON to the stack's run
directory (issue #14, item 6; the figures in the README's Security section)."""

from __future__ import annotations

import json
import os
import re
import uuid
from pathlib import Path

import pytest
import yaml

from serve_app.config.artefacts import serve_config_path
from serve_app.money import accounts, keyring, keyspace
from tests.stack import start_stack
from tests.support import RedisServer, free_port

BODY_READ_S = 3
NARROW = "qbt-sim-narrow"
RESULTS: dict = {}
TRACEBACK = re.compile(rb"Traceback \(most recent call last\)")


@pytest.fixture(scope="module")
def hostile_redis(tmp_path_factory):
    server = RedisServer(free_port(), tmp_path_factory.mktemp("hostile-redis"))
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def hostile_config(tmp_path_factory):
    config = yaml.safe_load(serve_config_path("sim").read_text())
    args = config["applications"][0]["args"]
    args.update(body_read_s=BODY_READ_S)
    # A model that takes 2 requests at once and queues 2 more: a burst beyond that is refused at once (503).
    narrow = next(m for m in args["models"] if m["category"] == "llm")
    args["models"].append({**narrow, "id": NARROW, "source": "sim://" + NARROW, "max_ongoing_requests": 2,
                           "max_queued_requests": 2})
    path = tmp_path_factory.mktemp("hostile-config") / "serve-hostile.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture(scope="module")
def hostile_stack(hostile_redis, hostile_config, tmp_path_factory):
    stack = start_stack(hostile_redis.url, tmp_path_factory, hostile_config)
    RESULTS["run_dir"] = str(stack.run_dir)
    yield stack
    stack.stop()
    RESULTS["logs_after_stop"] = scan_logs(stack)  # what stopping the stack logged too (reported, not asserted)
    write_results(stack)


@pytest.fixture(scope="module")
def hr(hostile_redis):
    return keyspace.sync_client(hostile_redis.url)


@pytest.fixture(scope="module")
def make_key(hr):
    """A fresh account (credit in USD) and a key with the given guard policy and limits."""

    def make(guard: str | None = "off", credits: str = "1000", **limits) -> str:
        name = "h-" + uuid.uuid4().hex[:10]
        accounts.create_account(hr, name, credits)
        return keyring.create_key(hr, name, guard=guard, **limits)[0]

    return make


def log_files(stack) -> list[Path]:
    """The launcher's output and every file under the stack's Ray temp dir (Ray's and Serve's logs, the workers'
    stdout and stderr), symlinks not followed (`session_latest`), so nothing is counted twice."""
    files = [stack.log_path]
    for root, _, names in os.walk(stack.ray_tmp):
        files += [Path(root, n) for n in names if Path(root, n).is_file() and not Path(root, n).is_symlink()]
    return files


def scan_logs(stack) -> dict:
    """Tracebacks in the stack's logs: how many, where, and the exception each ended with."""
    found: list[dict] = []
    for path in log_files(stack):
        try:
            data = path.read_bytes()
        except OSError:
            continue
        for m in TRACEBACK.finditer(data):
            found.append({"file": str(path.relative_to(stack.ray_tmp) if stack.ray_tmp in path.parents else path),
                          "exception": _exception_line(data, m.end())})
    kinds: dict[str, int] = {}
    for f in found:
        kinds[f["exception"]] = kinds.get(f["exception"], 0) + 1
    return {"tracebacks": len(found), "files": sorted({f["file"] for f in found}), "exceptions": kinds}


def _exception_line(data: bytes, start: int) -> str:
    """The line that ends a traceback: the exception and its message. Serve's replica logs write a traceback on
    one line, as reprs of its lines (`('  File ...\\n',)('TypeError: ...\\n',)`); Ray prefixes forwarded worker
    output with `(actor pid=...)`. Both are undone first."""
    text = data[start:start + 200_000].decode(errors="replace").replace("\\n", "\n")
    for line in text.splitlines()[1:]:
        line = re.sub(r"^['(),]+", "", re.sub(r"^\([^)]*pid=\d+[^)]*\) ?", "", line))
        if line.strip() and line[0] not in " \t" and not line.startswith(("Traceback", "During", "The above")):
            return line.strip()[:160]
    return "?"


def write_results(stack) -> None:
    path = Path(stack.run_dir) / "hostile-results.json"
    path.write_text(json.dumps(RESULTS, indent=1, default=str))
    RESULTS["json"] = str(path)


def summary() -> dict:
    inputs = RESULTS.get("inputs", [])
    bypasses = RESULTS.get("bypasses", [])
    flood = RESULTS.get("flood", {})
    attacks = flood.get("attack_answers", {})
    five = sum(1 for r in inputs if r["status"] and r["status"] >= 500) + \
        sum(n for s, n in attacks.items() if s.isdigit() and int(s) >= 500)
    return {
        "hostile inputs tried": len(inputs),
        "... refused (4xx)": sum(1 for r in inputs if r["status"] and 400 <= r["status"] < 500),
        "... served or redirected (< 400)": sum(1 for r in inputs if r["status"] and r["status"] < 400),
        "... no answer (client gone, connection closed)": sum(1 for r in inputs if r["status"] is None),
        "... answers off their expectation": sum(1 for r in inputs if r["problem"]),
        "... 4xx outside the envelope (HTTP parser, Serve)": sum(1 for r in inputs if r["status"] and
                                                                 400 <= r["status"] < 500 and r["code"] is None),
        "flood requests (2 MB, invalid key)": sum(attacks.values()),
        "... their answers": attacks,
        "bypass attempts tried": len(bypasses),
        "bypasses that got through": sum(1 for b in bypasses if not b["refused"]),
        "5xx answers": five,
        "tracebacks in responses": sum(1 for r in inputs if r["problem"] and "traceback" in r["problem"]) +
        sum(1 for b in bypasses if b.get("traceback")) + flood.get("tracebacks_in_attack_answers", 0),
        "tracebacks in logs (end of run)": RESULTS.get("logs", {}).get("tracebacks"),
        "tracebacks in logs (after stop)": RESULTS.get("logs_after_stop", {}).get("tracebacks"),
        "ITL p50 alone (ms)": _ms(flood.get("itl_p50_alone_ms")),
        "ITL p50 under attack (ms)": _ms(flood.get("itl_p50_attack_ms")),
        "ITL p50 ratio (target < 1.20)": _ms(flood.get("itl_p50_ratio"), "{:.2f}"),
        "ITL p99 alone / under attack (ms)": f"{_ms(flood.get('itl_p99_alone_ms'))} / "
                                             f"{_ms(flood.get('itl_p99_attack_ms'))}",
    }


def _ms(x, fmt: str = "{:.1f}") -> str:
    return "-" if x is None else fmt.format(x)


def pytest_terminal_summary(terminalreporter):
    if not RESULTS.get("inputs"):
        return
    tr = terminalreporter
    tr.section("hostile clients (targets: 5xx 0, tracebacks 0, bypasses through 0, ITL p50 ratio < 1.20)")
    for name, value in summary().items():
        tr.write_line(f"{name:<50} {value}")
    for r in [r for r in RESULTS["inputs"] if r["problem"]][:40]:
        tr.write_line(f"  input  {r['group']}: {r['name']}: {r['problem'][:150]}")
    for b in [b for b in RESULTS.get("bypasses", []) if not b["refused"]]:
        tr.write_line(f"  bypass {b['name']}: {b['detail'][:150]}")
    for key in ("logs", "logs_after_stop"):
        for exc, n in RESULTS.get(key, {}).get("exceptions", {}).items():
            tr.write_line(f"  {key}: {n} x {exc}")
    if "json" in RESULTS:
        tr.write_line(f"written to {RESULTS['json']}")
