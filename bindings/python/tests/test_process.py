"""The interpreter around forward(): Ctrl-C while it waits, exiting with tunnels open
or requests under way, a forked child, ``python -m portferry``."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from typing import Callable

import pytest
from clients import answers
from conftest import EchoServer, Relay, address_of, free_port, portferry_command, python_program

import portferry

# Seconds a child program may take for what it was asked (a guard against a hang).
PROGRAM_LIMIT = 30.0


WAITS_FOR_A_SILENT_RELAY = """
import signal, threading, portferry
# Ctrl-C as in a terminal, also when the suite was started with SIGINT ignored (a
# background job of a non-interactive shell is), which Python would keep.
signal.signal(signal.SIGINT, signal.default_int_handler)
ticks = 0
def tick():
    global ticks
    while True:
        ticks += 1
threading.Thread(target=tick, daemon=True).start()
try:
    with portferry.forward(8000) as tunnel:
        print("opened", flush=True)
except KeyboardInterrupt:
    print("interrupted", "ticks" if ticks > 0 else "no ticks", flush=True)
except portferry.Error as error:
    print("failed:", error, flush=True)
"""


def test_ctrl_c_interrupts_a_forward_waiting_for_a_relay_that_never_answers(
    silent_relay: socket.socket, relay: Relay
) -> None:
    program = python_program(
        WAITS_FOR_A_SILENT_RELAY, {"PORTFERRY_RELAY": address_of(silent_relay), "PORTFERRY_TOKEN": relay.token}
    )
    connection, _ = silent_relay.accept()  # the agent is connecting: forward() waits
    with connection:
        program.send_signal(signal.SIGINT)
        out, err = program.communicate(timeout=PROGRAM_LIMIT)
    assert out.split() == ["interrupted", "ticks"], err
    assert program.returncode == 0, err


def test_the_interpreter_exits_with_tunnels_open_and_requests_under_way(
    relay_env: Relay, silent_relay: socket.socket
) -> None:
    address = address_of(silent_relay)
    source = f"""
import portferry
kept = portferry.forward({free_port()})
print(kept.url, flush=True)
waiting = portferry.Agent({address!r}, "token").forward(8000)
"""
    program = python_program(source, relay_env.env)
    connection, _ = silent_relay.accept()  # the second request is under way
    with connection:
        out, err = program.communicate(timeout=PROGRAM_LIMIT)
    assert program.returncode == 0, err
    assert out.startswith("https://")


# Forking a process with threads (the runtime's, the logging thread's) is the point:
# gunicorn and multiprocessing do it. Python 3.12+ warns about it.
@pytest.mark.filterwarnings("ignore:This process .* is multi-threaded:DeprecationWarning")
def test_a_forked_child_forwards_on_its_own_and_leaves_the_parents_tunnel_alone(
    relay_env: Relay, echo_server: Callable[[int], EchoServer]
) -> None:
    parent_port, child_port = free_port(), free_port()
    echo_server(parent_port)
    echo_server(child_port)
    with portferry.forward(parent_port) as parents:
        reading, writing = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: reports, and never returns into pytest
            status = 1
            try:
                os.close(reading)
                parents.close()  # the parent's: left alone
                with portferry.forward(child_port) as own:
                    report = f"{own.url} {answers(own.url, relay_env.ca)}"
                os.write(writing, report.encode())
                status = 0
            finally:
                os._exit(status)
        os.close(writing)
        with os.fdopen(reading) as pipe:
            report = pipe.read()
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        url, answered = report.split()
        assert answered == "True" and url != parents.url
        # The child closed neither the parent's tunnel nor its link.
        assert answers(parents.url, relay_env.ca)
        with portferry.forward(free_port()) as more:
            assert answers(more.url, relay_env.ca)


def test_a_forked_child_cannot_wait_for_the_parents_request(relay_env: Relay) -> None:
    source = """
import os, portferry
pending = portferry.forward(%d)
pid = os.fork()
if pid == 0:
    try:
        pending.url
        os._exit(1)
    except portferry.ForkedError:
        pass
    try:
        pending._opening.wait(0.01)  # the native request itself refuses too
        os._exit(2)
    except portferry.ForkedError:
        os._exit(0)
_, status = os.waitpid(pid, 0)
print(os.waitstatus_to_exitcode(status), pending.url.startswith("https://"), flush=True)
""" % free_port()
    program = python_program(source, relay_env.env)
    out, err = program.communicate(timeout=PROGRAM_LIMIT)
    assert out.split() == ["0", "True"], err


def test_python_m_portferry_runs_the_command(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PORTFERRY_BIN", portferry_command())
    done = subprocess.run(
        [sys.executable, "-m", "portferry", "--version"], capture_output=True, text=True, timeout=PROGRAM_LIMIT
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("portferry ")
    monkeypatch.setenv("PORTFERRY_BIN", "")
    monkeypatch.setenv("PATH", "/nonexistent")
    done = subprocess.run(
        [sys.executable, "-m", "portferry", "--version"], capture_output=True, text=True, timeout=PROGRAM_LIMIT
    )
    assert done.returncode != 0 and "cargo install" in done.stderr
