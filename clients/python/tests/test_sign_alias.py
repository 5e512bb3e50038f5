"""sign, verify, public_key and the alias operations against a real daemon.

Every signature is also checked here with ``cryptography`` against the
public key the daemon served, so a wrong key or a wrong encoding fails.
"""

from __future__ import annotations

import base64
import hashlib
from typing import Any, Callable, Iterator

import pytest
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.serialization import load_pem_public_key

from keyhaven import (
    AliasInfo,
    Client,
    DaemonError,
    InvalidInput,
    KeyhavenError,
    PublicKeyResult,
    SignResult,
    VerifyResult,
    parse_mac_tag,
)

from .conftest import Daemon

PSS = padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=32)


@pytest.fixture(scope="module")
def kh(daemon: Daemon) -> Iterator[Client]:
    with Client(daemon.socket) as c:
        c.key_create("acme/pii")
        c.key_create("acme/index", type="hmac-sha256")
        c.key_create("acme/ec", type="ecdsa-p256")
        c.key_create("acme/ec2", type="ecdsa-p256")
        c.key_create("acme/rsa", type="rsa-3072-pss")
        yield c


def ec_key(pk: PublicKeyResult) -> ec.EllipticCurvePublicKey:
    key = load_pem_public_key(pk.pem.encode())
    assert isinstance(key, ec.EllipticCurvePublicKey)
    return key


def rsa_key(pk: PublicKeyResult) -> rsa.RSAPublicKey:
    key = load_pem_public_key(pk.pem.encode())
    assert isinstance(key, rsa.RSAPublicKey)
    return key


def ec_valid(key: ec.EllipticCurvePublicKey, sig: bytes, message: bytes, h: hashes.HashAlgorithm) -> bool:
    try:
        key.verify(sig, message, ec.ECDSA(h))
    except InvalidSignature:
        return False
    return True


def pss_valid(key: rsa.RSAPublicKey, sig: bytes, message: bytes) -> bool:
    try:
        key.verify(sig, message, PSS, hashes.SHA256())
    except InvalidSignature:
        return False
    return True


def code_of(call: Callable[[], Any]) -> str:
    with pytest.raises(KeyhavenError) as e:
        call()
    return e.value.code


def test_ecdsa_p256_sign_verify_in_the_daemon_and_locally(kh: Client) -> None:
    message = b'{"sub":"alice"}'
    s = kh.sign("acme/ec", message)
    assert isinstance(s, SignResult) and isinstance(s.signature, bytes)
    assert s.signature[0] == 0x30  # a DER SEQUENCE
    assert (s.key_version, s.algorithm) == (1, "ecdsa-p256-sha256")

    pk = kh.public_key("acme/ec")
    assert (pk.key_version, pk.type) == (1, "ecdsa-p256")
    assert pk.pem.startswith("-----BEGIN PUBLIC KEY-----\n") and pk.pem.endswith("-----END PUBLIC KEY-----\n")
    key = ec_key(pk)
    assert isinstance(key.curve, ec.SECP256R1)
    assert kh.public_key(("acme", "ec"), version=1).pem == pk.pem

    # Locally: ECDSA with SHA-256 over the message, DER signature.
    assert ec_valid(key, s.signature, message, hashes.SHA256())
    assert not ec_valid(key, s.signature, b'{"sub":"mallory"}', hashes.SHA256())
    other = kh.public_key("acme/ec2")
    assert other.pem != pk.pem
    assert not ec_valid(ec_key(other), s.signature, message, hashes.SHA256())

    # The caller's digest gives a signature of the same message; randomised.
    sd = kh.sign("acme/ec", digest=hashlib.sha256(message).digest())
    assert ec_valid(key, sd.signature, message, hashes.SHA256())
    assert sd.signature != s.signature
    # A str message is its UTF-8 bytes.
    ss = kh.sign("acme/ec", "héllo")
    assert ec_valid(key, ss.signature, "héllo".encode(), hashes.SHA256())

    # In the daemon: true; false for a changed message, signature or key.
    assert kh.verify("acme/ec", message, s.signature) == VerifyResult(True, 1, "ecdsa-p256-sha256")
    assert kh.verify("acme/ec", message, base64.b64encode(s.signature).decode(), version=1).valid
    assert kh.verify("acme/ec", None, sd.signature, digest=hashlib.sha256(message).digest()).valid
    assert not kh.verify("acme/ec", b'{"sub":"mallory"}', s.signature).valid
    flipped = bytearray(s.signature)
    flipped[-1] ^= 1
    assert not kh.verify("acme/ec", message, flipped).valid
    assert not kh.verify("acme/ec2", message, s.signature).valid
    assert not kh.verify("acme/ec", message, b"not DER").valid
    assert code_of(lambda: kh.verify("acme/ec", message, s.signature, version=2)) == "not_found"
    assert code_of(lambda: kh.public_key("acme/ec", version=2)) == "not_found"


