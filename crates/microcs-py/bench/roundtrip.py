"""Python client -> Python handler round trip: microcs vs multiprocessing.connection vs pyzmq.

Not a test: a measurement. Each system echoes the payload from a Python handler in a separate
server process; the client (this process) sends a request, waits for the reply, and repeats.
Both processes are pinned (os.sched_setaffinity), once on the same CPU and once on different
CPUs. Systems are measured in turns within each run (so drift hits them alike), several runs,
and the median of the runs is reported, with microcs's ratio to each of the others (the
median of the ratios of runs measured side by side).

    pip install pyzmq      # in the venv, for this benchmark only
    python crates/microcs-py/bench/roundtrip.py                     # print the table
    python crates/microcs-py/bench/roundtrip.py --write docs/BENCHMARKS.md

    # microcs_lite, the pure-Python implementation, against the others (its own section):
    python crates/microcs-py/bench/roundtrip.py --subject lite --systems lite mp.conn microcs \
        --sizes 32 1048576 --write docs/BENCHMARKS.md

The compared systems:
  microcs      microcs.Client.request -> microcs.Server handler (Python function)
  lite         the same with microcs_lite (python/microcs_lite.py, standard library only)
  microcs+shm  microcs over shared memory (Server(shared_memory=True), Client(shared_memory=True))
  mp.conn      multiprocessing.connection.Client over AF_UNIX, send_bytes/recv_bytes, and a
               Python loop recv_bytes/send_bytes in the server (no pickling either way)
  pyzmq        zmq REQ socket -> REP socket over ipc://, a Python loop recv/send in the server
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import re
import shlex
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

SYSTEMS = ("microcs", "mp.conn", "pyzmq", "lite", "microcs+shm")
#: Where microcs_lite lives: python/ at the repository root.
LITE = Path(__file__).resolve().parents[3] / "python"
#: The AsyncClient row: requests made many at a time over one connection (throughput, not latency).
ASYNC = "microcs AsyncClient"
#: `--p50` rows: the median round trip of `Client` and of `AsyncClient`, one request at a time.
P50_SYNC, P50_ASYNC = "p50 Client", "p50 AsyncClient"
SECTION = "## Python"
#: The section of each subject (the system whose ratios to the others are reported).
SECTIONS = {"microcs": SECTION, "lite": "## Pure Python (microcs_lite)"}


# ---------------------------------------------------------------- server side (child process)


def serve(system: str, address: str, cpu: int) -> None:
    """Runs one echo server until killed. Pins itself first, so all its threads inherit it."""
    os.sched_setaffinity(0, {cpu})
    if system in ("microcs", "lite", "microcs+shm"):
        if system == "lite":
            sys.path.insert(0, str(LITE))
        impl: Any = __import__("microcs_lite" if system == "lite" else "microcs")

        def echo(data: bytes) -> bytes:
            return data

        shm = {"shared_memory": True} if system == "microcs+shm" else {}
        server = impl.Server(echo, address, **shm)
        print("ready", flush=True)
        server.start_listening()
    elif system == "mp.conn":
        from multiprocessing.connection import Listener

        with Listener(address, family="AF_UNIX") as listener:
            print("ready", flush=True)
            with listener.accept() as conn:
                while True:
                    try:
                        data = conn.recv_bytes()
                    except EOFError:
                        return
                    conn.send_bytes(data)
    elif system == "pyzmq":
        import zmq

        ctx = zmq.Context()
        rep = ctx.socket(zmq.REP)
        rep.bind(address)
        print("ready", flush=True)
        while True:
            rep.send(rep.recv(copy=True))
    else:
        raise SystemExit(f"unknown system {system!r}")


# ---------------------------------------------------------------- client side


def connect(system: str, address: str) -> tuple[Callable[[bytes], bytes], Callable[[], None]]:
    """A request function and a close function for `system` at `address`."""
    if system == "microcs":
        import microcs

        client = microcs.Client(address, timeout=30)
        return client.request, client.close
    if system == "microcs+shm":
        import microcs

        shm_client = microcs.Client(address, timeout=30, shared_memory=True)
        shm_client.request(b"")
        if shm_client.local_transport != "shm":
            raise SystemExit("microcs+shm is not on shared memory")
        return shm_client.request, shm_client.close
    if system == "lite":
        sys.path.insert(0, str(LITE))
        import microcs_lite

        lite_client = microcs_lite.Client(address, timeout=30)
        return lite_client.request, lite_client.close
    if system == "mp.conn":
        from multiprocessing.connection import Client

        conn = Client(address, family="AF_UNIX")

        def mp_request(data: bytes) -> bytes:
            conn.send_bytes(data)
            return conn.recv_bytes()

        return mp_request, conn.close
    if system == "pyzmq":
        import zmq

        ctx = zmq.Context()
        req = ctx.socket(zmq.REQ)
        req.connect(address)

        def zmq_request(data: bytes) -> bytes:
            req.send(data)
            reply: bytes = req.recv(copy=True)
            return reply

        def zmq_close() -> None:
            req.close(linger=0)
            ctx.term()

        return zmq_request, zmq_close
    raise ValueError(system)


def start_server(system: str, address: str, cpu: int, env: dict[str, str]) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(
        [sys.executable, __file__, "--serve", system, address, str(cpu)],
        stdout=subprocess.PIPE,
        env=env,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if line.strip() != b"ready":
        proc.kill()
        raise SystemExit(f"{system} server did not start (exit code {proc.wait()})")
    return proc


def measure(request: Callable[[bytes], bytes], payload: bytes, n: int) -> float:
    """Median-free raw figure: mean microseconds per round trip over `n` round trips."""
    for _ in range(n // 10):  # warm-up: caches, branch predictors, lazy allocations
        request(payload)
    t0 = time.perf_counter_ns()
    for _ in range(n):
        request(payload)
    elapsed = time.perf_counter_ns() - t0
    if request(payload) != payload:
        raise SystemExit("wrong reply")
    return elapsed / n / 1000


def measure_async(name: str, payload: bytes, n: int, width: int) -> float:
    """Microseconds per request for `n` requests made `width` at a time by one AsyncClient."""
    import asyncio

    import microcs

    async def main() -> float:
        async with microcs.AsyncClient(name, timeout=60) as client:
            await asyncio.gather(*(client.request(payload) for _ in range(width)))  # warm-up
            t0 = time.perf_counter_ns()
            for _ in range(max(1, n // width)):
                replies = await asyncio.gather(*(client.request(payload) for _ in range(width)))
            elapsed = time.perf_counter_ns() - t0
            if replies[-1] != payload:
                raise SystemExit("wrong reply")
            return elapsed / (max(1, n // width) * width) / 1000

    return asyncio.run(main())


def p50_sync(request: Callable[[bytes], bytes], payload: bytes, n: int) -> float:
    """Median microseconds of `n` round trips, one at a time."""
    for _ in range(n // 10):
        request(payload)
    samples = []
    for _ in range(n):
        t0 = time.perf_counter_ns()
        request(payload)
        samples.append(time.perf_counter_ns() - t0)
    return statistics.median(samples) / 1000


def p50_async(name: str, payload: bytes, n: int) -> float:
    """Median microseconds of `n` AsyncClient requests awaited one at a time (on asyncio's
    default loop, as `asyncio.run` gives it)."""
    import asyncio

    import microcs

    async def main() -> float:
        async with microcs.AsyncClient(name, timeout=60) as client:
            for _ in range(n // 10):
                await client.request(payload)
            samples = []
            for _ in range(n):
                t0 = time.perf_counter_ns()
                await client.request(payload)
                samples.append(time.perf_counter_ns() - t0)
            return statistics.median(samples) / 1000

    return asyncio.run(main())


def run(args: argparse.Namespace) -> dict[tuple[str, int, str], list[float]]:
    """All measurements: (placement, payload size, system) -> microseconds per run."""
    tmp = Path(tempfile.mkdtemp(prefix="mcs-bench-", dir="/tmp"))
    env = dict(os.environ, MICROCS_RUNTIME_DIR=str(tmp / "rt"))
    os.environ["MICROCS_RUNTIME_DIR"] = env["MICROCS_RUNTIME_DIR"]
    addresses = {
        "microcs": f"BENCH_{os.getpid()}",
        "lite": f"BENCH_LITE_{os.getpid()}",
        "microcs+shm": f"BENCH_SHM_{os.getpid()}",
        "mp.conn": str(tmp / "mp.sock"),
        "pyzmq": f"ipc://{tmp / 'zmq.sock'}",
    }
    # (client CPU, server CPU): both on CPU 0 (as `taskset -c 0` for both), or split.
    placements = {"same CPU": (0, 0), "different CPUs": (1, 0)}
    results: dict[tuple[str, int, str], list[float]] = {}
    for placement, (client_cpu, server_cpu) in placements.items():
        os.sched_setaffinity(0, {client_cpu})
        servers = {s: start_server(s, addresses[s], server_cpu, env) for s in args.systems}
        try:
            conns = {s: connect(s, addresses[s]) for s in args.systems}
            for size in args.sizes:
                payload = os.urandom(size)
                # Large payloads take longer per round trip: fewer of them keep a run short.
                n = args.n if size <= 65536 else max(100, args.n * 65536 // size)
                for r in range(args.runs):
                    for s in args.systems:
                        us = measure(conns[s][0], payload, n)
                        results.setdefault((placement, size, s), []).append(us)
                        print(f"  {placement:14} {size:>7} B  run {r + 1}/{args.runs}  {s:8} {us:8.2f} µs", file=sys.stderr)
                    if "microcs" in args.systems and args.width and args.subject == "microcs" and size <= 65536:
                        us = measure_async(addresses["microcs"], payload, args.n, args.width)
                        results.setdefault((placement, size, ASYNC), []).append(us)
                    if "microcs" in args.systems and args.p50 and size <= 65536:
                        # One request at a time, p50, the two clients in turn.
                        results.setdefault((placement, size, P50_SYNC), []).append(p50_sync(conns["microcs"][0], payload, n))
                        results.setdefault((placement, size, P50_ASYNC), []).append(p50_async(addresses["microcs"], payload, n))
            for _, close in conns.values():
                close()
        finally:
            for proc in servers.values():
                proc.kill()
                proc.wait()
    os.sched_setaffinity(0, set(range(os.cpu_count() or 1)))
    return results


def table(args: argparse.Namespace, results: dict[tuple[str, int, str], list[float]]) -> str:
    systems, subject = args.systems, args.subject
    head = "| placement | payload | " + " | ".join(f"{s} (µs)" for s in systems)
    others = [s for s in systems if s != subject]
    head += "".join(f" | {subject} / {s}" for s in others) + " |"
    lines = [head, "|" + "---|" * (2 + len(systems) + len(others))]
    placements = list(dict.fromkeys(p for p, _, _ in results))
    for placement in placements:
        for size in args.sizes:
            runs = {s: results[(placement, size, s)] for s in systems}
            med = {s: statistics.median(r) for s, r in runs.items()}
            row = f"| {placement} | {size} B | " + " | ".join(f"{med[s]:.1f}" for s in systems)
            if subject in med:
                # Ratios of runs measured side by side, then their median: drift in the machine's
                # load between runs cancels out.
                row += "".join(
                    f" | {statistics.median(m / o for m, o in zip(runs[subject], runs[s])):.2f}×"
                    for s in others
                )
            lines.append(row + " |")
    if any(k[2] == ASYNC for k in results):
        lines += [
            "",
            f"`microcs.AsyncClient` with {args.width} requests in flight over its one connection"
            " (same server; time per request, so a throughput figure rather than a latency):",
            "",
            "| placement | payload | µs per request | requests/s |",
            "|---|---|---|---|",
        ]
        for placement in placements:
            for size in args.sizes:
                if (placement, size, ASYNC) not in results:
                    continue  # not measured above 64 KiB: a thousand large requests in flight is a GiB
                us = statistics.median(results[(placement, size, ASYNC)])
                lines.append(f"| {placement} | {size} B | {us:.1f} | {1e6 / us:,.0f} |")
    if any(k[2] == P50_SYNC for k in results):
        lines += [
            "",
            "One request at a time, median round trip (`--p50`): `microcs.Client` against"
            " `microcs.AsyncClient` awaited in a loop on asyncio's default event loop (same server):",
            "",
            "| placement | payload | Client p50 (µs) | AsyncClient p50 (µs) | AsyncClient / Client |",
            "|---|---|---|---|---|",
        ]
        for placement in placements:
            for size in args.sizes:
                if (placement, size, P50_SYNC) not in results:
                    continue
                sync, aio = results[(placement, size, P50_SYNC)], results[(placement, size, P50_ASYNC)]
                ratio = statistics.median(a / b for a, b in zip(aio, sync))
                lines.append(
                    f"| {placement} | {size} B | {statistics.median(sync):.1f} | {statistics.median(aio):.1f} | {ratio:.2f}× |"
                )
    return "\n".join(lines)


def machine() -> str:
    model = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    versions = [f"Python {platform.python_version()}"]
    for mod in ("microcs", "zmq"):
        try:
            m: Any = __import__(mod)
            v = getattr(m, "__version__", None) or getattr(m, "pyzmq_version", lambda: "?")()
            versions.append(f"{mod} {v}")
        except ImportError:
            pass
    return (
        f"{socket.gethostname()}: {model}, {os.cpu_count()} CPUs, Linux {platform.release()}; "
        + ", ".join(versions)
    )


def loadavg() -> str:
    try:
        return Path("/proc/loadavg").read_text().split()[0]
    except OSError:
        return "unknown"


#: Hand-written notes inside a section, between these markers, survive `--write`.
NOTES_BEGIN, NOTES_END = "<!-- notes:begin (hand-written, kept by --write) -->", "<!-- notes:end -->"


def write_section(path: Path, section: str, text: str) -> None:
    """Puts `text` as the `section` section of `path`, keeping every other section and the
    section's hand-written notes (between NOTES_BEGIN and NOTES_END)."""
    old = path.read_text() if path.exists() else "# Benchmarks\n"
    pattern = re.compile(rf"^{re.escape(section)}\n.*?(?=^## |\Z)", re.S | re.M)
    found = pattern.search(old)
    if found and NOTES_BEGIN in found.group(0):
        notes = found.group(0)[found.group(0).index(NOTES_BEGIN):]
        text = text.rstrip() + "\n\n" + notes[: notes.index(NOTES_END) + len(NOTES_END)] + "\n"
    if found:
        new = pattern.sub(lambda _: text.rstrip() + "\n\n", old, count=1)
    else:
        new = old.rstrip() + "\n\n" + text.rstrip() + "\n"
    path.write_text(new.rstrip() + "\n")


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--serve":
        serve(sys.argv[2], sys.argv[3], int(sys.argv[4]))
        return
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-n", type=int, default=20000, help="round trips per run (default 20000)")
    p.add_argument("--runs", type=int, default=5, help="runs per system and placement (default 5)")
    p.add_argument("--sizes", type=int, nargs="+", default=[64, 4096], help="payload sizes in bytes")
    p.add_argument("--systems", nargs="+", choices=SYSTEMS, default=["microcs", "mp.conn", "pyzmq"])
    p.add_argument("--width", type=int, default=1000, help="AsyncClient requests in flight (0: skip)")
    p.add_argument("--p50", action="store_true",
                   help="also the median round trip of Client and of AsyncClient, one request at a time")
    p.add_argument("--subject", choices=sorted(SECTIONS), default="microcs",
                   help="the system whose ratios to the others are reported (default microcs)")
    p.add_argument("--write", type=Path, help="put the results in this Markdown file's section of the subject")
    args = p.parse_args()
    if args.subject not in args.systems:
        raise SystemExit(f"--subject {args.subject} is not among --systems")
    if "pyzmq" in args.systems:
        try:
            import zmq  # noqa: F401
        except ImportError:
            raise SystemExit("pyzmq is not installed: pip install pyzmq (or pass --systems microcs mp.conn)")
    if (os.cpu_count() or 1) < 2:
        raise SystemExit("needs 2 CPUs (to measure both placements)")
    started = datetime.datetime.now(datetime.timezone.utc)
    load_before = loadavg()
    results = run(args)
    load_after = loadavg()
    command = "python " + " ".join(shlex.quote(a) for a in [os.path.relpath(__file__), *sys.argv[1:]])
    body = table(args, results)
    print(body)
    if args.write and args.subject == "lite":
        text = lite_section(args, body, started, load_before, load_after, command)
    elif args.write:
        text = f"""{SECTION}

Python client → Python handler round trip (an echo), against `multiprocessing.connection`
(AF_UNIX, `send_bytes`/`recv_bytes`) and pyzmq REQ/REP (`ipc://`), each server a separate
process. Client and server pinned with `os.sched_setaffinity` to the same CPU or to different
CPUs. Median of {args.runs} runs of {args.n} round trips each (after a warm-up); systems measured
in turns within each run, and each ratio is the median of the per-run ratios. Lower is better;
a ratio under 1 means microcs is faster.

{body}

- Machine: {machine()}
- Date: {started:%Y-%m-%d %H:%M} UTC; 1-minute load average {load_before} before the run and
  {load_after} after (anything above 0 is other work sharing the 2 CPUs: the pinned processes
  compete with it, which is why the ratios of runs taken side by side are the figures to read)
- Command: `{command}` (from the repository root, in `.venv`, with pyzmq installed there)
- The goal of the Python bindings: at most 1.2× the `multiprocessing.connection` time and at
  most 0.6× pyzmq's; for a 1 MiB payload at least `multiprocessing.connection`'s bytes per
  second, i.e. a time ratio of at most 1.00×. On this VM the different-CPU figures vary most from one invocation to the
  next (each round trip is two cross-CPU wake-ups, and other work on the machine shifts them):
  rerun before reading much into a few hundredths.
"""
    if args.write:
        write_section(args.write, SECTIONS[args.subject], text)
        print(f"wrote the {SECTIONS[args.subject]!r} section of {args.write}", file=sys.stderr)


