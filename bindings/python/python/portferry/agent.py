""":func:`forward` (the relay named by the environment) and :class:`Agent` (a relay
given explicitly)."""

from __future__ import annotations

import os
import threading

from . import _logging, _native
from .tunnel import Tunnel

__all__ = ["Agent", "forward", "ENV_RELAY", "ENV_TOKEN", "ENV_RELAY_CA"]

ENV_RELAY = "PORTFERRY_RELAY"
"""The environment variable naming the relay's agent endpoint, ``host:port``, or several
separated by commas (the agent uses the nearest, and moves to the next if it is lost)."""
ENV_TOKEN = "PORTFERRY_TOKEN"
"""The environment variable holding the agent's token."""
ENV_RELAY_CA = "PORTFERRY_RELAY_CA"
"""The environment variable naming a PEM file of CA certificates to trust for the relay."""


class Agent:
    """A relay to forward through, given explicitly: its agent endpoint (``host:port``, or
    several separated by commas: the nearest is used), a token, and optionally a PEM file
    of CA certificates to trust instead of the built-in web roots. ``connect_timeout`` bounds each step of
    connecting (TCP, TLS, the relay's welcome) and ``request_timeout`` each request, in
    seconds (10 by default).

    It connects when the first tunnel is asked for, and keeps one link to the relay
    for all its tunnels, from any thread, until the last of them and the agent are gone.
    """

    def __init__(
        self,
        relay: str,
        token: str,
        *,
        relay_ca: str | os.PathLike[str] | None = None,
        connect_timeout: float | None = None,
        request_timeout: float | None = None,
    ) -> None:
        self._native = _native.Agent(relay, token, relay_ca, connect_timeout, request_timeout)

    @property
    def relay(self) -> str:
        """The relay's agent endpoint as given: ``host:port``, or several, comma-separated."""
        return self._native.relay

    def forward(
        self,
        port: int,
        *,
        unencrypted: bool = False,
        h2_enabled: bool = False,
        proxy_protocol: str | None = None,
    ) -> Tunnel:
        """Asks the relay for a tunnel to the local ``port`` (see :func:`forward`)."""
        _native.check_forward(port, unencrypted, h2_enabled, proxy_protocol)
        _logging.refresh_level()
        opening = self._native.forward(port, unencrypted, h2_enabled, proxy_protocol)
        return Tunnel(opening, unencrypted=unencrypted, h2_enabled=h2_enabled)

    def __repr__(self) -> str:
        return f"<portferry.Agent relay={self.relay!r}>"


# The agents of the configurations the environment has named, so that every call with
# the same environment shares one link; a few, as a program changes its environment
# rarely (the oldest goes first; its tunnels keep it alive until they close).
_MAX_ENVIRONMENT_AGENTS = 8
_environment_agents: dict[tuple[str | None, str | None, str | None], Agent] = {}
_environment_lock = threading.Lock()


def _environment_agent() -> Agent:
    """The agent for the relay that ``os.environ`` names now."""
    relay, token, relay_ca = (os.environ.get(name) or None for name in (ENV_RELAY, ENV_TOKEN, ENV_RELAY_CA))
    key = (relay, token, relay_ca)
    with _environment_lock:
        agent = _environment_agents.get(key)
        if agent is None:
            agent = Agent.__new__(Agent)
            # Missing values are the "no relay configured" error, naming the variables.
            agent._native = _native.Agent(relay, token, relay_ca)
            if len(_environment_agents) >= _MAX_ENVIRONMENT_AGENTS:
                del _environment_agents[next(iter(_environment_agents))]
            _environment_agents[key] = agent
    return agent


def _forget_agents_after_fork() -> None:
    """In a forked child: the parent's agents are its own; the child connects anew."""
    global _environment_lock
    _environment_lock = threading.Lock()
    _environment_agents.clear()


os.register_at_fork(after_in_child=_forget_agents_after_fork)


def forward(
    port: int,
    *,
    unencrypted: bool = False,
    h2_enabled: bool = False,
    proxy_protocol: str | None = None,
) -> Tunnel:
    """Exposes the local ``port`` through the relay that the environment names
    (``PORTFERRY_RELAY``, ``PORTFERRY_TOKEN``, optional ``PORTFERRY_RELAY_CA``, read at
    each call).

    Use it as ``with forward(8000) as tunnel:`` or ``async with forward(8000) as
    tunnel:``; the tunnel closes when the block ends. ``unencrypted=True`` also exposes
    the port as raw TCP (:attr:`Tunnel.tcp_socket`); ``h2_enabled=True`` offers HTTP/2
    on the TLS side (not with ``unencrypted``); ``proxy_protocol="v1"`` or ``"v2"``
    starts each connection to the service with a PROXY protocol header naming the
    public client (as nginx ``proxy_protocol`` and HAProxy ``accept-proxy`` read it).

    Raises :class:`InvalidError` at once for a bad port, ``h2_enabled`` with
    ``unencrypted``, an unknown ``proxy_protocol``, or no relay configured; the relay's answer (and its errors) come
    when the block starts.
    """
    _native.check_forward(port, unencrypted, h2_enabled, proxy_protocol)
    return _environment_agent().forward(
        port, unencrypted=unencrypted, h2_enabled=h2_enabled, proxy_protocol=proxy_protocol
    )