def test_rsa_3072_pss_sign_verify_in_the_daemon_and_locally(kh: Client) -> None:
    message = b"invoice 2026-0042"
    s = kh.sign("acme/rsa", message)
    assert (len(s.signature), s.key_version, s.algorithm) == (384, 1, "rsa-3072-pss-sha256")
    pk = kh.public_key("acme/rsa")
    assert pk.type == "rsa-3072-pss"
    key = rsa_key(pk)
    assert key.key_size == 3072

    # Locally: RSASSA-PSS, SHA-256, MGF1-SHA-256, 32-byte salt.
    assert pss_valid(key, s.signature, message)
    assert not pss_valid(key, s.signature, b"invoice 2026-0043")
    stranger = rsa.generate_private_key(public_exponent=65537, key_size=3072)
    assert not pss_valid(stranger.public_key(), s.signature, message)
    sd = kh.sign("acme/rsa", digest=hashlib.sha256(message).digest())
    assert pss_valid(key, sd.signature, message)

    assert kh.verify("acme/rsa", message, s.signature).valid
    assert kh.verify("acme/rsa", None, s.signature, digest=hashlib.sha256(message).digest()).valid
    assert not kh.verify("acme/rsa", b"invoice 2026-0043", s.signature).valid
    forged = stranger.sign(message, PSS, hashes.SHA256())
    assert not kh.verify("acme/rsa", message, forged).valid


def test_ecdsa_p384_signs_a_sha384_digest(kh: Client) -> None:
    kh.key_create("acme/ec384", type="ecdsa-p384")
    message = b"p384"
    s = kh.sign("acme/ec384", digest=hashlib.sha384(message).digest())
    assert s.algorithm == "ecdsa-p384-sha384"
    key = ec_key(kh.public_key("acme/ec384"))
    assert ec_valid(key, s.signature, message, hashes.SHA384())
    assert kh.verify("acme/ec384", message, s.signature).valid
    # A 32-byte digest is the wrong length for P-384: the daemon says so.
    assert code_of(lambda: kh.sign("acme/ec384", digest=hashlib.sha256(message).digest())) == "bad_request"


def test_wrong_key_types_and_bad_input_are_typed(kh: Client) -> None:
    sig = kh.sign("acme/ec", "x").signature
    for call in (
        lambda: kh.sign("acme/pii", "x"),
        lambda: kh.sign("acme/index", "x"),
        lambda: kh.verify("acme/pii", "x", sig),
        lambda: kh.public_key("acme/pii"),
        lambda: kh.mac("acme/ec", "x"),
        lambda: kh.encrypt("acme/ec", "x"),
    ):
        with pytest.raises(DaemonError) as e:
            call()
        assert e.value.code == "wrong_key_type"
    assert code_of(lambda: kh.sign("acme/nope", "x")) == "not_found"
    with pytest.raises(DaemonError) as e:
        kh.sign("acme/ec", bytes(65537))
    assert e.value.code == "payload_too_large"

    # Refused here, before anything is sent.
    for bad in (
        lambda: kh.sign("Acme/ec", "x"),
        lambda: kh.sign("acme/ec", 42),  # type: ignore[arg-type]
        lambda: kh.sign("acme/ec"),
        lambda: kh.sign("acme/ec", "x", digest=hashlib.sha256(b"x").digest()),
        lambda: kh.sign("acme/ec", digest=bytes(31)),
        lambda: kh.sign("acme/ec", digest=hashlib.sha256(b"x").hexdigest()),  # type: ignore[arg-type]
        lambda: kh.verify("acme/ec", "x", 42),  # type: ignore[arg-type]
        lambda: kh.verify("acme/ec", "x", "not base64!"),
        lambda: kh.verify("acme/ec", "x", sig, version=0),
        lambda: kh.public_key("acme/ec", version=True),
    ):
        with pytest.raises(InvalidInput) as ei:
            bad()
        assert ei.value.code == "bad_request"


