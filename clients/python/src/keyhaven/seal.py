"""Sealed records (``khs1:``) and sealed streams (ENVELOPE.md §10).

Byte for byte as the Rust crate's client/src/seal.rs, with AES-256-GCM from
``cryptography``. Structural faults are ``bad_envelope``; a tag that does not
verify is ``integrity``.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from typing import Optional

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from .codec import Context, b64url_decode, b64url_encode, check_name, encode_context
from .errors import IntegrityError, InvalidInput

KIND_ENVELOPE = 0x01
KIND_SEALED = 0x03
KIND_STREAM = 0x04
SEALED_PREFIX = "khs1:"
ENVELOPE_PREFIX = "khe1:"
MAX_RECORD_PLAINTEXT = 2**36 - 32
MAX_MESSAGES_PER_KEY = 2**31
MIN_CHUNK = 1024
MAX_CHUNK = 16 * 1024 * 1024
DEFAULT_CHUNK = 65536
MAX_CHUNKS = 2**32
NONCE = 12
TAG = 16


def _malformed(what: str, why: str) -> InvalidInput:
    return InvalidInput("bad_envelope", f"malformed {what}: {why}")


def _preamble(kind: int) -> bytes:
    return bytes([0x4B, 0x48, 0x01, kind, 0x01])


def _check_preamble(what: str, b: bytes, kind: int) -> None:
    if len(b) < 5:
        raise _malformed(what, f"{len(b)} bytes, too short")
    if b[0:2] != b"KH":
        raise _malformed(what, "bad magic")
    if b[2] != 0x01:
        raise _malformed(what, f"unknown format version {b[2]}")
    if b[3] != kind:
        raise _malformed(what, f"kind {b[3]}, not {kind}")
    if b[4] != 0x01:
        raise _malformed(what, f"unknown algorithm {b[4]}")


@dataclass(frozen=True)
class EnvelopeInfo:
    """What an envelope claims (facts only once the daemon unwrapped it)."""

    tenant: str
    key: str
    version: int
    id: str


def parse_envelope(b: bytes) -> EnvelopeInfo:
    """Parse a data-key envelope (ENVELOPE.md §8 steps 2-10)."""
    what = "envelope"
    _check_preamble(what, b, KIND_ENVELOPE)
    at = 5
    names = []
    for field in ("tenant", "key"):
        if at >= len(b):
            raise _malformed(what, f"truncated before the {field} length")
        n = b[at]
        if not 1 <= n <= 63:
            raise _malformed(what, f"{field} length {n}")
        if at + 1 + n > len(b):
            raise _malformed(what, f"truncated {field}")
        raw = b[at + 1 : at + 1 + n].decode("latin-1")
        try:
            check_name(raw, field)
        except InvalidInput:
            raise _malformed(what, f"invalid {field} name") from None
        names.append(raw)
        at += 1 + n
    if at + 4 > len(b):
        raise _malformed(what, "truncated key version")
    (version,) = struct.unpack_from(">I", b, at)
    if version == 0:
        raise _malformed(what, "key version 0")
    at += 4
    if at + 16 + 12 + 48 > len(b):
        raise _malformed(what, "truncated id, nonce or wrapped key")
    eid = b[at : at + 16].hex()
    at += 16 + 12 + 48
    if at != len(b):
        raise _malformed(what, f"{len(b) - at} bytes after the wrapped key")
    return EnvelopeInfo(names[0], names[1], version, eid)


def _strip(text: object, prefix: str, what: str) -> str:
    if not isinstance(text, str):
        raise _malformed(what, f"a {prefix} str is expected")
    t = text.strip(" \t\r\n")
    if not t.startswith(prefix):
        raise _malformed(what, f"the text does not start with {prefix}")
    return t[len(prefix) :]


def envelope_from_text(text: str) -> bytes:
    return b64url_decode(_strip(text, ENVELOPE_PREFIX, "envelope"), "envelope")


def envelope_to_text(b: bytes) -> str:
    return ENVELOPE_PREFIX + b64url_encode(b)


def sealed_to_text(b: bytes) -> str:
    """A sealed record's bytes as ``khs1:`` text."""
    return SEALED_PREFIX + b64url_encode(b)


def sealed_from_text(text: str) -> bytes:
    """A sealed record's bytes from ``khs1:`` text."""
    return b64url_decode(_strip(text, SEALED_PREFIX, "sealed record"), "sealed record")


def _check_key(key: bytes | bytearray) -> None:
    if not isinstance(key, (bytes, bytearray)) or len(key) != 32:
        raise InvalidInput("bad_request", "a data key is 32 bytes")


def seal_record(
    key: bytes | bytearray, envelope: bytes, context: Context, plaintext: bytes, nonce: Optional[bytes] = None
) -> bytes:
    """Seal one record (ENVELOPE.md §10.1-10.2); ``nonce`` is for test vectors only."""
    _check_key(key)
    parse_envelope(envelope)
    if len(plaintext) > MAX_RECORD_PLAINTEXT:
        raise InvalidInput(
            "bad_request", f"a record holds at most {MAX_RECORD_PLAINTEXT} bytes; use a stream"
        )
    iv = nonce if nonce is not None else os.urandom(NONCE)
    header = _preamble(KIND_SEALED) + struct.pack(">H", len(envelope)) + envelope + iv
    return header + AESGCM(bytes(key)).encrypt(iv, plaintext, header + encode_context(context))


