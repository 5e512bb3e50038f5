"""The Client against a real daemon (dev mode: SoftHSM2 token, real socket)."""

from __future__ import annotations

import base64
import json
import os
import socket
import struct
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional

import pytest

from keyhaven import (
    Client,
    ConnectError,
    DaemonError,
    InvalidInput,
    KeyhavenError,
    KeyhavenTimeout,
    MacResult,
    MacVerifyResult,
    encode_context,
)
from keyhaven.codec import b64decode

from .conftest import Daemon


@pytest.fixture(scope="module")
def kh(daemon: Daemon) -> Iterator[Client]:
    with Client(daemon.socket) as c:
        c.key_create("acme/pii")
        yield c


def test_health_whoami_keys(kh: Client) -> None:
    assert kh.health()["status"] == "ok"
    metrics = kh.metrics()
    assert '\nkeyhaven_requests_total{operation="health",outcome="ok"} ' in metrics
    assert kh.whoami()["uid"] == os.getuid()
    info = kh.key_create(("acme", "smtp"))
    assert (info["tenant"], info["key"], info["current_version"]) == ("acme", "smtp", 1)
    shown = kh.key_show("acme/smtp")
    assert shown["state"] == "enabled"
    # One key shape (PROTOCOL.md §3.3): the same field names, `versions` aside.
    listed = next(k for k in kh.key_list("acme") if k["key"] == "smtp")
    assert set(listed) - {"versions"} == set(shown) - {"versions"}
    assert listed["min_decryption_version"] == 1
    assert shown["versions"][0]["wrap_budget_reserved"] == shown["versions"][0]["wraps"]
    labelled = kh.key_create("acme/labelled", description="for tests", tags={"team": "qa"})
    assert (labelled["description"], labelled["tags"]) == ("for tests", {"team": "qa"})
    assert [k["key"] for k in kh.key_list("acme", tags={"team": "qa"})] == ["labelled"]
    with pytest.raises(DaemonError) as e:
        kh.key_create("acme/bad-tag", tags={"a b": "v"})
    assert e.value.code == "bad_request"
    with pytest.raises(InvalidInput):
        kh.key_create("acme/bad-tag", tags={"a": 1})  # type: ignore[dict-item]
    assert [k["key"] for k in kh.key_list("acme")] == ["labelled", "pii", "smtp"]
    with pytest.raises(DaemonError) as e:
        kh.key_create("acme/smtp")
    assert e.value.code == "already_exists"
    with pytest.raises(DaemonError) as e:
        kh.key_show("acme/nope")
    assert e.value.code == "not_found"
    auto = kh.key_create("sched/auto", rotate_every_secs=86400)
    assert (auto["state"], auto["rotate_every_secs"]) == ("enabled", 86400)
    assert auto["next_rotation_at"] == auto["created_at"] + 86400
    with pytest.raises(InvalidInput):
        kh.key_create("sched/bad", rotate_every_secs=-1)
    once = kh.key_create("sched/once", idempotency_key="req-1")
    assert kh.key_create("sched/once", idempotency_key="req-1")["created_at"] == once["created_at"]
    with pytest.raises(DaemonError) as e:
        kh.key_create("sched/once")
    assert e.value.code == "already_exists"
    with pytest.raises(InvalidInput):
        kh.key_create("sched/bad", idempotency_key="has space")


def test_encrypt_decrypt_with_context_in_any_order(kh: Client) -> None:
    ctx = {"table": "users", "column": "email", "row": "42"}
    enc = kh.encrypt("acme/pii", "alice@example.com", ctx)
    assert enc.ciphertext.startswith("khc1:")
    dec = kh.decrypt(enc.ciphertext, {"row": "42", "column": "email", "table": "users"})
    assert bytes(dec.plaintext) == b"alice@example.com"
    assert (dec.tenant, dec.key, dec.key_version, dec.envelope_id) == ("acme", "pii", 1, enc.envelope_id)
    assert "alice" not in repr(dec)
    for bad_ctx in ({**ctx, "row": "43"}, None):
        with pytest.raises(DaemonError) as e:
            kh.decrypt(enc.ciphertext, bad_ctx)
        assert e.value.code == "integrity"
    flipped = enc.ciphertext[:-3] + ("B" if enc.ciphertext[-3] == "A" else "A") + enc.ciphertext[-2:]
    with pytest.raises(DaemonError) as e:
        kh.decrypt(flipped, ctx)
    assert e.value.code == "integrity"
    with pytest.raises(DaemonError) as e:
        kh.decrypt("khe1:AAAA", ctx)
    assert e.value.code == "bad_envelope"
    assert bytes(kh.decrypt(kh.encrypt("acme/pii", b"\x00\xff").ciphertext).plaintext) == b"\x00\xff"
    assert bytes(kh.decrypt(kh.encrypt("acme/pii", b"").ciphertext).plaintext) == b""


