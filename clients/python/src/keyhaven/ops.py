"""The operations, once for both clients: each builds its request (op name and
checked params, PROTOCOL.md §3) and reads its answer into a typed result.

``Client`` (threads) and ``AsyncClient`` (asyncio) differ only in how they send
a ``Request`` and wait for its ``ok`` object; validation, encoding and result
parsing live here. Results carry the wire's field names; base64 fields are
decoded to ``bytearray`` (which the caller can wipe).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Generic, List, Optional, TypeVar, Union

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
from .errors import InvalidInput, ProtocolError

T = TypeVar("T")
Ok = Dict[str, Any]


class Request(Generic[T]):
    """One operation ready to send: ``op``, ``params``, and ``parse`` for its ``ok`` object."""

    __slots__ = ("op", "params", "parse")

    def __init__(self, op: str, params: Optional[Ok], parse: Callable[[Ok], T]) -> None:
        self.op = op
        self.params = params
        self.parse = parse


def _ok(ok: Ok) -> Ok:
    return ok


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


def health() -> Request[Ok]:
    return Request("health", None, _ok)


def whoami() -> Request[Ok]:
    return Request("whoami", None, _ok)


def subscribe_revocations() -> Request[Ok]:
    return Request("subscribe_revocations", None, _ok)


def _metrics_text(ok: Ok) -> str:
    text = ok.get("text")
    if not isinstance(text, str):
        raise ProtocolError("`metrics` answered without text")
    return text


def metrics() -> Request[str]:
    return Request("metrics", None, _metrics_text)


def key_create(
    path: KeyPathLike,
    *,
    type: Optional[str] = None,
    rotate_every_secs: Optional[int] = None,
    idempotency_key: Optional[str] = None,
    description: Optional[str] = None,
    tags: Optional[Dict[str, str]] = None,
) -> Request[Ok]:
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
            raise InvalidInput("bad_request", "rotate_every_secs must be a whole number of seconds (0: none)")
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
    return Request("key_create", params, _ok)


def key_show(path: KeyPathLike) -> Request[Ok]:
    tenant, key = key_path(path)
    return Request("key_show", {"tenant": tenant, "key": key}, _ok)


def key_list_params(
    tenant: Optional[str], page_size: Optional[int], tags: Optional[Dict[str, str]]
) -> Dict[str, Any]:
    """The first page's params of ``key_list`` (§3.4); ``key_list_page`` reads each page."""
    params: Dict[str, Any] = {} if tenant is None else {"tenant": check_name(tenant, "tenant")}
    if page_size is not None:
        if isinstance(page_size, bool) or not isinstance(page_size, int) or not 1 <= page_size <= 1000:
            raise InvalidInput("bad_request", "page_size must be an int from 1 to 1000")
        params["limit"] = page_size
    if tags is not None:
        params["tags"] = _tag_dict(tags)
    return params


def key_list_page(ok: Ok, params: Dict[str, Any], keys: List[Ok]) -> bool:
    """Add a page's keys to ``keys``; True (with ``params`` set for the next page) if there is one."""
    keys.extend(ok["keys"])
    nxt = ok.get("next")
    if not isinstance(nxt, str):
        return False
    if nxt == params.get("after"):
        raise ProtocolError("`key_list` returned the same page again")
    params["after"] = nxt
    return True


def _encrypt_result(ok: Ok) -> EncryptResult:
    return EncryptResult(ok["ciphertext"], ok["envelope_id"], ok["key_version"])


def encrypt(
    path: KeyPathLike, plaintext: Union[Bytes, str], context: Context = None
) -> Request[EncryptResult]:
    tenant, key = key_path(path)
    return Request(
        "encrypt",
        {
            "tenant": tenant,
            "key": key,
            "plaintext": b64encode(to_bytes(plaintext, "plaintext")),
            "context": context_object(context),
        },
        _encrypt_result,
    )


def _decrypt_result(ok: Ok) -> DecryptResult:
    return DecryptResult(
        b64decode(ok["plaintext"], "the plaintext"),
        ok["tenant"],
        ok["key"],
        ok["key_version"],
        ok["envelope_id"],
    )


def decrypt(ciphertext: str, context: Context = None) -> Request[DecryptResult]:
    if not isinstance(ciphertext, str):
        raise InvalidInput("bad_request", "ciphertext must be a khc1: str")
    return Request("decrypt", {"ciphertext": ciphertext, "context": context_object(context)}, _decrypt_result)


def _datakey_result(ok: Ok) -> DatakeyResult:
    plain = ok.get("plaintext")
    return DatakeyResult(
        ok["envelope"],
        ok["envelope_id"],
        ok["key_version"],
        None if plain is None else b64decode(plain, "the data key"),
    )


def datakey(
    path: KeyPathLike, context: Context = None, *, include_plaintext: bool = True
) -> Request[DatakeyResult]:
    tenant, key = key_path(path)
    return Request(
        "datakey",
        {
            "tenant": tenant,
            "key": key,
            "context": context_object(context),
            "include_plaintext": bool(include_plaintext),
        },
        _datakey_result,
    )


def _datakey_decrypt_result(ok: Ok) -> DecryptResult:
    return DecryptResult(
        b64decode(ok["plaintext"], "the data key"),
        ok["tenant"],
        ok["key"],
        ok["key_version"],
        ok["envelope_id"],
    )