def lite_section(
    args: argparse.Namespace, body: str, started: datetime.datetime, load_before: str, load_after: str, command: str
) -> str:
    return f"""{SECTIONS["lite"]}

`microcs_lite` (python/microcs_lite.py: protocol v1 in pure Python, standard library only)
client → its threaded server, a Python echo handler, against `multiprocessing.connection`
(AF_UNIX, `send_bytes`/`recv_bytes`, a Python loop in the server) and the compiled package
(`microcs.Client` → `microcs.Server`), each server a separate process. Placements: both processes
on CPU 0 (as `taskset -c 0` for both; pinned with `os.sched_setaffinity`), and split (server on
CPU 0, client on CPU 1). Median of {args.runs} runs of {args.n} round trips (of 1 MiB: {max(100, args.n * 65536 // (1 << 20))})
each, after a warm-up; systems measured in turns within each run, each ratio the median of the
per-run ratios. Lower is better; a ratio under 1 means microcs_lite is faster.

{body}

- Machine: {machine()}
- Date: {started:%Y-%m-%d %H:%M} UTC; 1-minute load average {load_before} before the run and
  {load_after} after (the 2 vCPUs are shared with other work: read the ratios, not the times)
- Command: `{command}` (from the repository root, in `.venv`)
- The target: within 1.3× of `multiprocessing.connection`.
"""


if __name__ == "__main__":
    main()
