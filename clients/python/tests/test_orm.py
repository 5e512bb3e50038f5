"""Encrypted SQLAlchemy fields with a blind index, against a real PostgreSQL
(a throwaway cluster from the Debian package, Unix socket only) and a real daemon."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import uuid
from pathlib import Path
from typing import Iterator, List, Optional

import pytest

sqlalchemy = pytest.importorskip(
    "sqlalchemy", reason="SQLAlchemy is not installed (pip install keyhaven[sqlalchemy])"
)
pytest.importorskip("psycopg", reason="psycopg (v3) is not installed (requirements-dev.txt)")

from sqlalchemy import create_engine, select, text  # noqa: E402
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column  # noqa: E402

from keyhaven import Client, DaemonError, InvalidInput  # noqa: E402
from keyhaven.orm import BlindIndex, BlindIndexTag, Ciphertext, EncryptedField  # noqa: E402

from .conftest import Daemon  # noqa: E402


def _pg_bin() -> Path:
    """``$KEYHAVEN_PG_BIN``, else the newest /usr/lib/postgresql/N/bin (Debian's layout)."""
    if os.environ.get("KEYHAVEN_PG_BIN"):
        return Path(os.environ["KEYHAVEN_PG_BIN"])
    found = sorted(
        Path("/usr/lib/postgresql").glob("*/bin"),
        key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0,
    )
    return found[-1] if found else Path("/usr/lib/postgresql/15/bin")


PG_BIN = _pg_bin()


class Postgres:
    """A throwaway cluster in a temp dir, run as an unprivileged user, listening on a socket there only."""

    def __init__(self) -> None:
        if not (PG_BIN / "initdb").exists():
            pytest.skip(
                f"PostgreSQL is not installed: no {PG_BIN}/initdb (apt-get install postgresql, or set KEYHAVEN_PG_BIN)"
            )
        self.dir = tempfile.mkdtemp(prefix="kh-pg-")
        self.prefix: List[str] = []
        if os.getuid() == 0:  # postgres refuses to run as root
            shutil.chown(self.dir, "nobody", "nogroup")
            self.prefix = ["runuser", "-u", "nobody", "--"]
        self.data = os.path.join(self.dir, "data")
        self._run(PG_BIN / "initdb", "-D", self.data, "-U", "kh", "-A", "trust", "--no-sync", "-E", "UTF8")
        self._run(
            PG_BIN / "pg_ctl", "start", "-w", "-D", self.data, "-l", os.path.join(self.dir, "log"),
            "-o", f"-k {self.dir} -c listen_addresses= -c fsync=off",
        )  # fmt: skip
        self.url = f"postgresql+psycopg://kh@/postgres?host={self.dir}"

    def _run(self, *args: object) -> None:
        r = subprocess.run([*self.prefix, *map(str, args)], capture_output=True, cwd=self.dir)
        if r.returncode != 0:
            log = Path(self.dir, "log")
            raise RuntimeError(
                f"{args[0]} failed: {r.stderr.decode()} {log.read_text() if log.exists() else ''}"
            )

    def stop(self) -> None:
        try:
            self._run(PG_BIN / "pg_ctl", "stop", "-m", "fast", "-w", "-D", self.data)
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture(scope="module")
def pg() -> Iterator[Postgres]:
    p = Postgres()
    try:
        yield p
    finally:
        p.stop()


@pytest.fixture(scope="module")
def kh(daemon: Daemon) -> Iterator[Client]:
    with Client(daemon.socket) as c:
        c.key_create("acme/pii")
        c.key_create("acme/email-index", type="hmac-sha256")
        yield c


def test_encrypted_field_and_blind_index(pg: Postgres, kh: Client) -> None:
    index = BlindIndex(kh, "acme/email-index")

    class Base(DeclarativeBase):
        pass

    class User(Base):
        __tablename__ = "users"
        id: Mapped[str] = mapped_column(primary_key=True)
        email_enc: Mapped[Optional[str]] = mapped_column(Ciphertext)
        email_bidx: Mapped[Optional[str]] = mapped_column(BlindIndexTag, index=True)
        note_enc: Mapped[Optional[str]] = mapped_column(Ciphertext)
        email = EncryptedField(kh, "acme/pii", "email_enc", index=index, index_column="email_bidx")
        note = EncryptedField(kh, "acme/pii", "note_enc")

    engine = create_engine(pg.url)
    try:
        Base.metadata.create_all(engine)
        alice, bob = str(uuid.uuid4()), str(uuid.uuid4())
        with Session(engine) as s:
            for pk, email in ((alice, "Alice@Example.com"), (bob, "bob@example.com")):
                u = User(id=pk)
                u.email = email
                u.note = "vip"
                s.add(u)
            s.commit()

        with engine.connect() as c:
            raw = c.execute(text("SELECT id, email_enc, email_bidx FROM users")).all()
        assert {r[0] for r in raw} == {alice, bob}
        for _, enc, bidx in raw:  # nothing readable in the table
            assert enc.startswith("khc1:") and "example" not in enc.lower()
            assert bidx.startswith("khm1:") and len(bidx) == 53

        with Session(engine) as s:
            # Equality lookup without decrypting; the index normalises (case, space).
            found = s.scalars(select(User).where(index.lookup(User.email_bidx, " alice@EXAMPLE.com"))).all()
            assert [u.id for u in found] == [alice]
            assert found[0].email == "Alice@Example.com"
            assert found[0].note == "vip"
            assert (
                s.scalars(select(User).where(index.lookup(User.email_bidx, "carol@example.com"))).all() == []
            )

        # A ciphertext moved to another row, or to another column, does not decrypt.
        with engine.begin() as c:
            c.execute(text("UPDATE users SET email_enc = (SELECT email_enc FROM users WHERE id = :a) WHERE id = :b"),
                      {"a": alice, "b": bob})  # fmt: skip
            c.execute(text("UPDATE users SET note_enc = email_enc WHERE id = :a"), {"a": alice})
        with Session(engine) as s:
            moved = s.get(User, bob)
            assert moved is not None
            with pytest.raises(DaemonError) as e:
                _ = moved.email
            assert e.value.code == "integrity", e.value
            a = s.get(User, alice)
            assert a is not None and a.email == "Alice@Example.com"
            with pytest.raises(DaemonError) as e2:
                _ = a.note
            assert e2.value.code == "integrity"

        # After a rotation of the HMAC key: new writes use version 2, lookups find rows of both.
        kh.call("key_rotate", {"tenant": "acme", "key": "email-index"})
        carol = str(uuid.uuid4())
        with Session(engine) as s:
            u = User(id=carol)
            u.email = "carol@example.com"
            s.add(u)
            s.commit()
            assert (
                kh.mac_verify("acme/email-index", b"carol@example.com", u.email_bidx or "").key_version == 2
            )
            assert [
                x.id
                for x in s.scalars(select(User).where(index.lookup(User.email_bidx, "alice@example.com")))
            ] == [alice]
            assert [
                x.id
                for x in s.scalars(select(User).where(index.lookup(User.email_bidx, "carol@example.com")))
            ] == [carol]
            # Only the current version's tag: rows indexed before the rotation are not found.
            assert (
                s.scalars(select(User).where(User.email_bidx == index.tag("alice@example.com"))).all() == []
            )

        # Bad input: typed errors, nothing written.
        with Session(engine) as s:
            u = User()
            with pytest.raises(InvalidInput) as ei:
                u.email = "x@example.com"
            assert "primary key" in str(ei.value)
            u = User(id=str(uuid.uuid4()))
            with pytest.raises(InvalidInput):
                u.email = 42  # type: ignore[assignment]
            u.email_enc = "plaintext@example.com"
            s.add(u)
            with pytest.raises(sqlalchemy.exc.StatementError) as es:
                s.commit()
            assert isinstance(es.value.orig, InvalidInput)
    finally:
        engine.dispose()
