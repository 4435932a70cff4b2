"""`qbt`: run the service, build dev models, manage accounts, keys and usage."""

from __future__ import annotations

import argparse
import json
import os
import sys
from datetime import datetime
from pathlib import Path

from serve_app.config.paths import ROOT
from serve_app.money import keyspace
from serve_app.safety.policy import GuardMode


def _redis(args):
    return keyspace.sync_client(args.redis_url)


def _print(data, as_json: bool) -> None:
    if as_json:
        print(json.dumps(data))
    else:
        for k, v in data.items():
            print(f"{k}: {v}")


def cmd_serve(args) -> int:
    from serve_app.ops.launcher import serve_forever

    return serve_forever(Path(args.config), args.port, args.redis_url, Path(args.run_dir), args.num_cpus,
                         args.startup_timeout, args.admin_port)


def cmd_config(args) -> int:
    from serve_app.config import artefacts, catalog as catalogs

    catalog = catalogs.load()
    for name in args.profile:
        for path, text in artefacts.build(name, catalog).items():
            if args.check:
                if not path.exists() or path.read_text() != text:
                    print(f"{path.relative_to(ROOT)} is out of date: run `qbt config build --profile {name}`",
                          file=sys.stderr)
                    return 1
            else:
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(text)
                print(f"wrote {path.relative_to(ROOT)}")
    return 0


def cmd_sizing(args) -> int:
    from serve_app.config import catalog as catalogs, sizing

    catalog = catalogs.load()
    print(sizing.table(catalog.models, catalog.memory_gib()))
    return 0


def cmd_dev_models(args) -> int:
    from serve_app.ops.dev_models import ensure_built

    for model_id, path in ensure_built(log=lambda m: print(m, file=sys.stderr, flush=True)).items():
        print(f"{model_id} {path}")
    return 0


def cmd_accounts(args) -> int:
    from serve_app.money import accounts

    r = _redis(args)
    if args.action == "create":
        _print(accounts.create_account(r, args.name, args.credits, _change()), args.json)
    elif args.action == "topup":
        _print(accounts.topup(r, args.name, args.usd, args.idempotency_key, _change()), args.json)
    elif args.action == "list":
        for a in accounts.list_accounts(r):
            print(json.dumps(a))
    else:
        _print(accounts.show_account(r, args.name), args.json)
    return 0


def _change():
    import getpass

    from serve_app.money.accounts import Change

    return Change(actor=f"cli:{getpass.getuser()}")


def cmd_keys(args) -> int:
    from serve_app.money import accounts, keyring

    r = _redis(args)
    if args.action == "create":
        if not r.exists(keyspace.account_record(args.account)):
            accounts.create_account(r, args.account, "0", _change())
            print(f"created account {args.account} with no credit (top it up: qbt accounts topup "
                  f"{args.account} USD)")
        spec = {name: getattr(args, name) for name in ("rpm", "tpm", "concurrency", "guard", "expires_in_s",
                                                       "budget_usd", "budget_period") if getattr(args, name)}
        if args.models:
            spec["models"] = args.models.split(",")
        key, kid = keyring.create_key(r, args.account, _change(), safety_models=args.safety_models, **spec)
        print(f"key id {kid} for account {args.account}; the key is shown once:")
        print(key)
    elif args.action == "revoke":
        print(f"revoked {keyring.revoke_key(r, args.key, _change())}")
    elif args.action == "rotate":
        key, view = keyring.rotate_key(r, args.key, args.grace_s, _change())
        print(f"rotated {view['key_id']}; the old secret works until {view['grace_until']}; the new key is shown "
              "once:")
        print(key)
    else:
        for k in keyring.list_keys(r, args.account):
            print(json.dumps(k))
    return 0


def cmd_admin(args) -> int:
    from serve_app.admin import tokens

    r = _redis(args)
    if args.action == "serve":
        from serve_app.ops.admin_server import serve_admin

        return serve_admin(r, _ledger_config(args), args.host, args.port)
    if args.token_action == "create":
        token = tokens.create(r, args.name, _change())
        print(f"admin token for {args.name}; shown once:")
        print(token)
    elif args.token_action == "revoke":
        print(f"revoked {tokens.revoke(r, args.name, _change())} admin token(s) named {args.name}")
    else:
        for t in tokens.names(r):
            print(json.dumps(t))
    return 0


