// The operator console. Plain DOM, no libraries. Data only ever reaches the page as text (textContent, attributes),
// never as HTML. The admin token lives in sessionStorage: this tab only, never in a URL, a cookie or localStorage.
"use strict";

const TOKEN = "qbt-admin-token";
const DAYS = 30;
const $ = (id) => document.getElementById(id);
const state = { accounts: [], selected: null };

// --- small helpers ---

function el(tag, props, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(props || {})) {
    if (k === "class") node.className = v;
    else if (k.startsWith("data-")) node.setAttribute(k, v);
    else node[k] = v;
  }
  for (const c of children) node.append(c instanceof Node ? c : String(c ?? ""));
  return node;
}

// Money arrives as exact decimal strings: shown without float rounding, trailing zeros trimmed to cents.
function usd(value) {
  if (value === null || value === undefined) return "—";
  let [whole, frac = ""] = String(value).split(".");
  frac = frac.replace(/0+$/, "").padEnd(2, "0");
  return "$" + whole + "." + frac;
}

function when(iso) {
  if (!iso) return "—";
  const t = new Date(iso);
  return isNaN(t) ? String(iso) : t.toISOString().slice(0, 16).replace("T", " ") + "Z";
}

// crypto.randomUUID needs a secure context; an admin app on plain HTTP off localhost still gets a v4 UUID.
function uuid() {
  if (crypto.randomUUID) return crypto.randomUUID();
  const b = crypto.getRandomValues(new Uint8Array(16));
  b[6] = (b[6] & 0x0f) | 0x40;
  b[8] = (b[8] & 0x3f) | 0x80;
  const h = [...b].map((x) => x.toString(16).padStart(2, "0")).join("");
  return `${h.slice(0, 8)}-${h.slice(8, 12)}-${h.slice(12, 16)}-${h.slice(16, 20)}-${h.slice(20)}`;
}

function notify(message, isError) {
  const box = $("notice");
  box.textContent = message;
  box.classList.toggle("error", !!isError);
  box.hidden = !message;
}

// A failed call's message for the operator; a 401 has already sent them back to the sign-in form, which says why.
function fail(e) {
  if (!(e instanceof ApiError && e.status === 401)) notify(e.message, true);
}

// --- the API ---

class ApiError extends Error {
  constructor(status, message) { super(message); this.status = status; }
}

// `body.dataset.busy` counts requests in flight, so a test (or a person) can tell when the page has settled.
async function request(method, path, body, headers) {
  const busy = document.body.dataset;
  busy.busy = Number(busy.busy) + 1;
  try {
    const init = { method, headers: { Authorization: "Bearer " + sessionStorage.getItem(TOKEN), ...headers } };
    if (body !== undefined) {
      init.headers["Content-Type"] = "application/json";
      init.body = JSON.stringify(body);
    }
    const response = await fetch(path, init);
    if (response.ok) return response;
    let message = `${response.status} ${response.statusText}`;
    try { message = (await response.json()).error.message || message; } catch (_) { /* not the error shape */ }
    if (response.status === 401) signOut(message);
    throw new ApiError(response.status, message);
  } finally {
    busy.busy = Number(busy.busy) - 1;
  }
}

const api = async (method, path, body, headers) => (await request(method, path, body, headers)).json();

// Runs an operator action: its error is shown, then whatever changed is reloaded.
async function act(action, ...reloads) {
  try {
    notify("");
    await action();
  } catch (e) {
    fail(e);
  }
  await Promise.all([...reloads, loadAudit].map((f) => f()));
}

// --- signing in ---

function signOut(message) {
  sessionStorage.removeItem(TOKEN);
  hideSecret();
  notify("");
  for (const body of document.querySelectorAll("main tbody")) body.replaceChildren();  // nothing left behind
  $("console").hidden = true;
  $("who").hidden = true;
  $("signin-section").hidden = false;
  $("signin-error").textContent = message || "";
  $("token-input").focus();
}

async function signIn(token) {
  sessionStorage.setItem(TOKEN, token.trim());
  try {
    const me = await api("GET", "/admin/v1/me");
    $("actor").textContent = me.actor;
  } catch (e) {
    signOut(e.message);
    return;
  }
  $("signin-section").hidden = true;
  $("who").hidden = false;
  $("console").hidden = false;
  $("signin-error").textContent = "";
  await loadAll();
}

async function loadAll() {
  notify("");
  await Promise.all([loadAccounts().then(loadKeys), loadSpend(), loadRequests(), loadAudit()]);
}

