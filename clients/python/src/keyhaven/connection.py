"""One connection to the daemon.

Frames (PROTOCOL.md §1), pipelined requests paired with their answers by id
(§2.3) through a reader thread, and event frames (§6) handed to a callback. A
connection that closes fails its requests in flight; the ``Client`` opens a
new one for the next call.
"""

from __future__ import annotations

import itertools
import json
import socket
import struct
import threading
from typing import Any, Callable, Collection, Dict, List, Optional, Protocol, Tuple, TypeVar, Union

from .errors import (
    ConnectError,
    ConnectionClosed,
    DaemonError,
    InvalidInput,
    KeyhavenError,
    KeyhavenTimeout,
    ProtocolError,
)

MAX_FRAME = 1024 * 1024
PROTOCOL_VERSION = 1

EventCallback = Callable[[Dict[str, Any]], None]


class _Waiter:
    """One call's answer slot: a lock held until the reader thread fills it.

    Cheaper than a ``concurrent.futures.Future`` (no condition variable, no
    callbacks) on the path every request takes.
    """

    __slots__ = ("_lock", "error", "ok")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._lock.acquire()
        self.ok: Optional[Dict[str, Any]] = None
        self.error: Optional[BaseException] = None

    def set(self, ok: Optional[Dict[str, Any]], error: Optional[BaseException]) -> None:
        """Fill it, once (callers hold the connection's lock or own the waiter alone)."""
        self.ok, self.error = ok, error
        self._lock.release()

    def wait(self, timeout: Optional[float]) -> bool:
        return self._lock.acquire(True, -1 if timeout is None else timeout)


class Connection:
    """A pipelined connection; thread-safe."""

    def __init__(
        self,
        path: str,
        connect_timeout: Optional[float],
        client_name: str,
        on_event: Optional[EventCallback] = None,
        on_close: Optional[Callable[[], None]] = None,
    ) -> None:
        self.path = path
        self.on_event = on_event
        self.on_close = on_close
        self._pending: Dict[int, _Waiter] = {}
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        self._write_lock = threading.Lock()
        self._outbox: List[bytes] = []
        self._sending = False
        self.closed = False
        self._close_error: Optional[KeyhavenError] = None
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self._sock.settimeout(connect_timeout)
            self._sock.connect(path)
        except socket.timeout:
            self._sock.close()
            raise KeyhavenTimeout(f"connecting to the daemon at {path}", connect_timeout or 0) from None
        except OSError as e:
            self._sock.close()
            raise ConnectError(path, e) from None
        self._sock.settimeout(None)
        self._reader = threading.Thread(target=self._read_loop, name="keyhaven-reader", daemon=True)
        self._reader.start()
        try:
            ok = self.request(
                "hello",
                hello_params(client_name),
                connect_timeout,
                what=f"connecting to the daemon at {path}",
            )
        except BaseException:
            self.close()
            raise
        try:
            self.server = check_hello(ok)
        except ProtocolError:
            self.close()
            raise

    @property
    def in_flight(self) -> int:
        """Requests sent and not yet answered."""
        return len(self._pending)

    def request(
        self, op: str, params: Optional[Dict[str, Any]], timeout: Optional[float], what: Optional[str] = None
    ) -> Dict[str, Any]:
        """Send one request and wait for its ``ok`` object; errors are typed."""
        waiter = _Waiter()
        with self._lock:
            if self.closed:
                raise self._close_error or ConnectionClosed()
            rid = next(self._ids)
            self._pending[rid] = waiter
        try:
            frame = encode_request(rid, op, params)
        except BaseException:
            with self._lock:
                self._pending.pop(rid, None)
            raise
        self._send(frame)
        if not waiter.wait(timeout):
            with self._lock:
                forgotten = self._pending.pop(rid, None) is not None
            if forgotten:
                raise KeyhavenTimeout(what or f"the answer to `{op}`", timeout or 0)
            waiter.wait(None)  # answered (or closed) just as the time ran out: it is being filled
        if waiter.error is not None:
            raise waiter.error
        assert waiter.ok is not None
        return waiter.ok

    def _send(self, frame: bytes) -> None:
        """Queue a frame; the thread that finds nobody sending sends every queued frame,
        so calls made while a send is under way leave together (one syscall, not one each)."""
        with self._write_lock:
            self._outbox.append(frame)
            if self._sending:
                return
            self._sending = True
        try:
            while True:
                with self._write_lock:
                    frames, self._outbox = self._outbox, []
                    if not frames:
                        self._sending = False
                        return
                self._sock.sendall(frames[0] if len(frames) == 1 else b"".join(frames))
        except OSError as e:
            with self._write_lock:
                self._outbox.clear()
                self._sending = False
            self.close(ConnectionClosed(f"socket error: {e}"))

    def _read_loop(self) -> None:
        """Read frames, several a ``recv`` when answers queue up, and hand each to its caller."""
        err: Optional[KeyhavenError] = None
        buf = bytearray()
        recv_into = self._sock.recv_into
        chunk = bytearray(1 << 16)
        view = memoryview(chunk)
        try:
            while True:
                n = recv_into(view)
                if n == 0:
                    break
                buf += view[:n]
                while len(buf) >= 4:
                    size = frame_length(bytes(buf[:4]))
                    end = 4 + size
                    if len(buf) < end:
                        break
                    body = bytes(buf[4:end])
                    del buf[:end]
                    self._dispatch(decode_frame(body))
        except ProtocolError as e:
            err = e
        except OSError as e:
            err = ConnectionClosed(f"socket error: {e}")
        self.close(err)

    def _dispatch(self, msg: Dict[str, Any]) -> None:
        if is_event(msg):
            if self.on_event is not None:
                try:
                    self.on_event(msg)
                except Exception:  # noqa: S110 (a failing callback must not end the reader thread)
                    pass
            return
        rid = msg.get("id")
        if rid is None:
            self._close_error = unsolicited_error(msg)
            return
        result = answer(msg)
        with self._lock:
            waiter = self._pending.pop(rid, None) if isinstance(rid, int) else None
            if waiter is None:
                return  # a request that timed out: its late answer is dropped
            if isinstance(result, KeyhavenError):
                waiter.set(None, result)
            else:
                waiter.set(result, None)

    def close(self, err: Optional[KeyhavenError] = None) -> None:
        """Close, failing every request in flight."""
        with self._lock:
            if self.closed:
                return
            self.closed = True
            reason = self._close_error or err or ConnectionClosed()
            self._close_error = reason
            pending = list(self._pending.values())
            self._pending.clear()
        for waiter in pending:
            waiter.set(None, reason)
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._sock.close()
        if self.on_close is not None:
            self.on_close()


