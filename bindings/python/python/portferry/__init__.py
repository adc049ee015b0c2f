"""portferry: expose a port from inside a container through a relay.

.. code-block:: python

    import portferry

    with portferry.forward(8000) as tunnel:
        print("listening at", tunnel.url)
        serve_on_port_8000()

The relay is named by the environment (``PORTFERRY_RELAY``, ``PORTFERRY_TOKEN``,
optional ``PORTFERRY_RELAY_CA``), as ``portferry relay`` prints it; :class:`Agent` takes
them explicitly. The work runs in the native library on a background runtime that every
call shares; waits release the GIL and Ctrl-C interrupts them. Its log records go to
the ``portferry`` logger.
"""

from . import _logging as _logging
from .agent import ENV_RELAY, ENV_RELAY_CA, ENV_TOKEN, Agent, forward
from .errors import (
    Error,
    ForkedError,
    InvalidError,
    InvalidPortError,
    LimitReachedError,
    LinkClosedError,
    NotConfiguredError,
    PortAlreadyForwardedError,
    RefusedError,
    RelayTimeoutError,
    RelayTlsError,
    RelayUnreachableError,
    TokenRefusedError,
    VersionMismatchError,
)
from .tunnel import Tunnel

__all__ = [
    "forward",
    "Agent",
    "Tunnel",
    "ENV_RELAY",
    "ENV_TOKEN",
    "ENV_RELAY_CA",
    "Error",
    "InvalidError",
    "InvalidPortError",
    "PortAlreadyForwardedError",
    "NotConfiguredError",
    "RelayUnreachableError",
    "RelayTlsError",
    "TokenRefusedError",
    "VersionMismatchError",
    "LimitReachedError",
    "RefusedError",
    "RelayTimeoutError",
    "LinkClosedError",
    "ForkedError",
]
