"""The admin HTTP API on a real Redis and a real SQLite ledger (Starlette's test client, no Ray): admin tokens,
accounts, keys, usage and its CSV from the SQL ledger, the audit log, and the CLI calling the same functions."""

from __future__ import annotations

import csv
import io
import uuid

import pytest
from starlette.testclient import TestClient

from serve_app.admin import tokens
from serve_app.admin.app import build_admin_app
from serve_app.ledger.database import Database, LedgerConfig, parse_entry
from serve_app.money import keys
from serve_app.ops import cli

DAY_MS = 86_400_000
T0 = 1_796_000_000_000  # Monday 2026-11-30 at 00:53 UTC


@pytest.fixture
def ledger(tmp_path):
    database = Database.open(LedgerConfig(database=f"sqlite:///{tmp_path}/ledger.sqlite3"))
    yield database
    database.close()


@pytest.fixture
def client(r, ledger):
    token = tokens.create(r, "alice")
    app = build_admin_app(r, ledger, known_models={"m1", "m2"})
    with TestClient(app, headers={"Authorization": f"Bearer {token}"}) as c:
        yield c


def rows(account: str, key_id: str) -> list[dict]:
    """Ledger rows over two UTC days and two models: (day, model, prompt, completion, cost micros, status)."""
    spec = [(0, "m1", 10, 20, 1000, "ok"), (0, "m1", 5, 5, 250, "ok"), (0, "m2", 1, 0, 0, "upstream_error"),
            (1, "m2", 7, 3, 333, "ok"), (1, "m1", 2, 2, 101, "disconnected")]
    out = []
    for i, (day, model, prompt, completion, cost, status) in enumerate(spec):
        settled = T0 + day * DAY_MS + i
        out.append(parse_entry(f"{settled}-{i}", {
            "request_id": f"req-{account}-{i}", "completion_id": f"cmpl-{account}-{i}", "account": account,
            "key_id": key_id, "model": model, "prompt_tokens": str(prompt), "completion_tokens": str(completion),
            "cost_micros": str(cost), "status": status, "created_ms": str(settled - 50), "settled_ms": str(settled)}))
    return out


def test_every_call_needs_an_admin_token(r, ledger):
    app = build_admin_app(r, ledger)
    with TestClient(app) as c:
        for headers in ({}, {"Authorization": "Bearer qbta_nope"}, {"Authorization": "Bearer qbt_customer"}):
            res = c.get("/admin/v1/accounts", headers=headers)
            assert res.status_code == 401 and res.json()["error"]["code"] == "invalid_api_key"
            assert res.headers["content-security-policy"].startswith("default-src 'self'")
        assert c.get("/healthz").status_code == 200
        assert c.get("/admin/v1/nothing-here").status_code == 401  # no route is revealed without a token


def test_accounts_and_idempotent_topups(client):
    name = "acme-" + uuid.uuid4().hex[:6]
    assert client.get("/admin/v1/me").json() == {"actor": "alice"}
    res = client.post("/admin/v1/accounts", json={"name": name, "credits_usd": "10"})
    assert res.status_code == 201 and res.json()["balance_usd"] == "10.000000"
    assert client.post("/admin/v1/accounts", json={"name": name}).status_code == 409
    assert name in [a["account"] for a in client.get("/admin/v1/accounts").json()["data"]]
    once = {"Idempotency-Key": "inv-" + name}
    for _ in range(2):
        res = client.post(f"/admin/v1/accounts/{name}/topup", json={"usd": "2.5"}, headers=once)
        assert res.status_code == 200 and res.json()["balance_usd"] == "12.500000"
    res = client.post(f"/admin/v1/accounts/{name}/topup", json={"usd": "3"}, headers=once)
    assert res.status_code == 409 and "was used" in res.json()["error"]["message"]
    assert client.get("/admin/v1/accounts/nobody-here").status_code == 404
    for bad in ({"usd": "-1"}, {"usd": "x"}, {"usd": True}, {"cents": 5}, [1]):
        res = client.post(f"/admin/v1/accounts/{name}/topup", json=bad)
        assert res.status_code == 400 and res.json()["error"]["type"] == "invalid_request_error", bad


def test_keys_create_rotate_revoke_and_the_audit_rows(client):
    name = "keys-" + uuid.uuid4().hex[:6]
    client.post("/admin/v1/accounts", json={"name": name, "credits_usd": "1"})
    res = client.post("/admin/v1/keys", json={"account": name, "rpm": 60, "budget_usd": "5", "budget_period": "week",
                                               "models": ["m1"], "expires_in_s": 3600},
                      headers={"x-request-id": "req-create-1"})
    assert res.status_code == 201, res.text
    created = res.json()
    assert created["key"].startswith("qbt_") and created["key_id"] == keys.key_id(keys.key_hash(created["key"]))
    assert (created["budget_usd"], created["budget_period"], created["models"]) == ("5.000000", "week", ["m1"])
    assert created["expires_at"] and created["budget_spent_usd"] == "0.000000"
    kid = created["key_id"]
    assert client.post("/admin/v1/keys", json={"account": name, "models": ["nope"]}).status_code == 400
    assert client.post("/admin/v1/keys", json={"account": "nobody-" + name}).status_code == 404
    for smuggled in ("change", "known_models", "r", "color"):  # only the key's own fields, never the function's
        res = client.post("/admin/v1/keys", json={"account": name, smuggled: 1})
        assert res.status_code == 400 and res.json()["error"]["param"] == smuggled
    rotated = client.post(f"/admin/v1/keys/{kid}/rotate", json={"grace_s": 600}).json()
    assert rotated["key"].startswith("qbt_") and rotated["key"] != created["key"] and rotated["grace_until"]
    revoked = client.post(f"/admin/v1/keys/{kid}/revoke")
    assert revoked.status_code == 200 and revoked.json()["revoked"] is True
    assert client.post("/admin/v1/keys/key_000000000000/revoke").status_code == 404
    assert client.post("/admin/v1/keys/not-a-key/rotate", json={}).status_code == 404
    listed = client.get("/admin/v1/keys", params={"account": name}).json()["data"]
    assert [k["key_id"] for k in listed] == [kid] and listed[0]["revoked"]
    log = [row for row in client.get("/admin/v1/audit", params={"limit": 100}).json()["data"]
           if row["target"] in (name, kid)]
    assert [row["action"] for row in log] == ["key.revoke", "key.rotate", "key.create", "account.create"]
    assert {row["actor"] for row in log} == {"admin:alice"}
    assert log[2]["request_id"] == "req-create-1"
    assert created["key"] not in str(log) and rotated["key"] not in str(log)


