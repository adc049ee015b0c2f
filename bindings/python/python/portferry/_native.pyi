"""Stubs of the native module (the Rust crate ``portferry-python``); private API."""

import os
from typing import final

__all__ = [
    "Agent",
    "Opening",
    "Tunnel",
    "Closing",
    "check_forward",
    "set_error_classes",
    "set_log_level",
    "take_log_records",
]

@final
class Agent:
    def __new__(
        cls,
        relay: str | None,
        token: str | None,
        relay_ca: str | os.PathLike[str] | None = None,
        connect_timeout: float | None = None,
        request_timeout: float | None = None,
    ) -> Agent: ...
    def forward(
        self,
        port: object,
        unencrypted: bool = False,
        h2: bool = False,
        proxy_protocol: str | None = None,
    ) -> Opening: ...
    @property
    def relay(self) -> str: ...

@final
class Opening:
    def wait(self, timeout: float | None = None) -> Tunnel | None: ...
    def cancel(self) -> None: ...
    @property
    def port(self) -> int: ...

@final
class Tunnel:
    @property
    def url(self) -> str: ...
    @property
    def tls_socket(self) -> tuple[str, int]: ...
    @property
    def tcp_socket(self) -> tuple[str, int]: ...
    @property
    def port(self) -> int: ...
    @property
    def is_open(self) -> bool: ...
    def close(self) -> Closing | None: ...

@final
class Closing:
    def wait(self, timeout: float | None = None) -> bool: ...
    def cancel(self) -> None: ...

def check_forward(
    port: object, unencrypted: bool = False, h2: bool = False, proxy_protocol: str | None = None
) -> int: ...
def set_error_classes(classes: dict[str, type[BaseException]]) -> None: ...
def set_log_level(level: int) -> None: ...
def take_log_records(timeout: float) -> list[tuple[str, int, str, str, int]]: ...
