#!/usr/bin/env python3
"""Writes vectors.json: language-neutral test vectors for every Keyhaven client.

Self-contained on purpose: it uses only `struct` and `cryptography`'s AESGCM
and HMAC, none of the clients' code, so the vectors are an independent
implementation of docs/ENVELOPE.md §4, §5, §8 and §10, and of the `khm1:`
MAC tag of docs/PROTOCOL.md §3.29, that the Rust crate, the Node.js package
and the Python package are each checked against. The envelopes are
wrapped under the test KEK of ENVELOPE.md §9 (never a real Keyhaven KEK), so
that the vectors need no daemon; the first reproduces §9's vector A.

Run: python3 tests/conformance/generate.py (deterministic: same output).
"""

from __future__ import annotations

import base64
import json
import struct
from pathlib import Path

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives import hmac as crypto_hmac
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

KEK = bytes(range(0x00, 0x20))
DEK = bytes(range(0x20, 0x40))
DOC_VECTOR_A = (
    "khe1:S0gBAQEEYWNtZQNwaWkAAAADDx4tPEtaaXiHlqW0w9Lh8KChoqOkpaanqKmqq8Y5Xg5h7iSYSkyt-"
    "CtX7vFAnWsjpoJ0W6Q3HL1Dlks-19JgsYx55h2Jo90s2jOvyQ"
)


def c(pairs: list[tuple[str, str]]) -> bytes:
    """C(ctx), ENVELOPE.md §4.2: pairs sorted by the key's UTF-8 bytes."""
    enc = sorted((k.encode(), v.encode()) for k, v in pairs)
    out = struct.pack(">H", len(enc))
    for k, v in enc:
        out += struct.pack(">H", len(k)) + k + struct.pack(">H", len(v)) + v
    return out


def b64url(b: bytes) -> str:
    return base64.urlsafe_b64encode(b).rstrip(b"=").decode()


def envelope(tenant: str, key: str, version: int, eid: bytes, nonce: bytes, pairs: list[tuple[str, str]]) -> bytes:
    header = b"KH\x01\x01\x01" + bytes([len(tenant)]) + tenant.encode() + bytes([len(key)]) + key.encode()
    header += struct.pack(">I", version) + eid + nonce
    return header + AESGCM(KEK).encrypt(nonce, DEK, header + c(pairs))


def record(env: bytes, nonce: bytes, pairs: list[tuple[str, str]], plaintext: bytes) -> bytes:
    header = b"KH\x01\x03\x01" + struct.pack(">H", len(env)) + env + nonce
    return header + AESGCM(DEK).encrypt(nonce, plaintext, header + c(pairs))


def stream(env: bytes, chunk: int, pairs: list[tuple[str, str]], plaintext: bytes) -> bytes:
    header = b"KH\x01\x04\x01" + struct.pack(">IH", chunk, len(env)) + env
    pieces = [plaintext[i : i + chunk] for i in range(0, len(plaintext), chunk)] or [b""]
    out = header
    for i, p in enumerate(pieces):
        tail = struct.pack(">QB", i, 1 if i == len(pieces) - 1 else 0)
        out += AESGCM(DEK).encrypt(tail + b"\x00\x00\x00", p, header + c(pairs) + tail)
    return out


def mac_tag(version: int, key: bytes, message: bytes) -> tuple[bytes, str]:
    """HMAC-SHA256(key, message) and its `khm1:` text, PROTOCOL.md §3.29."""
    h = crypto_hmac.HMAC(key, hashes.SHA256())
    h.update(message)
    mac = h.finalize()
    return mac, "khm1:" + b64url(struct.pack(">I", version) + mac)


def flip(b: bytes, i: int) -> bytes:
    x = bytearray(b)
    x[i] ^= 0x01
    return bytes(x)


