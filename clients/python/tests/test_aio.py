"""The asyncio client against a real daemon (dev mode: SoftHSM2 token, real socket).

Plain tests that run their coroutines with ``asyncio.run`` (no pytest plugin).
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import struct
import threading
import time
from pathlib import Path
from typing import Any, Awaitable, Callable, Dict, List, Optional, TypeVar

import pytest
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_pem_public_key

from keyhaven import (
    Client,
    ConnectError,
    ConnectionClosed,
    DaemonError,
    InvalidInput,
    KeyhavenError,
    KeyhavenTimeout,
    parse_mac_tag,
)
from keyhaven.aio import AsyncClient

from .conftest import Daemon

T = TypeVar("T")


def run(main: Callable[[], Awaitable[T]]) -> T:
    async def bounded() -> T:
        return await asyncio.wait_for(main(), 120)

    return asyncio.run(bounded())


@pytest.fixture(scope="module")
def keys(daemon: Daemon) -> Daemon:
    with Client(daemon.socket) as c:
        c.key_create("acme/pii")
        c.key_create("acme/index", type="hmac-sha256")
        c.key_create("acme/signer", type="ecdsa-p256")
    return daemon


def test_every_operation(keys: Daemon) -> None:
    async def main() -> None:
        async with AsyncClient(keys.socket) as kh:
            assert (await kh.health())["status"] == "ok"
            assert (await kh.whoami())["uid"] == os.getuid()
            made = await kh.key_create("acme/aio", description="from asyncio", tags={"team": "a"})
            assert made["key"] == "aio"
            assert (await kh.key_show("acme/aio"))["description"] == "from asyncio"
            listed = await kh.key_list("acme", page_size=1)
            assert {"pii", "aio"} <= {k["key"] for k in listed}
            assert [k["key"] for k in await kh.key_list("acme", tags={"team": "a"})] == ["aio"]

            ctx = {"table": "t", "row": "1", "Ä": "é"}
            enc = await kh.encrypt("acme/pii", "secret", ctx)
            assert enc.ciphertext.startswith("khc1:") and enc.key_version == 1
            dec = await kh.decrypt(enc.ciphertext, dict(reversed(list(ctx.items()))))
            assert bytes(dec.plaintext) == b"secret" and (dec.tenant, dec.key) == ("acme", "pii")
            with pytest.raises(DaemonError) as e:
                await kh.decrypt(enc.ciphertext, {**ctx, "row": "2"})
            assert e.value.code == "integrity"

            dk = await kh.datakey("acme/pii", {"f": "x"})
            assert dk.plaintext is not None and len(dk.plaintext) == 32
            back = await kh.datakey_decrypt(dk.envelope, {"f": "x"})
            assert back.plaintext == dk.plaintext
            await kh.call("key_rotate", {"tenant": "acme", "key": "pii"})
            rw = await kh.rewrap(enc.ciphertext, ctx)
            assert (rw.from_version, rw.key_version) == (1, 2)
            assert bytes((await kh.decrypt(rw.text, ctx)).plaintext) == b"secret"

            tag = await kh.mac("acme/index", b"alice@example.com")
            assert parse_mac_tag(tag.tag).version == 1
            assert (await kh.mac_verify("acme/index", b"alice@example.com", tag.tag)).valid
            assert not (await kh.mac_verify("acme/index", b"bob@example.com", tag.tag)).valid

            sig = await kh.sign("acme/signer", b"hello")
            assert sig.algorithm == "ecdsa-p256-sha256"
            assert (await kh.verify("acme/signer", b"hello", sig.signature)).valid
            assert not (await kh.verify("acme/signer", b"hullo", sig.signature)).valid
            pem = (await kh.public_key("acme/signer")).pem
            pub = load_pem_public_key(pem.encode())
            assert isinstance(pub, ec.EllipticCurvePublicKey)
            pub.verify(sig.signature, b"hello", ec.ECDSA(hashes.SHA256()))
            with pytest.raises(InvalidSignature):
                pub.verify(sig.signature, b"hullo", ec.ECDSA(hashes.SHA256()))

            made_alias = await kh.alias_create("current", "acme/pii")
            assert (made_alias.alias, made_alias.key) == ("current", "pii")
            via = await kh.encrypt("acme/current", "through an alias")
            assert (await kh.decrypt(via.ciphertext)).key == "pii"
            moved = await kh.alias_update("current", "acme/aio")
            assert moved.previous_key == "pii"
            assert [a.alias for a in await kh.alias_list("acme")] == ["current"]
            assert (await kh.alias_delete("acme", "current")).key == "aio"
            assert await kh.alias_list("acme") == []

            # Refused before sending, with the daemon's code.
            for bad in (
                lambda: kh.encrypt("acme", "x"),
                lambda: kh.encrypt("acme/pii", "x", {"k": 1}),  # type: ignore[dict-item]
                lambda: kh.mac("acme/index", "x", version=0),
            ):
                with pytest.raises(InvalidInput) as ei:
                    await bad()
                assert ei.value.code == "bad_request"
            with pytest.raises(InvalidInput) as big:
                await kh.encrypt("acme/pii", b"x" * (1 << 20))
            assert big.value.code == "frame_too_large"
            assert kh.connections_opened == 1

    run(main)


def test_same_encoding_as_the_threaded_client(keys: Daemon) -> None:
    """What one client makes, the other reads: the shared ops, both ways."""

    async def main() -> None:
        with Client(keys.socket) as sync:
            async with AsyncClient(keys.socket) as kh:
                ctx = {"b": "2", "a": "1", "é": "x"}
                ct = (await kh.encrypt("acme/pii", "both ways", ctx)).ciphertext
                assert bytes(sync.decrypt(ct, ctx).plaintext) == b"both ways"
                ct2 = sync.encrypt("acme/pii", "and back", ctx).ciphertext
                assert bytes((await kh.decrypt(ct2, ctx)).plaintext) == b"and back"
                assert (await kh.mac("acme/index", "v")).tag == sync.mac("acme/index", "v").tag

    run(main)


def test_64_concurrent_calls_pipelined_on_one_connection(keys: Daemon) -> None:
    async def main() -> None:
        async with AsyncClient(keys.socket, connections=1) as kh:
            await kh.health()
            conn = kh._slots[0]
            assert conn is not None
            most = 0
            done = False

            async def watch() -> None:
                nonlocal most
                while not done:
                    most = max(most, conn.in_flight)
                    await asyncio.sleep(0)

            async def roundtrip(i: int) -> bytes:
                enc = await kh.encrypt("acme/pii", f"secret-{i}", {"i": str(i)})
                return bytes((await kh.decrypt(enc.ciphertext, {"i": str(i)})).plaintext)

            watcher = asyncio.ensure_future(watch())
            out = await asyncio.gather(*(roundtrip(i) for i in range(64)))
            done = True
            await watcher
            assert out == [f"secret-{i}".encode() for i in range(64)]
            assert kh.connections_opened == 1
            # All 64 were in flight at once on the one connection, answered by id.
            assert most == 64, most

    run(main)


def test_a_pool_opens_connections_for_concurrent_calls(keys: Daemon) -> None:
    async def main() -> None:
        async with AsyncClient(keys.socket, connections=4) as kh:
            await asyncio.gather(*(kh.encrypt("acme/pii", "x") for _ in range(64)))
            assert 2 <= kh.connections_opened <= 4

    run(main)


def _serve_hello_then(path: str, then: Optional[bytes], held: List[socket.socket]) -> socket.socket:
    """A peer on a real socket that answers ``hello``, then sends ``then`` (None: nothing)."""
    srv = socket.socket(socket.AF_UNIX)
    srv.bind(path)
    srv.listen(8)

    def serve() -> None:
        s, _ = srv.accept()
        held.append(s)
        n = struct.unpack(">I", s.recv(4))[0]
        rid = json.loads(s.recv(n))["id"]
        body = json.dumps({"id": rid, "ok": {"protocol": 1, "server": "peer"}}).encode()
        s.sendall(struct.pack(">I", len(body)) + body)
        if then is not None:
            s.recv(4096)
            s.sendall(then)

    threading.Thread(target=serve, daemon=True).start()
    return srv


def test_connect_failures_and_timeouts_are_typed(tmp_path: Path) -> None:
    d = str(tmp_path)
    held: List[socket.socket] = []
    silent = socket.socket(socket.AF_UNIX)  # accepts (backlog) and never answers
    silent.bind(os.path.join(d, "silent.sock"))
    silent.listen(8)
    mute = _serve_hello_then(os.path.join(d, "mute.sock"), None, held)

    async def main() -> None:
        with pytest.raises(ConnectError) as e:
            await AsyncClient(os.path.join(d, "none.sock")).health()
        assert e.value.code == "connect_failed"

        t0 = time.monotonic()
        with pytest.raises(KeyhavenTimeout) as t:
            await AsyncClient(os.path.join(d, "silent.sock"), connect_timeout=0.3).health()
        assert t.value.code == "timeout" and "connecting" in str(t.value)
        assert time.monotonic() - t0 < 3

        async with AsyncClient(os.path.join(d, "mute.sock"), request_timeout=0.3) as c:
            t0 = time.monotonic()
            with pytest.raises(KeyhavenTimeout) as t2:
                await c.health()
            assert t2.value.code == "timeout" and "`health`" in str(t2.value)
            assert 0.25 < time.monotonic() - t0 < 3
            conn = c._slots[0]
            assert conn is not None and conn.in_flight == 0  # forgotten, the connection kept
            # A shorter timeout than a call already waiting still expires on time.
            c.request_timeout = 30
            slow = asyncio.ensure_future(c.health())
            await asyncio.sleep(0.01)
            c.request_timeout = 0.2
            t0 = time.monotonic()
            with pytest.raises(KeyhavenTimeout):
                await c.whoami()
            assert time.monotonic() - t0 < 2
            slow.cancel()
            with pytest.raises(asyncio.CancelledError):
                await slow
            # The peer goes away with 64 calls in flight: each fails with connection_closed.
            c.request_timeout = None
            calls = [asyncio.ensure_future(c.encrypt("acme/pii", f"m{i}")) for i in range(64)]
            while conn.in_flight < 64:
                await asyncio.sleep(0.01)
            held[0].close()
            results = await asyncio.gather(*calls, return_exceptions=True)
            assert all(isinstance(r, ConnectionClosed) for r in results), results
            assert conn.closed and c.connections_opened == 1

    try:
        run(main)
    finally:
        for s in [*held, silent, mute]:
            s.close()


def test_a_request_timeout_against_the_daemon_leaves_the_connection_usable(keys: Daemon) -> None:
    async def main() -> None:
        async with AsyncClient(keys.socket, connections=1, request_timeout=1e-6) as kh:
            # Connecting and hello are under connect_timeout; the answer cannot come within 1 µs.
            with pytest.raises(KeyhavenTimeout):
                await kh.encrypt("acme/pii", "late")
            kh.request_timeout = 10
            assert (await kh.health())["status"] == "ok"  # the late answer was dropped
            assert kh.connections_opened == 1

    run(main)


def test_bad_frames_fail_calls_with_protocol(tmp_path: Path) -> None:
    held: List[socket.socket] = []
    srvs = [
        _serve_hello_then(os.path.join(str(tmp_path), f"p{i}.sock"), reply, held)
        for i, reply in enumerate([b"\x00\x20\x00\x00", b"\x00\x00\x00\x03{x}", b"\x00\x00\x00\x02[]"])
    ]

    async def main() -> None:
        for i in range(len(srvs)):
            async with AsyncClient(os.path.join(str(tmp_path), f"p{i}.sock"), request_timeout=5) as c:
                with pytest.raises(KeyhavenError) as e:
                    await c.health()
                assert e.value.code == "protocol", e.value

    try:
        run(main)
    finally:
        for s in [*held, *srvs]:
            s.close()


def test_bad_options() -> None:
    for kwargs in ({"connections": 0}, {"request_timeout": -1}, {"socket": ""}):
        with pytest.raises(InvalidInput) as e:
            AsyncClient(**kwargs)
        assert e.value.code == "config"


def test_reconnects_after_losing_the_connection(keys: Daemon) -> None:
    async def main() -> None:
        async with AsyncClient(keys.socket, connections=1) as kh:
            await kh.health()
            conn = kh._slots[0]
            assert conn is not None and conn._transport is not None
            conn._transport.abort()  # as when the daemon drops an idle connection
            await asyncio.sleep(0.05)
            assert conn.closed
            assert (await kh.health())["status"] == "ok"
            assert kh.connections_opened == 2

    run(main)


def test_events_reach_on_event(keys: Daemon) -> None:
    seen: List[Dict[str, Any]] = []

    def listener(e: Dict[str, Any]) -> None:
        seen.append(e)
        raise RuntimeError("listener bug")

    async def main() -> None:
        async with AsyncClient(keys.socket, on_event=listener) as kh:
            await kh.key_create("acme/evt")
            assert await kh.subscribe_revocations() == {"subscribed": True}
            scope = {"kind": "key", "tenant": "acme", "key": "evt"}
            await kh.call("revoke", {"scope": scope, "reason": "unspecified"})
            for _ in range(500):
                if seen:
                    break
                await asyncio.sleep(0.01)
            assert seen == [{"event": "revoked", "scope": scope}]
            assert (await kh.health())["status"] == "ok"

    run(main)


def test_daemon_restart_fails_in_flight_calls_typed_then_reconnects() -> None:
    d2 = Daemon()
    d3: Optional[Daemon] = None

    async def main() -> None:
        nonlocal d3
        async with AsyncClient(d2.socket, connect_timeout=2, connections=1) as kh:
            await kh.key_create("acme/restart")
            ct = (await kh.encrypt("acme/restart", "survives", {"r": "1"})).ciphertext
            # Calls in flight when the daemon goes: each is answered (the daemon drains) or
            # fails typed; none hangs.
            calls = [asyncio.ensure_future(kh.encrypt("acme/restart", f"m{i}")) for i in range(64)]
            await asyncio.sleep(0)
            await asyncio.get_running_loop().run_in_executor(None, lambda: d2.stop(keep=True))
            results = await asyncio.gather(*calls, return_exceptions=True)
            for r in results:
                assert not isinstance(r, BaseException) or isinstance(r, ConnectionClosed), r
            with pytest.raises(ConnectError):
                await kh.health()
            d3 = await asyncio.get_running_loop().run_in_executor(None, lambda: Daemon(d2.dir))
            assert d3.socket == d2.socket
            assert bytes((await kh.decrypt(ct, {"r": "1"})).plaintext) == b"survives"
            assert kh.connections_opened == 2

    try:
        run(main)
    finally:
        (d3 or d2).stop()


def test_cancelled_call_leaves_the_connection_usable(keys: Daemon) -> None:
    async def main() -> None:
        async with AsyncClient(keys.socket, connections=1) as kh:
            await kh.health()
            task = asyncio.ensure_future(kh.encrypt("acme/pii", "cancelled"))
            await asyncio.sleep(0)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            conn = kh._slots[0]
            assert conn is not None and conn.in_flight == 0
            assert (await kh.health())["status"] == "ok"
            assert kh.connections_opened == 1

    run(main)
