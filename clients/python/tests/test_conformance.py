"""The language-neutral vectors of tests/conformance/vectors.json (written by
an independent generator): contexts, envelopes, records, streams and MAC tags."""

from __future__ import annotations

import base64
import hashlib
import hmac
import io
import json
from typing import Any, Callable, Dict, List

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.hazmat.primitives.serialization import load_pem_public_key

from keyhaven import Client, KeyhavenError, encode_context, parse_mac_tag
from keyhaven.seal import (
    ChunkCipher,
    envelope_from_text,
    open_record,
    parse_envelope,
    parse_record,
    parse_stream_header_fixed,
    seal_record,
    sealed_from_text,
    sealed_to_text,
    stream_header,
)
from keyhaven.sealer import _read_full

from .conftest import ROOT, Daemon

V: Dict[str, Any] = json.loads((ROOT / "tests" / "conformance" / "vectors.json").read_text(encoding="utf-8"))


def ctx(pairs: List[List[str]]) -> Dict[str, str]:
    return {k: v for k, v in pairs}


def code_of(fn: Callable[..., object], *args: Any) -> str:
    try:
        fn(*args)
    except KeyhavenError as e:
        return e.code
    return "ok"


def parse_text(text: str) -> object:
    return parse_envelope(envelope_from_text(text))


def open_text(dek: bytes, text: str, pairs: List[List[str]]) -> object:
    return open_record(dek, parse_record(sealed_from_text(text)), ctx(pairs))


def test_contexts() -> None:
    for v in V["contexts"]:
        assert encode_context(ctx(v["pairs"])).hex() == v["encoded"], v["name"]
    for v in V["bad_contexts"]:
        if len({p[0] for p in v["pairs"]}) != len(v["pairs"]):
            continue  # a dict cannot hold a key twice; for APIs that take pairs
        assert code_of(encode_context, ctx(v["pairs"])) == "bad_request", v["name"]


def test_envelopes() -> None:
    for v in V["envelopes"]:
        info = parse_envelope(envelope_from_text(v["text"]))
        assert (info.tenant, info.key, info.version, info.id) == (
            v["tenant"],
            v["key"],
            v["version"],
            v["id"],
        )
    for v in V["bad_envelopes"]:
        assert code_of(parse_text, v["text"]) == "bad_envelope", v["name"]


def test_records() -> None:
    for v in V["records"]:
        dek = bytes.fromhex(v["dek"])
        env = envelope_from_text(v["envelope"])
        sealed = seal_record(
            dek, env, ctx(v["context"]), bytes.fromhex(v["plaintext"]), bytes.fromhex(v["nonce"])
        )
        assert sealed_to_text(sealed) == v["text"], v["name"]
        rec = parse_record(sealed_from_text(v["text"]))
        assert open_record(dek, rec, ctx(v["context"])).hex() == v["plaintext"], v["name"]
    dek = bytes.fromhex(V["records"][0]["dek"])
    for v in V["bad_records"]:
        got = code_of(open_text, dek, v["text"], v["context"])
        assert got == v["error"], v["name"]


def open_stream(dek: bytes, data: bytes, context: Dict[str, str]) -> bytes:
    src = io.BytesIO(data)
    fixed = _read_full(src, 11)
    chunk, n = parse_stream_header_fixed(fixed)
    env = _read_full(src, n)
    if len(env) < n:
        raise KeyhavenError("bad_envelope", "ends inside its header")
    parse_envelope(env)
    c = ChunkCipher(dek, fixed + env, context)
    out = b""
    buf = _read_full(src, chunk + 16)
    while True:
        nxt = _read_full(src, chunk + 16) if len(buf) == chunk + 16 else b""
        out += c.open(buf, not nxt)
        if not nxt:
            return out
        buf = nxt


@pytest.mark.parametrize("v", V["streams"], ids=lambda v: v["name"])
def test_streams(v: Dict[str, Any]) -> None:
    dek = bytes.fromhex(v["dek"])
    header = stream_header(envelope_from_text(v["envelope"]), v["chunk_size"])
    c = ChunkCipher(dek, header, ctx(v["context"]))
    pt = bytes.fromhex(v["plaintext"])
    pieces = [pt[i : i + v["chunk_size"]] for i in range(0, len(pt), v["chunk_size"])] or [b""]
    out = header + b"".join(c.seal(p, i == len(pieces) - 1) for i, p in enumerate(pieces))
    assert out.hex() == v["stream"]
    assert open_stream(dek, bytes.fromhex(v["stream"]), ctx(v["context"])).hex() == v["plaintext"]


@pytest.mark.parametrize("v", V["bad_streams"], ids=lambda v: v["name"])
def test_bad_streams(v: Dict[str, Any]) -> None:
    dek = bytes.fromhex(V["streams"][0]["dek"])
    assert code_of(open_stream, dek, bytes.fromhex(v["stream"]), ctx(v["context"])) == v["error"]


def test_mac_tags() -> None:
    for v in V["mac_tags"]:
        tag = parse_mac_tag(v["text"])
        assert (tag.version, tag.mac.hex()) == (v["version"], v["mac"]), v["name"]
        # The MAC is HMAC-SHA256 of the message alone under the version's secret.
        mac = hmac.new(bytes.fromhex(v["key"]), bytes.fromhex(v["message"]), hashlib.sha256).hexdigest()
        assert mac == v["mac"], v["name"]
    for v in V["bad_mac_tags"]:
        assert code_of(parse_mac_tag, v["text"]) == v["error"], v["name"]


def test_mac_tags_are_what_the_daemon_makes_from_their_secrets(daemon: Daemon) -> None:
    """Each vector's secret imported (PROTOCOL.md §3.36) as version 1 or 2 of one key."""
    secrets: Dict[int, bytes] = {}
    for v in V["mac_tags"]:
        if v["version"] <= 2:
            secrets.setdefault(v["version"], bytes.fromhex(v["key"]))
    with Client(daemon.socket) as kh:
        for version in (1, 2):
            p = kh.call("key_import_params", {"tenant": "vec", "key": "mac", "type": "hmac-sha256"})
            public = load_pem_public_key(p["public_key"].encode())
            assert isinstance(public, rsa.RSAPublicKey)
            oaep = padding.OAEP(mgf=padding.MGF1(hashes.SHA1()), algorithm=hashes.SHA1(), label=None)  # noqa: S303
            wrapped = public.encrypt(secrets[version], oaep)
            info = kh.call(
                "key_import",
                {
                    "tenant": "vec",
                    "key": "mac",
                    "import_token": p["import_token"],
                    "wrapped": base64.b64encode(wrapped).decode(),
                },
            )
            assert info["current_version"] == version
        checked = 0
        for v in V["mac_tags"]:
            if v["version"] > 2:
                continue
            message = bytes.fromhex(v["message"])
            assert kh.mac("vec/mac", message, version=v["version"]).tag == v["text"].strip(), v["name"]
            assert kh.mac_verify("vec/mac", message, v["text"]).valid, v["name"]
            checked += 1
        assert checked >= 4
        for v in V["bad_mac_tags"]:
            assert code_of(kh.mac_verify, "vec/mac", b"x", v["text"]) == v["error"], v["name"]