def test_context_sorts_by_utf8_bytes(kh: Client) -> None:
    ctx = {"\U0001f600": "a", "\uff61": "b"}
    assert encode_context(ctx).hex() == "0002" + "0003efbda1" + "000162" + "0004f09f9880" + "000161"
    assert bytes(kh.decrypt(kh.encrypt("acme/pii", "x", ctx).ciphertext, ctx).plaintext) == b"x"


@pytest.mark.parametrize(
    "path,plaintext,context",
    [
        ("Acme/pii", "x", None),
        ("acme", "x", None),
        ("acme/pii/x", "x", None),
        ("acme/" + "x" * 64, "x", None),
        ("acme/pii", "x", {"k": 1}),
        ("acme/pii", "x", {"": "v"}),
        ("acme/pii", "x", {"k": "v" * 1025}),
        ("acme/pii", "x", {f"k{i}": "v" for i in range(33)}),
        ("acme/pii", "x", {"k": "\ud800"}),
        ("acme/pii", "\udfff", None),
        ("acme/pii", 42, None),
        ("acme/pii", "x", ["k", "v"]),
    ],
)
def test_bad_input_is_refused_before_sending(
    kh: Client, path: object, plaintext: object, context: object
) -> None:
    with pytest.raises(InvalidInput) as e:
        kh.encrypt(path, plaintext, context)  # type: ignore[arg-type]
    assert e.value.code == "bad_request"


def test_limits_come_back_typed(kh: Client) -> None:
    with pytest.raises(InvalidInput) as local:
        kh.encrypt("acme/pii", bytes(800 * 1024))
    assert local.value.code == "frame_too_large"
    with pytest.raises(DaemonError) as e:
        kh.encrypt("acme/pii", bytes(65537))
    assert e.value.code == "payload_too_large"
    with pytest.raises(DaemonError) as e:
        kh.encrypt("acme/nope", "x")
    assert e.value.code == "not_found"
    assert kh.health()["status"] == "ok"


def test_datakey_and_rewrap(kh: Client) -> None:
    ctx = {"app": "billing"}
    dk = kh.datakey("acme/pii", ctx)
    assert dk.plaintext is not None and len(dk.plaintext) == 32
    back = kh.datakey_decrypt(dk.envelope, ctx)
    assert back.plaintext == dk.plaintext and back.envelope_id == dk.envelope_id
    assert kh.datakey("acme/pii", ctx, include_plaintext=False).plaintext is None
    with pytest.raises(DaemonError) as e:
        kh.datakey_decrypt(dk.envelope, {})
    assert e.value.code == "integrity"
    kh.key_create("acme/rot")
    enc = kh.encrypt("acme/rot", "secret", ctx)
    kh.call("key_rotate", {"tenant": "acme", "key": "rot"})
    re = kh.rewrap(enc.ciphertext, ctx)
    assert (re.from_version, re.key_version, re.envelope_id) == (1, 2, enc.envelope_id)
    assert bytes(kh.decrypt(re.text, ctx).plaintext) == b"secret"


def test_strict_base64() -> None:
    assert b64decode("aGk=", "x") == b"hi"
    for bad in ["aGk", "aGl=", "aG k=", "aGk==", "a-k=", "aGk=\n"]:
        with pytest.raises(InvalidInput):
            b64decode(bad, "x")


def test_pipelining_many_threads_one_connection(daemon: Daemon) -> None:
    with Client(daemon.socket, connections=1) as one:

        def roundtrip(i: int) -> bytes:
            enc = one.encrypt("acme/pii", f"secret-{i}", {"i": str(i)})
            return bytes(one.decrypt(enc.ciphertext, {"i": str(i)}).plaintext)

        with ThreadPoolExecutor(32) as pool:
            out = list(pool.map(roundtrip, range(300)))
        assert out == [f"secret-{i}".encode() for i in range(300)]
        assert one.connections_opened == 1


def test_pool_spreads_calls(daemon: Daemon) -> None:
    with Client(daemon.socket, connections=4) as pool_client:
        barrier = threading.Barrier(16)

        def call(_: int) -> None:
            barrier.wait()
            for _ in range(10):
                pool_client.encrypt("acme/pii", "x")

        with ThreadPoolExecutor(16) as pool:
            list(pool.map(call, range(16)))
        assert 2 <= pool_client.connections_opened <= 4


