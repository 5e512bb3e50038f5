"""The language-neutral scenarios of tests/conformance/scenarios.json, run
through this package's public API against a real dev daemon, one fresh
tenant per scenario. The Rust crate (tests/tests/conformance.rs) and the
Node.js package (clients/node/test/scenarios.test.js) run the same file;
the format is in tests/conformance/README.md. Every scenario runs twice:
through the threaded ``Client`` and through the asyncio ``AsyncClient``.

An op, an argument, a check or a result field this runner does not know
fails the scenario, so that no step is skipped silently.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import json
import secrets
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

import pytest

from keyhaven import Client, DaemonError, IntegrityError, InvalidInput, KeyhavenError
from keyhaven.aio import AsyncClient

from .conftest import ROOT

S: Dict[str, Any] = json.loads(
    (ROOT / "tests" / "conformance" / "scenarios.json").read_text(encoding="utf-8")
)
OPS: Dict[str, Any] = S["ops"]
STEP_FIELDS = {"op", "note", "save", "expect"}


class StepError(Exception):
    """A step that did not go as the scenario says (or that this runner cannot run)."""


Args = Dict[str, Any]
Path = Tuple[str, str]


def _text(value: Any) -> str:
    """A `plaintext`/`message` argument: a string, or ``{"repeat": S, "times": N}``."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and set(value) == {"repeat", "times"}:
        return str(value["repeat"]) * int(value["times"])
    raise StepError(f"not a text argument: {value!r}")


def _b64(data: Any) -> Any:
    """Normalise a result: bytes as standard base64 (the wire's form), recursively."""
    if isinstance(data, (bytes, bytearray)):
        return base64.b64encode(bytes(data)).decode("ascii")
    if isinstance(data, dict):
        return {k: _b64(v) for k, v in data.items()}
    if isinstance(data, list):
        return [_b64(v) for v in data]
    return data


def _result(value: Any) -> Dict[str, Any]:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = {f.name: getattr(value, f.name) for f in dataclasses.fields(value)}
    if not isinstance(value, dict):
        raise StepError(f"a result that is not an object: {value!r}")
    out: Dict[str, Any] = _b64(value)
    return out


def _path(t: str, a: Args) -> Path:
    return (t, a["key"])


# Each op of scenarios.json, through the public API of keyhaven.Client.
HANDLERS: Dict[str, Callable[[Client, str, Args], Any]] = {
    "key_create": lambda kh, t, a: kh.key_create(_path(t, a), type=a.get("type")),
    "key_show": lambda kh, t, a: kh.key_show(_path(t, a)),
    "encrypt": lambda kh, t, a: kh.encrypt(_path(t, a), _text(a["plaintext"]), a.get("context")),
    "decrypt": lambda kh, t, a: kh.decrypt(a["ciphertext"], a.get("context")),
    "datakey": lambda kh, t, a: kh.datakey(_path(t, a), a.get("context")),
    "datakey_decrypt": lambda kh, t, a: kh.datakey_decrypt(a["envelope"], a.get("context")),
    "rewrap": lambda kh, t, a: kh.rewrap(a["text"], a.get("context")),
    "mac": lambda kh, t, a: kh.mac(_path(t, a), _text(a["message"]), version=a.get("version")),
    "mac_verify": lambda kh, t, a: {"valid": kh.mac_verify(_path(t, a), _text(a["message"]), a["tag"]).valid},
    "sign": lambda kh, t, a: kh.sign(_path(t, a), _text(a["message"])),
    "verify": lambda kh, t, a: kh.verify(
        _path(t, a), _text(a["message"]), a["signature"], version=a.get("version")
    ),
    "public_key": lambda kh, t, a: kh.public_key(_path(t, a), version=a.get("version")),
    "alias_create": lambda kh, t, a: kh.alias_create(a["alias"], _path(t, a)),
    "alias_update": lambda kh, t, a: kh.alias_update(a["alias"], _path(t, a)),
    "alias_delete": lambda kh, t, a: kh.alias_delete(t, a["alias"]),
    "call": lambda kh, t, a: kh.call(a["call"], a["params"]),
}


