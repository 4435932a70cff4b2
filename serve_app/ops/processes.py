"""The launcher's process hygiene: what it says, and how its children end with it (never a broad name match)."""

from __future__ import annotations

import ctypes
import signal

PR_SET_CHILD_SUBREAPER = 36
PR_SET_PDEATHSIG = 1


def say(msg: str) -> None:
    print(f"[qbt] {msg}", flush=True)


def become_subreaper() -> None:
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    except OSError:
        say("warning: could not become a child subreaper; orphaned engine processes may outlive this run")


def die_with_parent() -> None:
    """In a child before exec: it gets SIGTERM when the launcher dies, however it dies (Ray's core worker ends the
    launcher's process when Ray's own processes are killed with it, before its cleanup can stop Redis)."""
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
