"""The operator's side through the real stack: the admin API that `qbt serve` starts on loopback, a key made there
with a budget and allowed models as customers then meet it (the official client), rotation and revocation taking
effect on the live service, and spend read back from the SQL ledger the exporter fills."""

from __future__ import annotations

import time
import uuid

import httpx
import openai
import psutil
import pytest

from tests.support import MODEL

pytestmark = pytest.mark.e2e
PROMPT = "The capital of Canada is"  # 6 tokens: at most 6 x 0.50 + 4 x 1.50 = 9 micro-dollars with max_tokens 4


@pytest.fixture(scope="module")
def admin(stack):
    token = (stack.run_dir / "admin-token").read_text().strip()
    assert oct((stack.run_dir / "admin-token").stat().st_mode & 0o777) == "0o600"
    with httpx.Client(base_url=stack.admin_url, headers={"Authorization": f"Bearer {token}"}, timeout=30) as c:
        yield c


def customer_client(stack, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=stack.base_url + "/v1", api_key=key, max_retries=0)


def test_the_admin_api_is_on_loopback_and_needs_a_token(stack, admin):
    assert stack.admin_url.startswith("http://127.0.0.1:")
    assert admin.get("/admin/v1/me").json() == {"actor": "local-operator"}
    assert httpx.get(stack.admin_url + "/admin/v1/accounts").status_code == 401
    page = httpx.get(stack.admin_url + "/")
    assert page.status_code == 200 and "default-src 'self'" in page.headers["content-security-policy"]
    assert httpx.get(stack.base_url + "/admin/v1/accounts").status_code == 404  # not on the public port


def test_a_budgeted_key_made_by_the_operator_stops_at_its_budget(stack, admin):
    name = "op-" + uuid.uuid4().hex[:8]
    assert admin.post("/admin/v1/accounts", json={"name": name, "credits_usd": "1"}).status_code == 201
    made = admin.post("/admin/v1/keys", json={"account": name, "budget_usd": "0.000020", "budget_period": "day",
                                              "models": [MODEL], "guard": "off"}).json()
    client = customer_client(stack, made["key"])
    answered = 0
    with pytest.raises(openai.APIStatusError) as refused:
        for _ in range(10):
            client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=4, temperature=0)
            answered += 1
    assert refused.value.status_code == 402 and "budget" in refused.value.message and answered >= 2
    other = admin.get("/admin/v1/keys", params={"account": name}).json()["data"][0]
    account = admin.get(f"/admin/v1/accounts/{name}").json()
    assert other["budget_spent_usd"] == account["spent_usd"]  # what the key spent is what the account paid
    assert int(other["budget_spent_usd"].replace(".", "")) <= 20
    narrow = admin.post("/admin/v1/keys", json={"account": name, "models": ["qbt-dev-guard"], "guard": "off"}).json()
    with pytest.raises(openai.BadRequestError) as wrong:  # a model the service has, that this key may not use
        customer_client(stack, narrow["key"]).completions.create(model=MODEL, prompt=PROMPT, max_tokens=1)
    assert wrong.value.code == "model_not_found" and "this key may not use it" in wrong.value.message
    assert [m.id for m in customer_client(stack, narrow["key"]).models.list()] == ["qbt-dev-guard"]
    assert MODEL in [m.id for m in client.models.list()]

    # The spend, from the SQL ledger (the exporter moves rows from Redis within seconds).
    deadline = time.monotonic() + 30
    while True:
        usage = admin.get("/admin/v1/usage", params={"group_by": "model,key", "account": name}).json()["data"]
        if usage and usage[0]["requests"] == answered:
            break
        assert time.monotonic() < deadline, usage
        time.sleep(0.5)
    assert usage[0]["model"] == MODEL and usage[0]["key_id"] == made["key_id"]
    assert usage[0]["cost_usd"] == account["spent_usd"]
    recent = admin.get("/admin/v1/requests", params={"account": name}).json()["data"]
    assert len(recent) == answered and {r["status"] for r in recent} == {"ok"}
    csv = admin.get("/admin/v1/usage.csv", params={"group_by": "day", "account": name})
    assert csv.text.splitlines()[1].endswith(account["spent_usd"])


def test_rotation_and_revocation_take_effect_on_the_live_service(stack, admin):
    name = "rot-" + uuid.uuid4().hex[:8]
    admin.post("/admin/v1/accounts", json={"name": name, "credits_usd": "1"})
    made = admin.post("/admin/v1/keys", json={"account": name, "guard": "off"}).json()
    rotated = admin.post(f"/admin/v1/keys/{made['key_id']}/rotate", json={"grace_s": 600}).json()
    for key in (made["key"], rotated["key"]):  # both work during the grace
        assert customer_client(stack, key).completions.create(model=MODEL, prompt=PROMPT, max_tokens=1).usage
    admin.post(f"/admin/v1/keys/{made['key_id']}/revoke")
    for key in (made["key"], rotated["key"]):
        with pytest.raises(openai.AuthenticationError):
            customer_client(stack, key).completions.create(model=MODEL, prompt=PROMPT, max_tokens=1)
    actions = [row["action"] for row in admin.get("/admin/v1/audit").json()["data"]
               if row["target"] in (name, made["key_id"])]
    assert actions == ["key.revoke", "key.rotate", "key.create", "account.create"]


def test_no_secret_in_the_stacks_files_or_command_lines(stack, admin):
    """The OTLP headers (a vendor's API key), the dev key and the admin token: in none of the
    files the stack writes (Ray's logs included) but their own, and in no process's command line."""
    from tests.stack import OTLP_SECRET

    run = stack.run_dir
    secrets = {"otlp": OTLP_SECRET, "dev key": (run / "dev-key").read_text().strip(),
               "admin token": (run / "admin-token").read_text().strip()}
    own = {run / "dev-key", run / "admin-token"}
    for name, secret in secrets.items():
        for root in (stack.ray_tmp, run):
            for path in root.rglob("*"):
                if path.is_file() and not path.is_symlink() and path not in own and path.stat().st_size < 50_000_000:
                    assert secret.encode() not in path.read_bytes(), f"the {name} is written in {path}"
        for proc in stack.descendants():
            try:
                assert secret not in " ".join(proc.cmdline()), f"the {name} is on the command line of {proc.pid}"
            except psutil.NoSuchProcess:
                pass
    for proc in stack.descendants():
        try:
            assert "--redis-url" not in proc.cmdline(), f"a Redis URL is on the command line of {proc.pid}"
        except psutil.NoSuchProcess:
            pass