def _field(result: Any, path: str) -> Any:
    value = result
    for part in path.split("."):
        if isinstance(value, dict) and part in value:
            value = value[part]
        elif isinstance(value, list) and part.isdigit() and int(part) < len(value):
            value = value[int(part)]
        else:
            raise StepError(f"the result has no field `{path}`: {json.dumps(result)[:400]}")
    return value


def _resolve(value: Any, saved: Dict[str, Any]) -> Any:
    """``$name`` and ``$name.field.path`` references, recursively."""
    if isinstance(value, str) and value.startswith("$"):
        name, _, rest = value[1:].partition(".")
        if name not in saved:
            raise StepError(f"`{value}`: nothing saved as `{name}`")
        return _field(saved[name], rest) if rest else saved[name]
    if isinstance(value, dict):
        return {k: _resolve(v, saved) for k, v in value.items()}
    if isinstance(value, list):
        return [_resolve(v, saved) for v in value]
    return value


def _same(a: Any, b: Any) -> bool:
    """JSON equality (``True`` is not ``1``)."""
    return json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)


def _decoded(actual: Any) -> bytes:
    if not isinstance(actual, str):
        raise StepError(f"not a base64 field: {actual!r}")
    return base64.b64decode(actual, validate=True)


CHECKS: Dict[str, Callable[[Any, Any], bool]] = {
    "utf8": lambda actual, want: _decoded(actual) == str(want).encode("utf-8"),
    "not": lambda actual, want: not _same(actual, want),
    "prefix": lambda actual, want: isinstance(actual, str) and actual.startswith(want),
    "bytes": lambda actual, want: len(_decoded(actual)) == want,
}


def _check(result: Dict[str, Any], field: str, want: Any, saved: Dict[str, Any]) -> None:
    actual = _field(result, field)
    if isinstance(want, dict):
        if len(want) != 1:
            raise StepError(f"check of `{field}`: an object check has exactly one key, not {want}")
        ((kind, arg),) = want.items()
        if kind not in CHECKS:
            raise StepError(f"check of `{field}`: unknown check `{kind}`")
        if not CHECKS[kind](actual, _resolve(arg, saved)):
            raise StepError(f"`{field}` is {json.dumps(actual)[:200]}: fails {kind} {json.dumps(arg)}")
    elif not _same(actual, _resolve(want, saved)):
        raise StepError(
            f"`{field}` is {json.dumps(actual)[:200]}, expected {json.dumps(_resolve(want, saved))}"
        )


def _validate(step: Dict[str, Any]) -> Tuple[str, Args, Dict[str, Any]]:
    """The step's op, its arguments and its expectation, after checking them against `ops`."""
    op = step.get("op")
    if op not in OPS or op not in HANDLERS:
        raise StepError(f"unknown op `{op}`")
    spec = OPS[op]
    args = {k: v for k, v in step.items() if k not in STEP_FIELDS}
    unknown = set(args) - set(spec["args"]) - set(spec["optional"])
    missing = set(spec["args"]) - set(args)
    if unknown or missing:
        raise StepError(f"`{op}`: unknown arguments {sorted(unknown)}, missing {sorted(missing)}")
    expect = step.get("expect")
    if not isinstance(expect, dict) or len(set(expect) & {"ok", "error"}) != 1:
        raise StepError("`expect` must have exactly one of `ok` and `error`")
    if set(expect) - {"ok", "error", "by"} or ("by" in expect and "error" not in expect):
        raise StepError(f"unknown `expect` fields {sorted(expect)}")
    if expect.get("by") not in (None, "client", "daemon"):
        raise StepError(f"`by` is client or daemon, not {expect['by']!r}")
    if "ok" in expect:
        for field in expect["ok"]:
            if "*" not in spec["result"] and field.split(".")[0] not in spec["result"]:
                raise StepError(f"`{op}` has no result field `{field}`")
    elif "save" in step:
        raise StepError("a step expecting an error saves nothing")
    return op, args, expect


