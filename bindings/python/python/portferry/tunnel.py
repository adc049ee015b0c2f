"""The :class:`Tunnel` handle that :func:`portferry.forward` returns."""

from __future__ import annotations

import asyncio
import logging
import os
import threading
from types import TracebackType
from typing import Generator

from . import _native
from .errors import Error, ForkedError

__all__ = ["Tunnel"]

_logger = logging.getLogger("portferry")

# Seconds one native wait may last: Ctrl-C (KeyboardInterrupt) is handled between two.
_WAIT_SLICE = 0.05


class Tunnel:
    """A tunnel from the relay to a local port.

    :func:`portferry.forward` sends the request and returns at once. The tunnel is
    ready when a ``with`` or ``async with`` block starts, when it is awaited, or at the
    first use of :attr:`url`, :attr:`tls_socket` or :attr:`tcp_socket` (which wait for
    it and raise the request's error). Leaving the block, :meth:`close`, or the last
    reference going away closes it.
    """

    def __init__(self, opening: _native.Opening, *, unencrypted: bool, h2_enabled: bool) -> None:
        self._port = opening.port
        self._unencrypted = unencrypted
        self._h2_enabled = h2_enabled
        self._opening: _native.Opening | None = opening
        self._native: _native.Tunnel | None = None
        self._failure: Error | None = None
        self._closed = False
        # Held while waiting for the relay's answer: one thread waits, others queue.
        self._lock = threading.Lock()
        self._pid = os.getpid()

    @property
    def port(self) -> int:
        """The forwarded local port."""
        return self._port

    @property
    def unencrypted(self) -> bool:
        """Whether the port is also exposed as raw TCP (:attr:`tcp_socket`)."""
        return self._unencrypted

    @property
    def h2_enabled(self) -> bool:
        """Whether the TLS side offers HTTP/2 (ALPN ``h2``)."""
        return self._h2_enabled

    @property
    def url(self) -> str:
        """The public URL, ``https://<host>``, with ``:<port>`` unless it is 443."""
        return self._open().url

    @property
    def tls_socket(self) -> tuple[str, int]:
        """``(host, port)`` of the TLS endpoint."""
        return self._open().tls_socket

    @property
    def tcp_socket(self) -> tuple[str, int]:
        """``(host, port)`` of the raw TCP endpoint; raises :class:`InvalidError`
        unless the port was forwarded with ``unencrypted=True``."""
        return self._open().tcp_socket

    def _open(self) -> _native.Tunnel:
        """The open tunnel, after waiting for the relay's answer if it has not come."""
        if self._native is not None:
            return self._native
        if os.getpid() != self._pid:
            # A thread of the parent may have held the lock at the fork: do not take it.
            raise ForkedError(
                "this tunnel was asked for by the process that forked this one: forward again here"
            )
        with self._lock:
            if self._native is not None:
                return self._native
            if self._failure is not None:
                raise self._failure
            opening = self._opening
            if opening is None:
                raise Error(f"the tunnel to port {self._port} was closed before it opened")
            try:
                native = None
                while native is None:
                    native = opening.wait(_WAIT_SLICE)
            except BaseException as failure:
                opening.cancel()
                self._opening = None
                if isinstance(failure, Error):
                    self._failure = failure
                raise
            self._opening = None
            self._native = native
            return native

    def close(self) -> None:
        """Closes the tunnel and waits for the relay to confirm, so that the port can be
        forwarded again at once. Calling it again does nothing. In a forked child, the
        tunnel is the parent's: it is left open there."""
        if os.getpid() != self._pid or self._closed:
            return
        opening = self._opening
        if opening is not None:
            opening.cancel()  # a request under way stops at once, also its waiter
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._opening = None
            closing = self._native.close() if self._native is not None else None
        if closing is None:
            return
        try:
            while not closing.wait(_WAIT_SLICE):
                pass
        except BaseException:
            closing.cancel()  # the tunnel is closed; only the confirmation is not awaited
            raise

    def _close_after_block(self, failed: bool) -> None:
        """Closes on leaving a block; if the block raised, a failure to close is logged
        rather than raised over the block's exception."""
        if not failed:
            self.close()
            return
        try:
            self.close()
        except Error as error:
            _logger.warning("closing the tunnel to port %d failed: %s", self._port, error)

    def __enter__(self) -> Tunnel:
        self._open()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self._close_after_block(exc_type is not None)

    async def _aopen(self) -> Tunnel:
        try:
            await asyncio.get_running_loop().run_in_executor(None, self._open)
        except asyncio.CancelledError:
            opening = self._opening
            if opening is not None:
                opening.cancel()
            raise
        return self

    async def __aenter__(self) -> Tunnel:
        return await self._aopen()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        failed = exc_type is not None
        await asyncio.get_running_loop().run_in_executor(None, self._close_after_block, failed)

    def __await__(self) -> Generator[None, None, Tunnel]:
        return self._aopen().__await__()

    def __repr__(self) -> str:
        native = self._native
        if native is None:
            state = "failed" if self._failure is not None else "opening"
            if self._closed:
                state = "closed"
            return f"<portferry.Tunnel port={self._port} {state}>"
        fields = [f"port={self._port}", f"url={native.url!r}"]
        if self._unencrypted:
            fields.append(f"tcp_socket={native.tcp_socket!r}")
        if self._h2_enabled:
            fields.append("h2")
        fields.append("closed" if self._closed or not native.is_open else "open")
        return f"<portferry.Tunnel {' '.join(fields)}>"