@dataclass(frozen=True)
class Record:
    """A parsed sealed record."""

    header: bytes
    envelope: bytes
    envelope_info: EnvelopeInfo
    nonce: bytes
    payload: bytes


def parse_record(b: bytes | bytearray | memoryview) -> Record:
    what = "sealed record"
    if not isinstance(b, (bytes, bytearray, memoryview)):
        raise _malformed(what, "bytes are expected")
    b = bytes(b)
    _check_preamble(what, b, KIND_SEALED)
    if len(b) < 7:
        raise _malformed(what, "truncated envelope length")
    (n,) = struct.unpack_from(">H", b, 5)
    if 7 + n > len(b):
        raise _malformed(what, "truncated envelope")
    envelope = b[7 : 7 + n]
    info = parse_envelope(envelope)
    if 7 + n + NONCE > len(b):
        raise _malformed(what, "truncated nonce")
    payload = b[7 + n + NONCE :]
    if len(payload) < TAG:
        raise _malformed(what, f"a payload of {len(payload)} bytes, shorter than its tag")
    return Record(b[: 7 + n + NONCE], envelope, info, b[7 + n : 7 + n + NONCE], payload)


def open_record(key: bytes | bytearray, record: Record, context: Context) -> bytearray:
    """Open a parsed record; a failed tag is ``integrity``."""
    _check_key(key)
    try:
        out = AESGCM(bytes(key)).decrypt(
            record.nonce, record.payload, record.header + encode_context(context)
        )
    except InvalidTag:
        raise IntegrityError(
            "the sealed record does not authenticate: it was altered, or the encryption context differs"
        ) from None
    return bytearray(out)


def check_chunk_size(c: int) -> None:
    if isinstance(c, bool) or not isinstance(c, int) or not MIN_CHUNK <= c <= MAX_CHUNK:
        raise InvalidInput("bad_request", f"the chunk size must be {MIN_CHUNK} to {MAX_CHUNK} bytes, not {c}")


def stream_header(envelope: bytes, chunk_size: int) -> bytes:
    """A sealed stream's header (ENVELOPE.md §10.4)."""
    check_chunk_size(chunk_size)
    parse_envelope(envelope)
    return _preamble(KIND_STREAM) + struct.pack(">IH", chunk_size, len(envelope)) + envelope


@dataclass(frozen=True)
class StreamHeader:
    header: bytes
    envelope: bytes
    envelope_info: EnvelopeInfo
    chunk_size: int


def parse_stream_header_fixed(fixed: bytes) -> tuple[int, int]:
    """Check the first 11 bytes; returns (chunk size, envelope length)."""
    what = "sealed stream"
    if len(fixed) < 11:
        if len(fixed) >= 5:
            _check_preamble(what, fixed, KIND_STREAM)
        raise _malformed(what, "it ends inside its header")
    _check_preamble(what, fixed, KIND_STREAM)
    chunk, n = struct.unpack_from(">IH", fixed, 5)
    if not MIN_CHUNK <= chunk <= MAX_CHUNK:
        raise _malformed(what, f"chunk size {chunk}")
    return chunk, n


class ChunkCipher:
    """The chunk cipher of one stream, owning a copy of its key (``wipe()``).

    Chunk i with final flag f uses IV u64(i) || f || 000000 and AAD
    header || C(ctx) || u64(i) || f.
    """

    def __init__(self, key: bytes | bytearray, header: bytes, context: Context) -> None:
        _check_key(key)
        self._key = bytearray(key)
        self._prefix = header + encode_context(context)
        self.index = 0
        self.done = False

    def _iv_aad(self, last: bool) -> tuple[bytes, bytes]:
        if self.done:
            raise IntegrityError("the sealed stream goes on after its final chunk")
        if self.index >= MAX_CHUNKS:
            raise InvalidInput("bad_request", "a stream holds at most 2^32 chunks")
        tail = struct.pack(">QB", self.index, 1 if last else 0)
        self.index += 1
        self.done = last
        return tail + b"\x00\x00\x00", self._prefix + tail

    def seal(self, plaintext: bytes, last: bool) -> bytes:
        iv, aad = self._iv_aad(last)
        return AESGCM(bytes(self._key)).encrypt(iv, plaintext, aad)

    def open(self, sealed: bytes, last: bool) -> bytes:
        if len(sealed) < TAG:
            raise IntegrityError("the sealed stream ends inside a chunk: it was truncated")
        iv, aad = self._iv_aad(last)
        try:
            return AESGCM(bytes(self._key)).decrypt(iv, sealed, aad)
        except InvalidTag:
            raise IntegrityError(
                "a chunk of the sealed stream does not authenticate: it was altered, reordered, "
                "truncated or extended, or the context differs"
            ) from None

    def wipe(self) -> None:
        self._key[:] = bytes(len(self._key))
