"""The documents' services, forwarded for real: a Flask app over HTTPS, the threaded
echo server over raw TCP, HTTP/2 offered by ALPN."""

from __future__ import annotations

import socket
import threading
from typing import Callable
from urllib.parse import urlsplit

from clients import CLIENT_TIMEOUT, https_get, read_exactly, tls_connect
from conftest import EchoServer, Relay, free_port
import pytest
from flask import Flask
from werkzeug.serving import make_server

import portferry


def test_a_flask_app_is_served_over_https_trusting_the_relays_ca(relay_env: Relay) -> None:
    app = Flask(__name__)

    @app.route("/")
    def hello_world() -> str:
        return "Hello, World!"

    port = free_port()
    # As in the documents: the tunnel first, then the server on that port.
    with portferry.forward(port) as tunnel:
        server = make_server("127.0.0.1", port, app, threaded=True)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        try:
            status, _, body = https_get(tunnel.url, relay_env.ca)
        finally:
            server.shutdown()
    assert (status, body) == (200, b"Hello, World!")
    host, tls_port = tunnel.tls_socket
    assert tls_port != 443
    assert tunnel.url == f"https://{host}:{tls_port}"
    assert urlsplit(tunnel.url).hostname == host


def test_the_echo_server_answers_on_the_tcp_socket_and_the_url(
    relay_env: Relay, echo_server: Callable[[int], EchoServer]
) -> None:
    port = free_port()
    with portferry.forward(port, unencrypted=True) as tunnel:
        echo_server(port)
        host, tcp_port = tunnel.tcp_socket
        with socket.create_connection((host, tcp_port), timeout=CLIENT_TIMEOUT) as connection:
            for message in (b"hello", b"x" * 100_000):
                connection.sendall(message)
                assert read_exactly(connection, len(message)) == message
        # The HTTPS URL keeps working: the TLS stream reaches the echo server too.
        with tls_connect(tunnel.url, relay_env.ca) as connection:
            connection.sendall(b"over TLS")
            assert read_exactly(connection, 8) == b"over TLS"


def test_h2_enabled_offers_h2_by_alpn_and_only_then(
    relay_env: Relay, echo_server: Callable[[int], EchoServer]
) -> None:
    port = free_port()
    echo_server(port)
    preface = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
    with portferry.forward(port, h2_enabled=True) as tunnel:
        with tls_connect(tunnel.url, relay_env.ca, alpn=["h2", "http/1.1"]) as connection:
            assert connection.selected_alpn_protocol() == "h2"
            # The service gets the client's bytes as they are: no translation.
            connection.sendall(preface)
            assert read_exactly(connection, len(preface)) == preface
    with portferry.forward(port) as tunnel:
        with tls_connect(tunnel.url, relay_env.ca, alpn=["h2", "http/1.1"]) as connection:
            assert connection.selected_alpn_protocol() == "http/1.1"


def test_proxy_protocol_names_the_client_to_the_service(relay_env: Relay) -> None:
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    received: list[bytes] = []

    def serve_one() -> None:
        connection, _ = listener.accept()
        with connection:
            connection.settimeout(CLIENT_TIMEOUT)
            data = b""
            while b"hello" not in data:
                chunk = connection.recv(4096)
                if not chunk:
                    break
                data += chunk
            received.append(data)
            connection.sendall(b"ok")

    threading.Thread(target=serve_one, daemon=True).start()
    with portferry.forward(port, unencrypted=True, proxy_protocol="v1") as tunnel:
        host, tcp_port = tunnel.tcp_socket
        with socket.create_connection((host, tcp_port), timeout=CLIENT_TIMEOUT) as connection:
            client = connection.getsockname()
            connection.sendall(b"hello")
            assert read_exactly(connection, 2) == b"ok"
    header = f"PROXY TCP4 {client[0]} 127.0.0.1 {client[1]} {tcp_port}\r\n".encode()
    assert received == [header + b"hello"]
    listener.close()


def test_an_unknown_proxy_protocol_is_refused_at_once(relay_env: Relay) -> None:
    with pytest.raises(portferry.InvalidError, match="proxy_protocol"):
        portferry.forward(free_port(), proxy_protocol="v3")
