"""What the business reads from the ledger's system of record: spend aggregated by day, model, account and key,
the same as CSV for invoicing, and the most recent requests. Sums are exact (integer micro-dollars in SQL, decimal
strings out)."""

from __future__ import annotations

import csv
import io
from datetime import date, timedelta
from enum import Enum
from typing import Any

from serve_app.ledger.database import COLUMNS, Database
from serve_app.money import ledger as stream_ledger
from serve_app.money import units

DAY_MS = 86_400_000
EPOCH = date(1970, 1, 1)


class GroupBy(str, Enum):
    DAY = "day"
    MODEL = "model"
    ACCOUNT = "account"
    KEY = "key"

    @property
    def column(self) -> str:  # the day is the UTC day of settlement, as integer division works in both databases
        return {"day": f"settled_ms / {DAY_MS}", "model": "model", "account": "account", "key": "key_id"}[self.value]

    @classmethod
    def parse(cls, text: str | None) -> list[GroupBy]:
        names = [n.strip() for n in (text or "day").split(",") if n.strip()]
        try:
            return list(dict.fromkeys(cls(n) for n in names))
        except ValueError:
            raise ValueError(f"group_by takes a comma-separated list of {', '.join(g.value for g in cls)}") from None


USAGE_FIELDS = ("day", "model", "account", "key_id", "requests", "prompt_tokens", "completion_tokens", "cost_usd")


def usage(db: Database, group_by: list[GroupBy], since_ms: int | None = None, until_ms: int | None = None,
          account: str | None = None) -> list[dict]:
    """Rows of the ledger settled in [since, until), summed per group; every row counts (a refused or failed
    request costs 0 and still counts as a request)."""
    p = db.param
    keys = [g.column for g in group_by]
    where, args = _filters(p, since_ms, until_ms, account)
    select = ", ".join([*keys, "COUNT(*)", "SUM(prompt_tokens)", "SUM(completion_tokens)", "SUM(cost_micros)"])
    sql = f"SELECT {select} FROM ledger{where}"
    if keys:
        sql += f" GROUP BY {', '.join(keys)} ORDER BY {', '.join(keys)}"
    out = []
    records = db.query(sql, args)
    for rec in records:
        row: dict[str, Any] = {f: None for f in USAGE_FIELDS}
        for g, value in zip(group_by, rec):
            row["key_id" if g is GroupBy.KEY else g.value] = (
                (EPOCH + timedelta(days=int(value))).isoformat() if g is GroupBy.DAY else value)
        count, prompt, completion, cost = rec[len(keys):]
        if not count:
            continue
        row.update(requests=int(count), prompt_tokens=int(prompt or 0), completion_tokens=int(completion or 0),
                   cost_usd=units.micros_to_usd(int(cost or 0)))
        out.append(row)
    return out


def usage_csv(rows: list[dict]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=USAGE_FIELDS, lineterminator="\r\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: ("" if v is None else v) for k, v in row.items()})
    return buffer.getvalue()


def recent(db: Database, limit: int = 50, account: str | None = None) -> list[dict]:
    """The latest settled requests, newest first."""
    p = db.param
    where, args = _filters(p, None, None, account)
    sql = (f"SELECT {', '.join(('ledger_id', *COLUMNS))} FROM ledger{where} "
           f"ORDER BY settled_ms DESC, stream_ms DESC, stream_seq DESC LIMIT {int(limit)}")
    records = db.query(sql, args)
    rows = [stream_ledger.row(r[0], dict(zip(COLUMNS, (str(v) for v in r[1:])))) for r in records]
    for row, r in zip(rows, records):
        row["account"] = r[1 + COLUMNS.index("account")]
    return rows


def _filters(p: str, since_ms: int | None, until_ms: int | None, account: str | None) -> tuple[str, list]:
    clauses, args = [], []
    if account is not None:
        clauses.append(f"account = {p}")
        args.append(account)
    if since_ms is not None:
        clauses.append(f"settled_ms >= {p}")
        args.append(since_ms)
    if until_ms is not None:
        clauses.append(f"settled_ms < {p}")
        args.append(until_ms)
    return (" WHERE " + " AND ".join(clauses) if clauses else ""), args