// --- accounts ---

async function loadAccounts() {
  try {
    state.accounts = (await api("GET", "/admin/v1/accounts")).data;
  } catch (e) {
    return fail(e);
  }
  const names = state.accounts.map((a) => a.account);
  if (!names.includes(state.selected)) state.selected = names[0] ?? null;
  $("accounts-table").tBodies[0].replaceChildren(...state.accounts.map((a) => el("tr",
    { "data-account": a.account, class: a.account === state.selected ? "selected" : "" },
    el("td", {}, el("button", { type: "button", class: "link select", title: "show this account's keys",
      onclick: () => selectAccount(a.account) }, a.account)),
    el("td", { class: "num balance" }, usd(a.balance_usd)),
    el("td", { class: "num reserved" }, usd(a.reserved_usd)),
    el("td", { class: "num available" }, usd(a.available_usd)),
    el("td", { class: "num spent" }, usd(a.spent_usd)),
    el("td", { class: "num" }, a.requests),
    el("td", { class: "num" }, `${a.prompt_tokens} / ${a.completion_tokens}`),
    el("td", { class: "num" }, a.keys))));
  for (const id of ["topup-account", "requests-account"]) {
    const select = $(id), keep = select.value;
    const options = names.map((n) => el("option", { value: n }, n));
    if (id === "requests-account") options.unshift(el("option", { value: "" }, "all accounts"));
    select.replaceChildren(...options);
    select.value = names.includes(keep) || keep === "" ? keep : (state.selected ?? "");
  }
}

function selectAccount(name) {
  state.selected = name;
  $("topup-account").value = name;
  for (const row of $("accounts-table").tBodies[0].rows) {
    row.classList.toggle("selected", row.dataset.account === name);
  }
  loadKeys();
}

async function createAccount(event) {
  event.preventDefault();
  const name = $("new-account-name").value.trim();
  const credits = $("new-account-credits").value.trim() || "0";
  await act(async () => {
    await api("POST", "/admin/v1/accounts", { name, credits_usd: credits });
    state.selected = name;
    $("new-account-name").value = $("new-account-credits").value = "";
    notify(`Account ${name} created with ${usd(credits)}.`);
  }, () => loadAccounts().then(loadKeys));
}

async function topUp(event) {
  event.preventDefault();
  const name = $("topup-account").value, amount = $("topup-usd").value.trim();
  // One key per click: a retried click is a new top-up, a retried request (same key) is not.
  await act(async () => {
    const a = await api("POST", `/admin/v1/accounts/${encodeURIComponent(name)}/topup`, { usd: amount },
      { "Idempotency-Key": uuid() });
    $("topup-usd").value = "";
    notify(`Added ${usd(amount)} to ${name}: balance ${usd(a.balance_usd)}.`);
  }, loadAccounts);
}

// --- keys ---

// A rotation keeps the key (its id, limits and budget) with a new secret; `grace_until` is when the replaced
// secret stops working.
function keyState(k) {
  const now = Date.now();
  if (k.revoked) return ["revoked", "revoked"];
  if (k.expires_at && Date.parse(k.expires_at) <= now) return ["expired", "expired"];
  if (k.grace_until && Date.parse(k.grace_until) > now) return ["grace", `grace: old secret until ${when(k.grace_until)}`];
  return ["active", "active"];
}

function keyRow(k) {
  const [kind, label] = keyState(k);
  const limits = [["rpm", k.rpm], ["tpm", k.tpm], ["conc", k.concurrency]].filter(([, v]) => v != null)
    .map(([n, v]) => `${n} ${v}`).join(" · ");
  const budget = k.budget_usd == null ? "—"
    : `${usd(k.budget_usd)} / ${k.budget_period || "total"} (spent ${usd(k.budget_spent_usd ?? "0")})`;
  const grace = el("input", { type: "number", min: "0", value: "3600", class: "grace", title: "grace seconds" });
  const actions = el("td", { class: "actions" });
  if (kind === "active" || kind === "grace") {
    actions.append(grace, " s ",
      el("button", { type: "button", class: "rotate", onclick: () => rotateKey(k, grace.value) }, "Rotate"), " ");
  }
  if (!k.revoked) {
    actions.append(el("button", { type: "button", class: "revoke danger", onclick: () => revokeKey(k) }, "Revoke"));
  }
  return el("tr", { "data-key-id": k.key_id, "data-state": kind, class: kind },
    el("td", {}, el("code", {}, k.key_id)),
    el("td", { class: "state" }, el("span", { class: "badge " + kind }, label)),
    el("td", {}, limits || "—"),
    el("td", {}, budget),
    el("td", {}, k.models ? k.models.join(", ") : "all"),
    el("td", { class: "when" }, when(k.expires_at)),
    el("td", { class: "when" }, when(k.created_at)),
    actions);
}

