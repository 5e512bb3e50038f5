"""Keyhaven client for Python: the daemon's protocol over its Unix socket, and
client-side sealing compatible with the Rust crate."""

from .cache import OpenLimits, SealLimits
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
from .seal import (
    DEFAULT_CHUNK,
    MAX_CHUNK,
    MAX_MESSAGES_PER_KEY,
    MIN_CHUNK,
    EnvelopeInfo,
    Record,
    parse_envelope,
    parse_record,
    sealed_from_text,
    sealed_to_text,
)
from .sealer import Sealer, SealerStats

__version__ = VERSION

__all__ = [
    "CLIENT_CODES",
    "DEFAULT_CHUNK",
    "DEFAULT_CONNECT_TIMEOUT",
    "DEFAULT_REQUEST_TIMEOUT",
    "DEFAULT_SOCKET",
    "MAX_CHUNK",
    "MAX_MESSAGES_PER_KEY",
    "MIN_CHUNK",
    "SOCKET_ENV",
    "VERSION",
    "Client",
    "ConnectError",
    "ConnectionClosed",
    "DaemonError",
    "DatakeyResult",
    "DecryptResult",
    "EncryptResult",
    "EnvelopeInfo",
    "IntegrityError",
    "InvalidInput",
    "KeyhavenError",
    "KeyhavenTimeout",
    "OpenLimits",
    "ProtocolError",
    "Record",
    "RewrapResult",
    "SealLimits",
    "Sealer",
    "SealerStats",
    "context_object",
    "encode_context",
    "key_path",
    "parse_envelope",
    "parse_record",
    "sealed_from_text",
    "sealed_to_text",
]
