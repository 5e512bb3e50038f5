"""Typed errors.

A daemon error carries the wire code of PROTOCOL.md §4 in ``code``; errors
found in this process carry the code the daemon would give for the same
fault (``bad_request``, ``bad_envelope``, ``integrity``) or one of
``CLIENT_CODES``, which never appear on the wire.
"""

from __future__ import annotations

CLIENT_CODES = ("connect_failed", "connection_closed", "timeout", "protocol", "config")


class KeyhavenError(Exception):
    """Base of every error this package raises; ``code`` says which."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{message} ({code})")
        self.code = code
        self.message = message


class DaemonError(KeyhavenError):
    """The daemon answered with an error; ``code`` is its wire code."""


class ConnectError(KeyhavenError):
    """The daemon could not be reached (``connect_failed``)."""

    def __init__(self, socket: str, cause: BaseException) -> None:
        super().__init__("connect_failed", f"daemon not reachable at {socket}: {cause}")
        self.socket = socket


class KeyhavenTimeout(KeyhavenError):
    """A connect or a request took longer than its timeout (``timeout``)."""

    def __init__(self, what: str, after: float) -> None:
        super().__init__("timeout", f"timed out after {after:g} s waiting for {what}")
        self.after = after


class ConnectionClosed(KeyhavenError):
    """The connection closed with the request in flight: its outcome is unknown.

    The next call reconnects.
    """

    def __init__(self, message: str = "the daemon closed the connection") -> None:
        super().__init__("connection_closed", message)


class InvalidInput(KeyhavenError):
    """A bad argument, caught before anything was sent."""


class BadStoredValue(InvalidInput):
    """A value read from (or about to be written to) a database column is not what the
    column holds, e.g. a blind-index column with a malformed ``khm1:`` tag (``bad_request``).

    ``column`` names the column (``table.column`` when known); the value itself
    is never in the message.
    """

    def __init__(self, column: str, reason: str) -> None:
        super().__init__("bad_request", f"column {column}: {reason}")
        self.column = column
        self.reason = reason


class IntegrityError(KeyhavenError):
    """Local decryption failed to authenticate (``integrity``)."""

    def __init__(self, message: str) -> None:
        super().__init__("integrity", message)


class ProtocolError(KeyhavenError):
    """The daemon sent something this client cannot read (``protocol``)."""

    def __init__(self, message: str) -> None:
        super().__init__("protocol", message)