def cmd_audit(args) -> int:
    from serve_app.admin import audit

    for row in audit.recent(_redis(args), args.limit):
        print(json.dumps(row))
    return 0


def _ledger_config(args):
    from serve_app.ledger.database import LedgerConfig
    from serve_app.ops.launcher import ledger_database

    return LedgerConfig(database=args.database or ledger_database(Path(args.run_dir)),
                        password_file=args.password_file)


def cmd_usage(args) -> int:
    """From the SQL ledger (the system of record; the exporter moves rows there from Redis within seconds)."""
    from serve_app.ledger import reports
    from serve_app.ledger.database import Database

    since_ms = int(datetime.fromisoformat(args.since).timestamp() * 1000) if args.since else None
    database = Database.open(_ledger_config(args))
    try:
        if args.group_by or args.csv:
            rows = reports.usage(database, reports.GroupBy.parse(args.group_by), since_ms, None, args.account)
            if args.csv:
                sys.stdout.write(reports.usage_csv(rows))
            else:
                for row in rows:
                    print(json.dumps(row))
            return 0
        if not args.account:
            raise ValueError("--account is required without --group-by or --csv")
        rows = database.rows(args.account, since_ms)
    finally:
        database.close()
    for row in rows:
        if args.json:
            print(json.dumps(row))
        else:
            print(f"{row['settled_at']} {row['request_id']} {row['model']} {row['prompt_tokens']}+"
                  f"{row['completion_tokens']} tokens ${row['cost_usd']} {row['status']}")
    return 0


