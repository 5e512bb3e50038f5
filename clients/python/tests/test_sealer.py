"""Local sealing against a real daemon: records, caches and their limits,
revocation events, streams, and the Rust CLI opening what Python sealed."""

from __future__ import annotations

import io
import struct
import time
from functools import partial
from typing import Callable, Iterator, Optional

import pytest

from keyhaven import (
    Client,
    KeyhavenError,
    OpenLimits,
    Sealer,
    SealLimits,
    parse_record,
    sealed_from_text,
    sealed_to_text,
)
from keyhaven.codec import Context

from .conftest import Daemon

SEAL = SealLimits(max_age=60, max_messages=1000, max_bytes=1 << 20)
OPEN = OpenLimits(max_age=60, max_entries=100)


@pytest.fixture(scope="module")
def kh(daemon: Daemon) -> Iterator[Client]:
    with Client(daemon.socket) as c:
        for k in ("acme/pii", "acme/files", "acme/rev", "globex/pii"):
            c.key_create(k)
        yield c


def sealer(daemon: Daemon, seal: SealLimits = SEAL, open_: OpenLimits = OPEN) -> Sealer:
    return Sealer(daemon.socket, seal=seal, open=open_)


def id_of(rec: bytes) -> str:
    return parse_record(rec).envelope_info.id


def raises_code(code: str, fn: Callable[[], object], *codes: str) -> None:
    with pytest.raises(KeyhavenError) as e:
        fn()
    assert e.value.code in (code, *codes), str(e.value)


def until(cond: Callable[[], bool], limit: float = 5.0) -> float:
    t0 = time.monotonic()
    while not cond():
        if time.monotonic() - t0 > limit:
            raise AssertionError("condition not met in time")
        time.sleep(0.002)
    return time.monotonic() - t0


def test_records_share_a_cached_key_and_open_from_the_cache(daemon: Daemon, kh: Client) -> None:
    with sealer(daemon) as s:
        ctx = {"table": "users", "column": "email"}
        recs = [s.seal("acme/pii", f"user{i}@example.com", ctx) for i in range(20)]
        st = s.stats()
        assert (st.datakeys, st.seal_hits) == (1, 19)
        assert len({id_of(r) for r in recs}) == 1
        assert len({parse_record(r).nonce for r in recs}) == 20
        text = sealed_to_text(recs[3])
        assert text.startswith("khs1:") and sealed_from_text(text) == recs[3]
        for i, r in enumerate(recs):
            assert s.open(sealed_to_text(r) if i % 2 else r, ctx) == f"user{i}@example.com".encode()
        st = s.stats()
        assert (st.unwraps, st.open_hits) == (1, 19)


def test_cache_limits_are_exact_and_partitioned(daemon: Daemon, kh: Client) -> None:
    with sealer(daemon, SealLimits(max_age=60, max_messages=3, max_bytes=100)) as s:
        ids = [id_of(s.seal("acme/pii", "x", {})) for _ in range(7)]
        assert ids[0] == ids[2] != ids[3] == ids[5] != ids[6]
        b = [id_of(s.seal("acme/pii", "a" * n, {"p": "b"})) for n in (60, 40, 1)]
        assert b[0] == b[1] != b[2]
        assert id_of(s.seal("acme/pii", "a" * 101, {"p": "big"})) != id_of(
            s.seal("acme/pii", "a" * 101, {"p": "big"})
        )
        p = [
            id_of(s.seal("acme/pii", "x", {"row": "1"})),
            id_of(s.seal("acme/pii", "x", {"row": "2"})),
            id_of(s.seal("acme/files", "x", {"row": "1"})),
            id_of(s.seal("globex/pii", "x", {"row": "1"})),
        ]
        assert len(set(p)) == 4
    with sealer(daemon, SealLimits(max_age=0.05, max_messages=1000, max_bytes=1000)) as s:
        a, b2 = id_of(s.seal("acme/pii", "x", {})), id_of(s.seal("acme/pii", "x", {}))
        time.sleep(0.08)
        assert a == b2 != id_of(s.seal("acme/pii", "x", {}))


