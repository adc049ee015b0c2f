"""Every error of the documents and of the relay, as its exception class."""

from __future__ import annotations

import signal
import socket
from typing import Callable

import pytest
from conftest import Relay, address_of, free_port

import portferry


@pytest.mark.parametrize("port", [0, 70000, 65536, -1, True, False, "8000", 8000.0, None, 2**70])
def test_a_bad_port_is_an_invalid_error_naming_the_range(relay_env: Relay, port: object) -> None:
    with pytest.raises(portferry.InvalidPortError, match="1 to 65535") as raised:
        portferry.forward(port)  # type: ignore[arg-type]
    assert isinstance(raised.value, portferry.InvalidError)
    assert isinstance(raised.value, ValueError)


def test_the_documents_with_statement_catches_a_bad_port(relay_env: Relay) -> None:
    with pytest.raises(portferry.InvalidError):
        with portferry.forward(70000):
            pass


def test_a_bad_port_is_reported_before_a_missing_relay(no_relay_env: None) -> None:
    with pytest.raises(portferry.InvalidPortError):
        portferry.forward(0)


def test_h2_with_unencrypted_is_an_invalid_error(relay_env: Relay) -> None:
    with pytest.raises(portferry.InvalidError, match="HTTP/2 needs TLS"):
        portferry.forward(free_port(), unencrypted=True, h2_enabled=True)


def test_outside_a_container_the_missing_variables_are_named(
    no_relay_env: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(portferry.NotConfiguredError) as raised:
        with portferry.forward(8000):
            pass
    assert isinstance(raised.value, portferry.InvalidError)
    assert "PORTFERRY_RELAY" in str(raised.value) and "PORTFERRY_TOKEN" in str(raised.value)
    monkeypatch.setenv("PORTFERRY_RELAY", "localhost:1")
    with pytest.raises(portferry.NotConfiguredError) as raised:
        portferry.forward(8000)
    assert "PORTFERRY_TOKEN" in str(raised.value)
    assert "PORTFERRY_RELAY" not in str(raised.value)


def test_the_same_port_twice_is_refused_until_the_first_closes(relay_env: Relay) -> None:
    port = free_port()
    with portferry.forward(port) as first:
        with pytest.raises(portferry.PortAlreadyForwardedError, match=str(port)) as raised:
            with portferry.forward(port):
                pass
        assert isinstance(raised.value, portferry.InvalidError)
        assert first.url
    with portferry.forward(port) as again:
        assert again.url != first.url


def test_tcp_socket_needs_unencrypted(relay_env: Relay) -> None:
    with portferry.forward(free_port()) as tunnel:
        with pytest.raises(portferry.InvalidError, match="unencrypted"):
            tunnel.tcp_socket


def test_an_unreachable_relay(monkeypatch: pytest.MonkeyPatch, relay: Relay) -> None:
    monkeypatch.setenv("PORTFERRY_RELAY", f"127.0.0.1:{free_port()}")
    monkeypatch.setenv("PORTFERRY_TOKEN", relay.token)
    with pytest.raises(portferry.RelayUnreachableError) as raised:
        with portferry.forward(8000):
            pass
    assert isinstance(raised.value, ConnectionError)


def test_a_refused_token(monkeypatch: pytest.MonkeyPatch, relay_env: Relay) -> None:
    monkeypatch.setenv("PORTFERRY_TOKEN", "not-the-token")
    with pytest.raises(portferry.TokenRefusedError):
        with portferry.forward(8000):
            pass


def test_an_untrusted_relay_certificate(monkeypatch: pytest.MonkeyPatch, relay_env: Relay) -> None:
    monkeypatch.delenv("PORTFERRY_RELAY_CA")
    with pytest.raises(portferry.RelayTlsError, match="PORTFERRY_RELAY_CA"):
        with portferry.forward(8000):
            pass


def test_a_reached_limit(new_relay: Callable[..., Relay]) -> None:
    agent = new_relay("--max-tunnels-per-agent", "1").agent()
    with agent.forward(free_port()):
        with pytest.raises(portferry.LimitReachedError):
            with agent.forward(free_port()):
                pass


def test_a_relay_that_never_answers_times_out(silent_relay: socket.socket, relay: Relay) -> None:
    agent = portferry.Agent(address_of(silent_relay), relay.token, connect_timeout=0.5)
    with pytest.raises(portferry.RelayTimeoutError) as raised:
        with agent.forward(8000):
            pass
    assert isinstance(raised.value, TimeoutError)


def test_a_request_the_relay_never_answers_times_out(new_relay: Callable[..., Relay]) -> None:
    stopped = new_relay()
    agent = stopped.agent(request_timeout=0.5)
    with agent.forward(free_port()):  # connected
        stopped.process.send_signal(signal.SIGSTOP)
        try:
            with pytest.raises(portferry.RelayTimeoutError):
                with agent.forward(free_port()):
                    pass
        finally:
            stopped.process.send_signal(signal.SIGCONT)


def test_every_error_is_a_portferry_error() -> None:
    for name in portferry.__all__:
        value = getattr(portferry, name)
        if isinstance(value, type) and issubclass(value, BaseException):
            assert issubclass(value, portferry.Error), name
