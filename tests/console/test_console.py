"""The operator console in a real headless Chromium against `qbt admin serve`: signing in, accounts and top-ups,
a key's life (create, rotate, revoke), the spend charts, recent requests and the audit log. The tests share one
browser and one admin app and run in file order; with QBT_SCREENSHOT set, a picture of the page is taken after
them."""

from __future__ import annotations

import base64
import os
import time
import uuid
from collections import defaultdict
from decimal import Decimal
from pathlib import Path

import pytest
from selenium.common.exceptions import StaleElementReferenceException
from selenium.webdriver.common.by import By
from selenium.webdriver.support import expected_conditions as EC
from selenium.webdriver.support.ui import Select, WebDriverWait

from tests.console.conftest import MODELS

TOKEN_NAME = "console-test"
flow: dict[str, str] = {}  # what the lifecycle test created, for the screenshot


def wait(driver, condition, what: str, timeout: float = 20):
    """Waits until `condition(driver)` is truthy (a re-rendered table may swap elements under a lookup)."""

    def check(d):
        try:
            return condition(d)
        except StaleElementReferenceException:
            return False

    return WebDriverWait(driver, timeout).until(check, message=f"timed out waiting for {what}")


def settled(driver) -> None:
    wait(driver, lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-busy") == "0", "requests to end")


def css(driver, selector: str):
    return driver.find_element(By.CSS_SELECTOR, selector)


def usd(micros: int) -> str:
    """The console's money format: exact, trailing zeros trimmed to cents."""
    whole, frac = f"{Decimal(micros) / 10**6:.6f}".split(".")
    return f"${whole}.{frac.rstrip('0').ljust(2, '0')}"


def open_signed_in(driver, admin) -> None:
    driver.get("about:blank")  # a new document: a fragment-only change would not reload the page
    driver.get(f"{admin.url}/#token={admin.token}")
    wait(driver, lambda d: css(d, "#actor").text == TOKEN_NAME, "the signed-in actor")
    settled(driver)


def errors_in_console(driver) -> list[str]:
    return [e["message"] for e in driver.get_log("browser") if e["level"] == "SEVERE"]


def account_cell(driver, account: str, column: str) -> str:
    return css(driver, f'#accounts-table tr[data-account="{account}"] td.{column}').text


def test_sign_in_form_refuses_a_wrong_token_then_shows_accounts(browser, admin):
    browser.get(admin.url + "/")
    browser.execute_script("sessionStorage.clear()")
    browser.refresh()
    form = wait(browser, lambda d: css(d, "#signin-section").is_displayed() and css(d, "#token-input"), "the form")
    assert not css(browser, "#console").is_displayed()

    form.send_keys("qbta_not-a-token\n")
    wait(browser, lambda d: css(d, "#signin-error").text, "the API's error message")
    assert not css(browser, "#console").is_displayed()

    form.clear()
    form.send_keys(admin.token + "\n")
    wait(browser, lambda d: css(d, "#actor").text == TOKEN_NAME, "the signed-in actor")
    settled(browser)
    for account, credits in admin.seed.accounts.items():
        assert account_cell(browser, account, "balance") == usd(int(Decimal(credits) * 10**6))
        assert account_cell(browser, account, "available") == usd(int(Decimal(credits) * 10**6))
    # The token is kept in this tab only.
    assert browser.execute_script("return sessionStorage.getItem('qbt-admin-token')") == admin.token
    assert browser.execute_script("return localStorage.length + document.cookie.length") == 0
    assert admin.token not in browser.current_url
    errors_in_console(browser)  # drains the wrong token's 401, expected


def test_a_token_in_the_fragment_signs_in_and_leaves_the_address_bar(browser, admin):
    browser.execute_script("sessionStorage.clear()")
    open_signed_in(browser, admin)
    assert browser.current_url == admin.url + "/"
    assert browser.execute_script("return location.hash") == ""


def test_account_top_up_and_a_keys_life_are_shown_and_audited(browser, admin):
    open_signed_in(browser, admin)
    # A refusal is shown with the API's message, as text: markup in it stays inert.
    hostile = "<img src=x id=pwned>:x"
    css(browser, "#new-account-name").send_keys(hostile + "\n")
    wait(browser, lambda d: "error" in css(d, "#notice").get_attribute("class") and hostile in css(d, "#notice").text,
         "the API's refusal")
    assert browser.execute_script("return document.getElementById('pwned')") is None
    assert all("status of 400" in e for e in errors_in_console(browser))  # the refusal itself, and only it
    css(browser, "#new-account-name").clear()

    name = flow["account"] = f"flow-{uuid.uuid4().hex[:6]}"
    css(browser, "#new-account-name").send_keys(name)
    css(browser, "#new-account-credits").send_keys("10\n")
    wait(browser, lambda d: account_cell(d, name, "balance") == "$10.00", "the new account")
    assert css(browser, "#keys-account").text == name  # a new account is the selected one

    Select(css(browser, "#topup-account")).select_by_value(name)
    css(browser, "#topup-usd").send_keys("5\n")
    wait(browser, lambda d: account_cell(d, name, "balance") == "$15.00", "the topped-up balance")
    assert account_cell(browser, name, "available") == "$15.00"

    # Create: the secret is shown once, in its own box.
    css(browser, "#key-rpm").send_keys("120")
    css(browser, "#key-budget").send_keys("2")
    Select(css(browser, "#key-budget-period")).select_by_value("day")
    css(browser, "#key-models").send_keys(MODELS[0])
    css(browser, "#create-key button[type=submit]").click()
    wait(browser, lambda d: css(d, "#secret-box").is_displayed(), "the new key's secret")
    secret = css(browser, "#secret-value").get_attribute("value")
    assert secret.startswith("qbt_")
    key_id = css(browser, "#secret-key-id").text
    row = f'#keys-table tr[data-key-id="{key_id}"]'
    wait(browser, lambda d: css(d, row).get_attribute("data-state") == "active", "the new key's row")
    assert "rpm 120" in css(browser, row).text and MODELS[0] in css(browser, row).text
    css(browser, "#secret-dismiss").click()
    assert not css(browser, "#secret-box").is_displayed()
    assert css(browser, "#secret-value").get_attribute("value") == ""

    # Rotate: the same key with a new secret; the old secret keeps working through its grace period.
    grace = css(browser, f"{row} input.grace")
    grace.clear()
    grace.send_keys("600")
    css(browser, f"{row} button.rotate").click()
    wait(browser, lambda d: css(d, "#secret-box").is_displayed(), "the rotated key's secret")
    rotated = css(browser, "#secret-value").get_attribute("value")
    assert rotated.startswith("qbt_") and rotated != secret and css(browser, "#secret-key-id").text == key_id
    wait(browser, lambda d: css(d, row).get_attribute("data-state") == "grace", "the key in its grace period")
    assert "old secret until" in css(browser, f"{row} td.state").text
    css(browser, "#secret-dismiss").click()

    # Revoke, after the browser's confirmation.
    css(browser, f"{row} button.revoke").click()
    WebDriverWait(browser, 10).until(EC.alert_is_present()).accept()
    wait(browser, lambda d: css(d, row).get_attribute("data-state") == "revoked", "the revoked key")
    assert css(browser, f"{row} td.state").text == "revoked"
    assert not browser.find_elements(By.CSS_SELECTOR, f"{row} button")  # nothing left to do with it

    # The audit log has each of these, by this token.
    def audited(d):
        rows = d.find_elements(By.CSS_SELECTOR, "#audit-table tbody tr")
        mine = [(r.find_element(By.CSS_SELECTOR, "td.action").text, r.text) for r in rows if TOKEN_NAME in r.text]
        return mine if sum(name in text or key_id in text for _, text in mine) >= 5 else None

    actions = " ".join(a for a, _ in wait(browser, audited, "the audit rows of these actions"))
    for word in ("create", "top", "rotate", "revoke"):
        assert word in actions.lower(), (word, actions)
    assert not errors_in_console(browser)


def test_spend_charts_have_a_series_per_model_and_per_account(browser, admin):
    open_signed_in(browser, admin)
    totals: dict[str, dict[str, int]] = {"model": defaultdict(int), "account": defaultdict(int)}
    for row in admin.seed.rows:
        totals["model"][row["model"]] += row["cost_micros"]
        totals["account"][row["account"]] += row["cost_micros"]
    for chart, field in (("spend-by-model", "model"), ("spend-by-account", "account")):
        paths = wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, f"svg#{chart} path[data-series]"),
                     f"the series of {chart}")
        series = {p.get_attribute("data-series"): p for p in paths}
        assert set(series) == set(totals[field]) and len(paths) == len(series)
        for name, path in series.items():
            box = browser.execute_script("const b = arguments[0].getBBox(); return [b.width, b.height]", path)
            assert box[0] > 0 and box[1] > 0, (chart, name, box)  # spans the days, and rises above zero
        legend = {li.get_attribute("data-series"): li.text
                  for li in browser.find_elements(By.CSS_SELECTOR, f"#{chart}-legend li")}
        assert legend.keys() == series.keys()
        for name, micros in totals[field].items():
            assert legend[name].endswith(usd(micros)), (chart, legend[name], usd(micros))
        labels = [t.text for t in browser.find_elements(By.CSS_SELECTOR, f"svg#{chart} text")]
        assert "day (UTC)" in labels and "USD" in labels and sum(t.startswith("$") for t in labels) >= 2
    assert "/admin/v1/usage.csv?" in css(browser, "#csv-download").get_attribute("href")
    assert not errors_in_console(browser)


