"""Encrypted SQLAlchemy fields with a blind index, against a real PostgreSQL
(a throwaway cluster from the Debian package, Unix socket only) and a real daemon."""

from __future__ import annotations

import base64
import os
import shutil
import subprocess
import tempfile
import uuid
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional

import pytest

sqlalchemy = pytest.importorskip(
    "sqlalchemy", reason="SQLAlchemy is not installed (pip install keyhaven[sqlalchemy])"
)
pytest.importorskip("psycopg", reason="psycopg (v3) is not installed (requirements-dev.txt)")

from sqlalchemy import create_engine, select, text  # noqa: E402
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column  # noqa: E402

from keyhaven import BadStoredValue, Client, DaemonError, InvalidInput, parse_mac_tag  # noqa: E402
from keyhaven.orm import (  # noqa: E402
    BlindIndex,
    BlindIndexTag,
    Ciphertext,
    EncryptedField,
    check_stored_tag,
    normalise_text,
    reindex,
)

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


def test_blind_index_column_parses_stored_tags_strictly(pg: Postgres, kh: Client) -> None:
    index = BlindIndex(kh, "acme/email-index")

    class Base(DeclarativeBase):
        pass

    class Member(Base):
        __tablename__ = "members"
        id: Mapped[str] = mapped_column(primary_key=True)
        email_enc: Mapped[Optional[str]] = mapped_column(Ciphertext)
        email_bidx: Mapped[Optional[str]] = mapped_column(BlindIndexTag)
        email = EncryptedField(kh, "acme/pii", "email_enc", index=index, index_column="email_bidx")

    good = index.tag("alice@example.com")
    assert check_stored_tag(good, "t.c").version == parse_mac_tag(good).version
    body = good[len("khm1:") :]
    malformed = {
        "another prefix": "khm2:" + body,
        "not base64url": good[:20] + "!" + good[21:],
        "standard base64": good[:20] + "+" + good[21:],
        "35 bytes": "khm1:" + base64.urlsafe_b64encode(bytes(35)).decode().rstrip("="),
        "version 0": "khm1:" + base64.urlsafe_b64encode(bytes(4) + bytes(range(32))).decode().rstrip("="),
        "surrounding space": " " + good[:-1],
        "a plaintext": "alice@example.com",
        "empty": "",
    }
    engine = create_engine(pg.url)
    try:
        Base.metadata.create_all(engine)
        with engine.begin() as c:
            for i, bad in enumerate(malformed.values()):
                c.execute(
                    text("INSERT INTO members (id, email_bidx) VALUES (:id, :t)"), {"id": f"bad{i}", "t": bad}
                )
        for i, (what, bad) in enumerate(malformed.items()):
            with pytest.raises(BadStoredValue) as e, Session(engine) as s:
                s.scalars(select(Member).where(Member.id == f"bad{i}")).all()
            assert e.value.code == "bad_request" and e.value.column == "members.email_bidx", what
            assert "members.email_bidx" in str(e.value)
            if len(bad) > 2:
                assert bad not in str(e.value), what  # the stored value is never echoed
            with pytest.raises(BadStoredValue):
                check_stored_tag(bad, "x")
            # Written through the ORM: refused before it reaches the table.
            with Session(engine) as s:
                s.add(Member(id=f"new{i}", email_bidx=bad))
                with pytest.raises(sqlalchemy.exc.StatementError) as es:
                    s.commit()
                assert isinstance(es.value.orig, BadStoredValue), what
                assert es.value.orig.column == "members.email_bidx"
        with Session(engine) as s:  # a well-formed row still reads
            s.add(Member(id="good", email_bidx=good))
            s.commit()
            assert s.get(Member, "good") is not None
        # One type object shared by two tables' columns: each error names its own column.
        shared = BlindIndexTag()
        t1 = sqlalchemy.Table("one", sqlalchemy.MetaData(), sqlalchemy.Column("tag", shared))
        t2 = sqlalchemy.Table("two", sqlalchemy.MetaData(), sqlalchemy.Column("tag", shared))
        assert {t1.c.tag.type.column, t2.c.tag.type.column} == {"one.tag", "two.tag"}
    finally:
        engine.dispose()


