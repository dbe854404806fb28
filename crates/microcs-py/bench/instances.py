"""Throughput of a CPU-bound service with 1 and 2 instances, and how callers spread over them.

The service is the Game of Life on a 512x512 board, in three kinds: ``rust`` (``microcs serve
--life --instances N``, method ``steps``: 10 generations per request; one instance already uses
every CPU, a thread per connection, so a second one adds isolation, not throughput),
``rust-serial`` (the same with ``--jobs 1``: each instance computes one request at a time, as a
stateful service behind one lock does, so instances are what uses more CPUs) and ``python``
(the pure-Python handler of ``examples/workers.py``, one generation per request; the GIL makes
each instance serial). Callers are threads with a blocking
``Client`` each (a connection each: balanced by the instances' connection counts when they
connect) or one ``AsyncClient`` with that many tasks (one connection per instance, each request
on the connection with the fewest requests in flight). Requests per instance come from each
instance's own ``$stats`` (``microcs stats --instance K``).

    python bench/instances.py [--seconds 8] [--runs 3] [--cpus 0,1] [--kinds rust,rust-serial,python]

Prints one JSON line per measurement and a summary table. Each run starts the servers afresh;
the median of the runs is reported.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import microcs

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[2]
MICROCS = Path(os.environ.get("MICROCS_BIN", ROOT / "target" / "release" / "microcs"))
WORKERS = HERE.parent / "examples" / "workers.py"
#: The Rust kinds: the extra options of `microcs serve --life` for each.
RUST_KINDS = {"rust": [], "rust-serial": ["--jobs", "1"]}


def board(n: int) -> bytes:
    rnd = random.Random(42)
    return ("\n".join("".join(rnd.choice(".#") for _ in range(n)) for _ in range(n)) + "\n").encode()


def start(kind: str, name: str, instances: int, env: dict[str, str], cpus: str | None) -> subprocess.Popen[bytes]:
    pin = ["taskset", "-c", cpus] if cpus else []
    if kind in RUST_KINDS:
        cmd = [*pin, str(MICROCS), "serve", name, "--life", *RUST_KINDS[kind], "--instances", str(instances)]
    else:
        cmd = [*pin, sys.executable, str(WORKERS), name, str(instances)]
    p = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    give_up = time.monotonic() + 60
    while sum(s.name == name for s in microcs.list_services()) < instances:
        if time.monotonic() > give_up or p.poll() is not None:
            p.kill()
            raise SystemExit(f"{kind} service with {instances} instances did not start")
        time.sleep(0.05)
    return p


def per_instance(name: str, env: dict[str, str]) -> dict[int, int]:
    """Requests of the measured method per instance slot, from each instance's $stats."""
    out = {}
    for s in microcs.list_services():
        if s.name != name or s.instance is None:
            continue
        j = json.loads(
            subprocess.run(
                [str(MICROCS), "--json", "stats", name, "--instance", str(s.instance)],
                env=env,
                capture_output=True,
                check=True,
            ).stdout
        )
        out[s.instance] = sum(e["num_requests"] for e in j["endpoints"])
    return out


def drive_blocking(name: str, method: str, payload: bytes, callers: int, seconds: float) -> tuple[int, float]:
    """Requests done by `callers` threads in about `seconds`, and the time they took."""
    done = [0] * callers
    stop = 0.0

    def at_start() -> None:
        nonlocal stop
        stop = time.monotonic() + seconds

    start_line = threading.Barrier(callers, action=at_start)

    def caller(i: int) -> None:
        c = microcs.Client(name, timeout=120)
        start_line.wait()
        while time.monotonic() < stop:
            c.call(method, payload) if method else c.request(payload)
            done[i] += 1
        c.close()

    threads = [threading.Thread(target=caller, args=(i,)) for i in range(callers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sum(done), time.monotonic() - (stop - seconds)


def drive_async(name: str, method: str, payload: bytes, callers: int, seconds: float) -> tuple[int, float]:
    """As `drive_blocking`, with `callers` tasks sharing one AsyncClient."""
    async def main() -> tuple[int, float]:
        c = microcs.AsyncClient(name, timeout=120)
        await c.ping()
        await asyncio.sleep(1.5)  # its background refresh connects to every instance
        t0 = time.monotonic()
        stop = t0 + seconds
        done = 0

        async def task() -> None:
            nonlocal done
            while time.monotonic() < stop:
                await (c.call(method, payload) if method else c.request(payload))
                done += 1

        await asyncio.gather(*(task() for _ in range(callers)))
        elapsed = time.monotonic() - t0
        c.close()
        return done, elapsed

    return asyncio.run(main())


def measure(kind: str, instances: int, callers: int, client: str, seconds: float, cpus: str | None) -> dict[str, object]:
    d = tempfile.mkdtemp(prefix="mcs-bench-", dir="/tmp")
    os.environ["MICROCS_RUNTIME_DIR"] = d
    env = dict(os.environ)
    name = f"LIFE_{kind.upper().replace('-', '_')}"
    p = start(kind, name, instances, env, cpus)
    try:
        # Rust: 10 generations per request (method steps); Python: one (the default handler).
        method, payload = ("steps", b"10\n" + board(512)) if kind in RUST_KINDS else ("", board(512))
        drive = drive_blocking if client == "blocking" else drive_async
        n, elapsed = drive(name, method, payload, callers, seconds)
        spread = per_instance(name, env)
    finally:
        p.send_signal(signal.SIGTERM)
        p.wait(timeout=60)
        shutil.rmtree(d, ignore_errors=True)
    return {
        "kind": kind,
        "instances": instances,
        "callers": callers,
        "client": client,
        "requests": n,
        "per_s": n / elapsed,
        "spread": [spread[k] for k in sorted(spread)],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=8.0)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--cpus", default=None, help="pin the servers (taskset -c LIST)")
    ap.add_argument("--kinds", default="rust,rust-serial,python", help="of rust, rust-serial, python")
    args = ap.parse_args()
    for kind in args.kinds.split(","):
        if kind not in (*RUST_KINDS, "python"):
            ap.error(f"unknown kind {kind!r}; use rust, rust-serial or python")
    cases = []
    for kind in args.kinds.split(","):
        for instances in (1, 2):
            cases.append((kind, instances, 4, "blocking"))
        cases.append((kind, 2, 4, "async"))
        cases.append((kind, 2, 16, "blocking"))
        cases.append((kind, 2, 16, "async"))
    results: dict[tuple[str, int, int, str], list[dict[str, object]]] = {}
    for _ in range(args.runs):
        for case in cases:
            r = measure(*case, seconds=args.seconds, cpus=args.cpus)
            print(json.dumps(r), flush=True)
            results.setdefault(case, []).append(r)
    print()
    print(f"{'service':11} {'inst':>4} {'callers':>7} {'client':8} {'req/s (median)':>15} {'spread (median run)':>22}")
    for case, rs in results.items():
        med = statistics.median(float(str(r["per_s"])) for r in rs)
        mid = sorted(rs, key=lambda r: float(str(r["per_s"])))[len(rs) // 2]
        print(f"{case[0]:11} {case[1]:>4} {case[2]:>7} {case[3]:8} {med:>15.2f} {str(mid['spread']):>22}")
    for kind in args.kinds.split(","):
        one = statistics.median(float(str(r["per_s"])) for r in results[(kind, 1, 4, "blocking")])
        two = statistics.median(float(str(r["per_s"])) for r in results[(kind, 2, 4, "blocking")])
        print(f"{kind}: 2 instances / 1 instance (4 callers) = {two / one:.2f}x")


if __name__ == "__main__":
    main()
