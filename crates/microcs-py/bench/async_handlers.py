"""Many concurrent calls of an ``async def`` handler that awaits ``asyncio.sleep``.

Not a test: a measurement. A ``microcs.Server`` in a separate process serves ``nap``, an
``async def`` handler that sleeps for the seconds it is sent; this process opens one
``microcs.AsyncClient`` and makes N calls at once with ``asyncio.gather``. Concurrent handlers
take about one sleep in all; handlers run one after the other would take N sleeps. Reported:
the wall time of each run, and its median over the runs as a multiple of one sleep.

    python crates/microcs-py/bench/async_handlers.py                 # 1,000 calls of 0.2 s, 5 runs
    python crates/microcs-py/bench/async_handlers.py --calls 5000 --sleep 0.5
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import os
import statistics
import tempfile
import time

import microcs

NAME = "BENCH_ASYNC_NAP"


async def nap(payload: bytes) -> bytes:
    await asyncio.sleep(float(payload))
    return b"slept"


def serve(runtime_dir: str, ready: multiprocessing.synchronize.Event, stop: multiprocessing.synchronize.Event) -> None:
    with microcs.Server(None, NAME, methods={"nap": nap}, runtime_dir=runtime_dir):
        ready.set()
        stop.wait()


async def run(runtime_dir: str, calls: int, sleep: float) -> float:
    async with microcs.AsyncClient(NAME, timeout=max(60.0, 10 * sleep), runtime_dir=runtime_dir) as c:
        await c.call("nap", b"0")  # connected, and the server's loop is running
        started = time.monotonic()
        replies = await asyncio.gather(*(c.call("nap", str(sleep).encode()) for _ in range(calls)))
        took = time.monotonic() - started
    if replies != [b"slept"] * calls:
        raise SystemExit("wrong replies")
    return took


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--calls", type=int, default=1000)
    ap.add_argument("--sleep", type=float, default=0.2)
    ap.add_argument("--runs", type=int, default=5)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        os.chmod(d, 0o700)
        ctx = multiprocessing.get_context("spawn")
        ready, stop = ctx.Event(), ctx.Event()
        server = ctx.Process(target=serve, args=(d, ready, stop))
        server.start()
        try:
            if not ready.wait(30):
                raise SystemExit("the server did not start")
            took = [asyncio.run(run(d, args.calls, args.sleep)) for _ in range(args.runs)]
        finally:
            stop.set()
            server.join(30)
    runs = ", ".join(f"{t:.3f}" for t in took)
    median = statistics.median(took)
    print(f"{args.calls} concurrent calls of an async def handler sleeping {args.sleep} s, one AsyncClient:")
    print(f"  runs (s): {runs}")
    print(f"  median {median:.3f} s = {median / args.sleep:.2f} sleeps (one after the other: {args.calls} sleeps)")


if __name__ == "__main__":
    main()