def test_the_csv_link_downloads_with_the_token(browser, admin, downloads):
    open_signed_in(browser, admin)
    css(browser, "#csv-download").click()
    deadline = time.monotonic() + 20
    while not (files := [f for f in downloads.iterdir() if f.suffix == ".csv"]) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert files, "no CSV was downloaded"
    text = files[0].read_text()
    assert all(model in text for model in MODELS) and all(a in text for a in admin.seed.accounts)


def test_recent_requests_are_newest_first_with_their_status(browser, admin):
    open_signed_in(browser, admin)
    seeded = {row["request_id"]: row for row in admin.seed.rows}

    def shown(d):
        rows = d.find_elements(By.CSS_SELECTOR, "#requests-table tbody tr")
        return [(r.get_attribute("data-request-id"), r.find_element(By.CSS_SELECTOR, "td.status").text,
                 r.find_elements(By.TAG_NAME, "td")[2].text) for r in rows]

    rows = [r for r in wait(browser, shown, "recent requests") if r[0] in seeded]
    assert [r[0] for r in rows] == [row["request_id"] for row in reversed(admin.seed.rows)]
    assert all(status == seeded[rid]["status"] for rid, status, _ in rows)
    assert {status for _, status, _ in rows} == {"ok", "disconnected", "upstream_error", "timed_out"}

    account = sorted(admin.seed.accounts)[1]
    Select(css(browser, "#requests-account")).select_by_value(account)
    wait(browser, lambda d: {a for _, _, a in shown(d)} == {account}, "the requests of one account")
    assert not errors_in_console(browser)