async function loadKeys() {
  $("keys-account").textContent = state.selected ?? "—";
  $("create-key").hidden = !state.selected;
  const body = $("keys-table").tBodies[0];
  if (!state.selected) return body.replaceChildren();
  try {
    const keys = (await api("GET", "/admin/v1/keys?account=" + encodeURIComponent(state.selected))).data;
    keys.sort((a, b) => (a.revoked - b.revoked) || String(b.created_at).localeCompare(String(a.created_at)));
    body.replaceChildren(...keys.map(keyRow));
  } catch (e) {
    fail(e);
  }
}

function showSecret(created) {
  $("secret-account").textContent = created.account;
  $("secret-key-id").textContent = created.key_id;
  $("secret-value").value = created.key;
  $("secret-box").hidden = false;
  $("secret-value").select();
}

function hideSecret() {
  $("secret-value").value = "";  // the secret leaves the page, not just the view
  $("secret-box").hidden = true;
}

async function copySecret() {
  const input = $("secret-value");
  try {
    await navigator.clipboard.writeText(input.value);  // secure contexts only
  } catch (_) {
    input.select();
    document.execCommand("copy");
  }
  $("secret-copy").textContent = "Copied";
  setTimeout(() => { $("secret-copy").textContent = "Copy"; }, 1500);
}

async function createKey(event) {
  event.preventDefault();
  const body = { account: state.selected };
  for (const [field, id] of [["rpm", "key-rpm"], ["tpm", "key-tpm"], ["concurrency", "key-concurrency"]]) {
    if ($(id).value) body[field] = Number($(id).value);
  }
  if ($("key-expires").value) body.expires_at = new Date($("key-expires").value).toISOString();
  if ($("key-budget").value.trim()) body.budget_usd = $("key-budget").value.trim();
  if ($("key-budget-period").value) body.budget_period = $("key-budget-period").value;
  const models = $("key-models").value.split(",").map((m) => m.trim()).filter(Boolean);
  if (models.length) body.models = models;
  await act(async () => {
    showSecret(await api("POST", "/admin/v1/keys", body));
    $("create-key").reset();
  }, loadKeys, loadAccounts);
}

async function rotateKey(k, graceSeconds) {
  await act(async () => {
    const created = await api("POST", `/admin/v1/keys/${encodeURIComponent(k.key_id)}/rotate`,
      { grace_s: Number(graceSeconds) });
    showSecret(created);
    notify(`Key ${k.key_id} has a new secret; the old one keeps working for ${Number(graceSeconds)} s.`);
  }, loadKeys, loadAccounts);
}

async function revokeKey(k) {
  if (!confirm(`Revoke key ${k.key_id} of ${k.account}? Requests with it are refused at once.`)) return;
  await act(async () => {
    await api("POST", `/admin/v1/keys/${encodeURIComponent(k.key_id)}/revoke`);
    notify(`Key ${k.key_id} revoked.`);
  }, loadKeys, loadAccounts);
}

// --- spend charts ---

function spendWindow() {
  const today = new Date();
  today.setUTCHours(0, 0, 0, 0);
  const since = new Date(today.getTime() - (DAYS - 1) * 86400e3);
  const days = Array.from({ length: DAYS }, (_, i) => new Date(since.getTime() + i * 86400e3).toISOString().slice(0, 10));
  return { days, since: since.toISOString(), until: new Date(today.getTime() + 86400e3).toISOString() };
}

async function loadSpend() {
  const w = spendWindow();
  const query = (groups) => `group_by=${groups}&since=${encodeURIComponent(w.since)}&until=${encodeURIComponent(w.until)}`;
  $("csv-download").href = "/admin/v1/usage.csv?" + query("day,account,model");
  try {
    const [byModel, byAccount] = await Promise.all(["day,model", "day,account"].map(
      (g) => api("GET", "/admin/v1/usage?" + query(g))));
    drawChart($("spend-by-model"), $("spend-by-model-legend"), w.days, byModel.data, "model");
    drawChart($("spend-by-account"), $("spend-by-account-legend"), w.days, byAccount.data, "account");
  } catch (e) {
    fail(e);
  }
}

