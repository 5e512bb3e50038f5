"""The ``khm1:`` text form of a MAC tag (PROTOCOL.md §3.29).

The key version (4 bytes, big-endian, >= 1) and HMAC-SHA256 of the message
(32 bytes), as unpadded canonical base64url. A tag names no key, only the
version that made it: applications that store tags (a blind index) can read
that version, e.g. to find the rows to re-index before retiring it.
"""

from __future__ import annotations

from dataclasses import dataclass

from .codec import b64url_decode
from .errors import InvalidInput

MAC_TAG_PREFIX = "khm1:"
MAC_TAG_LENGTH = 53


@dataclass(frozen=True)
class MacTag:
    version: int
    """The key version that made the tag, >= 1."""
    mac: bytes
    """HMAC-SHA256 of the message under that version, 32 bytes."""


def parse_mac_tag(text: str) -> MacTag:
    """Parse a tag as the daemon does: surrounding whitespace removed, the exact
    prefix, strict base64url, 36 bytes, version >= 1.

    A bad tag raises ``InvalidInput`` with code ``bad_request`` (what
    ``mac_verify`` answers for it).
    """
    if not isinstance(text, str):
        raise InvalidInput("bad_request", "a MAC tag must be a khm1: str")
    t = text.strip(" \t\r\n")
    if not t.startswith(MAC_TAG_PREFIX):
        raise InvalidInput("bad_request", f"MAC tag: text form must start with `{MAC_TAG_PREFIX}`")
    raw = b64url_decode(t[len(MAC_TAG_PREFIX) :], "MAC tag", "bad_request")
    if len(raw) != 36:
        raise InvalidInput("bad_request", f"MAC tag: {len(raw)} bytes, a tag has 36")
    version = int.from_bytes(raw[:4], "big")
    if version == 0:
        raise InvalidInput("bad_request", "MAC tag: key version 0 (versions start at 1)")
    return MacTag(version, bytes(raw[4:]))