def test_socket_from_environment(daemon: Daemon, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KEYHAVEN_SOCKET", daemon.socket)
    with Client() as c:
        assert c.socket == daemon.socket and c.health()["status"] == "ok"
    monkeypatch.delenv("KEYHAVEN_SOCKET")
    assert Client().socket == "/run/keyhaven/keyhaven.sock"


def test_reconnects_after_losing_the_connection(daemon: Daemon) -> None:
    with Client(daemon.socket, connections=1) as c:
        c.health()
        c._connection()._sock.shutdown(socket.SHUT_RDWR)  # as when the daemon drops an idle connection
        time.sleep(0.05)
        assert c.health()["status"] == "ok"
        assert c.connections_opened == 2


def test_connect_failures_and_timeouts_are_typed(tmp_path: Path) -> None:
    d = str(tmp_path)
    held: List[socket.socket] = []
    with pytest.raises(ConnectError) as e:
        Client(os.path.join(d, "none.sock")).health()
    assert e.value.code == "connect_failed"
    # A peer that accepts and never answers: the connect (hello) times out.
    silent = socket.socket(socket.AF_UNIX)
    silent.bind(os.path.join(d, "silent.sock"))
    silent.listen(8)
    t0 = time.monotonic()
    with pytest.raises(KeyhavenTimeout) as t:
        Client(os.path.join(d, "silent.sock"), connect_timeout=0.3).health()
    assert t.value.code == "timeout" and time.monotonic() - t0 < 3
    # A peer that answers hello and then nothing: the request times out.
    mute = socket.socket(socket.AF_UNIX)
    mute.bind(os.path.join(d, "mute.sock"))
    mute.listen(8)

    def serve() -> None:
        s, _ = mute.accept()
        held.append(s)
        n = struct.unpack(">I", s.recv(4))[0]
        rid = json.loads(s.recv(n))["id"]
        body = json.dumps({"id": rid, "ok": {"protocol": 1, "server": "mute"}}).encode()
        s.sendall(struct.pack(">I", len(body)) + body)

    threading.Thread(target=serve, daemon=True).start()
    with Client(os.path.join(d, "mute.sock"), request_timeout=0.3) as c, pytest.raises(KeyhavenTimeout):
        c.health()
    for s in [*held, silent, mute]:
        s.close()


def test_bad_options() -> None:
    for kwargs in ({"connections": 0}, {"request_timeout": -1}, {"socket": ""}):
        with pytest.raises(InvalidInput) as e:
            Client(**kwargs)
        assert e.value.code == "config"


def test_events_reach_on_event_and_a_failing_callback_harms_nothing(daemon: Daemon, kh: Client) -> None:
    seen: List[Dict[str, Any]] = []

    def listener(e: Dict[str, Any]) -> None:
        seen.append(e)
        raise RuntimeError("listener bug")

    with Client(daemon.socket, connections=1, on_event=listener) as c:
        kh.key_create("acme/evt")
        assert c.subscribe_revocations() == {"subscribed": True}
        kh.call("revoke", {"scope": {"kind": "key", "tenant": "acme", "key": "evt"}, "reason": "unspecified"})
        t0 = time.monotonic()
        while not seen and time.monotonic() - t0 < 5:
            time.sleep(0.005)
        assert seen == [{"event": "revoked", "scope": {"kind": "key", "tenant": "acme", "key": "evt"}}]
        assert c.health()["status"] == "ok"
        assert c.connections_opened == 1


def test_daemon_restart_fails_typed_then_the_same_client_carries_on() -> None:
    d2 = Daemon()
    d3: Optional[Daemon] = None
    try:
        with Client(d2.socket, connect_timeout=2) as c:
            c.key_create("acme/restart")
            ct = c.encrypt("acme/restart", "survives", {"r": "1"}).ciphertext
            d2.stop(keep=True)
            # Down: a connection not yet seen closing fails as connection_closed, a new one as connect_failed.
            for _ in range(2):
                with pytest.raises(KeyhavenError) as e:
                    c.health()
                assert e.value.code in ("connect_failed", "connection_closed")
            with pytest.raises(ConnectError):
                c.health()
            d3 = Daemon(d2.dir)
            assert d3.socket == d2.socket
            assert bytes(c.decrypt(ct, {"r": "1"}).plaintext) == b"survives"
    finally:
        (d3 or d2).stop()


@pytest.mark.parametrize(
    "reply", [b"\x00\x20\x00\x00", b"\x00\x00\x00\x03{x}"], ids=["2 MiB frame", "not JSON"]
)
def test_a_peer_sending_a_bad_frame_fails_calls_with_protocol(reply: bytes, tmp_path: Path) -> None:
    d = str(tmp_path)
    path = os.path.join(d, "peer.sock")
    srv = socket.socket(socket.AF_UNIX)
    srv.bind(path)
    srv.listen(4)
    held: List[socket.socket] = []

    def serve() -> None:
        s, _ = srv.accept()
        held.append(s)
        n = struct.unpack(">I", s.recv(4))[0]
        rid = json.loads(s.recv(n))["id"]
        body = json.dumps({"id": rid, "ok": {"protocol": 1, "server": "hostile"}}).encode()
        s.sendall(struct.pack(">I", len(body)) + body)
        s.recv(4096)
        s.sendall(reply)

    threading.Thread(target=serve, daemon=True).start()
    with Client(path, request_timeout=5) as c, pytest.raises(KeyhavenError) as e:
        c.health()
    assert e.value.code == "protocol"
    for s in [*held, srv]:
        s.close()


def test_key_list_follows_the_daemons_pages(kh: Client) -> None:
    names = ["a1", "a2", "a3", "a4", "a5"]
    for n in names:
        kh.key_create(f"paged/{n}")
    assert [k["key"] for k in kh.key_list("paged", page_size=2)] == names
    assert [k["key"] for k in kh.key_list("paged")] == names
    every = kh.key_list(page_size=3)
    assert (
        any(k["tenant"] == "acme" for k in every) and len([k for k in every if k["tenant"] == "paged"]) == 5
    )
    for bad in (0, 1001):
        with pytest.raises(InvalidInput):
            kh.key_list("paged", page_size=bad)


def test_mac_and_mac_verify(kh: Client) -> None:
    info = kh.key_create("acme/email-index", type="hmac-sha256")
    assert info["type"] == "hmac-sha256"
    m = kh.mac("acme/email-index", "alice@example.com")
    assert isinstance(m, MacResult)
    assert m.tag.startswith("khm1:") and len(m.tag) == 53 and m.key_version == 1
    # Deterministic (what a blind index needs); different messages differ.
    assert kh.mac("acme/email-index", b"alice@example.com").tag == m.tag
    assert kh.mac("acme/email-index", "bob@example.com").tag != m.tag
    raw = base64.urlsafe_b64decode(m.tag[5:] + "====")
    assert len(raw) == 36 and int.from_bytes(raw[:4], "big") == 1

    assert kh.mac_verify("acme/email-index", "alice@example.com", m.tag) == MacVerifyResult(True, 1)
    assert not kh.mac_verify("acme/email-index", "alice@example.con", m.tag).valid
    assert not kh.mac_verify("acme/email-index", b"", m.tag).valid
    flipped = bytearray(raw)
    flipped[20] ^= 1
    bad = "khm1:" + base64.urlsafe_b64encode(bytes(flipped)).decode().rstrip("=")
    assert not kh.mac_verify("acme/email-index", "alice@example.com", bad).valid
    kh.key_create("acme/other-index", type="hmac-sha256")
    assert not kh.mac_verify("acme/other-index", "alice@example.com", m.tag).valid

    kh.key_create("acme/aes-only")
    for call in (
        lambda: kh.mac("acme/aes-only", "x"),
        lambda: kh.mac_verify("acme/aes-only", "x", m.tag),
        lambda: kh.encrypt("acme/email-index", "x"),
    ):
        with pytest.raises(DaemonError) as e:
            call()
        assert e.value.code == "wrong_key_type"
    with pytest.raises(DaemonError) as e:
        kh.key_create("acme/k3", type="rot13")
    assert e.value.code == "bad_request"
    with pytest.raises(DaemonError) as e:
        kh.mac_verify("acme/email-index", "x", "khm1:AAAA")
    assert e.value.code == "bad_request"
    with pytest.raises(DaemonError) as e:
        kh.mac("acme/email-index", "x", version=2)
    assert e.value.code == "not_found"
    with pytest.raises(InvalidInput) as ei:
        kh.mac("acme/email-index", "x", version=0)
    assert ei.value.code == "bad_request"
    with pytest.raises(InvalidInput):
        kh.mac_verify("acme/email-index", "x", 42)  # type: ignore[arg-type]
