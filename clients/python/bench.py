"""Measures this client against a running daemon, as `keyhaven bench` does for
the Rust client: ops/s and p50/p99 per op and concurrency. Concurrent callers
are threads sharing one Client (pipelined on its pool), then (``aio``) tasks
sharing one AsyncClient (pipelined on one connection); seal/open run in this
process with a Sealer's caches. ``cpu us/op`` is this process's CPU time (user
and system, every thread) per operation: less sensitive to other load on the
machine than ops/s.

    python bench.py [--socket S] [--duration 3] [--concurrency 1,16] [--payload 32] [--no-asyncio]
"""

from __future__ import annotations

import argparse
import asyncio
import resource
import threading
import time
from typing import Awaitable, Callable, Dict, List, Optional

from keyhaven import Client, DaemonError, OpenLimits, Sealer, SealLimits
from keyhaven.aio import AsyncClient


def cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def pct(lat: List[float], p: float) -> float:
    return lat[min(len(lat) - 1, int(p / 100 * len(lat)))]


def report(name: str, c: int, lat: List[float], duration: float, cpu: float) -> None:
    lat.sort()
    n = max(len(lat), 1)
    print(
        f"{name:<11} {c:>4} {len(lat) / duration:>10.0f} {pct(lat, 50):>8.2f} {pct(lat, 99):>8.2f}"
        f" {cpu / n * 1e6:>11.1f}"
    )


async def bench_asyncio(
    socket: Optional[str], key: str, payload: bytes, ct: str, duration: float, levels: List[int]
) -> None:
    async with AsyncClient(socket) as kh:
        ops: Dict[str, Callable[[], Awaitable[object]]] = {
            "aio encrypt": lambda: kh.encrypt(key, payload),
            "aio decrypt": lambda: kh.decrypt(ct),
        }
        for name, op in ops.items():
            for c in levels:
                lat: List[float] = []
                end = time.perf_counter() + duration

                async def worker(
                    op: Callable[[], Awaitable[object]] = op, lat: List[float] = lat, end: float = end
                ) -> None:
                    while time.perf_counter() < end:
                        t0 = time.perf_counter()
                        await op()
                        lat.append((time.perf_counter() - t0) * 1000)

                c0 = cpu_seconds()
                await asyncio.gather(*(worker() for _ in range(c)))
                report(name, c, lat, duration, cpu_seconds() - c0)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--socket")
    ap.add_argument("--duration", type=float, default=3.0)
    ap.add_argument("--concurrency", default="1,16")
    ap.add_argument("--payload", type=int, default=32)
    ap.add_argument("--revoke-rounds", type=int, default=20)
    ap.add_argument("--no-asyncio", action="store_true", help="leave out the AsyncClient")
    a = ap.parse_args()
    kh = Client(a.socket)
    key = "bench/python"
    try:
        kh.key_create(key)
    except DaemonError as e:
        if e.code != "already_exists":
            raise
    payload = b"a" * a.payload
    ct = kh.encrypt(key, payload).ciphertext
    sealer = Sealer(
        a.socket,
        seal=SealLimits(max_age=300, max_messages=1 << 30, max_bytes=1 << 40),
        open=OpenLimits(max_age=300, max_entries=1000),
    )
    kib = b"b" * 1024
    record = sealer.seal(key, kib)
    ops: Dict[str, Callable[[], object]] = {
        "encrypt": lambda: kh.encrypt(key, payload),
        "decrypt": lambda: kh.decrypt(ct),
        "seal 1KiB": lambda: sealer.seal(key, kib),
        "open 1KiB": lambda: sealer.open(record),
    }
    lock = threading.Lock()
    print("op          conc      ops/s   p50 ms   p99 ms  cpu us/op")
    for name, op in ops.items():
        for c in (int(x) for x in a.concurrency.split(",")):
            lat: List[float] = []
            end = time.perf_counter() + a.duration

            def worker(op: Callable[[], object] = op, lat: List[float] = lat, end: float = end) -> None:
                mine = []
                while time.perf_counter() < end:
                    t0 = time.perf_counter()
                    op()
                    mine.append((time.perf_counter() - t0) * 1000)
                with lock:
                    lat.extend(mine)

            threads = [threading.Thread(target=worker) for _ in range(c)]
            c0 = cpu_seconds()
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            report(name, c, lat, a.duration, cpu_seconds() - c0)
    if not a.no_asyncio:
        levels = [int(x) for x in a.concurrency.split(",")]
        asyncio.run(bench_asyncio(a.socket, key, payload, ct, a.duration, levels))
    # Revocation delay: from the answer to `revoke` until the Sealer's cache no
    # longer holds the key (the event has arrived and been applied).
    try:
        kh.key_create("bench/python-rev")
    except DaemonError as e:
        if e.code != "already_exists":
            raise
    delays: List[float] = []
    scope = {"kind": "key", "tenant": "bench", "key": "python-rev"}
    for _ in range(a.revoke_rounds):
        sealer.seal("bench/python-rev", "x")
        kh.call("revoke", {"scope": scope, "reason": "unspecified"})
        t0 = time.perf_counter()
        while sealer.stats().seal_keys > 1:
            time.sleep(0)
        delays.append((time.perf_counter() - t0) * 1000)
        kh.call("revoke_lift", {"scope": scope, "reason": "unspecified"})
    delays.sort()
    print(
        f"revoke -> cache empty, {a.revoke_rounds} rounds: "
        f"p50 {delays[len(delays) // 2]:.2f} ms, max {delays[-1]:.2f} ms"
    )
    sealer.close()
    kh.close()


if __name__ == "__main__":
    main()
