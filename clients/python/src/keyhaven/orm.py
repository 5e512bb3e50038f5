"""Encrypted, searchable fields for SQLAlchemy models (``pip install keyhaven[sqlalchemy]``).

A field is stored as a ``khc1:`` ciphertext made by the daemon's ``encrypt``
op, with the encryption context ``{"table", "column", "row"}`` (the row's
primary key), so a value copied to another row or column does not decrypt.
A column type cannot see the row it is written to, so the field is a
descriptor on the model that encrypts on assignment and decrypts on
access; the row's primary key must be set before the field is (use an
application-made key such as a UUID). Composite keys join their values
with ``/``. The companion blind index holds the
daemon's ``mac`` tag of the normalised value, so ``WHERE email_bidx IN
(...)`` finds rows by equality without decrypting.
"""

from __future__ import annotations

import unicodedata
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from sqlalchemy import Column, String, Table, Text, event, select, tuple_, update
from sqlalchemy import inspect as sa_inspect
from sqlalchemy.engine import Dialect, Engine
from sqlalchemy.orm import Mapper
from sqlalchemy.sql.elements import ColumnElement
from sqlalchemy.types import TypeDecorator

from .client import Client
from .codec import KeyPathLike
from .errors import BadStoredValue, DaemonError, InvalidInput
from .mactag import MAC_TAG_LENGTH, MacTag, parse_mac_tag

Normaliser = Callable[[str], str]


def normalise_text(value: str) -> str:
    """The default normalisation of a blind index: NFKC, surrounding space removed, case-folded."""
    return unicodedata.normalize("NFKC", value).strip().casefold()