def test_opening_checks_context_every_byte_and_type(daemon: Daemon, kh: Client) -> None:
    with sealer(daemon) as s:
        rec = s.seal("acme/pii", "secret", {"row": "1"})
        with sealer(daemon) as fresh:
            raises_code("integrity", lambda: fresh.open(rec, {"row": "2"}))  # the daemon refuses the unwrap
            assert fresh.open(rec, {"row": "1"}) == b"secret"
            raises_code("integrity", lambda: fresh.open(rec, {"row": "2"}))  # the local tag check refuses
        for i in range(len(rec)):
            bad = bytearray(rec)
            bad[i] ^= 1
            raises_code("bad_envelope", partial(s.open, bytes(bad), {"row": "1"}), "integrity", "not_found")
        for n in (0, 4, 7, 50, len(rec) - 17, len(rec) - 1):
            raises_code("bad_envelope", partial(s.open, rec[:n], {"row": "1"}), "integrity")
        raises_code("integrity", lambda: s.open(rec + b"\x00", {"row": "1"}))
        raises_code("bad_envelope", lambda: s.open("khc1:" + sealed_to_text(rec)[5:], {"row": "1"}))
        raises_code("bad_envelope", lambda: s.open(sealed_to_text(rec) + "=", {"row": "1"}))
        raises_code("bad_envelope", lambda: s.open(kh.encrypt("acme/pii", "x").ciphertext))


def test_revocation_empties_the_caches_at_once(daemon: Daemon, kh: Client) -> None:
    with sealer(daemon) as s:
        rec = s.seal("acme/rev", "before", {})
        s.open(rec, {})
        s.seal("acme/pii", "other", {})
        assert (s.stats().seal_keys, s.stats().open_keys) == (2, 1)
        t0 = time.monotonic()
        kh.call(
            "revoke", {"scope": {"kind": "key", "tenant": "acme", "key": "rev"}, "reason": "key-compromise"}
        )
        until(lambda: s.stats().seal_keys == 1 and s.stats().open_keys == 0)
        assert time.monotonic() - t0 < 2
        raises_code("revoked", lambda: s.seal("acme/rev", "after", {}))
        raises_code("revoked", lambda: s.open(rec, {}))
        kh.call(
            "revoke_lift", {"scope": {"kind": "key", "tenant": "acme", "key": "rev"}, "reason": "unspecified"}
        )
        assert s.open(rec, {}) == b"before"
        r2 = s.seal("acme/pii", "x", {"d": "1"})
        before = s.stats().seal_keys
        kh.call("revoke", {"scope": {"kind": "datakey", "envelope_id": id_of(r2)}, "reason": "unspecified"})
        until(lambda: s.stats().seal_keys == before - 1)
        raises_code("revoked", lambda: s.open(r2, {"d": "1"}))
        # A lost connection: nothing stays cached; the next call reconnects.
        s.seal("acme/pii", "x", {})
        assert s.stats().seal_keys > 0
        conn = s.connection()
        conn._sock.shutdown(2)
        until(lambda: s.stats().seal_keys == 0 and s.stats().open_keys == 0)
        s.seal("acme/pii", "x", {})
        assert s.stats().connections == 2


def seal_bytes(s: Sealer, data: bytes, ctx: Context, chunk: int) -> bytes:
    out = io.BytesIO()
    n = s.seal_stream("acme/files", ctx, io.BytesIO(data), out, chunk)
    assert n == len(out.getvalue())
    return out.getvalue()


def open_bytes(s: Sealer, data: bytes, ctx: Context) -> bytes:
    out = io.BytesIO()
    s.open_stream(ctx, io.BytesIO(data), out)
    return out.getvalue()