def datakey_decrypt(envelope: str, context: Context = None) -> Request[DecryptResult]:
    if not isinstance(envelope, str):
        raise InvalidInput("bad_request", "envelope must be a khe1: str")
    return Request(
        "datakey_decrypt", {"envelope": envelope, "context": context_object(context)}, _datakey_decrypt_result
    )


def _rewrap_result(ok: Ok) -> RewrapResult:
    return RewrapResult(ok["text"], ok["from_version"], ok["key_version"], ok["envelope_id"])


def rewrap(text: str, context: Context = None) -> Request[RewrapResult]:
    if not isinstance(text, str):
        raise InvalidInput("bad_request", "text must be a khe1: or khc1: str")
    return Request("rewrap", {"text": text, "context": context_object(context)}, _rewrap_result)


def _mac_result(ok: Ok) -> MacResult:
    return MacResult(ok["tag"], ok["key_version"])


def mac(
    path: KeyPathLike, message: Union[Bytes, str], *, version: Optional[int] = None
) -> Request[MacResult]:
    tenant, key = key_path(path)
    params: Dict[str, Any] = {
        "tenant": tenant,
        "key": key,
        "message": b64encode(to_bytes(message, "message")),
    }
    if version is not None:
        params["version"] = _version(version)
    return Request("mac", params, _mac_result)


def _mac_verify_result(ok: Ok) -> MacVerifyResult:
    return MacVerifyResult(bool(ok["valid"]), ok["key_version"])


def mac_verify(path: KeyPathLike, message: Union[Bytes, str], tag: str) -> Request[MacVerifyResult]:
    if not isinstance(tag, str):
        raise InvalidInput("bad_request", "tag must be a khm1: str")
    tenant, key = key_path(path)
    return Request(
        "mac_verify",
        {"tenant": tenant, "key": key, "message": b64encode(to_bytes(message, "message")), "tag": tag},
        _mac_verify_result,
    )


def _sign_result(ok: Ok) -> SignResult:
    return SignResult(bytes(b64decode(ok["signature"], "the signature")), ok["key_version"], ok["algorithm"])


def sign(
    path: KeyPathLike, message: Optional[Union[Bytes, str]] = None, *, digest: Optional[Bytes] = None
) -> Request[SignResult]:
    tenant, key = key_path(path)
    return Request(
        "sign", {"tenant": tenant, "key": key, **_message_or_digest(message, digest)}, _sign_result
    )


def _verify_result(ok: Ok) -> VerifyResult:
    return VerifyResult(bool(ok["valid"]), ok["key_version"], ok["algorithm"])


def verify(
    path: KeyPathLike,
    message: Optional[Union[Bytes, str]],
    signature: Union[Bytes, str],
    *,
    digest: Optional[Bytes] = None,
    version: Optional[int] = None,
) -> Request[VerifyResult]:
    tenant, key = key_path(path)
    params: Dict[str, Any] = {
        "tenant": tenant,
        "key": key,
        **_message_or_digest(message, digest),
        "signature": _signature_text(signature),
    }
    if version is not None:
        params["version"] = _version(version)
    return Request("verify", params, _verify_result)


def _public_key_result(ok: Ok) -> PublicKeyResult:
    return PublicKeyResult(ok["pem"], ok["key_version"], ok["type"])


def public_key(path: KeyPathLike, *, version: Optional[int] = None) -> Request[PublicKeyResult]:
    tenant, key = key_path(path)
    params: Dict[str, Any] = {"tenant": tenant, "key": key}
    if version is not None:
        params["version"] = _version(version)
    return Request("public_key", params, _public_key_result)


def alias_create(alias: str, path: KeyPathLike) -> Request[AliasInfo]:
    tenant, key = key_path(path)
    return Request(
        "alias_create", {"tenant": tenant, "alias": check_name(alias, "alias"), "key": key}, _alias_info
    )


def alias_update(alias: str, path: KeyPathLike) -> Request[AliasInfo]:
    tenant, key = key_path(path)
    return Request(
        "alias_update", {"tenant": tenant, "alias": check_name(alias, "alias"), "key": key}, _alias_info
    )


def alias_delete(tenant: str, alias: str) -> Request[AliasInfo]:
    return Request(
        "alias_delete",
        {"tenant": check_name(tenant, "tenant"), "alias": check_name(alias, "alias")},
        _alias_info,
    )


def _alias_list_result(ok: Ok) -> List[AliasInfo]:
    aliases = ok.get("aliases")
    if not isinstance(aliases, list):
        raise ProtocolError("`alias_list` answered without `aliases`")
    return [_alias_info(a) for a in aliases]


def alias_list(tenant: Optional[str] = None) -> Request[List[AliasInfo]]:
    params: Dict[str, Any] = {} if tenant is None else {"tenant": check_name(tenant, "tenant")}
    return Request("alias_list", params, _alias_list_result)


def _tag_dict(tags: Any) -> Dict[str, str]:
    """Tags as the daemon takes them: str names and values (the daemon checks their bounds)."""
    if not isinstance(tags, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in tags.items()
    ):
        raise InvalidInput("bad_request", "tags must be a dict of str NAME: str VALUE")
    return dict(tags)