class _NamedColumnType(TypeDecorator[str]):
    """A column type that knows its column's name (``table.column``), for its errors.

    Named when the column is attached to its table (``after_parent_attach``,
    below); ``column`` names it explicitly.
    """

    impl: Any = Text
    cache_ok = True

    def __init__(self, *args: Any, column: Optional[str] = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.column = column

    @property
    def column_name(self) -> str:
        return self.column or f"of type {type(self).__name__}"


@event.listens_for(Column, "after_parent_attach")
def _name_column_type(column: Column[Any], table: Any) -> None:
    t = column.type
    if isinstance(t, _NamedColumnType) and isinstance(table, Table):
        name = f"{table.name}.{column.name}"
        if t.column is None:
            t.column = name
        elif t.column != name:  # one type object given to two columns: each gets its own
            column.type = t = t.copy()
            t.column = name


class Ciphertext(_NamedColumnType):
    """A column holding ``khc1:`` ciphertexts; refuses to store anything else (e.g. a plaintext)."""

    impl = Text
    cache_ok = True

    def process_bind_param(self, value: Optional[str], dialect: Dialect) -> Optional[str]:
        if value is not None and (not isinstance(value, str) or not value.startswith("khc1:")):
            raise BadStoredValue(self.column_name, "a Ciphertext column stores only khc1: ciphertexts")
        return value


def check_stored_tag(value: object, column: str) -> MacTag:
    """A blind-index column's value, parsed as strictly as ``parse_mac_tag`` and exact:
    the 53 characters of the canonical tag, no surrounding whitespace.

    Anything else raises ``BadStoredValue`` naming ``column`` (never the value).
    """
    if not isinstance(value, str):
        raise BadStoredValue(column, f"a blind-index tag must be a khm1: str, not {type(value).__name__}")
    if len(value) != MAC_TAG_LENGTH or value.strip(" \t\r\n") != value:
        raise BadStoredValue(column, f"not a khm1: tag ({len(value)} characters, a tag has {MAC_TAG_LENGTH})")
    try:
        return parse_mac_tag(value)
    except InvalidInput as e:
        raise BadStoredValue(column, f"not a khm1: tag: {e.message}") from None


class BlindIndexTag(_NamedColumnType):
    """A column holding whole ``khm1:`` tags (53 characters: key version and MAC).

    Every value written and every value read is parsed in full (``check_stored_tag``):
    a malformed one raises ``BadStoredValue`` naming the column. On a write,
    SQLAlchemy wraps it in a ``StatementError`` (its ``orig``); on a read it
    is raised as is.
    """

    impl = String(MAC_TAG_LENGTH)
    cache_ok = True

    def process_bind_param(self, value: Optional[str], dialect: Dialect) -> Optional[str]:
        if value is not None:
            check_stored_tag(value, self.column_name)
        return value

    def process_result_value(self, value: Optional[str], dialect: Dialect) -> Optional[str]:
        if value is not None:
            check_stored_tag(value, self.column_name)
        return value


class BlindIndex:
    """Tags of normalised values under an ``hmac-sha256`` key, for equality lookups.

    The whole tag is stored: it names the key version that made it, so after
    the key is rotated, rows still indexed under an older version can be
    found (``lookup`` asks for every version the key still has) and
    re-indexed; a version that is retired no longer finds its rows.
    """

    def __init__(self, client: Client, key: KeyPathLike, normalise: Normaliser = normalise_text) -> None:
        self.client = client
        self.key = key
        self.normalise = normalise

    def _message(self, value: str) -> bytes:
        if not isinstance(value, str):
            raise InvalidInput("bad_request", "a blind-indexed value must be a str")
        return self.normalise(value).encode()

    def tag(self, value: str) -> str:
        """The tag under the key's current version (what a write stores)."""
        return self.client.mac(self.key, self._message(value)).tag

    def tags(self, value: str, versions: Optional[Sequence[int]] = None) -> List[str]:
        """Tags under ``versions`` (default: every version the key has, not retired)."""
        message = self._message(value)
        if versions is None:
            versions = [v["version"] for v in self.client.key_show(self.key)["versions"]]
        out: List[str] = []
        for v in versions:
            try:
                out.append(self.client.mac(self.key, message, version=v).tag)
            except DaemonError as e:
                if e.code != "version_retired":
                    raise
        return out

    def lookup(self, column: Any, value: str) -> ColumnElement[bool]:
        """A WHERE clause: ``column`` holds a tag of ``value`` under any live key version."""
        return column.in_(self.tags(value))  # type: ignore[no-any-return]


class EncryptedField:
    """A model attribute whose value lives encrypted in ``column`` (a Ciphertext column).

    ``index``: a BlindIndex and the attribute of its companion column,
    written on every assignment.
    """

    def __init__(
        self,
        client: Client,
        key: KeyPathLike,
        column: str,
        *,
        index: Optional[BlindIndex] = None,
        index_column: Optional[str] = None,
    ) -> None:
        if (index is None) != (index_column is None):
            raise InvalidInput("config", "index and index_column go together")
        self.client = client
        self.key = key
        self.column = column
        self.index = index
        self.index_column = index_column
        self.name = column

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def context(self, obj: Any) -> dict[str, str]:
        """``{"table", "column", "row"}`` of ``obj``; its primary key must be set."""
        mapper = sa_inspect(type(obj))
        pk = mapper.primary_key_from_instance(obj)
        if any(v is None for v in pk):
            raise InvalidInput(
                "bad_request", f"{type(obj).__name__}.{self.name}: set the row's primary key before the field"
            )
        return _row_context(mapper.local_table.name, self.column, pk)

    def __get__(self, obj: Any, owner: Optional[type] = None) -> Any:
        if obj is None:
            return self
        stored = getattr(obj, self.column)
        if stored is None:
            return None
        plain = self.client.decrypt(stored, self.context(obj)).plaintext
        try:
            return plain.decode()
        finally:
            plain[:] = bytes(len(plain))

    def __set__(self, obj: Any, value: Optional[str]) -> None:
        if value is None:
            setattr(obj, self.column, None)
            if self.index_column is not None:
                setattr(obj, self.index_column, None)
            return
        if not isinstance(value, str):
            raise InvalidInput("bad_request", f"{self.name} must be a str or None")
        ctx = self.context(obj)
        tag = None if self.index is None else self.index.tag(value)
        setattr(obj, self.column, self.client.encrypt(self.key, value, ctx).ciphertext)
        if self.index_column is not None:
            setattr(obj, self.index_column, tag)


@dataclass
class ReindexReport:
    """What ``reindex`` did; ``last_key`` is where to resume (``after=``)."""

    target_version: int
    """The index key's version every tag now names (its current version when the run began)."""
    updated: int = 0
    """Rows whose tag was recomputed under ``target_version``."""
    current: int = 0
    """Rows whose tag already named ``target_version`` (or a later one): left alone."""
    changed: int = 0
    """Rows written by someone else between this run's read and its update: left to that
    writer, whose tag is of the current version."""
    empty: int = 0
    """Rows with no value (NULL)."""
    batches: int = 0
    last_key: Optional[Tuple[Any, ...]] = None
    """The primary key of the last row looked at (all of its columns)."""
    done: bool = False
    """True when the table's end was reached (not when ``max_batches`` stopped the run)."""


def _row_context(table: str, column: str, pk: Sequence[Any]) -> Dict[str, str]:
    return {"table": table, "column": column, "row": "/".join(str(v) for v in pk)}


def reindex(
    engine: Engine,
    model: type,
    field: str,
    *,
    batch_size: int = 500,
    after: Optional[Sequence[Any]] = None,
    max_batches: Optional[int] = None,
    concurrency: int = 8,
    on_batch: Optional[Callable[[ReindexReport], None]] = None,
) -> ReindexReport:
    """Recompute the blind index of ``model.<field>`` (an ``EncryptedField`` with an index)
    under the index key's current version, in batches, after a rotation of that key.

    Rows are walked in primary-key order, ``batch_size`` at a time. For each row
    whose tag names an older version, the value is decrypted by the daemon (with
    the row's context), its tag made under the target version, and the row updated
    only if its ciphertext and tag are still the ones read (a row written meanwhile
    keeps its writer's tag). Each batch is its own transaction, committed before
    the next is read; no transaction is open during daemon calls.

    Idempotent (a row already at the target version costs no daemon call) and
    resumable: ``after`` = a report's ``last_key`` starts after that row;
    ``on_batch`` gets the report after each committed batch (to persist it).
    While it runs, ``BlindIndex.lookup`` finds every row: it asks for the tags
    of every version the key still has. Once a run reports ``done`` (a second run
    then updates nothing), the older versions can be retired.

    A stored tag that does not parse raises ``BadStoredValue`` naming the column;
    a value that does not decrypt raises the daemon's error. Neither is skipped.
    """
    desc = model.__dict__.get(field)
    if not isinstance(desc, EncryptedField) or desc.index is None or desc.index_column is None:
        raise InvalidInput(
            "config", f"{getattr(model, '__name__', model)}.{field} is not an EncryptedField with an index"
        )
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise InvalidInput("config", "batch_size must be an int >= 1")
    if isinstance(concurrency, bool) or not isinstance(concurrency, int) or not 1 <= concurrency <= 64:
        raise InvalidInput("config", "concurrency must be an int from 1 to 64")
    mapper: Mapper[Any] = sa_inspect(model)
    table = mapper.local_table
    if not isinstance(table, Table):
        raise InvalidInput("config", f"{model.__name__} is not mapped to a table")
    pk_cols = list(mapper.primary_key)
    enc_col = mapper.attrs[desc.column].columns[0]
    idx_col = mapper.attrs[desc.index_column].columns[0]
    index = desc.index
    column_name = f"{table.name}.{idx_col.name}"
    target = int(desc.client.key_show(index.key)["current_version"])
    report = ReindexReport(target_version=target)
    last: Optional[Tuple[Any, ...]] = tuple(after) if after is not None else None
    if last is not None and len(last) != len(pk_cols):
        raise InvalidInput("config", f"after must have {len(pk_cols)} value(s), one per primary-key column")

    def new_tag(enc: str, pk: Tuple[Any, ...]) -> str:
        plain = desc.client.decrypt(enc, _row_context(table.name, desc.column, pk)).plaintext
        try:
            return index.client.mac(index.key, index._message(plain.decode()), version=target).tag
        finally:
            plain[:] = bytes(len(plain))

    with ThreadPoolExecutor(concurrency) as pool:
        while max_batches is None or report.batches < max_batches:
            q = select(*pk_cols, enc_col, idx_col).order_by(*pk_cols).limit(batch_size)
            if last is not None:
                q = q.where(tuple_(*pk_cols) > tuple_(*last) if len(pk_cols) > 1 else pk_cols[0] > last[0])
            with engine.connect() as c:
                rows = c.execute(q).all()
            if not rows:
                report.done = True
                break
            todo: List[Tuple[Tuple[Any, ...], str, Optional[str]]] = []
            for row in rows:
                pk, enc, old = tuple(row[: len(pk_cols)]), row[-2], row[-1]
                if enc is None:
                    report.empty += 1
                elif old is not None and check_stored_tag(old, column_name).version >= target:
                    report.current += 1
                else:
                    todo.append((pk, enc, old))
            tags = list(pool.map(lambda t: new_tag(t[1], t[0]), todo))
            if todo:
                with engine.begin() as c:
                    for (pk, enc, old), tag in zip(todo, tags):
                        cond = [col == v for col, v in zip(pk_cols, pk)]
                        cond.append(enc_col == enc)
                        cond.append(idx_col.is_(None) if old is None else idx_col == old)
                        n = c.execute(update(table).where(*cond).values({idx_col.name: tag})).rowcount
                        if n == 1:
                            report.updated += 1
                        else:
                            report.changed += 1
            last = tuple(rows[-1][: len(pk_cols)])
            report.last_key = last
            report.batches += 1
            if on_batch is not None:
                on_batch(report)
            if len(rows) < batch_size:
                report.done = True
                break
    return report