def test_streams_round_trip_and_refuse_reordering_truncation_extension(daemon: Daemon, kh: Client) -> None:
    c = 1024
    with sealer(daemon) as s:
        for n in (0, 1, c - 1, c, c + 1, 3 * c, 3 * c + 5):
            data = bytes([n % 251]) * n
            sealed = seal_bytes(s, data, {"f": "x"}, c)
            h = 11 + struct.unpack_from(">H", sealed, 9)[0]
            assert len(sealed) == h + n + 16 * max(1, -(-n // c))
            assert open_bytes(s, sealed, {"f": "x"}) == data
        data = b"\x07" * (3 * c + 10)
        sealed = seal_bytes(s, data, {"f": "x"}, c)
        h = 11 + struct.unpack_from(">H", sealed, 9)[0]
        w = c + 16

        def chunk(i: int) -> bytes:
            return sealed[h + i * w : h + (i + 1) * w]

        bad_streams = [
            sealed[:h] + chunk(1) + chunk(0) + sealed[h + 2 * w :],
            sealed[: h + 3 * w],
            sealed[:-1],
            sealed + chunk(0),
            sealed[:h],
        ]
        for bad in bad_streams:
            raises_code("integrity", partial(open_bytes, s, bad, {"f": "x"}))
        raises_code("bad_envelope", lambda: open_bytes(s, sealed[: h - 1], {"f": "x"}))
        raises_code("integrity", lambda: open_bytes(s, sealed, {"f": "y"}))
        raises_code("bad_request", lambda: seal_bytes(s, b"", {}, 1023))


def test_rust_cli_and_python_open_each_other(daemon: Daemon, kh: Client) -> None:
    ctx = {"file": "backup.tar", "ü": "ß"}
    args = [a for k, v in ctx.items() for a in ("--context", f"{k}={v}")]
    data = b"\x03" * 200000
    with sealer(daemon) as s:
        assert daemon.cli("open", *args, input=seal_bytes(s, data, ctx, 4096)) == data
        rec = s.seal("acme/pii", "a record from python", ctx)
        assert daemon.cli("open", *args, input=sealed_to_text(rec).encode()) == b"a record from python"
        from_cli = daemon.cli("seal", "acme/files", *args, "--chunk-size", "1024", input=data)
        assert open_bytes(s, from_cli, ctx) == data


@pytest.mark.parametrize(
    "make",
    [
        lambda: SealLimits(max_age=0, max_messages=1, max_bytes=1),
        lambda: SealLimits(max_age=1, max_messages=2**31 + 1, max_bytes=1),
        lambda: SealLimits(max_age=1, max_messages=0, max_bytes=1),
        lambda: SealLimits(max_age=1, max_messages=1, max_bytes=0),
        lambda: OpenLimits(max_age=0, max_entries=5),
        lambda: OpenLimits(max_age=1, max_entries=-1),
        lambda: Sealer("/nonexistent", seal=None, open=OPEN),  # type: ignore[arg-type]
    ],
)
def test_every_cache_limit_is_required(make: Callable[[], Optional[object]]) -> None:
    with pytest.raises(KeyhavenError) as e:
        make()
    assert e.value.code == "config"


def test_cached_keys_are_overwritten_when_they_leave_a_cache(daemon: Daemon, kh: Client) -> None:
    with sealer(daemon, SealLimits(max_age=60, max_messages=2, max_bytes=1000)) as s:

        def keys(cache: object) -> list[bytearray]:
            return [e.key for e in cache.entries.values()]  # type: ignore[attr-defined]

        rec = s.seal("acme/pii", "x", {"w": "1"})
        s.open(rec, {"w": "1"})
        (seal_key,), (open_key,) = keys(s._seal), keys(s._open)
        assert any(seal_key) and any(open_key)
        shown = repr(s._seal.entries) + repr(s._open.entries) + repr(s) + repr(s.stats())
        assert seal_key.hex() not in shown and "bytearray" not in shown
        s.seal("acme/pii", "x", {"w": "1"})
        s.seal("acme/pii", "x", {"w": "1"})  # past max_messages: a new key
        assert not any(seal_key)
        (seal_key2,) = keys(s._seal)
        s.clear()
        assert not any(open_key) and not any(seal_key2)
        s.seal("acme/files", "x", {})
        (files_key,) = keys(s._seal)
        scope = {"kind": "key", "tenant": "acme", "key": "files"}
        kh.call("revoke", {"scope": scope, "reason": "unspecified"})
        until(lambda: not any(files_key))
        kh.call("revoke_lift", {"scope": scope, "reason": "unspecified"})
        s.seal("acme/pii", "y", {})
        (last,) = keys(s._seal)
    assert not any(last)  # close() on leaving the with block
