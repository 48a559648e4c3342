"""Where pairfree's library logs go: plain lines on stderr, set up by the command line and by
every process it spawns (a spawned process starts with no logging set up)."""

from __future__ import annotations

import logging
import sys


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is at the time (not the one it was created with)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _value) -> None:
        pass


def show_library_logs(level: int = logging.INFO) -> None:
    """pairfree's library logs (training progress, resume points, skipped items) go to stderr
    as plain lines, from ``level`` up."""
    logger = logging.getLogger("pairfree")
    if not any(isinstance(h, _StderrHandler) for h in logger.handlers):
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
    logger.setLevel(level)


def library_log_level() -> int | None:
    """The level :func:`show_library_logs` set in this process, or None where it was not
    called (a library user's own logging applies then)."""
    logger = logging.getLogger("pairfree")
    if any(isinstance(h, _StderrHandler) for h in logger.handlers):
        return logger.level
    return None
