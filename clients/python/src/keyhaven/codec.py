"""Strict encodings, names and the encryption context.

Base64 as the daemon expects it (PROTOCOL.md §2.5, ENVELOPE.md §5): the
standard library's decoders skip bad characters unless told not to and do
not check trailing bits, so every decode re-encodes and compares. Names follow
ENVELOPE.md §2.3; the context's canonical encoding ``C(ctx)`` is §4.2.
"""

from __future__ import annotations

import base64
import binascii
import re
import struct
from typing import Dict, List, Mapping, Optional, Tuple, Union

from .errors import InvalidInput

_STD_B64 = re.compile(r"(?:[A-Za-z0-9+/]{4})*(?:[A-Za-z0-9+/]{2}==|[A-Za-z0-9+/]{3}=)?")
_URL_B64 = re.compile(r"[A-Za-z0-9_-]*")
_NAME = re.compile(r"[a-z0-9][a-z0-9_-]{0,62}")

MAX_CONTEXT_PAIRS = 32
MAX_CONTEXT_KEY = 128
MAX_CONTEXT_VALUE = 1024

Bytes = Union[bytes, bytearray, memoryview]
Context = Optional[Mapping[str, str]]
KeyPathLike = Union[str, Tuple[str, str]]


def to_bytes(value: Union[Bytes, str], what: str) -> bytes:
    """Bytes from bytes-like or str (UTF-8)."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    if isinstance(value, str):
        try:
            return value.encode("utf-8")
        except UnicodeEncodeError:
            raise InvalidInput("bad_request", f"{what} is a str with a lone surrogate: not UTF-8") from None
    raise InvalidInput("bad_request", f"{what} must be bytes or str")


def b64encode(data: Bytes) -> str:
    """Standard base64 with padding."""
    return base64.b64encode(bytes(data)).decode("ascii")


def b64decode(text: object, what: str) -> bytearray:
    """Decode canonical standard base64 into a bytearray (which can be wiped)."""
    if not isinstance(text, str) or not _STD_B64.fullmatch(text):
        raise InvalidInput("bad_request", f"{what} is not standard padded base64")
    out = bytearray(base64.b64decode(text, validate=True))
    if base64.b64encode(out).decode("ascii") != text:
        raise InvalidInput("bad_request", f"{what} has non-zero trailing bits (not canonical base64)")
    return out


def b64url_encode(data: Bytes) -> str:
    """base64url without padding (ENVELOPE.md §5)."""
    return base64.urlsafe_b64encode(bytes(data)).rstrip(b"=").decode("ascii")


def b64url_decode(text: str, what: str, code: str = "bad_envelope") -> bytes:
    """Decode canonical unpadded base64url; ``code`` names the failure class."""
    if not _URL_B64.fullmatch(text) or len(text) % 4 == 1:
        raise InvalidInput(code, f"{what} is not canonical unpadded base64url")
    try:
        out = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError):
        raise InvalidInput(code, f"{what} is not canonical unpadded base64url") from None
    if b64url_encode(out) != text:
        raise InvalidInput(code, f"{what} has non-zero trailing bits (not canonical base64url)")
    return out


def check_name(name: object, what: str) -> str:
    """A tenant or key name: 1..63 of a-z 0-9 - _, starting with a letter or digit."""
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        shown = repr(name[:70]) if isinstance(name, str) else type(name).__name__
        raise InvalidInput(
            "bad_request",
            f"invalid {what} name {shown}: 1 to 63 of a-z, 0-9, - and _, starting with a letter or a digit",
        )
    return name


def key_path(path: KeyPathLike) -> Tuple[str, str]:
    """``"tenant/key"`` or ``(tenant, key)``, checked."""
    if isinstance(path, str):
        if "/" not in path:
            raise InvalidInput("bad_request", "a key is written TENANT/KEY")
        tenant, key = path.split("/", 1)
    elif isinstance(path, tuple) and len(path) == 2:
        tenant, key = path
    else:
        raise InvalidInput("bad_request", 'a key is "tenant/key" or (tenant, key)')
    return check_name(tenant, "tenant"), check_name(key, "key")


def context_pairs(context: Context) -> List[Tuple[bytes, bytes, str, str]]:
    """Validate a context; its pairs as UTF-8, sorted by the key's bytes."""
    if context is None:
        return []
    if not isinstance(context, Mapping):
        raise InvalidInput("bad_request", "invalid encryption context: a mapping of str to str")
    if len(context) > MAX_CONTEXT_PAIRS:
        raise InvalidInput(
            "bad_request", f"invalid encryption context: {len(context)} pairs, at most {MAX_CONTEXT_PAIRS}"
        )
    pairs = []
    for k, v in context.items():
        if not isinstance(k, str) or not isinstance(v, str):
            raise InvalidInput("bad_request", "invalid encryption context: keys and values must be str")
        try:
            kb, vb = k.encode("utf-8"), v.encode("utf-8")
        except UnicodeEncodeError:
            raise InvalidInput(
                "bad_request", "invalid encryption context: a lone surrogate is not UTF-8"
            ) from None
        if not 1 <= len(kb) <= MAX_CONTEXT_KEY:
            raise InvalidInput(
                "bad_request",
                f"invalid encryption context: a key of {len(kb)} bytes (1 to {MAX_CONTEXT_KEY})",
            )
        if len(vb) > MAX_CONTEXT_VALUE:
            raise InvalidInput(
                "bad_request",
                f"invalid encryption context: the value of {k[:40]!r} has {len(vb)} bytes "
                f"(at most {MAX_CONTEXT_VALUE})",
            )
        pairs.append((kb, vb, k, v))
    pairs.sort(key=lambda p: p[0])
    return pairs


def context_object(context: Context) -> Dict[str, str]:
    """The context as the wire's JSON object, in canonical order."""
    return {k: v for _, _, k, v in context_pairs(context)}


def encode_context(context: Context) -> bytes:
    """``C(ctx)`` of ENVELOPE.md §4.2."""
    pairs = context_pairs(context)
    out = bytearray(struct.pack(">H", len(pairs)))
    for kb, vb, _, _ in pairs:
        out += struct.pack(">H", len(kb)) + kb + struct.pack(">H", len(vb)) + vb
    return bytes(out)
