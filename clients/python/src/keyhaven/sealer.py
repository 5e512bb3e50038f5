"""The Sealer: seal and open records and streams in this process.

Data keys come from the daemon and are cached (cache.py) as the Rust crate's
client/src/sealer.rs does. The Sealer's own connection subscribes to
revocation events (PROTOCOL.md §3.26, §6): an event drops every cached key
in scope at once; a lost connection drops them all, and until it has
reconnected and subscribed again nothing is cached. A key fetched while an
event came in is used for its one call and not cached. Thread-safe: the
caches are used under a lock, and each call works on its own copy of a key,
wiped when the call ends.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass
from typing import IO, Any, Callable, Dict, Optional, TypeVar, Union

from .cache import Entry, OpenCache, OpenLimits, SealCache, SealLimits
from .client import DEFAULT_CONNECT_TIMEOUT, DEFAULT_REQUEST_TIMEOUT, DEFAULT_SOCKET, SOCKET_ENV, VERSION
from .codec import Bytes, Context, KeyPathLike, b64decode, context_object, encode_context, key_path, to_bytes
from .connection import Connection
from .errors import InvalidInput, ProtocolError
from .seal import (
    DEFAULT_CHUNK,
    TAG,
    ChunkCipher,
    EnvelopeInfo,
    check_chunk_size,
    envelope_from_text,
    envelope_to_text,
    open_record,
    parse_envelope,
    parse_record,
    parse_stream_header_fixed,
    seal_record,
    sealed_from_text,
    stream_header,
)

T = TypeVar("T")


@dataclass
class SealerStats:
    datakeys: int = 0
    unwraps: int = 0
    seal_hits: int = 0
    open_hits: int = 0
    revoked: int = 0
    events: int = 0
    connections: int = 0
    seal_keys: int = 0
    open_keys: int = 0


def _wipe(b: bytearray) -> None:
    b[:] = bytes(len(b))


class Sealer:
    """Local sealing with cached data keys; every cache limit is required."""

    def __init__(
        self,
        socket: Optional[str] = None,
        *,
        seal: SealLimits,
        open: OpenLimits,
        connect_timeout: Optional[float] = DEFAULT_CONNECT_TIMEOUT,
        request_timeout: Optional[float] = DEFAULT_REQUEST_TIMEOUT,
    ) -> None:
        if not isinstance(seal, SealLimits) or not isinstance(open, OpenLimits):
            raise InvalidInput("config", "a Sealer needs SealLimits and OpenLimits: there are no defaults")
        self.socket = socket if socket is not None else os.environ.get(SOCKET_ENV) or DEFAULT_SOCKET
        self.connect_timeout = connect_timeout
        self.request_timeout = request_timeout
        self._seal = SealCache(seal)
        self._open = OpenCache(open)
        self._lock = threading.Lock()
        self._conn_lock = threading.Lock()
        self._conn: Optional[Connection] = None
        self._live = False
        self._epoch = 0
        self._generation = 0
        self._stats = SealerStats()

    def __enter__(self) -> Sealer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def stats(self) -> SealerStats:
        with self._lock:
            s = SealerStats(**self._stats.__dict__)
            s.seal_keys, s.open_keys = len(self._seal), len(self._open)
            return s

    def clear(self) -> None:
        """Empty both caches (keys wiped)."""
        with self._lock:
            self._clear_locked()

    def _clear_locked(self) -> None:
        self._epoch += 1
        self._seal.revoke(None)
        self._open.revoke(None)

    def close(self) -> None:
        """Close the connection and empty both caches."""
        with self._conn_lock:
            conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()
        self.clear()

    def _on_event(self, event: Dict[str, Any]) -> None:
        kind = event.get("event")
        if kind not in ("revoked", "lagged"):
            return  # unknown events are ignored (PROTOCOL.md §6)
        scope = event.get("scope") if kind == "revoked" else None
        with self._lock:
            self._epoch += 1
            self._stats.events += 1
            self._stats.revoked += self._seal.revoke(scope) + self._open.revoke(scope)

    def _on_close(self, generation: int) -> None:
        with self._lock:
            if generation == self._generation:
                self._live = False
            self._clear_locked()

    def connection(self) -> Connection:
        """The subscribed connection, (re)opened when needed."""
        with self._conn_lock:
            if self._conn is not None and not self._conn.closed:
                return self._conn
            with self._lock:
                self._generation += 1
                generation = self._generation
                self._live = False
                self._clear_locked()
            conn = Connection(
                self.socket,
                self.connect_timeout,
                f"keyhaven-python/{VERSION} sealer",
                self._on_event,
                lambda: self._on_close(generation),
            )
            try:
                conn.request("subscribe_revocations", {}, self.request_timeout)
            except BaseException:
                conn.close()
                raise
            with self._lock:
                self._stats.connections += 1
                self._live = self._generation == generation and not conn.closed
            self._conn = conn
            return conn

    def _datakey(self, tenant: str, key: str, context: Context) -> Entry:
        ok = self.connection().request(
            "datakey",
            {"tenant": tenant, "key": key, "context": context_object(context), "include_plaintext": True},
            self.request_timeout,
        )
        plain = ok.get("plaintext")
        if not isinstance(plain, str):
            raise ProtocolError("`datakey` returned no plaintext key")
        envelope = envelope_from_text(ok["envelope"])
        return Entry(b64decode(plain, "the data key"), envelope, parse_envelope(envelope), time.monotonic())

    def seal(self, path: KeyPathLike, plaintext: Union[Bytes, str], context: Context = None) -> bytes:
        """Seal one record; ``sealed_to_text`` gives its ``khs1:`` text."""
        tenant, key = key_path(path)
        data = to_bytes(plaintext, "plaintext")
        part = (tenant, key, encode_context(context))
        self.connection()
        hit_key: Optional[bytearray] = None
        envelope = b""
        with self._lock:
            if self._live and self._seal.admits(len(data)):
                hit = self._seal.take(part, len(data), time.monotonic())
                if hit is not None:
                    self._stats.seal_hits += 1
                    hit_key, envelope = bytearray(hit.key), hit.envelope
            epoch = self._epoch
        if hit_key is not None:
            try:
                return seal_record(hit_key, envelope, context, data)
            finally:
                _wipe(hit_key)
        fresh = self._datakey(tenant, key, context)
        try:
            with self._lock:
                self._stats.datakeys += 1
                if self._live and self._epoch == epoch and self._seal.admits(len(data)):
                    cached = Entry(
                        bytearray(fresh.key), fresh.envelope, fresh.origin, fresh.created, 1, len(data)
                    )
                    self._seal.insert(part, cached)
            return seal_record(fresh.key, fresh.envelope, context, data)
        finally:
            fresh.wipe()

    def open(self, sealed: Union[bytes, bytearray, str], context: Context = None) -> bytearray:
        """Open a record (bytes or ``khs1:`` text); the plaintext as a bytearray."""
        raw = sealed_from_text(sealed) if isinstance(sealed, str) else sealed
        record = parse_record(raw)
        return self._with_key(
            record.envelope, record.envelope_info, context, lambda k: open_record(k, record, context)
        )

    def _with_key(
        self, envelope: bytes, info: EnvelopeInfo, context: Context, use: Callable[[bytearray], T]
    ) -> T:
        context_object(context)  # validate before anything is sent
        conn = self.connection()
        k: Optional[bytearray] = None
        with self._lock:
            if self._live:
                hit = self._open.get(info.id, envelope, time.monotonic())
                if hit is not None:
                    self._stats.open_hits += 1
                    k = bytearray(hit.key)
            epoch = self._epoch
        if k is None:
            ok = conn.request(
                "datakey_decrypt",
                {"envelope": envelope_to_text(envelope), "context": context_object(context)},
                self.request_timeout,
            )
            k = b64decode(ok.get("plaintext"), "the data key")
            with self._lock:
                self._stats.unwraps += 1
                if self._live and self._epoch == epoch:
                    self._open.insert(Entry(bytearray(k), bytes(envelope), info, time.monotonic()))
        try:
            return use(k)
        finally:
            _wipe(k)

    def seal_stream(
        self,
        path: KeyPathLike,
        context: Context,
        src: IO[bytes],
        dst: IO[bytes],
        chunk_size: int = DEFAULT_CHUNK,
    ) -> int:
        """Seal ``src`` to ``dst`` as one sealed stream (a data key of its own); bytes written."""
        tenant, key = key_path(path)
        check_chunk_size(chunk_size)
        context_object(context)
        fresh = self._datakey(tenant, key, context)
        with self._lock:
            self._stats.datakeys += 1
        try:
            header = stream_header(fresh.envelope, chunk_size)
            cipher = ChunkCipher(fresh.key, header, context)
        finally:
            fresh.wipe()
        try:
            written = dst.write(header) or 0
            buf = _read_full(src, chunk_size)
            while True:
                nxt = _read_full(src, chunk_size) if len(buf) == chunk_size else b""
                last = len(nxt) == 0
                written += dst.write(cipher.seal(buf, last)) or 0
                if last:
                    return written
                buf = nxt
        finally:
            cipher.wipe()

    def open_stream(self, context: Context, src: IO[bytes], dst: IO[bytes]) -> int:
        """Open a sealed stream from ``src`` into ``dst``; plaintext bytes written.

        Each chunk is written once it has authenticated; if this raises,
        discard what was written.
        """
        context_object(context)
        fixed = _read_full(src, 11)
        chunk, n = parse_stream_header_fixed(fixed)
        env = _read_full(src, n)
        if len(env) < n:
            raise InvalidInput("bad_envelope", "malformed sealed stream: it ends inside its header")
        info = parse_envelope(env)
        header = fixed + env
        cipher = self._with_key(env, info, context, lambda k: ChunkCipher(k, header, context))
        try:
            whole = chunk + TAG
            written = 0
            buf = _read_full(src, whole)
            while True:
                nxt = _read_full(src, whole) if len(buf) == whole else b""
                last = len(nxt) == 0
                plain = cipher.open(buf, last)
                written += len(plain)
                dst.write(plain)
                if last:
                    return written
                buf = nxt
        finally:
            cipher.wipe()


def _read_full(src: IO[bytes], n: int) -> bytes:
    """Up to ``n`` bytes: fewer only at the end of the input."""
    parts = []
    got = 0
    while got < n:
        b = src.read(n - got)
        if not b:
            break
        parts.append(b)
        got += len(b)
    return b"".join(parts)
