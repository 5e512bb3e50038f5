"""Keyhaven client for Python: the daemon's protocol over its Unix socket, and
client-side sealing compatible with the Rust crate."""

from .client import (
    DEFAULT_CONNECT_TIMEOUT,
    DEFAULT_REQUEST_TIMEOUT,
    DEFAULT_SOCKET,
    SOCKET_ENV,
    VERSION,
    Client,
    DatakeyResult,
    DecryptResult,
    EncryptResult,
    RewrapResult,
)
from .codec import context_object, encode_context, key_path
from .errors import (
    CLIENT_CODES,
    ConnectError,
    ConnectionClosed,
    DaemonError,
    IntegrityError,
    InvalidInput,
    KeyhavenError,
    KeyhavenTimeout,
    ProtocolError,
)

__version__ = VERSION

__all__ = [
    "CLIENT_CODES",
    "DEFAULT_CONNECT_TIMEOUT",
    "DEFAULT_REQUEST_TIMEOUT",
    "DEFAULT_SOCKET",
    "SOCKET_ENV",
    "VERSION",
    "Client",
    "ConnectError",
    "ConnectionClosed",
    "DaemonError",
    "DatakeyResult",
    "DecryptResult",
    "EncryptResult",
    "IntegrityError",
    "InvalidInput",
    "KeyhavenError",
    "KeyhavenTimeout",
    "ProtocolError",
    "RewrapResult",
    "context_object",
    "encode_context",
    "key_path",
]
