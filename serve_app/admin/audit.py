"""Reading the audit log: the stream every operator change appends to, in the same script as the change
(`money/lua.py` AUDIT). Newest first."""

from __future__ import annotations

import json

from serve_app.money import keyspace
from serve_app.money.keyring import iso


def recent(r, limit: int = 100, before: str | None = None) -> list[dict]:
    entries = r.xrevrange(keyspace.AUDIT, max=f"({before}" if before else "+", min="-", count=limit)
    return [row(entry_id, f) for entry_id, f in entries]


def row(entry_id: str, f: dict) -> dict:
    return {"id": entry_id, "at": iso(f.get("at_ms")), "actor": f.get("actor"), "action": f.get("action"),
            "target": f.get("target"), "before": _json(f.get("before")), "after": _json(f.get("after")),
            "request_id": f.get("request_id") or None}


def _json(text: str | None):
    try:
        return json.loads(text) if text else None
    except ValueError:
        return text
