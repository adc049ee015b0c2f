"""The exceptions of portferry.

Every one is an :class:`Error`. What the caller can fix in the call or the environment
is an :class:`InvalidError`, which is also a :class:`ValueError`; what happens at the
relay has a class of its own.
"""

from __future__ import annotations

from . import _native


class Error(Exception):
    """Base class of every portferry exception."""


class InvalidError(Error, ValueError):
    """The call cannot work as made: a bad port, ``h2_enabled`` with ``unencrypted``,
    ``tcp_socket`` of a tunnel without ``unencrypted``, a bad setting, or no relay
    configured (outside a container)."""


class InvalidPortError(InvalidError):
    """The port is not an ``int`` from 1 to 65535."""


class PortAlreadyForwardedError(InvalidError):
    """This port is already forwarded; close that tunnel first."""


class NotConfiguredError(InvalidError):
    """No relay is configured (outside a container): the message names the missing
    environment variables."""


class RelayUnreachableError(Error, ConnectionError):
    """The relay could not be reached (refused, no route, or no answer in time)."""


class RelayTlsError(Error, ConnectionError):
    """The TLS handshake with the relay failed (an untrusted certificate, or not the
    relay's agent endpoint)."""


class TokenRefusedError(Error, PermissionError):
    """The relay refused the agent token."""


class VersionMismatchError(Error):
    """The relay speaks another protocol version."""


class LimitReachedError(Error):
    """The relay refused: one of its limits (tunnels per agent, agents) is reached."""


class RefusedError(Error):
    """The relay refused the request for another reason."""


class RelayTimeoutError(Error, TimeoutError):
    """The relay did not answer in time."""


class LinkClosedError(Error, ConnectionError):
    """The link to the relay is closed."""


class ForkedError(Error):
    """An object made before ``os.fork()`` was used in the child: forward again there."""


_native.set_error_classes(
    {
        "error": Error,
        "invalid": InvalidError,
        "invalid_port": InvalidPortError,
        "port_already_forwarded": PortAlreadyForwardedError,
        "not_configured": NotConfiguredError,
        "relay_unreachable": RelayUnreachableError,
        "relay_tls": RelayTlsError,
        "token_refused": TokenRefusedError,
        "version_mismatch": VersionMismatchError,
        "limit_reached": LimitReachedError,
        "refused": RefusedError,
        "timeout": RelayTimeoutError,
        "link_closed": LinkClosedError,
        "forked": ForkedError,
    }
)
