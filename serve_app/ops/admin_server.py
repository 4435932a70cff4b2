"""`qbt admin serve`: the admin API and console in their own process (uvicorn), on loopback unless told otherwise.
On a cluster it runs beside the head (its own container or pod), reached through `kubectl port-forward` or an
internal Service, never through the public gateway."""

from __future__ import annotations

import ipaddress
import sys

from serve_app.config.catalog import load as load_catalog
from serve_app.ledger.database import Database, LedgerConfig


def serve_admin(redis, ledger: LedgerConfig, host: str, port: int) -> int:
    import uvicorn

    from serve_app.admin.app import build_admin_app

    if not _loopback(host):
        print(f"[qbt admin] listening on {host}: every caller needs an admin token, but keep this port off the "
              "internet (a private network, or a port-forward)", file=sys.stderr, flush=True)
    try:
        catalog = load_catalog()
        known = {m.id for m in catalog.models} | {m.id for p in catalog.profiles for m in catalog.profile_models(p)}
    except Exception:  # a deployment without the catalog file: models are checked by format only
        known = None
    database = Database.open(ledger)
    app = build_admin_app(redis, database, known)
    print(f"[qbt admin] admin API and console on http://{host}:{port}/", file=sys.stderr, flush=True)
    try:
        uvicorn.run(app, host=host, port=port, log_level="warning", access_log=False, server_header=False)
    finally:
        database.close()
    return 0


def _loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"