def test_absurd_amounts_and_query_values_are_400_and_store_nothing(client):
    name = "absurd-" + uuid.uuid4().hex[:6]
    for credits in ("1e30", "Infinity", "sNaN", "1e999999"):
        res = client.post("/admin/v1/accounts", json={"name": name, "credits_usd": credits})
        assert res.status_code == 400 and res.json()["error"]["code"] == "invalid_request", (credits, res.text)
    assert client.get(f"/admin/v1/accounts/{name}").status_code == 404
    assert client.get("/admin/v1/accounts").status_code == 200
    for params, param in (({"limit": "\u00b2"}, "limit"), ({"before": "garbage"}, "before")):
        res = client.get("/admin/v1/audit", params=params)
        assert res.status_code == 400 and res.json()["error"]["param"] == param, res.text


def test_usage_by_day_model_and_key_from_the_sql_ledger(client, ledger):
    a, b = "use-a-" + uuid.uuid4().hex[:6], "use-b-" + uuid.uuid4().hex[:6]
    ledger.insert(rows(a, "key_aaaaaaaaaaaa") + rows(b, "key_bbbbbbbbbbbb"))
    got = client.get("/admin/v1/usage", params={"group_by": "day,model", "account": a}).json()["data"]
    assert [(g["day"], g["model"], g["requests"], g["prompt_tokens"], g["completion_tokens"], g["cost_usd"])
            for g in got] == [("2026-11-30", "m1", 2, 15, 25, "0.001250"), ("2026-11-30", "m2", 1, 1, 0, "0.000000"),
                              ("2026-12-01", "m1", 1, 2, 2, "0.000101"), ("2026-12-01", "m2", 1, 7, 3, "0.000333")]
    by_account = client.get("/admin/v1/usage", params={"group_by": "account,key"}).json()["data"]
    mine = {g["account"]: g for g in by_account if g["account"] in (a, b)}
    assert mine[a]["cost_usd"] == mine[b]["cost_usd"] == "0.001684" and mine[b]["key_id"] == "key_bbbbbbbbbbbb"
    since = client.get("/admin/v1/usage", params={"group_by": "account", "account": a,
                                                 "since": "2026-12-01T00:00:00Z"}).json()["data"]
    assert since[0]["requests"] == 2 and since[0]["cost_usd"] == "0.000434"
    res = client.get("/admin/v1/usage.csv", params={"group_by": "day,model", "account": a})
    assert res.headers["content-type"].startswith("text/csv") and "attachment" in res.headers["content-disposition"]
    table = list(csv.DictReader(io.StringIO(res.text)))
    assert len(table) == 4 and table[0]["cost_usd"] == "0.001250" and table[0]["key_id"] == ""
    recent = client.get("/admin/v1/requests", params={"account": b, "limit": 3}).json()["data"]
    assert [x["request_id"] for x in recent] == [f"req-{b}-4", f"req-{b}-3", f"req-{b}-2"]
    assert recent[0]["status"] == "disconnected" and recent[0]["account"] == b and recent[0]["cost_usd"] == "0.000101"
    for params in ({"group_by": "color"}, {"since": "yesterday"}, {"limit": "0"}):
        path = "/admin/v1/requests" if "limit" in params else "/admin/v1/usage"
        assert client.get(path, params=params).status_code == 400, params


def test_the_cli_calls_the_same_functions(r, redis_server, ledger, capsys, tmp_path):
    assert cli.main(["--redis-url", redis_server.url, "admin", "tokens", "create", "--name", "bob"]) == 0
    token = capsys.readouterr().out.strip().splitlines()[-1]
    assert token.startswith("qbta_") and tokens.actor(r, f"Bearer {token}") == "bob"
    name = "cli-" + uuid.uuid4().hex[:6]
    assert cli.main(["--redis-url", redis_server.url, "keys", "create", "--account", name, "--budget-usd", "1",
                     "--models", "m1,m2", "--expires-in-s", "60"]) == 0
    key = capsys.readouterr().out.strip().splitlines()[-1]
    assert cli.main(["--redis-url", redis_server.url, "keys", "rotate", keys.key_id(keys.key_hash(key))]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith("qbt_")
    assert cli.main(["--redis-url", redis_server.url, "audit", "--limit", "5"]) == 0
    assert '"actor": "cli:' in capsys.readouterr().out
    ledger.insert(rows(name, "key_cccccccccccc"))
    assert cli.main(["usage", "--database", ledger.config.database, "--group-by", "model", "--account", name,
                     "--csv"]) == 0
    assert capsys.readouterr().out.splitlines()[0] == "day,model,account,key_id,requests,prompt_tokens," \
                                                      "completion_tokens,cost_usd"
    assert cli.main(["--redis-url", redis_server.url, "admin", "tokens", "revoke", "--name", "bob"]) == 0
    assert tokens.actor(r, f"Bearer {token}") is None
