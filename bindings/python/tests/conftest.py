"""Fixtures: a real ``portferry relay`` on loopback, its environment, and local services
to forward (a Flask app, the threaded echo server of the documents)."""

from __future__ import annotations

import os
import queue
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import pytest

import portferry

REPOSITORY = Path(__file__).resolve().parents[3]

# Seconds a relay may take to say it is ready (a guard against a hang, not a measure).
RELAY_START_LIMIT = 30.0


def portferry_command() -> str:
    """The ``portferry`` program: $PORTFERRY_BIN, else the repository's debug build."""
    command = os.environ.get("PORTFERRY_BIN") or str(REPOSITORY / "target" / "debug" / "portferry")
    if not (os.path.isfile(command) and os.access(command, os.X_OK)):
        pytest.fail(
            f"no portferry program at {command}: run `cargo build` in {REPOSITORY}, "
            "or set PORTFERRY_BIN"
        )
    return command


@dataclass
class Relay:
    """A running ``portferry relay`` and the environment an agent needs for it."""

    process: subprocess.Popen[str]
    relay: str
    token: str
    ca: str

    @property
    def env(self) -> dict[str, str]:
        return {
            "PORTFERRY_RELAY": self.relay,
            "PORTFERRY_TOKEN": self.token,
            "PORTFERRY_RELAY_CA": self.ca,
        }

    def agent(self, **options: float) -> portferry.Agent:
        return portferry.Agent(self.relay, self.token, relay_ca=self.ca, **options)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGCONT)
            self.process.kill()
        self.process.wait()


def start_relay(state: Path, *args: str) -> Relay:
    """Starts ``portferry relay`` on loopback ports with its state in ``state``, and
    reads the environment lines it prints."""
    state.mkdir(parents=True, exist_ok=True)
    process = subprocess.Popen(
        [
            portferry_command(),
            "relay",
            "--state-dir",
            str(state),
            "--agent-addr",
            "127.0.0.1:0",
            "--public-addr",
            "127.0.0.1:0",
            *args,
        ],
        stdout=subprocess.PIPE,
        stderr=open(state / "relay.log", "w"),
        text=True,
    )
    stdout = process.stdout
    assert stdout is not None
    lines: queue.Queue[str] = queue.Queue()

    def read_all_it_prints() -> None:
        # So that it never blocks on a full pipe; "" says it ended.
        for line in stdout:
            lines.put(line)
        lines.put("")

    threading.Thread(target=read_all_it_prints, daemon=True).start()
    printed: dict[str, str] = {}
    deadline = time.monotonic() + RELAY_START_LIMIT
    while not printed.keys() >= {"PORTFERRY_RELAY", "PORTFERRY_TOKEN", "PORTFERRY_RELAY_CA"}:
        try:
            line = lines.get(timeout=max(0.0, deadline - time.monotonic()))
        except queue.Empty:
            process.kill()
            pytest.fail(f"the relay did not print its environment: {(state / 'relay.log').read_text()}")
        if not line:
            pytest.fail(f"the relay exited: {(state / 'relay.log').read_text()}")
        name, equals, value = line.strip().partition("=")
        if equals and name.startswith("PORTFERRY_"):
            printed[name] = value
    return Relay(process, printed["PORTFERRY_RELAY"], printed["PORTFERRY_TOKEN"], printed["PORTFERRY_RELAY_CA"])


@pytest.fixture(scope="session")
def relay(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Relay]:
    """One relay for the whole session."""
    started = start_relay(tmp_path_factory.mktemp("relay"))
    yield started
    started.stop()


@pytest.fixture
def relay_env(relay: Relay, monkeypatch: pytest.MonkeyPatch) -> Relay:
    """The session's relay, named by the environment (as inside a container)."""
    for name, value in relay.env.items():
        monkeypatch.setenv(name, value)
    return relay


@pytest.fixture
def new_relay(tmp_path: Path) -> Iterator[Callable[..., Relay]]:
    """Starts relays of the test's own, with extra arguments; stops them after it."""
    started: list[Relay] = []

    def start(*args: str) -> Relay:
        started.append(start_relay(tmp_path / f"relay{len(started)}", *args))
        return started[-1]

    yield start
    for one in started:
        one.stop()


@pytest.fixture
def no_relay_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """No relay configured: outside a container."""
    for name in ("PORTFERRY_RELAY", "PORTFERRY_TOKEN", "PORTFERRY_RELAY_CA"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def silent_relay() -> Iterator[socket.socket]:
    """A relay address that accepts connections and never says a word."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        listener.settimeout(RELAY_START_LIMIT)
        yield listener


def address_of(listener: socket.socket) -> str:
    """``host:port`` of a listening socket, as PORTFERRY_RELAY takes it."""
    return "127.0.0.1:%d" % listener.getsockname()[1]


def free_port() -> int:
    """A loopback port nothing listens on now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class EchoServer:
    """The documents' echo server: a listening socket, a thread per connection that
    sends back what it reads."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind(("127.0.0.1", port))
        self.listener.listen(16)
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                connection, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._echo, args=(connection,), daemon=True).start()

    @staticmethod
    def _echo(connection: socket.socket) -> None:
        with connection:
            try:
                while data := connection.recv(1024):
                    connection.sendall(data)
            except ConnectionResetError:
                return

    def close(self) -> None:
        self.listener.close()


@pytest.fixture
def echo_server() -> Iterator[Callable[[int], EchoServer]]:
    """Starts echo servers on given ports; closes them after the test."""
    servers: list[EchoServer] = []

    def start(port: int) -> EchoServer:
        servers.append(EchoServer(port))
        return servers[-1]

    yield start
    for server in servers:
        server.close()


def python_program(source: str, env: dict[str, str]) -> subprocess.Popen[str]:
    """Runs ``source`` in a new Python process with ``env`` added to this environment."""
    return subprocess.Popen(
        [sys.executable, "-c", source],
        env={**os.environ, **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def curl() -> str | None:
    return shutil.which("curl")
