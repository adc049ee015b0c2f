"""The package itself: its type stubs match the native module, and the library's log
records reach Python's logging."""

from __future__ import annotations

import logging
import subprocess
import sys
import time

import pytest
from clients import tls_connect
from conftest import Relay, free_port

import portferry

# Seconds to wait for a log record to come through the logging thread.
LOG_LIMIT = 10.0


def test_the_stubs_match_the_module() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "mypy.stubtest", "portferry", "--ignore-missing-stub"],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_the_package_type_checks_strictly() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "mypy", "--strict", "-p", "portferry"], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stdout + done.stderr


def refused_connection(url: str, ca: str) -> None:
    """A client whose connection the agent refuses: nothing listens on the port."""
    try:
        with tls_connect(url, ca) as connection:
            connection.recv(1)
    except OSError:
        pass


def wait_for_record(caplog: pytest.LogCaptureFixture, text: str) -> list[logging.LogRecord]:
    deadline = time.monotonic() + LOG_LIMIT
    while time.monotonic() < deadline and not any(text in r.getMessage() for r in caplog.records):
        time.sleep(0.05)
    return [r for r in caplog.records if text in r.getMessage()]


def test_library_warnings_reach_the_portferry_logger(relay_env: Relay, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="portferry")
    port = free_port()  # nothing listens there: the agent warns
    with portferry.forward(port) as tunnel:
        refused_connection(tunnel.url, relay_env.ca)
        records = wait_for_record(caplog, f":{port}")
    assert records, [r.getMessage() for r in caplog.records]
    assert records[0].name.startswith("portferry.")
    assert records[0].levelno == logging.WARNING


def test_records_below_the_loggers_level_are_not_sent(relay_env: Relay, caplog: pytest.LogCaptureFixture) -> None:
    quiet, loud = free_port(), free_port()
    caplog.set_level(logging.ERROR, logger="portferry")
    with portferry.forward(quiet) as tunnel:
        refused_connection(tunnel.url, relay_env.ca)
    caplog.set_level(logging.WARNING, logger="portferry")
    with portferry.forward(loud) as tunnel:
        refused_connection(tunnel.url, relay_env.ca)
        assert wait_for_record(caplog, f":{loud}")
    # Records arrive in order: the first warning, had it been sent, came before.
    assert not [r for r in caplog.records if f":{quiet}" in r.getMessage()]