def main() -> None:
    eid = bytes.fromhex("0f1e2d3c4b5a69788796a5b4c3d2e1f0")
    env_nonce = bytes.fromhex("a0a1a2a3a4a5a6a7a8a9aaab")
    ctx_b = [("app", "billing"), ("field", "iban")]
    ctx_u = [("\U0001f600", "a"), ("\uff61", "b"), ("row", "42"), ("é", "")]
    env_a = envelope("acme", "pii", 3, eid, env_nonce, [])
    assert "khe1:" + b64url(env_a) == DOC_VECTOR_A, "the generator does not reproduce ENVELOPE.md §9 vector A"
    env_b = envelope("acme", "pii", 3, eid, env_nonce, ctx_b)
    env_u = envelope("t-9_x", "k" * 63, 0xFFFFFFFF, bytes(range(16)), bytes(12), ctx_u)

    contexts = [
        {"name": "empty", "pairs": [], "encoded": c([]).hex()},
        {"name": "ENVELOPE.md §4.3 first example", "pairs": [["b", "2"], ["a", "1"]], "encoded": c([("b", "2"), ("a", "1")]).hex()},
        {"name": "vector B", "pairs": [["field", "iban"], ["app", "billing"]], "encoded": c(ctx_b).hex()},
        {"name": "UTF-8 byte order, not UTF-16 (U+FF61 before U+1F600)", "pairs": [list(p) for p in ctx_u], "encoded": c(ctx_u).hex()},
        {"name": "a proper prefix sorts first", "pairs": [["ab", "x"], ["a", "y"]], "encoded": c([("ab", "x"), ("a", "y")]).hex()},
        {"name": "upper case sorts before lower case", "pairs": [["a", "1"], ["B", "2"]], "encoded": c([("a", "1"), ("B", "2")]).hex()},
        {"name": "longest key and value", "pairs": [["k" * 128, "v" * 1024]], "encoded": c([("k" * 128, "v" * 1024)]).hex()},
        {"name": "32 pairs", "pairs": [[f"k{i:02}", str(i)] for i in range(32)], "encoded": c([(f"k{i:02}", str(i)) for i in range(32)]).hex()},
    ]
    bad_contexts = [
        {"name": "33 pairs", "pairs": [[f"k{i:02}", "v"] for i in range(33)]},
        {"name": "empty key", "pairs": [["", "v"]]},
        {"name": "key of 129 bytes", "pairs": [["k" * 129, "v"]]},
        {"name": "key of 129 bytes in UTF-8 (43 x 3 bytes)", "pairs": [["\u20ac" * 43, "v"]]},
        {"name": "value of 1025 bytes", "pairs": [["k", "v" * 1025]]},
        {"name": "value of 1026 bytes in UTF-8 (513 x 2 bytes)", "pairs": [["k", "\u00e9" * 513]]},
        {"name": "key given twice", "pairs": [["k", "1"], ["k", "2"]]},
    ]

    envelopes = [
        {"name": "ENVELOPE.md §9 vector A", "text": "khe1:" + b64url(env_a), "tenant": "acme", "key": "pii", "version": 3, "id": eid.hex()},
        {"name": "ENVELOPE.md §9 vector B", "text": "khe1:" + b64url(env_b), "tenant": "acme", "key": "pii", "version": 3, "id": eid.hex()},
        {"name": "longest key name, highest version", "text": "khe1:" + b64url(env_u), "tenant": "t-9_x", "key": "k" * 63, "version": 0xFFFFFFFF, "id": bytes(range(16)).hex()},
        {"name": "surrounding whitespace is removed", "text": " \t\r\nkhe1:" + b64url(env_a) + "\n", "tenant": "acme", "key": "pii", "version": 3, "id": eid.hex()},
    ]
    ta = "khe1:" + b64url(env_a)
    bad_envelopes = [{"name": f"byte {i} set to {v:02x}", "text": "khe1:" + b64url(env_a[:i] + bytes([v]) + env_a[i + 1 :])} for i, v in [(2, 0), (2, 2), (3, 2), (4, 2), (5, 0), (5, 0x40), (6, 0x41)]]
    bad_envelopes += [
        {"name": "key version 0", "text": "khe1:" + b64url(env_a[:14] + bytes(4) + env_a[18:])},
        {"name": "one byte appended", "text": "khe1:" + b64url(env_a + b"\x00")},
        {"name": "last byte cut", "text": "khe1:" + b64url(env_a[:-1])},
        {"name": "cut after the preamble", "text": "khe1:" + b64url(env_a[:5])},
        {"name": "prefix khc1:", "text": "khc1:" + ta[5:]},
        {"name": "prefix KHE1:", "text": "KHE1:" + ta[5:]},
        {"name": "padding appended", "text": ta + "="},
        {"name": "last character removed", "text": ta[:-1]},
        {"name": "non-zero trailing bits (R for Q)", "text": ta[:-1] + "R"},
        {"name": "standard alphabet (+)", "text": ta.replace("-", "+")},
        {"name": "inner whitespace", "text": ta[:40] + " " + ta[40:]},
    ]

    rn = bytes.fromhex("b0b1b2b3b4b5b6b7b8b9babb")
    records = []
    for name, env, pairs, pt in [
        ("vector B envelope, its context, hunter2", env_b, ctx_b, b"hunter2"),
        ("empty context, empty plaintext", env_a, [], b""),
        ("UTF-8 context, binary plaintext", env_u, ctx_u, bytes(range(256)) * 3),
    ]:
        rec = record(env, rn, pairs, pt)
        records.append({"name": name, "dek": DEK.hex(), "envelope": "khe1:" + b64url(env), "context": [list(p) for p in pairs], "nonce": rn.hex(), "plaintext": pt.hex(), "text": "khs1:" + b64url(rec)})
    rec_b = record(env_b, rn, ctx_b, b"hunter2")
    tb = "khs1:" + b64url(rec_b)
    hdr = 7 + len(env_b) + 12
    bad_records = [
        {"name": "wrong context (empty)", "text": tb, "context": [], "error": "integrity"},
        {"name": "wrong context (a value changed)", "text": tb, "context": [["app", "billing"], ["field", "bic"]], "error": "integrity"},
        {"name": "payload byte flipped", "text": "khs1:" + b64url(flip(rec_b, hdr)), "context": [list(p) for p in ctx_b], "error": "integrity"},
        {"name": "tag byte flipped", "text": "khs1:" + b64url(flip(rec_b, len(rec_b) - 1)), "context": [list(p) for p in ctx_b], "error": "integrity"},
        {"name": "record nonce flipped", "text": "khs1:" + b64url(flip(rec_b, hdr - 1)), "context": [list(p) for p in ctx_b], "error": "integrity"},
        {"name": "wrapped key flipped (header in the AAD)", "text": "khs1:" + b64url(flip(rec_b, 7 + len(env_b) - 1)), "context": [list(p) for p in ctx_b], "error": "integrity"},
        {"name": "kind 02 (a ciphertext)", "text": "khs1:" + b64url(rec_b[:3] + b"\x02" + rec_b[4:]), "context": [list(p) for p in ctx_b], "error": "bad_envelope"},
        {"name": "envelope length one too long", "text": "khs1:" + b64url(rec_b[:5] + struct.pack(">H", len(env_b) + 1) + rec_b[7:]), "context": [list(p) for p in ctx_b], "error": "bad_envelope"},
        {"name": "payload shorter than a tag", "text": "khs1:" + b64url(rec_b[: hdr + 15]), "context": [list(p) for p in ctx_b], "error": "bad_envelope"},
        {"name": "prefix khc1:", "text": "khc1:" + tb[5:], "context": [list(p) for p in ctx_b], "error": "bad_envelope"},
        {"name": "padding appended", "text": tb + "=", "context": [list(p) for p in ctx_b], "error": "bad_envelope"},
    ]

    streams = []
    for name, chunk, pt in [
        ("empty input: one final chunk of a tag", 1024, b""),
        ("one byte", 1024, b"\x01"),
        ("exactly one chunk: final and full", 1024, bytes(i % 256 for i in range(1024))),
        ("one chunk and one byte", 1024, bytes(i % 253 for i in range(1025))),
        ("three chunks and a bit", 1024, bytes(i % 251 for i in range(3 * 1024 + 7))),
        ("chunk size 4096", 4096, bytes(i % 249 for i in range(5000))),
    ]:
        s = stream(env_u if "4096" in name else env_b, chunk, ctx_u if "4096" in name else ctx_b, pt)
        streams.append({"name": name, "dek": DEK.hex(), "envelope": "khe1:" + b64url(env_u if "4096" in name else env_b), "context": [list(p) for p in (ctx_u if "4096" in name else ctx_b)], "chunk_size": chunk, "plaintext": pt.hex(), "stream": s.hex()})
    s3 = bytes.fromhex(streams[4]["stream"])
    h = 11 + len(env_b)
    w = 1024 + 16
    ch = [s3[h + i * w : h + (i + 1) * w] for i in range(4)]
    cb = [list(p) for p in ctx_b]
    bad_streams = [
        {"name": "chunks 0 and 1 swapped", "stream": (s3[:h] + ch[1] + ch[0] + ch[2] + ch[3]).hex(), "context": cb, "error": "integrity"},
        {"name": "truncated at a chunk boundary", "stream": s3[: h + 3 * w].hex(), "context": cb, "error": "integrity"},
        {"name": "truncated inside the last tag", "stream": s3[:-1].hex(), "context": cb, "error": "integrity"},
        {"name": "extended by a chunk", "stream": (s3 + ch[0]).hex(), "context": cb, "error": "integrity"},
        {"name": "extended by one byte", "stream": (s3 + b"\x00").hex(), "context": cb, "error": "integrity"},
        {"name": "header only: no chunk", "stream": s3[:h].hex(), "context": cb, "error": "integrity"},
        {"name": "wrong context", "stream": s3.hex(), "context": [], "error": "integrity"},
        {"name": "a chunk byte flipped", "stream": flip(s3, h + w + 5).hex(), "context": cb, "error": "integrity"},
        {"name": "chunk size in the header changed", "stream": (s3[:5] + struct.pack(">I", 2048) + s3[9:]).hex(), "context": cb, "error": "integrity"},
        {"name": "chunk size 1023", "stream": (s3[:5] + struct.pack(">I", 1023) + s3[9:]).hex(), "context": cb, "error": "bad_envelope"},
        {"name": "chunk size 16 MiB + 1", "stream": (s3[:5] + struct.pack(">I", (1 << 24) + 1) + s3[9:]).hex(), "context": cb, "error": "bad_envelope"},
        {"name": "ends inside the header", "stream": s3[: h - 1].hex(), "context": cb, "error": "bad_envelope"},
        {"name": "kind 03 (a record)", "stream": (s3[:3] + b"\x03" + s3[4:]).hex(), "context": cb, "error": "bad_envelope"},
    ]

    # MAC tags (PROTOCOL.md §3.29): version (u32 BE, >= 1) || HMAC-SHA256(K_v, message),
    # unpadded base64url after `khm1:`. The HMAC keys are test keys (never a
    # real key's material); a test may import them as an hmac-sha256 key
    # (PROTOCOL.md §3.36) and check that the daemon makes the same tags.
    mac_k1 = bytes(range(0x40, 0x60))
    mac_k2 = bytes(range(0x60, 0x80))
    mac_tags = []
    for name, version, key, msg in [
        ("version 1, an e-mail address", 1, mac_k1, b"alice@example.com"),
        ("version 1, empty message", 1, mac_k1, b""),
        ("version 1, binary message", 1, mac_k1, bytes(range(256))),
        ("version 2 (another secret), the same address", 2, mac_k2, b"alice@example.com"),
        ("highest version", 0xFFFFFFFF, mac_k2, b"x"),
    ]:
        mac, text = mac_tag(version, key, msg)
        mac_tags.append({"name": name, "key": key.hex(), "message": msg.hex(), "version": version, "mac": mac.hex(), "text": text})
    _, t1 = mac_tag(1, mac_k1, b"alice@example.com")
    mac_tags.append({**mac_tags[0], "name": "surrounding whitespace is removed", "text": " \t\r\n" + t1 + "\n"})
    body1 = base64.urlsafe_b64decode(t1[5:] + "====")
    bad_mac_tags = [
        {"name": "empty", "text": ""},
        {"name": "prefix only", "text": "khm1:"},
        {"name": "no prefix", "text": t1[5:]},
        {"name": "prefix KHM1:", "text": "KHM1:" + t1[5:]},
        {"name": "prefix khe1:", "text": "khe1:" + t1[5:]},
        {"name": "key version 0", "text": "khm1:" + b64url(bytes(4) + body1[4:])},
        {"name": "35 bytes (last MAC byte cut)", "text": "khm1:" + b64url(body1[:-1])},
        {"name": "37 bytes (a byte appended)", "text": "khm1:" + b64url(body1 + b"\x00")},
        {"name": "only the 32 MAC bytes, no version", "text": "khm1:" + b64url(body1[4:])},
        {"name": "padding appended", "text": t1 + "="},
        {"name": "last character removed", "text": t1[:-1]},
        {"name": "a character appended", "text": t1 + "A"},
        {"name": "standard alphabet (+)", "text": t1[:20] + "+" + t1[21:]},
        {"name": "standard alphabet (/)", "text": t1[:20] + "/" + t1[21:]},
        {"name": "inner whitespace", "text": t1[:30] + " " + t1[30:]},
        {"name": "a hex MAC, not base64url", "text": "khm1:" + body1.hex()},
    ]
    for b in bad_mac_tags:
        b["error"] = "bad_request"

    out = {
        "about": "Keyhaven conformance vectors (docs/ENVELOPE.md §4, §5, §8, §10; MAC tags of docs/PROTOCOL.md §3.29), written by tests/conformance/generate.py; see tests/conformance/README.md",
        "kek": KEK.hex(),
        "contexts": contexts,
        "bad_contexts": bad_contexts,
        "envelopes": envelopes,
        "bad_envelopes": bad_envelopes,
        "records": records,
        "bad_records": bad_records,
        "streams": streams,
        "bad_streams": bad_streams,
        "mac_tags": mac_tags,
        "bad_mac_tags": bad_mac_tags,
    }
    path = Path(__file__).with_name("vectors.json")
    path.write_text(json.dumps(out, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
