"""Reading the ledger (a Redis Stream written by the scripts): rows of one account with exact decimal costs."""

from __future__ import annotations

from datetime import datetime, timezone

from serve_app.money import keyspace, units


def ledger_rows(redis, account: str, since: datetime | None = None, batch: int = 1000):
    """Ledger rows of one account, oldest first, as dicts with exact decimal `cost_usd` (sync client, for the CLI)."""
    start = f"{int(since.timestamp() * 1000)}-0" if since else "-"
    while True:
        entries = redis.xrange(keyspace.LEDGER, min=start, max="+", count=batch)
        for entry_id, fields in entries:
            if fields.get("account") == account:
                yield row(entry_id, fields)
        if len(entries) < batch:
            return
        start = "(" + entries[-1][0]


def row(entry_id: str, f: dict) -> dict:
    def iso(ms: str) -> str:
        return datetime.fromtimestamp(int(ms) / 1000, tz=timezone.utc).isoformat(timespec="milliseconds")

    return {"request_id": f["request_id"], "completion_id": f["completion_id"], "model": f["model"], "key_id": f["key_id"],
            "prompt_tokens": int(f["prompt_tokens"]), "completion_tokens": int(f["completion_tokens"]),
            "cost_usd": units.micros_to_usd(f["cost_micros"]), "cost_micros": int(f["cost_micros"]),
            "status": f["status"], "created_at": iso(f["created_ms"]), "settled_at": iso(f["settled_ms"]),
            "ledger_id": entry_id}
