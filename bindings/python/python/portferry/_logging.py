"""Brings the native library's log records into :mod:`logging`, under the
``portferry`` logger, from a daemon thread (the library's own threads never touch
Python)."""

from __future__ import annotations

import logging
import os
import threading

from . import _native

_logger = logging.getLogger("portferry")

# Seconds between two looks at the ``portferry`` logger's level, when no record comes.
_LEVEL_REFRESH = 1.0


def refresh_level() -> None:
    """Tells the library the lowest level the ``portferry`` logger handles now."""
    _native.set_log_level(_logger.getEffectiveLevel())


def _pump() -> None:
    while True:
        refresh_level()
        for name, level, message, file, line in _native.take_log_records(_LEVEL_REFRESH):
            logger = logging.getLogger(name)
            if not logger.isEnabledFor(level):
                continue
            try:
                logger.handle(logger.makeRecord(name, level, file, line, message, (), None))
            except Exception:  # a broken filter: the next records may still get through
                continue


def start() -> None:
    """Starts the thread that logs the library's records (in each process)."""
    threading.Thread(target=_pump, name="portferry-logging", daemon=True).start()


start()
os.register_at_fork(after_in_child=start)
