"""Logging: the service's loggers go to Ray Serve's handlers, so they land in the replica's log file."""

from __future__ import annotations

import logging


def configure_logging(level: int = logging.INFO, names: tuple[str, ...] = ("qbt",)) -> None:
    """Sends these loggers (`qbt.*`; in a model replica also `vllm.*`) to Ray Serve's handlers, so they land in the
    replica's log file."""
    serve_handlers = logging.getLogger("ray.serve").handlers
    for name in names:
        logger = logging.getLogger(name)
        if serve_handlers and not logger.handlers:
            for handler in serve_handlers:
                logger.addHandler(handler)
            logger.propagate = False
        logger.setLevel(level)
