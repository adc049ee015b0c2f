"""Real clients of a tunnel: HTTPS with the relay's CA, connecting to loopback and
naming the tunnel's host for SNI (``*.localhost`` names resolve to loopback in curl
and browsers, not in every resolver)."""

from __future__ import annotations

import socket
import ssl
from urllib.parse import urlsplit

# Seconds a client waits for the relay or the service (a guard against a hang).
CLIENT_TIMEOUT = 10.0


def tls_connect(url: str, ca: str, alpn: list[str] | None = None) -> ssl.SSLSocket:
    """A TLS connection to the tunnel at ``url``, trusting only ``ca``."""
    parts = urlsplit(url)
    assert parts.hostname is not None
    context = ssl.create_default_context(cafile=ca)
    if alpn is not None:
        context.set_alpn_protocols(alpn)
    raw = socket.create_connection(("127.0.0.1", parts.port or 443), timeout=CLIENT_TIMEOUT)
    try:
        return context.wrap_socket(raw, server_hostname=parts.hostname)
    except BaseException:
        raw.close()
        raise


def read_all(connection: socket.socket) -> bytes:
    chunks = []
    while chunk := connection.recv(65536):
        chunks.append(chunk)
    return b"".join(chunks)


def read_exactly(connection: socket.socket, length: int) -> bytes:
    received = b""
    while len(received) < length:
        chunk = connection.recv(length - len(received))
        if not chunk:
            break
        received += chunk
    return received


def https_get(url: str, ca: str, path: str = "/") -> tuple[int, dict[str, str], bytes]:
    """GET ``path`` from the tunnel at ``url`` over HTTPS/1.1: status, headers, body."""
    host = urlsplit(url).netloc
    with tls_connect(url, ca) as connection:
        connection.sendall(f"GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
        response = read_all(connection)
    head, _, body = response.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in header_lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return int(status_line.split()[1]), headers, body


def answers(url: str, ca: str) -> bool:
    """Whether the relay still routes ``url``: a TLS handshake for its name succeeds."""
    try:
        with tls_connect(url, ca):
            return True
    except (ssl.SSLError, ConnectionError):
        return False
