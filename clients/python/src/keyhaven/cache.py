"""Data-key caches of the Sealer (ENVELOPE.md §10.3).

As the Rust crate's client/src/cache.rs: a sealing cache partitioned by
tenant, key and ``C(ctx)`` with required limits (age, messages, bytes), and
an opening cache by envelope id (age, entries). A key leaving either cache
is overwritten with zeros in its ``bytearray``. Not thread-safe by itself:
the Sealer holds a lock around every use.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Dict, Mapping, Optional, Tuple

from .errors import InvalidInput
from .seal import MAX_MESSAGES_PER_KEY, EnvelopeInfo


def _positive(value: object, name: str, top: Optional[float] = None) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
        raise InvalidInput("config", f"{name} must be above zero, not {value!r}")
    if top is not None and value > top:
        raise InvalidInput("config", f"{name} must be at most {int(top)}, not {value!r}")
    return float(value)


@dataclass(frozen=True)
class SealLimits:
    """Required limits per data key: ``max_age`` seconds, records, plaintext bytes."""

    max_age: float
    max_messages: int
    max_bytes: int

    def __post_init__(self) -> None:
        _positive(self.max_age, "max_age")
        if isinstance(self.max_messages, bool) or not isinstance(self.max_messages, int):
            raise InvalidInput("config", "max_messages must be an int")
        _positive(self.max_messages, "max_messages", MAX_MESSAGES_PER_KEY)
        if isinstance(self.max_bytes, bool) or not isinstance(self.max_bytes, int):
            raise InvalidInput("config", "max_bytes must be an int")
        _positive(self.max_bytes, "max_bytes")


@dataclass(frozen=True)
class OpenLimits:
    """Opening cache: ``max_age`` seconds and ``max_entries`` keys (0: no cache)."""

    max_age: float
    max_entries: int

    def __post_init__(self) -> None:
        if (
            isinstance(self.max_entries, bool)
            or not isinstance(self.max_entries, int)
            or self.max_entries < 0
        ):
            raise InvalidInput("config", "max_entries must be an int >= 0")
        if self.max_entries > 0:
            _positive(self.max_age, "max_age")


def in_scope(origin: EnvelopeInfo, scope: Optional[Mapping[str, Any]]) -> bool:
    """Whether a revocation scope covers a key; no scope covers everything."""
    if not scope:
        return True
    kind = scope.get("kind")
    if kind == "all":
        return True
    if kind == "tenant":
        return origin.tenant == scope.get("tenant")
    if kind == "key":
        v = scope.get("version")
        return (
            origin.tenant == scope.get("tenant")
            and origin.key == scope.get("key")
            and v in (None, origin.version)
        )
    if kind == "datakey":
        return origin.id == scope.get("envelope_id")
    return True  # a scope this client does not know: drop everything


@dataclass(eq=False)
class Entry:
    key: bytearray = field(repr=False)
    envelope: bytes
    origin: EnvelopeInfo
    created: float
    messages: int = 1
    bytes: int = 0

    def wipe(self) -> None:
        self.key[:] = bytes(len(self.key))


Partition = Tuple[str, str, bytes]


class SealCache:
    def __init__(self, limits: SealLimits) -> None:
        self.limits = limits
        self.entries: Dict[Partition, Entry] = {}

    def admits(self, n: int) -> bool:
        return n <= self.limits.max_bytes

    def take(self, part: Partition, n: int, now: float) -> Optional[Entry]:
        """The partition's key counted for one more record of ``n`` bytes, or None."""
        e = self.entries.get(part)
        if e is None:
            return None
        if (
            now - e.created >= self.limits.max_age
            or e.messages >= self.limits.max_messages
            or e.bytes + n > self.limits.max_bytes
        ):
            del self.entries[part]
            e.wipe()
            return None
        e.messages += 1
        e.bytes += n
        return e

    def insert(self, part: Partition, e: Entry) -> None:
        old = self.entries.pop(part, None)
        if old is not None:
            old.wipe()
        self.entries[part] = e

    def revoke(self, scope: Optional[Mapping[str, Any]]) -> int:
        gone = [p for p, e in self.entries.items() if in_scope(e.origin, scope)]
        for p in gone:
            self.entries.pop(p).wipe()
        return len(gone)

    def __len__(self) -> int:
        return len(self.entries)


class OpenCache:
    def __init__(self, limits: OpenLimits) -> None:
        self.limits = limits
        self.entries: OrderedDict[str, Entry] = OrderedDict()

    def get(self, eid: str, envelope: bytes, now: float) -> Optional[Entry]:
        e = self.entries.get(eid)
        if e is None:
            return None
        if now - e.created >= self.limits.max_age:
            del self.entries[eid]
            e.wipe()
            return None
        return e if e.envelope == envelope else None

    def insert(self, e: Entry) -> None:
        if self.limits.max_entries == 0:
            e.wipe()
            return
        old = self.entries.pop(e.origin.id, None)
        if old is not None:
            old.wipe()
        self.entries[e.origin.id] = e
        while len(self.entries) > self.limits.max_entries:
            _, oldest = self.entries.popitem(last=False)
            oldest.wipe()

    def revoke(self, scope: Optional[Mapping[str, Any]]) -> int:
        gone = [i for i, e in self.entries.items() if in_scope(e.origin, scope)]
        for i in gone:
            self.entries.pop(i).wipe()
        return len(gone)

    def __len__(self) -> int:
        return len(self.entries)
