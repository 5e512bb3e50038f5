"""Cross-language sealing against one real daemon: records and streams sealed
by each of Python, Node.js and Rust (the crate's Sealer through
target/debug/khseal for records, the `keyhaven` CLI for streams) are opened
by each of the others, under a context whose keys sort differently in UTF-8
and UTF-16."""

from __future__ import annotations

import io
import json
import subprocess
from typing import Callable, Dict, Iterator

import pytest

from keyhaven import Client, OpenLimits, Sealer, SealLimits, sealed_to_text

from .conftest import ROOT, Daemon

CTX = {"\U0001f600": "a", "\uff61": "b", "row": "42", "é": ""}
KHSEAL = ROOT / "target" / "debug" / "khseal"
NODE_HELPER = ROOT / "clients" / "node" / "test" / "cross-helper.js"


@pytest.fixture(scope="module")
def sealer(daemon: Daemon) -> Iterator[Sealer]:
    with Client(daemon.socket) as c:
        c.key_create("acme/pii")
        c.key_create("acme/files")
    with Sealer(
        daemon.socket,
        seal=SealLimits(max_age=60, max_messages=1000, max_bytes=1 << 20),
        open=OpenLimits(max_age=60, max_entries=100),
    ) as s:
        yield s


def run(args: list[str], data: bytes) -> bytes:
    p = subprocess.run(args, input=data, capture_output=True, check=False)
    assert p.returncode == 0, p.stderr.decode(errors="replace")
    return p.stdout


def pairs() -> list[str]:
    return [f"{k}={v}" for k, v in CTX.items()]


def cli_context() -> list[str]:
    return [a for p in pairs() for a in ("--context", p)]


Sealing = Callable[[Daemon, Sealer, bytes], bytes]


def record_sealers() -> Dict[str, Sealing]:
    return {
        "python": lambda d, s, pt: sealed_to_text(s.seal("acme/pii", pt, CTX)).encode(),
        "node": lambda d, s, pt: run(
            ["node", str(NODE_HELPER), d.socket, "seal-record", "acme/pii", json.dumps(CTX)], pt
        ).strip(),
        "rust": lambda d, s, pt: run([str(KHSEAL), d.socket, "seal", "acme/pii", *pairs()], pt).strip(),
    }


def record_openers() -> Dict[str, Sealing]:
    return {
        "python": lambda d, s, text: bytes(s.open(text.decode(), CTX)),
        "node": lambda d, s, text: run(
            ["node", str(NODE_HELPER), d.socket, "open-record", json.dumps(CTX)], text
        ),
        "rust": lambda d, s, text: run([str(KHSEAL), d.socket, "open", *pairs()], text),
        "rust-cli": lambda d, s, text: d.cli("open", *cli_context(), input=text),
    }


def py_seal_stream(d: Daemon, s: Sealer, pt: bytes) -> bytes:
    out = io.BytesIO()
    s.seal_stream("acme/files", CTX, io.BytesIO(pt), out, 1024)
    return out.getvalue()


def py_open_stream(d: Daemon, s: Sealer, sealed: bytes) -> bytes:
    out = io.BytesIO()
    s.open_stream(CTX, io.BytesIO(sealed), out)
    return out.getvalue()


def stream_sealers() -> Dict[str, Sealing]:
    return {
        "python": py_seal_stream,
        "node": lambda d, s, pt: run(
            ["node", str(NODE_HELPER), d.socket, "seal-stream", "acme/files", json.dumps(CTX), "1024"], pt
        ),
        "rust-cli": lambda d, s, pt: d.cli(
            "seal", "acme/files", *cli_context(), "--chunk-size", "1024", input=pt
        ),
    }


def stream_openers() -> Dict[str, Sealing]:
    return {
        "python": py_open_stream,
        "node": lambda d, s, sealed: run(
            ["node", str(NODE_HELPER), d.socket, "open-stream", json.dumps(CTX)], sealed
        ),
        "rust-cli": lambda d, s, sealed: d.cli("open", *cli_context(), input=sealed),
    }


@pytest.mark.parametrize("producer", ["python", "node", "rust"])
def test_records_open_in_every_language(daemon: Daemon, sealer: Sealer, producer: str) -> None:
    plaintext = f"sealed by {producer}: \u00fc\U0001f600".encode() + bytes(range(256))
    text = record_sealers()[producer](daemon, sealer, plaintext)
    assert text.startswith(b"khs1:")
    for consumer, opener in record_openers().items():
        assert opener(daemon, sealer, text) == plaintext, f"{producer} -> {consumer}"


@pytest.mark.parametrize("producer", ["python", "node", "rust-cli"])
def test_streams_open_in_every_language(daemon: Daemon, sealer: Sealer, producer: str) -> None:
    plaintext = bytes(i % 241 for i in range(5 * 1024 + 17))
    sealed = stream_sealers()[producer](daemon, sealer, plaintext)
    for consumer, opener in stream_openers().items():
        assert opener(daemon, sealer, sealed) == plaintext, f"{producer} -> {consumer}"
