"""The asyncio client: the operations of ``Client``, awaited.

``AsyncClient`` sends the same requests and reads the same results as the
threaded ``Client`` (both are built in ``keyhaven.ops``; frames are encoded and
read by the helpers of ``keyhaven.connection``). Each connection is an asyncio
protocol on the running loop, with no thread: calls are pipelined on it and
paired with their answers by id (PROTOCOL.md §2.3). A connection that closes
fails only the calls then in flight with ``ConnectionClosed``; the next call
reconnects.
"""

from __future__ import annotations

import asyncio
import itertools
from collections import deque
from typing import Any, Deque, Dict, List, Optional, Set, Tuple, TypeVar, Union

from . import ops
from .client import (
    _UNSET,
    DEFAULT_CONNECT_TIMEOUT,
    DEFAULT_REQUEST_TIMEOUT,
    VERSION,
    pool_size,
    socket_path,
    timeout_option,
)
from .codec import Bytes, Context, KeyPathLike
from .connection import (
    EventCallback,
    answer,
    check_hello,
    decode_frame,
    encode_request,
    frame_length,
    hello_params,
    is_event,
    pick_slot,
    unsolicited_error,
)
from .errors import (
    ConnectError,
    ConnectionClosed,
    InvalidInput,
    KeyhavenError,
    KeyhavenTimeout,
    ProtocolError,
)
from .ops import (
    AliasInfo,
    DatakeyResult,
    DecryptResult,
    EncryptResult,
    MacResult,
    MacVerifyResult,
    PublicKeyResult,
    Request,
    RewrapResult,
    SignResult,
    VerifyResult,
)

__all__ = ["AsyncClient", "AsyncConnection"]

T = TypeVar("T")
Ok = Dict[str, Any]