def test_aliases_create_use_move_list_delete(kh: Client) -> None:
    kh.key_create("acme/web-2025")
    kh.key_create("acme/web-2026")
    created = kh.alias_create("web", "acme/web-2025")
    assert isinstance(created, AliasInfo)
    assert (created.tenant, created.alias, created.key) == ("acme", "web", "web-2025")
    assert created.created_at > 0 and created.updated_at is None and created.previous_key is None

    # Used through the alias: answers and ciphertexts name the real key.
    e1 = kh.encrypt("acme/web", "card 1", {"row": "1"})
    d1 = kh.decrypt(e1.ciphertext, {"row": "1"})
    assert (bytes(d1.plaintext), d1.key) == (b"card 1", "web-2025")
    assert kh.key_show("acme/web")["key"] == "web-2025"
    kh.alias_create("email-idx", ("acme", "index"))
    via_alias = kh.mac("acme/email-idx", "alice@example.com")
    assert via_alias.tag == kh.mac("acme/index", "alice@example.com").tag
    assert kh.mac_verify("acme/email-idx", "alice@example.com", via_alias.tag).valid
    assert parse_mac_tag(via_alias.tag).version == via_alias.key_version
    kh.alias_create("signer", "acme/ec")
    s = kh.sign("acme/signer", "through an alias")
    pk = kh.public_key("acme/signer")
    assert pk.pem == kh.public_key("acme/ec").pem
    assert ec_valid(ec_key(pk), s.signature, b"through an alias", hashes.SHA256())
    assert kh.verify("acme/signer", "through an alias", s.signature).valid

    # Move: new data names the new key; old data still opens.
    moved = kh.alias_update("web", "acme/web-2026")
    assert (moved.key, moved.previous_key) == ("web-2026", "web-2025")
    assert moved.updated_at is not None
    e2 = kh.encrypt("acme/web", "card 2")
    assert kh.decrypt(e2.ciphertext).key == "web-2026"
    assert bytes(kh.decrypt(e1.ciphertext, {"row": "1"}).plaintext) == b"card 1"

    # List: sorted by tenant then alias; of one tenant or of all.
    listed = kh.alias_list("acme")
    assert [(a.alias, a.key) for a in listed] == [
        ("email-idx", "index"),
        ("signer", "ec"),
        ("web", "web-2026"),
    ]
    assert kh.alias_list() == listed
    assert kh.alias_list("other") == []

    # Delete: answers what it removed; the name is then nothing; the key is untouched.
    gone = kh.alias_delete("acme", "web")
    assert (gone.alias, gone.key) == ("web", "web-2026")
    assert code_of(lambda: kh.encrypt("acme/web", "x")) == "not_found"
    assert bytes(kh.decrypt(e2.ciphertext).plaintext) == b"card 2"
    assert [a.alias for a in kh.alias_list("acme")] == ["email-idx", "signer"]

    # The daemon's refusals, typed.
    for call, code in (
        (lambda: kh.alias_create("pii", "acme/web-2025"), "already_exists"),
        (lambda: kh.alias_create("signer", "acme/web-2025"), "already_exists"),
        (lambda: kh.key_create("acme/signer"), "already_exists"),
        (lambda: kh.alias_create("x", "acme/missing"), "not_found"),
        (lambda: kh.alias_create("chain", "acme/signer"), "not_found"),
        (lambda: kh.alias_update("web", "acme/web-2025"), "not_found"),
        (lambda: kh.alias_delete("acme", "web"), "not_found"),
    ):
        with pytest.raises(DaemonError) as e:
            call()
        assert e.value.code == code
    # Refused here.
    for bad in (
        lambda: kh.alias_create("Web", "acme/web-2025"),
        lambda: kh.alias_create("web", "acme"),
        lambda: kh.alias_delete("acme", 42),  # type: ignore[arg-type]
        lambda: kh.alias_list("ACME"),
    ):
        with pytest.raises(InvalidInput) as ei:
            bad()
        assert ei.value.code == "bad_request"