def test_reindex_after_rotating_the_index_key(pg: Postgres, kh: Client) -> None:
    kh.key_create("acme/people-index", type="hmac-sha256")
    engine = create_engine(pg.url)
    race: List[str] = []

    def normalise(value: str) -> str:
        # A writer changes this row while the re-index is between its read and its update.
        if value == "race@example.com" and race:
            with Session(engine) as s2:
                p = s2.get(Person, race.pop())
                assert p is not None
                p.email = "raced@example.com"
                s2.commit()
        return normalise_text(value)

    index = BlindIndex(kh, "acme/people-index", normalise=normalise)

    class Base(DeclarativeBase):
        pass

    class Person(Base):
        __tablename__ = "people"
        id: Mapped[str] = mapped_column(primary_key=True)
        email_enc: Mapped[Optional[str]] = mapped_column(Ciphertext)
        email_bidx: Mapped[Optional[str]] = mapped_column(BlindIndexTag, index=True)
        email = EncryptedField(kh, "acme/pii", "email_enc", index=index, index_column="email_bidx")

    def versions() -> Dict[str, Optional[int]]:
        with engine.connect() as c:
            return {
                r[0]: None if r[1] is None else parse_mac_tag(r[1]).version
                for r in c.execute(text("SELECT id, email_bidx FROM people"))
            }

    def find(value: str, only: Optional[List[int]] = None) -> List[str]:
        with Session(engine) as s:
            where = Person.email_bidx.in_(index.tags(value, only))
            return [p.id for p in s.scalars(select(Person).where(where).order_by(Person.id))]

    try:
        Base.metadata.create_all(engine)
        emails = {f"p{i:02d}": f"user{i}@example.com" for i in range(22)}
        emails["p05"] = "race@example.com"
        with Session(engine) as s:
            for pk, email in emails.items():
                p = Person(id=pk)
                p.email = email
                s.add(p)
            s.add(Person(id="p99"))  # no value
            s.commit()
        kh.call("key_rotate", {"tenant": "acme", "key": "people-index"})
        with Session(engine) as s:  # written after the rotation: already under version 2
            p = Person(id="p50")
            p.email = "late@example.com"
            s.add(p)
            s.commit()
        assert sorted(v for v in versions().values() if v is not None) == [1] * 22 + [2]

        seen: List[Any] = []
        first = reindex(
            engine, Person, "email", batch_size=5, max_batches=2, on_batch=lambda r: seen.append(r.last_key)
        )
        assert (first.target_version, first.updated, first.batches, first.done) == (2, 10, 2, False)
        assert first.last_key == ("p09",) and seen == [("p04",), ("p09",)]
        v = versions()
        assert {v[f"p{i:02d}"] for i in range(10)} == {2} and {v[f"p{i:02d}"] for i in range(10, 22)} == {1}
        # Half way: lookups find rows of both versions.
        assert find("USER3@example.com ") == ["p03"] and find("user15@example.com") == ["p15"]
        # Only the new version's tag does not find the rows not yet re-indexed.
        assert find("user15@example.com", [2]) == [] and find("user3@example.com", [2]) == ["p03"]

        # A row ahead of the cursor, for a writer to race with during the resumed run.
        with Session(engine) as s:
            p = Person(id="p30")
            p.email = "race@example.com"
            s.add(p)
            s.commit()
        kh.call("key_rotate", {"tenant": "acme", "key": "people-index"})  # v3: p30 has a v3 tag
        with engine.begin() as c:  # give p30 an old tag again, as if written before the rotations
            c.execute(
                text("UPDATE people SET email_bidx = :t WHERE id = 'p30'"),
                {"t": kh.mac("acme/people-index", b"race@example.com", version=1).tag},
            )
        race.append("p30")
        rest = reindex(engine, Person, "email", batch_size=5, after=first.last_key)
        assert rest.done and rest.target_version == 3 and rest.changed == 1
        assert rest.updated == 12 + 1  # p10..p21 and p50 (v2 < v3); p30 raced
        assert rest.empty == 1 and rest.last_key == ("p99",)
        v = versions()
        assert v["p99"] is None and v["p30"] == 3
        # p00..p09 are still at version 2 (done before the second rotation): a full run finishes them.
        full = reindex(engine, Person, "email", batch_size=7)
        assert full.done and full.updated == 10 and full.current == 14 and full.empty == 1
        assert set(v for v in versions().values() if v is not None) == {3}
        # Idempotent: nothing left to do, no daemon call needed.
        again = reindex(engine, Person, "email", batch_size=100)
        assert (again.updated, again.current, again.changed, again.empty) == (0, 24, 0, 1)
        # Every row found by the current version's tag alone; the raced row by its new value.
        for pk, email in emails.items():
            if pk != "p05":
                assert find(email, [3]) == [pk]
        assert find("raced@example.com", [3]) == ["p30"] and find("race@example.com", [3]) == ["p05"]
        with Session(engine) as s:
            assert s.get(Person, "p30").email == "raced@example.com"  # type: ignore[union-attr]

        with pytest.raises(InvalidInput) as e:
            reindex(engine, Person, "email_enc")
        assert e.value.code == "config"
        with pytest.raises(InvalidInput):
            reindex(engine, Person, "email", batch_size=0)
    finally:
        engine.dispose()