@pytest.fixture(scope="module", autouse=True)
def screenshot(browser, admin):
    """The README's picture of the console, when QBT_SCREENSHOT names a file: taken after the tests, with the
    lifecycle test's account selected (a key in its grace period, a revoked one)."""
    yield
    path = os.environ.get("QBT_SCREENSHOT")
    if not path:
        return
    account = flow.get("account") or sorted(admin.seed.accounts)[0]
    with admin.api() as api:  # beside the revoked key: one with limits, in its grace period after a rotation
        key = api.post("/admin/v1/keys", json={"account": account, "rpm": 600, "tpm": 200000, "concurrency": 8,
                                                "budget_usd": "50", "budget_period": "month"}).json()
        api.post(f"/admin/v1/keys/{key['key_id']}/rotate", json={"grace_s": 3600}).raise_for_status()
    open_signed_in(browser, admin)
    css(browser, f'#accounts-table tr[data-account="{account}"] button.select').click()
    wait(browser, lambda d: css(d, "#keys-account").text == account, "the selected account")
    settled(browser)
    height = browser.execute_script("return document.documentElement.scrollHeight")
    shot = browser.execute_cdp_cmd("Page.captureScreenshot", {  # the whole page, not just the window
        "format": "png", "captureBeyondViewport": True, "clip": {"x": 0, "y": 0, "width": 1400, "height": height,
                                                                 "scale": 1}})
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_bytes(base64.b64decode(shot["data"]))
