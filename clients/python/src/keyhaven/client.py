"""The Client: the operations an application uses, from threads.

Calls go over a small pool of pipelined connections, (re)opened on demand,
and may be made from many threads at once. Each operation's request and
result are built in ``ops`` (shared with ``keyhaven.aio.AsyncClient``).
Results carry the wire's field names (PROTOCOL.md §3); base64 fields are
decoded to ``bytearray`` (which the caller can wipe).
"""

from __future__ import annotations

import os
import threading
from typing import Any, Dict, List, Optional, Set, TypeVar, Union

from . import ops
from .codec import Bytes, Context, KeyPathLike
from .connection import Connection, EventCallback, pick_slot
from .errors import InvalidInput
from .ops import (
    AliasInfo,
    DatakeyResult,
    DecryptResult,
    EncryptResult,
    MacResult,
    MacVerifyResult,
    PublicKeyResult,
    Request,
    RewrapResult,
    SignResult,
    VerifyResult,
)

__all__ = [
    "DEFAULT_CONNECT_TIMEOUT",
    "DEFAULT_REQUEST_TIMEOUT",
    "DEFAULT_SOCKET",
    "SOCKET_ENV",
    "VERSION",
    "AliasInfo",
    "Client",
    "DatakeyResult",
    "DecryptResult",
    "EncryptResult",
    "MacResult",
    "MacVerifyResult",
    "PublicKeyResult",
    "RewrapResult",
    "SignResult",
    "VerifyResult",
]

SOCKET_ENV = "KEYHAVEN_SOCKET"
DEFAULT_SOCKET = "/run/keyhaven/keyhaven.sock"
DEFAULT_CONNECT_TIMEOUT = 5.0
DEFAULT_REQUEST_TIMEOUT = 30.0
VERSION = "0.1.0"

T = TypeVar("T")

_UNSET: Any = object()


def socket_path(socket: Optional[str]) -> str:
    """``socket``, else ``$KEYHAVEN_SOCKET``, else the default path; checked."""
    path = socket if socket is not None else os.environ.get(SOCKET_ENV) or DEFAULT_SOCKET
    if not isinstance(path, str) or not path:
        raise InvalidInput("config", "socket must be a non-empty path")
    return path


def pool_size(connections: object) -> int:
    if isinstance(connections, bool) or not isinstance(connections, int) or not 1 <= connections <= 64:
        raise InvalidInput("config", "connections must be an integer from 1 to 64")
    return connections


def timeout_option(value: Any, default: float, name: str) -> Optional[float]:
    """A timeout option in seconds: unset is ``default``; ``None`` or 0 is no limit."""
    if value is _UNSET:
        return default
    if value is None or value == 0:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
        raise InvalidInput("config", f"{name} must be seconds >= 0, or None")
    return float(value)


