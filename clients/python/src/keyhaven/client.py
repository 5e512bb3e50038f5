"""The Client: the operations an application uses.

Calls go over a small pool of pipelined connections, (re)opened on demand,
and may be made from many threads at once. Results carry the wire's field
names (PROTOCOL.md §3); base64 fields are decoded to ``bytearray`` (which
the caller can wipe).
"""

from __future__ import annotations

import os
import re
import threading
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Set, Union

from .codec import (
    Bytes,
    Context,
    KeyPathLike,
    b64decode,
    b64encode,
    check_name,
    context_object,
    key_path,
    to_bytes,
)
from .connection import Connection, EventCallback
from .errors import InvalidInput, ProtocolError

SOCKET_ENV = "KEYHAVEN_SOCKET"
DEFAULT_SOCKET = "/run/keyhaven/keyhaven.sock"
DEFAULT_CONNECT_TIMEOUT = 5.0
DEFAULT_REQUEST_TIMEOUT = 30.0
VERSION = "0.1.0"

_UNSET: Any = object()


@dataclass
class EncryptResult:
    ciphertext: str
    envelope_id: str
    key_version: int


@dataclass
class DecryptResult:
    plaintext: bytearray = field(repr=False)
    tenant: str
    key: str
    key_version: int
    envelope_id: str


@dataclass
class DatakeyResult:
    envelope: str
    envelope_id: str
    key_version: int
    plaintext: Optional[bytearray] = field(default=None, repr=False)


@dataclass
class RewrapResult:
    text: str
    from_version: int
    key_version: int
    envelope_id: str


@dataclass
class MacResult:
    tag: str
    """``khm1:`` text form, 53 characters (PROTOCOL.md §3.29)."""
    key_version: int


@dataclass
class MacVerifyResult:
    valid: bool
    key_version: int


@dataclass
class SignResult:
    signature: bytes
    """DER ``Ecdsa-Sig-Value`` (ECDSA), or the 384-byte RSASSA-PSS signature (§3.31)."""
    key_version: int
    algorithm: str
    """``ecdsa-p256-sha256``, ``ecdsa-p384-sha384`` or ``rsa-3072-pss-sha256``."""


@dataclass
class VerifyResult:
    valid: bool
    key_version: int
    """The version whose public key checked the signature."""
    algorithm: str


@dataclass
class PublicKeyResult:
    pem: str
    """PEM ``PUBLIC KEY`` (SubjectPublicKeyInfo), for ``load_pem_public_key``."""
    key_version: int
    type: str


@dataclass
class AliasInfo:
    """A second name for a key of the same tenant (PROTOCOL.md §3.37)."""

    tenant: str
    alias: str
    key: str
    """The key it names, within the tenant."""
    created_at: int
    updated_at: Optional[int] = None
    """When it was last moved; ``None`` if never."""
    previous_key: Optional[str] = None
    """``alias_update`` only: the key it named before."""


def _alias_info(ok: Any) -> AliasInfo:
    if not isinstance(ok, dict):
        raise ProtocolError("an alias answer is not an object")
    try:
        return AliasInfo(
            ok["tenant"],
            ok["alias"],
            ok["key"],
            ok["created_at"],
            ok.get("updated_at"),
            ok.get("previous_key"),
        )
    except KeyError as e:
        raise ProtocolError(f"an alias answer without `{e.args[0]}`") from None


def _version(version: object) -> int:
    if isinstance(version, bool) or not isinstance(version, int) or not 1 <= version <= 0xFFFFFFFF:
        raise InvalidInput("bad_request", "version must be an int >= 1")
    return version


def _message_or_digest(message: Optional[Union[Bytes, str]], digest: Optional[Bytes]) -> Dict[str, str]:
    """``sign``/``verify`` input: exactly one of the message and its 32- or 48-byte digest."""
    if (message is None) == (digest is None):
        raise InvalidInput("bad_request", "give exactly one of message and digest")
    if digest is not None:
        if not isinstance(digest, (bytes, bytearray, memoryview)):
            raise InvalidInput("bad_request", "digest must be bytes")
        d = bytes(digest)
        if len(d) not in (32, 48):
            raise InvalidInput(
                "bad_request", f"digest of {len(d)} bytes: a SHA-256 digest has 32, a SHA-384 digest 48"
            )
        return {"digest": b64encode(d)}
    assert message is not None
    return {"message": b64encode(to_bytes(message, "message"))}


def _signature_text(signature: object) -> str:
    """A signature as the wire takes it: bytes, or a str of standard base64 (checked)."""
    if isinstance(signature, str):
        b64decode(signature, "signature")
        return signature
    if isinstance(signature, (bytes, bytearray, memoryview)):
        return b64encode(signature)
    raise InvalidInput("bad_request", "signature must be bytes or a base64 str")