def hello_params(client_name: str) -> Dict[str, Any]:
    """The params of the first request on every connection (PROTOCOL.md §2.2)."""
    return {"protocol": PROTOCOL_VERSION, "client": client_name}


def check_hello(ok: Dict[str, Any]) -> str:
    """The server name from a ``hello`` answer; ``ProtocolError`` for another protocol."""
    if ok.get("protocol") != PROTOCOL_VERSION:
        raise ProtocolError(f"the daemon speaks protocol {ok.get('protocol')}, not {PROTOCOL_VERSION}")
    return str(ok.get("server", ""))


def encode_request(rid: int, op: str, params: Optional[Dict[str, Any]]) -> bytes:
    """One request frame: length prefix and JSON; ``frame_too_large`` over the limit (nothing sent)."""
    msg: Dict[str, Any] = {"id": rid, "op": op}
    if params is not None:
        msg["params"] = params
    body = json.dumps(msg, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    if len(body) > MAX_FRAME:
        raise InvalidInput(
            "frame_too_large",
            f"a request of {len(body)} bytes is over the frame limit of {MAX_FRAME} bytes",
        )
    return struct.pack(">I", len(body)) + body


def frame_length(head: bytes) -> int:
    """The length in a frame's 4-byte prefix; ``ProtocolError`` over the limit."""
    (n,) = struct.unpack(">I", head)
    if n > MAX_FRAME:
        raise ProtocolError(f"the daemon sent a frame of {n} bytes, over the limit of {MAX_FRAME}")
    return int(n)


def decode_frame(body: bytes) -> Dict[str, Any]:
    """A frame's JSON object; ``ProtocolError`` if it is not one."""
    try:
        msg = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise ProtocolError("the daemon sent a frame that is not JSON") from None
    if not isinstance(msg, dict):
        raise ProtocolError("the daemon sent a frame that is not an object")
    return msg


def is_event(msg: Dict[str, Any]) -> bool:
    """An event frame (§6): no id, an ``event`` name."""
    return "id" not in msg and isinstance(msg.get("event"), str)


def unsolicited_error(msg: Dict[str, Any]) -> DaemonError:
    """An error not tied to a request (``id: null``: a frame the daemon could not read,
    ``busy`` at the connection limit); the daemon closes the connection after it."""
    e = msg.get("error") or {}
    return DaemonError(str(e.get("code", "internal")), str(e.get("message", "")))


def answer(msg: Dict[str, Any]) -> Union[Dict[str, Any], KeyhavenError]:
    """An answer's ``ok`` object, or the typed error it carries."""
    error = msg.get("error")
    ok = msg.get("ok")
    if isinstance(error, dict):
        return DaemonError(str(error.get("code")), str(error.get("message", "")))
    if isinstance(ok, dict):
        return ok
    return ProtocolError("an answer with neither `ok` nor `error`")


class _Pooled(Protocol):
    @property
    def closed(self) -> bool: ...

    @property
    def in_flight(self) -> int: ...


_P = TypeVar("_P", bound=_Pooled)


def pick_slot(slots: List[Optional[_P]], connecting: Collection[int]) -> Tuple[Optional[_P], int]:
    """The pool's choice for the next request, for both clients: the least busy
    open connection (skipping slots being connected), and the first free slot
    (``-1`` for none); closed connections are cleared from ``slots`` on the way.
    The caller takes the connection when it is idle or no slot is free, else
    connects in the free slot."""
    best: Optional[_P] = None
    free = -1
    for i, c in enumerate(slots):
        if i in connecting:
            continue
        if c is None or c.closed:
            slots[i] = None
            if free < 0:
                free = i
        elif best is None or c.in_flight < best.in_flight:
            best = c
    return best, free