class AsyncConnection(asyncio.BufferedProtocol):
    """One pipelined connection on the running event loop (no thread).

    A buffered protocol: the loop reads into one preallocated buffer
    (``recv_into``), where a plain protocol gets a fresh 256 KiB ``bytes``
    for every read.
    """

    def __init__(self, path: str, on_event: Optional[EventCallback] = None) -> None:
        self.path = path
        self.on_event = on_event
        self.server = ""
        self.closed = False
        self._close_error: Optional[KeyhavenError] = None
        self._pending: Dict[int, asyncio.Future[Ok]] = {}
        self._ids = itertools.count(1)
        self._buf = bytearray()
        self._chunk = memoryview(bytearray(1 << 16))
        self._transport: Optional[asyncio.Transport] = None
        self._writable: Optional[asyncio.Event] = None
        self._loop = asyncio.get_running_loop()
        # (deadline, id, future, op, what, timeout) of calls with a timeout, in deadline order.
        self._deadlines: Deque[Tuple[float, int, asyncio.Future[Ok], str, Optional[str], float]] = deque()
        self._sweeper: Optional[asyncio.TimerHandle] = None
        self._outbox: List[bytes] = []

    @classmethod
    async def open(
        cls,
        path: str,
        connect_timeout: Optional[float],
        client_name: str,
        on_event: Optional[EventCallback] = None,
    ) -> AsyncConnection:
        """Connect and send ``hello``; ``connect_timeout`` covers both."""
        loop = asyncio.get_running_loop()
        conn = cls(path, on_event)
        what = f"connecting to the daemon at {path}"
        deadline = None if connect_timeout is None else loop.time() + connect_timeout
        try:
            await asyncio.wait_for(loop.create_unix_connection(lambda: conn, path), connect_timeout)
        except asyncio.TimeoutError:
            conn.close()
            raise KeyhavenTimeout(what, connect_timeout or 0) from None
        except OSError as e:
            raise ConnectError(path, e) from None
        try:
            left = None if deadline is None else max(deadline - loop.time(), 0.001)
            ok = await conn.request("hello", hello_params(client_name), left, what=what)
            conn.server = check_hello(ok)
        except BaseException:
            conn.close()
            raise
        return conn

    @property
    def in_flight(self) -> int:
        """Requests sent and not yet answered."""
        return len(self._pending)

    # asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport

    def get_buffer(self, sizehint: int) -> memoryview:
        return self._chunk

    def buffer_updated(self, nbytes: int) -> None:
        buf = self._buf
        buf += self._chunk[:nbytes]
        try:
            while len(buf) >= 4:
                n = frame_length(bytes(buf[:4]))
                if len(buf) < 4 + n:
                    return
                body = bytes(buf[4 : 4 + n])
                del buf[: 4 + n]
                self._dispatch(decode_frame(body))
        except ProtocolError as e:
            self.close(e)

    def connection_lost(self, exc: Optional[Exception]) -> None:
        self.close(None if exc is None else ConnectionClosed(f"socket error: {exc}"))

    def pause_writing(self) -> None:
        self._writable = asyncio.Event()

    def resume_writing(self) -> None:
        if self._writable is not None:
            self._writable.set()
            self._writable = None

    def _dispatch(self, msg: Ok) -> None:
        if is_event(msg):
            if self.on_event is not None:
                try:
                    self.on_event(msg)
                except Exception:  # noqa: S110 (a failing callback must not end the connection)
                    pass
            return
        rid = msg.get("id")
        if rid is None:
            self._close_error = unsolicited_error(msg)
            return
        fut = self._pending.pop(rid, None) if isinstance(rid, int) else None
        if fut is None or fut.done():
            return  # a request that timed out or was cancelled: its late answer is dropped
        result = answer(msg)
        if isinstance(result, KeyhavenError):
            fut.set_exception(result)
        else:
            fut.set_result(result)

    async def request(
        self, op: str, params: Optional[Ok], timeout: Optional[float], what: Optional[str] = None
    ) -> Ok:
        """Send one request and await its ``ok`` object; errors are typed."""
        if self.closed or self._transport is None:
            raise self._close_error or ConnectionClosed()
        rid = next(self._ids)
        frame = encode_request(rid, op, params)
        if self._writable is not None:  # the kernel's buffer is full: wait, as a stream's drain does
            await self._writable.wait()
            if self.closed:
                raise self._close_error or ConnectionClosed()
        loop = self._loop
        fut: asyncio.Future[Ok] = loop.create_future()
        self._pending[rid] = fut
        # Requests made in the same loop iteration leave in one write, not one syscall each.
        if self._outbox:
            self._outbox.append(frame)
        else:
            self._outbox = [frame]
            loop.call_soon(self._flush)
        timer = None
        if timeout is not None:
            deadline = loop.time() + timeout
            queue = self._deadlines
            while queue and queue[0][2].done():  # answered, mostly in order: keep the queue short
                queue.popleft()
            if not queue or deadline >= queue[-1][0]:
                # One timer per connection: with one request timeout, deadlines come in order.
                queue.append((deadline, rid, fut, op, what, timeout))
                sweeper = self._sweeper
                if sweeper is None or sweeper.when() > deadline:  # none, or set for a call now answered
                    if sweeper is not None:
                        sweeper.cancel()
                    self._sweeper = loop.call_at(deadline, self._sweep)
            else:  # an earlier deadline than a call already waiting (the timeout was changed)
                timer = loop.call_later(timeout, self._expire, rid, fut, op, what, timeout)
        try:
            return await fut
        finally:
            if timer is not None:
                timer.cancel()
            self._pending.pop(rid, None)

    def _flush(self) -> None:
        frames, self._outbox = self._outbox, []
        if frames and not self.closed and self._transport is not None:
            self._transport.write(frames[0] if len(frames) == 1 else b"".join(frames))

    def _sweep(self) -> None:
        """Expire the calls whose deadline has passed; wake again at the next one's."""
        self._sweeper = None
        now = self._loop.time()
        queue = self._deadlines
        while queue:
            deadline, rid, fut, op, what, after = queue[0]
            if fut.done():
                queue.popleft()
            elif deadline <= now:
                queue.popleft()
                self._expire(rid, fut, op, what, after)
            else:
                self._sweeper = self._loop.call_at(deadline, self._sweep)
                return

    def _expire(self, rid: int, fut: asyncio.Future[Ok], op: str, what: Optional[str], after: float) -> None:
        self._pending.pop(rid, None)
        if not fut.done():
            fut.set_exception(KeyhavenTimeout(what or f"the answer to `{op}`", after))

    def close(self, err: Optional[KeyhavenError] = None) -> None:
        """Close, failing every request in flight."""
        if self.closed:
            return
        self.closed = True
        reason = self._close_error or err or ConnectionClosed()
        self._close_error = reason
        pending = list(self._pending.values())
        self._pending.clear()
        for fut in pending:
            if not fut.done():
                fut.set_exception(reason)
        if self._writable is not None:
            self._writable.set()
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        self._deadlines.clear()
        if self._transport is not None:
            self._transport.abort()


