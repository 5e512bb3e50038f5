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
from typing import Any, Callable, List, Optional, Sequence

from sqlalchemy import String, Text
from sqlalchemy import inspect as sa_inspect
from sqlalchemy.engine import Dialect
from sqlalchemy.sql.elements import ColumnElement
from sqlalchemy.types import TypeDecorator

from .client import Client
from .codec import KeyPathLike
from .errors import DaemonError, InvalidInput

Normaliser = Callable[[str], str]


def normalise_text(value: str) -> str:
    """The default normalisation of a blind index: NFKC, surrounding space removed, case-folded."""
    return unicodedata.normalize("NFKC", value).strip().casefold()


class Ciphertext(TypeDecorator[str]):
    """A column holding ``khc1:`` ciphertexts; refuses to store anything else (e.g. a plaintext)."""

    impl = Text
    cache_ok = True

    def process_bind_param(self, value: Optional[str], dialect: Dialect) -> Optional[str]:
        if value is not None and (not isinstance(value, str) or not value.startswith("khc1:")):
            raise InvalidInput("bad_request", "a Ciphertext column stores only khc1: ciphertexts")
        return value


class BlindIndexTag(TypeDecorator[str]):
    """A column holding whole ``khm1:`` tags (53 characters: key version and MAC)."""

    impl = String(53)
    cache_ok = True

    def process_bind_param(self, value: Optional[str], dialect: Dialect) -> Optional[str]:
        if value is not None and (
            not isinstance(value, str) or not value.startswith("khm1:") or len(value) != 53
        ):
            raise InvalidInput("bad_request", "a BlindIndexTag column stores only khm1: tags")
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
        return {"table": mapper.local_table.name, "column": self.column, "row": "/".join(str(v) for v in pk)}

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