class Client:
    """A thread-safe client with a pool of pipelined connections."""

    def __init__(
        self,
        socket: Optional[str] = None,
        *,
        connect_timeout: Optional[float] = _UNSET,
        request_timeout: Optional[float] = _UNSET,
        connections: int = 2,
        client_name: Optional[str] = None,
        on_event: Optional[EventCallback] = None,
    ) -> None:
        """``socket``: else ``$KEYHAVEN_SOCKET``, else ``/run/keyhaven/keyhaven.sock``.

        Timeouts in seconds (5 to connect and greet, 30 per answer by
        default; ``None`` or 0: no limit). ``connections``: 1..64.
        """
        self.socket = socket_path(socket)
        self.connect_timeout = timeout_option(connect_timeout, DEFAULT_CONNECT_TIMEOUT, "connect_timeout")
        self.request_timeout = timeout_option(request_timeout, DEFAULT_REQUEST_TIMEOUT, "request_timeout")
        connections = pool_size(connections)
        self.client_name = client_name or f"keyhaven-python/{VERSION}"
        self.on_event = on_event
        self._slots: List[Optional[Connection]] = [None] * connections
        self._cond = threading.Condition()
        self._connecting: Set[int] = set()
        self._closed = False
        self.connections_opened = 0

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _connection(self) -> Connection:
        """An idle open connection, else a new one in a free slot, else the least busy."""
        with self._cond:
            while True:
                if self._closed:
                    raise InvalidInput("config", "the client is closed")
                best, free = pick_slot(self._slots, self._connecting)
                if best is not None and (best.in_flight == 0 or free < 0):
                    return best
                if free >= 0:
                    self._connecting.add(free)
                    break
                self._cond.wait()  # every slot is connecting
        try:
            conn = Connection(self.socket, self.connect_timeout, self.client_name, self.on_event)
        except BaseException:
            with self._cond:
                self._connecting.discard(free)
                self._cond.notify_all()
            raise
        with self._cond:
            self._connecting.discard(free)
            self._cond.notify_all()
            self.connections_opened += 1
            if self._closed:
                conn.close()
                raise InvalidInput("config", "the client is closed")
            self._slots[free] = conn
        return conn

    def call(self, op: str, params: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
        """Any operation by name (PROTOCOL.md §3); returns the ``ok`` object."""
        return self._connection().request(op, params, self.request_timeout)

    def close(self) -> None:
        """Close every connection; calls in flight fail with ``connection_closed``."""
        with self._cond:
            self._closed = True
            slots, self._slots = self._slots, [None] * len(self._slots)
        for c in slots:
            if c is not None:
                c.close()

    def _run(self, req: Request[T]) -> T:
        return req.parse(self._connection().request(req.op, req.params, self.request_timeout))

    def health(self) -> Dict[str, Any]:
        return self._run(ops.health())

    def metrics(self) -> str:
        """The Prometheus text exposition (``metrics``, §3.33; needs the ``metrics`` permission)."""
        return self._run(ops.metrics())

    def whoami(self) -> Dict[str, Any]:
        return self._run(ops.whoami())

    def key_create(
        self,
        path: KeyPathLike,
        *,
        type: Optional[str] = None,
        rotate_every_secs: Optional[int] = None,
        idempotency_key: Optional[str] = None,
        description: Optional[str] = None,
        tags: Optional[Dict[str, str]] = None,
    ) -> Dict[str, Any]:
        """Make a key; ``type``: ``aes256-gcm`` (the daemon's default), ``hmac-sha256``,
        ``ecdsa-p256``, ``ecdsa-p384``, ``rsa-3072-pss`` or ``rsa-4096-oaep`` (§3.3);
        ``rotate_every_secs``: rotate automatically this often, set in the same request (0: none)."""
        return self._run(
            ops.key_create(
                path,
                type=type,
                rotate_every_secs=rotate_every_secs,
                idempotency_key=idempotency_key,
                description=description,
                tags=tags,
            )
        )

    def key_show(self, path: KeyPathLike) -> Dict[str, Any]:
        return self._run(ops.key_show(path))

    def key_list(
        self,
        tenant: Optional[str] = None,
        *,
        page_size: Optional[int] = None,
        tags: Optional[Dict[str, str]] = None,
    ) -> List[Dict[str, Any]]:
        """Every key (of one tenant), following the daemon's pages (PROTOCOL.md §3.4).

        ``page_size``: at most this many keys a page, 1..1000 (the daemon's default 1000).
        """
        params = ops.key_list_params(tenant, page_size, tags)
        keys: List[Dict[str, Any]] = []
        while ops.key_list_page(self.call("key_list", params), params, keys):
            pass
        return keys

    def encrypt(
        self, path: KeyPathLike, plaintext: Union[Bytes, str], context: Context = None
    ) -> EncryptResult:
        return self._run(ops.encrypt(path, plaintext, context))

    def decrypt(self, ciphertext: str, context: Context = None) -> DecryptResult:
        return self._run(ops.decrypt(ciphertext, context))

    def datakey(
        self, path: KeyPathLike, context: Context = None, *, include_plaintext: bool = True
    ) -> DatakeyResult:
        return self._run(ops.datakey(path, context, include_plaintext=include_plaintext))

    def datakey_decrypt(self, envelope: str, context: Context = None) -> DecryptResult:
        return self._run(ops.datakey_decrypt(envelope, context))

    def rewrap(self, text: str, context: Context = None) -> RewrapResult:
        return self._run(ops.rewrap(text, context))

    def mac(
        self, path: KeyPathLike, message: Union[Bytes, str], *, version: Optional[int] = None
    ) -> MacResult:
        """The HMAC-SHA256 tag of ``message`` under an ``hmac-sha256`` key, made in the token (§3.29).

        ``version``: an older key version, to reproduce the tags it gave
        (e.g. to look up a blind index made before a rotation).
        """
        return self._run(ops.mac(path, message, version=version))

    def mac_verify(self, path: KeyPathLike, message: Union[Bytes, str], tag: str) -> MacVerifyResult:
        """Whether ``tag`` is the MAC of ``message`` under the version it names (§3.30).

        A mismatch is ``valid=False``, not an error.
        """
        return self._run(ops.mac_verify(path, message, tag))

    def sign(
        self,
        path: KeyPathLike,
        message: Optional[Union[Bytes, str]] = None,
        *,
        digest: Optional[Bytes] = None,
    ) -> SignResult:
        """A signature by the current version of an ``ecdsa-p256``, ``ecdsa-p384`` or
        ``rsa-3072-pss`` key, made in the token (§3.31).

        Give the message (the daemon hashes it) or ``digest``, its SHA-256
        (SHA-384 for P-384) computed by the caller; exactly one.
        """
        return self._run(ops.sign(path, message, digest=digest))

    def verify(
        self,
        path: KeyPathLike,
        message: Optional[Union[Bytes, str]],
        signature: Union[Bytes, str],
        *,
        digest: Optional[Bytes] = None,
        version: Optional[int] = None,
    ) -> VerifyResult:
        """Whether ``signature`` (bytes as ``sign`` gave them, or their base64) signs the
        message (or ``digest``, with ``message=None``) under a version of a signing key,
        checked in the token (§3.34).

        ``version``: the version whose public key checks it (the current one
        by default). A signature that does not verify is ``valid=False``, not
        an error.
        """
        return self._run(ops.verify(path, message, signature, digest=digest, version=version))

    def public_key(self, path: KeyPathLike, *, version: Optional[int] = None) -> PublicKeyResult:
        """The public key of a version (the current one by default) of a signing key or
        an ``rsa-4096-oaep`` key (§3.32), as PEM."""
        return self._run(ops.public_key(path, version=version))

    def alias_create(self, alias: str, path: KeyPathLike) -> AliasInfo:
        """Make ``alias`` a second name for the key ``path``, in the key's tenant (§3.37)."""
        return self._run(ops.alias_create(alias, path))

    def alias_update(self, alias: str, path: KeyPathLike) -> AliasInfo:
        """Move ``alias`` to the key ``path`` of the same tenant (§3.38); ``previous_key`` says from where."""
        return self._run(ops.alias_update(alias, path))

    def alias_delete(self, tenant: str, alias: str) -> AliasInfo:
        """Remove an alias (its key is untouched; §3.39); returns what it was."""
        return self._run(ops.alias_delete(tenant, alias))

    def alias_list(self, tenant: Optional[str] = None) -> List[AliasInfo]:
        """Aliases of one tenant, else of every tenant, sorted by tenant then alias (§3.40)."""
        return self._run(ops.alias_list(tenant))

    def subscribe_revocations(self) -> Dict[str, Any]:
        return self._run(ops.subscribe_revocations())
