"""When a tunnel opens and closes: the blocks, close(), the collector, threads, and the
environment read at each call."""

from __future__ import annotations

import gc
import re
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

import pytest
from clients import answers, https_get, read_exactly, tls_connect
from conftest import EchoServer, Relay, address_of, free_port

import portferry

# Seconds to wait for a tunnel dropped without close() to stop answering: it closes
# without waiting for the relay, which stops routing when the close frame arrives.
DROP_LIMIT = 10.0


def test_leaving_the_block_closes_the_tunnel(relay_env: Relay, echo_server: Callable[[int], EchoServer]) -> None:
    port = free_port()
    echo_server(port)
    with portferry.forward(port) as tunnel:
        assert answers(tunnel.url, relay_env.ca)
    assert not answers(tunnel.url, relay_env.ca)
    assert tunnel.url.startswith("https://")  # still readable after close
    assert "closed" in repr(tunnel)


def test_leaving_the_block_by_an_exception_closes_the_tunnel(relay_env: Relay) -> None:
    port = free_port()
    with pytest.raises(RuntimeError, match="the block failed"):
        with portferry.forward(port) as tunnel:
            url = tunnel.url
            raise RuntimeError("the block failed")
    assert not answers(url, relay_env.ca)
    with portferry.forward(port):  # the port is free again at once
        pass


def test_close_is_idempotent_and_explicit_use_works(relay_env: Relay) -> None:
    tunnel = portferry.forward(free_port())
    assert re.fullmatch(r"https://[a-z0-9]+\.portferry\.localhost:\d+", tunnel.url)
    assert answers(tunnel.url, relay_env.ca)
    tunnel.close()
    tunnel.close()
    assert not answers(tunnel.url, relay_env.ca)
    with tunnel:  # entering a closed tunnel does not reopen it
        pass
    assert not answers(tunnel.url, relay_env.ca)


def test_closing_before_the_answer_cancels_the_request(relay_env: Relay) -> None:
    port = free_port()
    tunnel = portferry.forward(port)
    tunnel.close()
    with pytest.raises(portferry.Error):
        tunnel.url
    with portferry.forward(port) as again:
        assert answers(again.url, relay_env.ca)


def test_a_tunnel_collected_without_close_closes(relay_env: Relay) -> None:
    port = free_port()
    tunnel = portferry.forward(port)
    url = tunnel.url
    del tunnel
    gc.collect()
    deadline = time.monotonic() + DROP_LIMIT
    while answers(url, relay_env.ca) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not answers(url, relay_env.ca)


def test_repr_says_what_the_tunnel_is(relay_env: Relay) -> None:
    port = free_port()
    with portferry.forward(port, unencrypted=True) as tunnel:
        text = repr(tunnel)
        assert f"port={port}" in text and repr(tunnel.url) in text and "open" in text
        assert repr(tunnel.tcp_socket) in text
    assert "closed" in repr(tunnel)


def test_many_tunnels_from_several_threads(relay_env: Relay, echo_server: Callable[[int], EchoServer]) -> None:
    def serve_a_few(worker: int) -> list[str]:
        urls = []
        for round in range(4):
            port = free_port()
            echo_server(port)
            with portferry.forward(port, unencrypted=round % 2 == 1) as tunnel:
                message = f"worker {worker} round {round}".encode()
                with tls_connect(tunnel.url, relay_env.ca) as connection:
                    connection.sendall(message)
                    assert read_exactly(connection, len(message)) == message
                urls.append(tunnel.url)
        return urls

    with ThreadPoolExecutor(max_workers=8) as pool:
        urls = [url for urls in pool.map(serve_a_few, range(8)) for url in urls]
    assert len(set(urls)) == 32


def test_other_threads_run_while_forward_waits_and_close_cancels_it(
    relay: Relay, silent_relay: socket.socket
) -> None:
    agent = portferry.Agent(address_of(silent_relay), relay.token, connect_timeout=60)
    tunnel = agent.forward(8000)
    ran: list[str] = []

    def other_thread() -> None:
        connection, _ = silent_relay.accept()  # the agent connects: forward() waits
        ran.append("python code")
        tunnel.close()  # another thread's close ends the wait at once
        connection.close()

    helper = threading.Thread(target=other_thread)
    helper.start()
    with pytest.raises(portferry.Error) as raised:
        tunnel.url
    helper.join()
    assert ran == ["python code"]
    assert not isinstance(raised.value, portferry.RelayTimeoutError)


def test_the_environment_is_read_at_each_call(relay_env: Relay, monkeypatch: pytest.MonkeyPatch) -> None:
    port = free_port()
    with portferry.forward(port):
        pass
    monkeypatch.setenv("PORTFERRY_TOKEN", "changed")
    with pytest.raises(portferry.TokenRefusedError):
        with portferry.forward(port):
            pass
    monkeypatch.setenv("PORTFERRY_TOKEN", relay_env.token)
    with portferry.forward(port) as tunnel:
        assert https_get is not None and answers(tunnel.url, relay_env.ca)


def test_an_explicit_agent_needs_no_environment(relay: Relay, no_relay_env: None) -> None:
    agent = relay.agent()
    assert agent.relay == relay.relay and relay.relay in repr(agent)
    with agent.forward(free_port()) as tunnel:
        assert answers(tunnel.url, relay.ca)