// The CSV needs the Authorization header, which a plain link cannot send: fetched, then saved from a blob.
async function downloadCsv(event) {
  event.preventDefault();
  try {
    const blob = await (await request("GET", $("csv-download").getAttribute("href"))).blob();
    const link = el("a", { href: URL.createObjectURL(blob), download: `usage-${spendWindow().days[DAYS - 1]}.csv` });
    document.body.append(link);
    link.click();
    link.remove();
    setTimeout(() => URL.revokeObjectURL(link.href), 10e3);
  } catch (e) {
    fail(e);
  }
}

// --- recent requests and the audit log ---

async function loadRequests() {
  const account = $("requests-account").value;
  const query = "limit=50" + (account ? "&account=" + encodeURIComponent(account) : "");
  try {
    const rows = (await api("GET", "/admin/v1/requests?" + query)).data;
    $("requests-table").tBodies[0].replaceChildren(...rows.map((r) => el("tr", { "data-request-id": r.request_id },
      el("td", { class: "when" }, when(r.settled_at)),
      el("td", {}, el("code", {}, r.request_id)),
      el("td", {}, r.account),
      el("td", {}, el("code", {}, r.key_id)),
      el("td", {}, r.model),
      el("td", { class: "num" }, `${r.prompt_tokens} / ${r.completion_tokens}`),
      el("td", { class: "num" }, usd(r.cost_usd)),
      el("td", { class: "status" }, el("span", { class: "badge status-" + r.status }, r.status)))));
  } catch (e) {
    fail(e);
  }
}

// The audit row keeps whole snapshots; the operator wants what changed: the differing fields, or the new record's.
function change(before, after) {
  const show = (v) => (v == null ? "∅" : typeof v === "string" ? v : JSON.stringify(v));
  const isRecord = (v) => v !== null && typeof v === "object" && !Array.isArray(v);
  if (!isRecord(before) || !isRecord(after)) {
    if (isRecord(after)) return Object.entries(after).map(([k, v]) => `${k}=${show(v)}`).join(", ");
    return before == null && after == null ? "" : `${show(before)} → ${show(after)}`;
  }
  return [...new Set([...Object.keys(before), ...Object.keys(after)])]
    .filter((k) => show(before[k]) !== show(after[k]))
    .map((k) => `${k}: ${show(before[k])} → ${show(after[k])}`).join(", ");
}

async function loadAudit() {
  try {
    const rows = (await api("GET", "/admin/v1/audit?limit=50")).data;
    $("audit-table").tBodies[0].replaceChildren(...rows.map((a) => el("tr", { "data-action": a.action },
      el("td", { class: "when" }, when(a.at)),
      el("td", {}, a.actor),
      el("td", { class: "action" }, a.action),
      el("td", { class: "target" }, a.target ?? ""),
      el("td", { class: "change", title: JSON.stringify({ before: a.before, after: a.after }) },
        change(a.before, a.after)),
      el("td", {}, el("code", {}, a.request_id ?? "")))));
  } catch (e) {
    fail(e);
  }
}

// --- wiring ---

document.addEventListener("DOMContentLoaded", () => {
  $("signin").addEventListener("submit", (e) => { e.preventDefault(); signIn($("token-input").value); });
  $("signout").addEventListener("click", () => signOut(""));
  $("refresh").addEventListener("click", loadAll);
  $("create-account").addEventListener("submit", createAccount);
  $("topup").addEventListener("submit", topUp);
  $("topup-account").addEventListener("change", (e) => selectAccount(e.target.value));
  $("create-key").addEventListener("submit", createKey);
  $("secret-copy").addEventListener("click", copySecret);
  $("secret-dismiss").addEventListener("click", hideSecret);
  $("csv-download").addEventListener("click", downloadCsv);
  $("requests-account").addEventListener("change", loadRequests);

  // A launcher or a test may open the page signed in with #token=…; the fragment never reaches a server, and
  // is removed from the address bar (and so from the history) at once.
  const fromUrl = new URLSearchParams(location.hash.slice(1)).get("token");
  if (fromUrl) {
    history.replaceState(null, "", location.pathname + location.search);
    sessionStorage.setItem(TOKEN, fromUrl);
  }
  const token = sessionStorage.getItem(TOKEN);
  if (token) signIn(token);
  else signOut("");
});