class AsyncClient:
    """An asyncio client with a pool of pipelined connections, for one event loop.

    The same options and operations as ``Client``; every operation is a
    coroutine. Use it from the loop it was first used on.
    """

    def __init__(
        self,
        socket: Optional[str] = None,
        *,
        connect_timeout: Optional[float] = _UNSET,
        request_timeout: Optional[float] = _UNSET,
        connections: int = 1,
        client_name: Optional[str] = None,
        on_event: Optional[EventCallback] = None,
    ) -> None:
        """``socket``: else ``$KEYHAVEN_SOCKET``, else ``/run/keyhaven/keyhaven.sock``.

        Timeouts in seconds (5 to connect and greet, 30 per answer by
        default; ``None`` or 0: no limit). ``connections``: 1..64 (default 1:
        every call pipelined on one connection).
        """
        self.socket = socket_path(socket)
        self.connect_timeout = timeout_option(connect_timeout, DEFAULT_CONNECT_TIMEOUT, "connect_timeout")
        self.request_timeout = timeout_option(request_timeout, DEFAULT_REQUEST_TIMEOUT, "request_timeout")
        self.client_name = client_name or f"keyhaven-python-asyncio/{VERSION}"
        self.on_event = on_event
        self._slots: List[Optional[AsyncConnection]] = [None] * pool_size(connections)
        self._connecting: Dict[int, asyncio.Future[AsyncConnection]] = {}
        self._closed = False
        self.connections_opened = 0

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _connection(self) -> AsyncConnection:
        """An idle open connection, else a new one in a free slot, else the least busy."""
        while True:
            if self._closed:
                raise InvalidInput("config", "the client is closed")
            best, free = pick_slot(self._slots, self._connecting)
            if best is not None and (best.in_flight == 0 or free < 0):
                return best
            if free >= 0:
                return await self._connect(free)
            # Every slot is connecting: share the outcome of one (its error too).
            waiting: Set[asyncio.Future[AsyncConnection]] = set(self._connecting.values())
            done, _ = await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
            for f in done:
                if f.exception() is None:
                    return f.result()
            raise next(iter(done)).exception()  # type: ignore[misc]

    async def _connect(self, slot: int) -> AsyncConnection:
        fut: asyncio.Future[AsyncConnection] = asyncio.get_running_loop().create_future()
        self._connecting[slot] = fut
        try:
            conn = await AsyncConnection.open(
                self.socket, self.connect_timeout, self.client_name, self.on_event
            )
        except BaseException as e:
            fut.set_exception(e if isinstance(e, Exception) else ConnectionClosed("connect cancelled"))
            fut.exception()  # retrieved: no "never retrieved" warning when nobody waited
            raise
        finally:
            del self._connecting[slot]
        fut.set_result(conn)
        self.connections_opened += 1
        if self._closed:
            conn.close()
            raise InvalidInput("config", "the client is closed")
        self._slots[slot] = conn
        return conn

    async def call(self, op: str, params: Optional[Ok] = None) -> Ok:
        """Any operation by name (PROTOCOL.md §3); returns the ``ok`` object."""
        return await (await self._connection()).request(op, params, self.request_timeout)

    async def _run(self, req: Request[T]) -> T:
        conn = await self._connection()
        return req.parse(await conn.request(req.op, req.params, self.request_timeout))

    async def close(self) -> None:
        """Close every connection; calls in flight fail with ``connection_closed``."""
        self._closed = True
        slots, self._slots = self._slots, [None] * len(self._slots)
        for c in slots:
            if c is not None:
                c.close()

    async def health(self) -> Ok:
        return await self._run(ops.health())

    async def metrics(self) -> str:
        """The Prometheus text exposition (``metrics``, §3.33; needs the ``metrics`` permission)."""
        return await self._run(ops.metrics())

    async def whoami(self) -> Ok:
        return await self._run(ops.whoami())

    async def key_create(
        self,
        path: KeyPathLike,
        *,
        type: Optional[str] = None,
        rotate_every_secs: Optional[int] = None,
        idempotency_key: Optional[str] = None,
        description: Optional[str] = None,
        tags: Optional[Dict[str, str]] = None,
    ) -> Ok:
        """As ``Client.key_create``."""
        return await self._run(
            ops.key_create(
                path,
                type=type,
                rotate_every_secs=rotate_every_secs,
                idempotency_key=idempotency_key,
                description=description,
                tags=tags,
            )
        )

    async def key_show(self, path: KeyPathLike) -> Ok:
        return await self._run(ops.key_show(path))

    async def key_list(
        self,
        tenant: Optional[str] = None,
        *,
        page_size: Optional[int] = None,
        tags: Optional[Dict[str, str]] = None,
    ) -> List[Ok]:
        """Every key (of one tenant), following the daemon's pages (PROTOCOL.md §3.4)."""
        params = ops.key_list_params(tenant, page_size, tags)
        keys: List[Ok] = []
        while ops.key_list_page(await self.call("key_list", params), params, keys):
            pass
        return keys

    async def encrypt(
        self, path: KeyPathLike, plaintext: Union[Bytes, str], context: Context = None
    ) -> EncryptResult:
        return await self._run(ops.encrypt(path, plaintext, context))

    async def decrypt(self, ciphertext: str, context: Context = None) -> DecryptResult:
        return await self._run(ops.decrypt(ciphertext, context))

    async def datakey(
        self, path: KeyPathLike, context: Context = None, *, include_plaintext: bool = True
    ) -> DatakeyResult:
        return await self._run(ops.datakey(path, context, include_plaintext=include_plaintext))

    async def datakey_decrypt(self, envelope: str, context: Context = None) -> DecryptResult:
        return await self._run(ops.datakey_decrypt(envelope, context))

    async def rewrap(self, text: str, context: Context = None) -> RewrapResult:
        return await self._run(ops.rewrap(text, context))

    async def mac(
        self, path: KeyPathLike, message: Union[Bytes, str], *, version: Optional[int] = None
    ) -> MacResult:
        """As ``Client.mac``."""
        return await self._run(ops.mac(path, message, version=version))

    async def mac_verify(self, path: KeyPathLike, message: Union[Bytes, str], tag: str) -> MacVerifyResult:
        return await self._run(ops.mac_verify(path, message, tag))

    async def sign(
        self,
        path: KeyPathLike,
        message: Optional[Union[Bytes, str]] = None,
        *,
        digest: Optional[Bytes] = None,
    ) -> SignResult:
        """As ``Client.sign``."""
        return await self._run(ops.sign(path, message, digest=digest))

    async def verify(
        self,
        path: KeyPathLike,
        message: Optional[Union[Bytes, str]],
        signature: Union[Bytes, str],
        *,
        digest: Optional[Bytes] = None,
        version: Optional[int] = None,
    ) -> VerifyResult:
        """As ``Client.verify``."""
        return await self._run(ops.verify(path, message, signature, digest=digest, version=version))

    async def public_key(self, path: KeyPathLike, *, version: Optional[int] = None) -> PublicKeyResult:
        return await self._run(ops.public_key(path, version=version))

    async def alias_create(self, alias: str, path: KeyPathLike) -> AliasInfo:
        return await self._run(ops.alias_create(alias, path))

    async def alias_update(self, alias: str, path: KeyPathLike) -> AliasInfo:
        return await self._run(ops.alias_update(alias, path))

    async def alias_delete(self, tenant: str, alias: str) -> AliasInfo:
        return await self._run(ops.alias_delete(tenant, alias))

    async def alias_list(self, tenant: Optional[str] = None) -> List[AliasInfo]:
        return await self._run(ops.alias_list(tenant))

    async def subscribe_revocations(self) -> Ok:
        return await self._run(ops.subscribe_revocations())