def _ledger_args(p) -> None:
    p.add_argument("--run-dir", default=str(ROOT / ".run"), help="the local ledger of `qbt serve --run-dir`")
    p.add_argument("--database", default=None, help="a ledger database URL (sqlite:///... or postgresql://...)")
    p.add_argument("--password-file", type=Path, default=None, help="PostgreSQL's password, from a file")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="qbt", description=__doc__)
    p.add_argument("--redis-url", default=None, help="default: $REDIS_URL or " + keyspace.DEFAULT_REDIS_URL)
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("serve", help="run the whole stack locally until Ctrl-C")
    s.add_argument("--config", default=str(ROOT / "cluster" / "serve-local.yaml"))
    s.add_argument("--port", type=int, default=None)
    s.add_argument("--run-dir", default=str(ROOT / ".run"))
    s.add_argument("--num-cpus", type=int, default=8, help="logical CPUs declared to Ray")
    s.add_argument("--startup-timeout", type=float, default=600)
    s.add_argument("--admin-port", type=int, default=8101, help="the admin API and console, on 127.0.0.1 (0: off)")
    s.set_defaults(func=cmd_serve)

    cfg = sub.add_parser("config").add_subparsers(dest="action", required=True)
    cb = cfg.add_parser("build", help="render cluster/serve-<profile>.yaml (and the RayService for prod)")
    cb.add_argument("--profile", action="append", choices=["local", "multinode", "sim", "prod"], required=True)
    cb.add_argument("--check", action="store_true", help="fail if a checked-in artefact differs")
    cb.set_defaults(func=cmd_config)
    cfg.add_parser("sizing", help="the sizing table of the catalog").set_defaults(func=cmd_sizing)

    sub.add_parser("dev-models", help="build missing dev models; prints '<model-id> <dir>'").set_defaults(
        func=cmd_dev_models)

    a = sub.add_parser("accounts").add_subparsers(dest="action", required=True)
    c = a.add_parser("create")
    c.add_argument("name")
    c.add_argument("--credits", default="0", help="USD")
    t = a.add_parser("topup")
    t.add_argument("name")
    t.add_argument("usd")
    t.add_argument("--idempotency-key", default=None, help="a retry with the same key credits once (kept 7 days)")
    sh = a.add_parser("show")
    sh.add_argument("name")
    for x in (c, t, sh):
        x.add_argument("--json", action="store_true")
        x.set_defaults(func=cmd_accounts)
    a.add_parser("list", help="every account, one JSON line each").set_defaults(func=cmd_accounts, json=True)

    k = sub.add_parser("keys").add_subparsers(dest="action", required=True)
    kc = k.add_parser("create")
    kc.add_argument("--account", default="default")
    kc.add_argument("--rpm", type=int, default=None, help="requests per minute, positive (default: the service's)")
    kc.add_argument("--tpm", type=int, default=None, help="tokens per minute, positive (default: the service's)")
    kc.add_argument("--concurrency", type=int, default=None, help="requests in flight at once, positive")
    kc.add_argument("--safety-models", action="store_true", help="may call the guard models directly")
    kc.add_argument("--guard", default=None, help=f"{'|'.join(m.value for m in GuardMode)}, optionally "
                    "',loose' (Controversial passes) and ',open' (traffic passes when the guard is down); default: "
                    "the config's")
    kc.add_argument("--expires-in-s", type=int, default=None, help="the key stops working after this many seconds")
    kc.add_argument("--budget-usd", default=None, help="the most the key may spend per --budget-period")
    kc.add_argument("--budget-period", default=None, choices=["day", "week", "month", "total"],
                    help="when the budget starts again (UTC; default month)")
    kc.add_argument("--models", default=None, help="comma-separated model ids the key may call (default: all)")
    kr = k.add_parser("revoke")
    kr.add_argument("key", help="the key, or its id (key_...) as `qbt keys list` shows it")
    ko = k.add_parser("rotate", help="a new secret; the old one works for --grace-s more seconds")
    ko.add_argument("key", help="the key, or its id (key_...)")
    ko.add_argument("--grace-s", type=int, default=3600)
    kl = k.add_parser("list")
    kl.add_argument("--account", default=None, help="default: every account")
    for x in (kc, kr, ko, kl):
        x.set_defaults(func=cmd_keys)

    u = sub.add_parser("usage", help="ledger rows or spend per day/model/account/key, from the SQL ledger")
    u.add_argument("--account", default=None)
    _ledger_args(u)
    u.add_argument("--since", default=None, help="ISO 8601")
    u.add_argument("--group-by", default=None, help="comma-separated: day, model, account, key")
    u.add_argument("--csv", action="store_true", help="the grouped spend as CSV, for invoicing")
    u.add_argument("--json", action="store_true")
    u.set_defaults(func=cmd_usage)

    ad = sub.add_parser("admin", help="the admin API and console, and its tokens").add_subparsers(
        dest="action", required=True)
    asv = ad.add_parser("serve", help="run the admin API and console (loopback by default)")
    asv.add_argument("--host", default="127.0.0.1")
    asv.add_argument("--port", type=int, default=8101)
    _ledger_args(asv)
    asv.set_defaults(func=cmd_admin)
    at = ad.add_parser("tokens").add_subparsers(dest="token_action", required=True)
    atc = at.add_parser("create")
    atc.add_argument("--name", required=True, help="who holds it: the actor of its audit rows")
    atr = at.add_parser("revoke")
    atr.add_argument("--name", required=True)
    for x in (atc, atr, at.add_parser("list")):
        x.set_defaults(func=cmd_admin)

    au = sub.add_parser("audit", help="the latest operator changes, newest first")
    au.add_argument("--limit", type=int, default=50)
    au.set_defaults(func=cmd_audit)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    own = ROOT / ".run" / "redis" / "password"  # `make serve`'s Redis, when no other is named
    if not (args.redis_url or os.environ.get("REDIS_URL") or os.environ.get("REDIS_PASSWORD_FILE")) and own.exists():
        os.environ["REDIS_PASSWORD_FILE"] = str(own)
    try:
        return args.func(args) or 0
    except Exception as exc:
        from serve_app.money.accounts import AccountError

        if isinstance(exc, (AccountError, ValueError)):
            print(f"qbt: {exc}", file=sys.stderr)
            return 2
        if type(exc).__module__.startswith("redis"):
            url = keyspace.shown(keyspace.redis_url(args.redis_url))
            print(f"qbt: Redis at {url} is unreachable ({exc}); start it with `make serve` or set REDIS_URL",
                  file=sys.stderr)
            return 3
        raise


if __name__ == "__main__":
    sys.exit(main())
