"""Logging (and, with the observability issue, traces and metrics) for the service's own loggers."""

from __future__ import annotations

import logging


def configure_logging(level: int = logging.INFO) -> None:
    """Sends the `qbt.*` loggers to Ray Serve's handlers, so they land in the replica's log file."""
    qbt = logging.getLogger("qbt")
    serve_handlers = logging.getLogger("ray.serve").handlers
    if serve_handlers and not qbt.handlers:
        for handler in serve_handlers:
            qbt.addHandler(handler)
        qbt.propagate = False
    qbt.setLevel(level)