def _run_step(kh: Client, tenant: str, step: Dict[str, Any], saved: Dict[str, Any]) -> None:
    op, args, expect = _validate(step)
    args = _resolve(args, saved)
    outcome: Optional[Dict[str, Any]] = None
    code: Optional[str] = None
    by: Optional[str] = None
    try:
        outcome = _result(HANDLERS[op](kh, tenant, args))
    except DaemonError as e:
        code, by = e.code, "daemon"
    except (InvalidInput, IntegrityError) as e:
        code, by = e.code, "client"
    except KeyhavenError as e:
        raise StepError(f"failed without an answer: {e}") from e
    if "error" in expect:
        if outcome is not None:
            raise StepError(f"expected error {expect['error']}, got ok {json.dumps(outcome)[:300]}")
        if code != expect["error"] or ("by" in expect and by != expect["by"]):
            raise StepError(
                f"expected error {expect['error']} by {expect.get('by', 'either')}, got {code} by {by}"
            )
        return
    if outcome is None:
        raise StepError(f"expected ok, got error {code} by {by}")
    for field, want in expect["ok"].items():
        _check(outcome, field, want, saved)
    if "save" in step:
        saved[step["save"]] = outcome


def run_scenario(kh: Client, scenario: Dict[str, Any]) -> None:
    tenant = "sc-" + secrets.token_hex(4)
    saved: Dict[str, Any] = {"tenant": tenant}
    for i, step in enumerate(scenario["steps"], 1):
        try:
            _run_step(kh, tenant, step, saved)
        except StepError as e:
            raise AssertionError(
                f"scenario {scenario['name']} (tenant {tenant}), step {i} ({step.get('op')}): {e}"
            ) from None


@pytest.fixture(scope="module")
def kh(daemon: Any) -> Iterator[Client]:
    with Client(daemon.socket) as c:
        yield c


def test_the_runner_knows_every_op_and_check_of_the_file() -> None:
    assert set(HANDLERS) == set(OPS)
    assert set(CHECKS) == set(S["checks"])
    names: List[str] = [s["name"] for s in S["scenarios"]]
    assert len(names) == len(set(names)), "scenario names are unique"


def test_an_unknown_op_or_check_fails_the_scenario(kh: Client) -> None:
    for step in (
        {"op": "key_frobnicate", "key": "k", "expect": {"ok": {}}},
        {"op": "key_create", "key": "k", "colour": "red", "expect": {"ok": {}}},
        {"op": "key_create", "key": "k", "expect": {"ok": {"colour": "red"}}},
        {"op": "key_create", "key": "k", "expect": {"ok": {"key": {"shout": "K"}}}},
        {"op": "key_create", "key": "k", "expect": {"ok": {"key": "k"}, "error": "not_found"}},
    ):
        with pytest.raises(AssertionError, match=r"scenario probe \(tenant sc-[0-9a-f]+\), step 1"):
            run_scenario(kh, {"name": "probe", "steps": [step]})


class _Awaited:
    """An AsyncClient driven from plain code: each operation awaited on a loop of its own."""

    def __init__(self, client: AsyncClient, loop: asyncio.AbstractEventLoop) -> None:
        self._client = client
        self._loop = loop

    def __getattr__(self, name: str) -> Callable[..., Any]:
        method = getattr(self._client, name)

        def call(*args: Any, **kwargs: Any) -> Any:
            return self._loop.run_until_complete(method(*args, **kwargs))

        return call


@pytest.fixture(scope="module")
def akh(daemon: Any) -> Iterator[Any]:
    loop = asyncio.new_event_loop()
    client = loop.run_until_complete(_make_async_client(daemon.socket))
    try:
        yield _Awaited(client, loop)
    finally:
        loop.run_until_complete(client.close())
        loop.close()


async def _make_async_client(socket: str) -> AsyncClient:
    return AsyncClient(socket)


@pytest.mark.parametrize("scenario", S["scenarios"], ids=[s["name"] for s in S["scenarios"]])
def test_scenario(kh: Client, scenario: Dict[str, Any]) -> None:
    run_scenario(kh, scenario)


@pytest.mark.parametrize("scenario", S["scenarios"], ids=[s["name"] for s in S["scenarios"]])
def test_scenario_asyncio(akh: Any, scenario: Dict[str, Any]) -> None:
    run_scenario(akh, scenario)
