"""The console tier's stack: `qbt admin serve` on a real Redis and a temporary SQLite ledger, an admin token, seed
data (accounts and keys through the API, settled requests straight into the ledger as the exporter writes them),
and a headless Chromium driven by Selenium."""

from __future__ import annotations

import subprocess
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from tests.support import BIN, ROOT, free_port

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
MODELS = ("qbt-dev-llm", "qbt-dev-chat")
STATUSES = ("ok", "disconnected", "ok", "upstream_error", "ok", "timed_out")  # cycled over the seeded rows
DAYS = 6  # seeded rows span today and the 5 days before


def admin_command(redis_url: str, port: int, database: str) -> list[str]:
    return [str(BIN / "qbt"), "--redis-url", redis_url, "admin", "serve", "--host", "127.0.0.1", "--port", str(port),
            "--database", database]


def create_token(redis_url: str, name: str) -> str:
    out = subprocess.run([str(BIN / "qbt"), "--redis-url", redis_url, "admin", "tokens", "create", "--name", name],
                         cwd=ROOT, capture_output=True, text=True, timeout=60, check=True)
    return out.stdout.strip().splitlines()[-1].strip()


@dataclass
class Seed:
    """What the tests can expect to find: account names, their balances, the ledger rows (newest last)."""

    accounts: dict[str, str] = field(default_factory=dict)  # name -> credits_usd
    keys: dict[str, str] = field(default_factory=dict)  # account -> a key_id
    rows: list[dict] = field(default_factory=list)


@dataclass
class Admin:
    url: str
    token: str
    database: str
    seed: Seed

    def api(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, headers={"Authorization": f"Bearer {self.token}"}, timeout=30)


def _wait_ready(url: str, proc: subprocess.Popen, log: Path, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"qbt admin serve exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(url + "/", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    pytest.fail(f"qbt admin serve did not answer GET / within {timeout:.0f} s:\n{log.read_text()[-3000:]}")


def _seed(admin: Admin) -> None:
    """Two accounts with a key each, then settled requests for both, on both models, over several days."""
    from serve_app.ledger.database import Database, LedgerConfig, parse_entry

    tag = uuid.uuid4().hex[:6]  # the Redis server is shared by the session: names unique to this run
    seed = admin.seed
    with admin.api() as api:
        for name, credits in ((f"acme-{tag}", "25"), (f"globex-{tag}", "7.5")):
            api.post("/admin/v1/accounts", json={"name": name, "credits_usd": credits}).raise_for_status()
            seed.accounts[name] = credits
            key = api.post("/admin/v1/keys", json={"account": name, "rpm": 60, "budget_usd": "5",
                                                     "budget_period": "month"})
            key.raise_for_status()
            seed.keys[name] = key.json()["key_id"]
    now = int(time.time() * 1000)
    entries = []
    for n, (day, account, model) in enumerate((d, a, m) for d in reversed(range(DAYS)) for a in seed.accounts
                                              for m in MODELS):
        status = STATUSES[n % len(STATUSES)]
        settled = now - day * 86_400_000 - (DAYS * 4 - n) * 1000  # strictly increasing, all in the past
        cost = (40_000 + 9_000 * n) * (status in ("ok", "disconnected", "timed_out"))  # errors pay nothing
        fields = {"request_id": f"req-{tag}-{n:02d}", "completion_id": f"cmpl-{tag}-{n:02d}", "account": account,
                  "key_id": seed.keys[account], "model": model, "prompt_tokens": 10 + n, "completion_tokens": 5 + n,
                  "cost_micros": cost, "status": status, "created_ms": settled - 800, "settled_ms": settled}
        entries.append(parse_entry(f"{settled}-0", {k: str(v) for k, v in fields.items()}))
        seed.rows.append(fields)
    db = Database.open(LedgerConfig(database=admin.database))
    try:
        assert db.insert(entries) == len(entries)
    finally:
        db.close()


@pytest.fixture(scope="module")
def admin(redis_server, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("console")
    port, log = free_port(), tmp / "admin.log"
    database = "sqlite:///" + str(tmp / "ledger.sqlite3")  # an absolute path: sqlite:////tmp/...
    with log.open("w") as out:
        proc = subprocess.Popen(admin_command(redis_server.url, port, database), cwd=ROOT, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
    try:
        url = f"http://127.0.0.1:{port}"
        _wait_ready(url, proc, log)
        admin = Admin(url, create_token(redis_server.url, "console-test"), database, Seed())
        _seed(admin)
        yield admin
    finally:
        proc.terminate()  # by its pid only
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


@pytest.fixture(scope="module")
def downloads(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("downloads")


@pytest.fixture(scope="module")
def browser(downloads):
    if not (CHROMIUM.exists() and CHROMEDRIVER.exists()):
        pytest.fail(f"{CHROMIUM} or {CHROMEDRIVER} is missing: run `bash .ci/servers chromium`")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,1000",
                "--force-device-scale-factor=1", "--lang=en-US"):
        options.add_argument(arg)
    options.add_experimental_option("prefs", {"download.default_directory": str(downloads),
                                              "download.prompt_for_download": False})
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})  # console errors, CSP violations
    # An explicit chromedriver: Selenium Manager never looks for (or downloads) one.
    driver = webdriver.Chrome(service=Service(executable_path=str(CHROMEDRIVER)), options=options)
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()