def _timeout(value: Any, default: float, name: str) -> Optional[float]:
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
        path = socket if socket is not None else os.environ.get(SOCKET_ENV) or DEFAULT_SOCKET
        if not isinstance(path, str) or not path:
            raise InvalidInput("config", "socket must be a non-empty path")
        self.socket = path
        self.connect_timeout = _timeout(connect_timeout, DEFAULT_CONNECT_TIMEOUT, "connect_timeout")
        self.request_timeout = _timeout(request_timeout, DEFAULT_REQUEST_TIMEOUT, "request_timeout")
        if isinstance(connections, bool) or not isinstance(connections, int) or not 1 <= connections <= 64:
            raise InvalidInput("config", "connections must be an integer from 1 to 64")
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
                best: Optional[Connection] = None
                free = -1
                for i, c in enumerate(self._slots):
                    if i in self._connecting:
                        continue
                    if c is None or c.closed:
                        self._slots[i] = None
                        if free < 0:
                            free = i
                    elif best is None or c.in_flight < best.in_flight:
                        best = c
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

    def health(self) -> Dict[str, Any]:
        return self.call("health")

    def metrics(self) -> str:
        """The Prometheus text exposition (``metrics``, §3.33; needs the ``metrics`` permission)."""
        text = self.call("metrics")["text"]
        if not isinstance(text, str):
            raise ProtocolError("`metrics` answered without text")
        return text

    def whoami(self) -> Dict[str, Any]:
        return self.call("whoami")

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
        tenant, key = key_path(path)
        params: Dict[str, Any] = {"tenant": tenant, "key": key}
        if type is not None:
            if not isinstance(type, str) or not type:
                raise InvalidInput("bad_request", "type must be a key type str such as hmac-sha256")
            params["type"] = type
        if rotate_every_secs is not None:
            if (
                isinstance(rotate_every_secs, bool)
                or not isinstance(rotate_every_secs, int)
                or rotate_every_secs < 0
            ):
                raise InvalidInput(
                    "bad_request", "rotate_every_secs must be a whole number of seconds (0: none)"
                )
            params["rotate_every_secs"] = rotate_every_secs
        if idempotency_key is not None:
            if not isinstance(idempotency_key, str) or not re.fullmatch(
                r"[A-Za-z0-9._:-]{1,64}", idempotency_key
            ):
                raise InvalidInput("bad_request", "idempotency_key must be 1 to 64 of A-Z a-z 0-9 . _ : -")
            params["idempotency_key"] = idempotency_key
        if description is not None:
            if not isinstance(description, str):
                raise InvalidInput("bad_request", "description must be a str")
            params["description"] = description
        if tags is not None:
            params["tags"] = _tag_dict(tags)
        return self.call("key_create", params)

    def key_show(self, path: KeyPathLike) -> Dict[str, Any]:
        tenant, key = key_path(path)
        return self.call("key_show", {"tenant": tenant, "key": key})

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
        params: Dict[str, Any] = {} if tenant is None else {"tenant": check_name(tenant, "tenant")}
        if page_size is not None:
            if isinstance(page_size, bool) or not isinstance(page_size, int) or not 1 <= page_size <= 1000:
                raise InvalidInput("bad_request", "page_size must be an int from 1 to 1000")
            params["limit"] = page_size
        if tags is not None:
            params["tags"] = _tag_dict(tags)
        keys: List[Dict[str, Any]] = []
        while True:
            ok = self.call("key_list", params)
            keys.extend(ok["keys"])
            nxt = ok.get("next")
            if not isinstance(nxt, str):
                return keys
            if nxt == params.get("after"):
                raise ProtocolError("`key_list` returned the same page again")
            params["after"] = nxt

    def encrypt(
        self, path: KeyPathLike, plaintext: Union[Bytes, str], context: Context = None
    ) -> EncryptResult:
        tenant, key = key_path(path)
        ok = self.call(
            "encrypt",
            {
                "tenant": tenant,
                "key": key,
                "plaintext": b64encode(to_bytes(plaintext, "plaintext")),
                "context": context_object(context),
            },
        )
        return EncryptResult(ok["ciphertext"], ok["envelope_id"], ok["key_version"])

    def decrypt(self, ciphertext: str, context: Context = None) -> DecryptResult:
        if not isinstance(ciphertext, str):
            raise InvalidInput("bad_request", "ciphertext must be a khc1: str")
        ok = self.call("decrypt", {"ciphertext": ciphertext, "context": context_object(context)})
        return DecryptResult(
            b64decode(ok["plaintext"], "the plaintext"),
            ok["tenant"],
            ok["key"],
            ok["key_version"],
            ok["envelope_id"],
        )

    def datakey(
        self, path: KeyPathLike, context: Context = None, *, include_plaintext: bool = True
    ) -> DatakeyResult:
        tenant, key = key_path(path)
        ok = self.call(
            "datakey",
            {
                "tenant": tenant,
                "key": key,
                "context": context_object(context),
                "include_plaintext": bool(include_plaintext),
            },
        )
        plain = ok.get("plaintext")
        return DatakeyResult(
            ok["envelope"],
            ok["envelope_id"],
            ok["key_version"],
            None if plain is None else b64decode(plain, "the data key"),
        )

    def datakey_decrypt(self, envelope: str, context: Context = None) -> DecryptResult:
        if not isinstance(envelope, str):
            raise InvalidInput("bad_request", "envelope must be a khe1: str")
        ok = self.call("datakey_decrypt", {"envelope": envelope, "context": context_object(context)})
        return DecryptResult(
            b64decode(ok["plaintext"], "the data key"),
            ok["tenant"],
            ok["key"],
            ok["key_version"],
            ok["envelope_id"],
        )

    def rewrap(self, text: str, context: Context = None) -> RewrapResult:
        if not isinstance(text, str):
            raise InvalidInput("bad_request", "text must be a khe1: or khc1: str")
        ok = self.call("rewrap", {"text": text, "context": context_object(context)})
        return RewrapResult(ok["text"], ok["from_version"], ok["key_version"], ok["envelope_id"])

    def mac(
        self, path: KeyPathLike, message: Union[Bytes, str], *, version: Optional[int] = None
    ) -> MacResult:
        """The HMAC-SHA256 tag of ``message`` under an ``hmac-sha256`` key, made in the token (§3.29).

        ``version``: an older key version, to reproduce the tags it gave
        (e.g. to look up a blind index made before a rotation).
        """
        tenant, key = key_path(path)
        params: Dict[str, Any] = {
            "tenant": tenant,
            "key": key,
            "message": b64encode(to_bytes(message, "message")),
        }
        if version is not None:
            params["version"] = _version(version)
        ok = self.call("mac", params)
        return MacResult(ok["tag"], ok["key_version"])

    def mac_verify(self, path: KeyPathLike, message: Union[Bytes, str], tag: str) -> MacVerifyResult:
        """Whether ``tag`` is the MAC of ``message`` under the version it names (§3.30).

        A mismatch is ``valid=False``, not an error.
        """
        if not isinstance(tag, str):
            raise InvalidInput("bad_request", "tag must be a khm1: str")
        tenant, key = key_path(path)
        ok = self.call(
            "mac_verify",
            {"tenant": tenant, "key": key, "message": b64encode(to_bytes(message, "message")), "tag": tag},
        )
        return MacVerifyResult(bool(ok["valid"]), ok["key_version"])

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
        tenant, key = key_path(path)
        ok = self.call("sign", {"tenant": tenant, "key": key, **_message_or_digest(message, digest)})
        return SignResult(
            bytes(b64decode(ok["signature"], "the signature")), ok["key_version"], ok["algorithm"]
        )

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
        tenant, key = key_path(path)
        params: Dict[str, Any] = {
            "tenant": tenant,
            "key": key,
            **_message_or_digest(message, digest),
            "signature": _signature_text(signature),
        }
        if version is not None:
            params["version"] = _version(version)
        ok = self.call("verify", params)
        return VerifyResult(bool(ok["valid"]), ok["key_version"], ok["algorithm"])

    def public_key(self, path: KeyPathLike, *, version: Optional[int] = None) -> PublicKeyResult:
        """The public key of a version (the current one by default) of a signing key or
        an ``rsa-4096-oaep`` key (§3.32), as PEM."""
        tenant, key = key_path(path)
        params: Dict[str, Any] = {"tenant": tenant, "key": key}
        if version is not None:
            params["version"] = _version(version)
        ok = self.call("public_key", params)
        return PublicKeyResult(ok["pem"], ok["key_version"], ok["type"])

    def alias_create(self, alias: str, path: KeyPathLike) -> AliasInfo:
        """Make ``alias`` a second name for the key ``path``, in the key's tenant (§3.37)."""
        tenant, key = key_path(path)
        return _alias_info(
            self.call("alias_create", {"tenant": tenant, "alias": check_name(alias, "alias"), "key": key})
        )

    def alias_update(self, alias: str, path: KeyPathLike) -> AliasInfo:
        """Move ``alias`` to the key ``path`` of the same tenant (§3.38); ``previous_key`` says from where."""
        tenant, key = key_path(path)
        return _alias_info(
            self.call("alias_update", {"tenant": tenant, "alias": check_name(alias, "alias"), "key": key})
        )

    def alias_delete(self, tenant: str, alias: str) -> AliasInfo:
        """Remove an alias (its key is untouched; §3.39); returns what it was."""
        return _alias_info(
            self.call(
                "alias_delete", {"tenant": check_name(tenant, "tenant"), "alias": check_name(alias, "alias")}
            )
        )

    def alias_list(self, tenant: Optional[str] = None) -> List[AliasInfo]:
        """Aliases of one tenant, else of every tenant, sorted by tenant then alias (§3.40)."""
        params: Dict[str, Any] = {} if tenant is None else {"tenant": check_name(tenant, "tenant")}
        aliases = self.call("alias_list", params).get("aliases")
        if not isinstance(aliases, list):
            raise ProtocolError("`alias_list` answered without `aliases`")
        return [_alias_info(a) for a in aliases]

    def subscribe_revocations(self) -> Dict[str, Any]:
        return self.call("subscribe_revocations")


def _tag_dict(tags: Any) -> Dict[str, str]:
    """Tags as the daemon takes them: str names and values (the daemon checks their bounds)."""
    if not isinstance(tags, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in tags.items()
    ):
        raise InvalidInput("bad_request", "tags must be a dict of str NAME: str VALUE")
    return dict(tags)
