"""Page faults and time per large round trip: `microcs.Client` -> `microcs.Server` echo.

Not a test: a measurement (issue 18's check that a large round trip touches no fresh memory).
The server runs in a child process; both are pinned (server CPU 0, client CPU 0 or --client-cpu).
Minor page faults come from /proc/PID/stat for both processes, over the measured round trips.

    python crates/microcs-py/bench/faults.py                    # 1 MiB, 200 round trips, one CPU
    python crates/microcs-py/bench/faults.py --client-cpu 1     # split across two CPUs
    python crates/microcs-py/bench/faults.py --handler async    # an async def echo (tokio server)
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import tempfile
import time


def minor_faults(pid: int) -> int:
    """Minor page faults of process `pid` so far (the 10th field of /proc/PID/stat)."""
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[7])


def serve(name: str, kind: str) -> None:
    import microcs

    os.sched_setaffinity(0, {0})

    async def echo_async(data: bytes) -> bytes:
        return data

    server = microcs.Server(echo_async if kind == "async" else (lambda data: data), name)
    print("ready", flush=True)
    server.start_listening()


def main() -> None:
    if len(sys.argv) > 3 and sys.argv[1] == "--serve":
        serve(sys.argv[2], sys.argv[3])
        return
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=int, default=1 << 20, help="payload bytes (default 1 MiB)")
    p.add_argument("-n", type=int, default=200, help="round trips measured (default 200)")
    p.add_argument("--client-cpu", type=int, default=0, help="the client's CPU (the server's is 0)")
    p.add_argument("--handler", choices=["plain", "async"], default="plain",
                   help="the server's echo: a plain function (blocking server) or an async def (tokio server)")
    args = p.parse_args()
    os.environ.setdefault("MICROCS_RUNTIME_DIR", os.path.join(tempfile.mkdtemp(prefix="mcs-faults-"), "rt"))
    name = f"FAULTS_{os.getpid()}"
    server = subprocess.Popen([sys.executable, __file__, "--serve", name, args.handler], stdout=subprocess.PIPE)
    try:
        assert server.stdout is not None
        if server.stdout.readline().strip() != b"ready":
            raise SystemExit("the server did not start")
        os.sched_setaffinity(0, {args.client_cpu})
        import microcs

        client = microcs.Client(name, timeout=60)
        payload = os.urandom(args.size)
        for _ in range(20):  # warm-up
            client.request(payload)
        c0, s0 = minor_faults(os.getpid()), minor_faults(server.pid)
        r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
        for _ in range(args.n):
            client.request(payload)
        dt, r1 = time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_SELF)
        c1, s1 = minor_faults(os.getpid()), minor_faults(server.pid)
        if client.request(payload) != payload:
            raise SystemExit("wrong reply")
        cpu = (r1.ru_utime + r1.ru_stime) - (r0.ru_utime + r0.ru_stime)
        print(
            f"{args.size} B, {args.n} round trips, {args.handler} handler, client CPU {args.client_cpu}: "
            f"{dt / args.n * 1e6:.1f} µs per round trip, {args.size * args.n / dt / 1e6:.0f} MB/s, "
            f"page faults per round trip client {(c1 - c0) / args.n:.1f} server {(s1 - s0) / args.n:.1f}, "
            f"client CPU {cpu / args.n * 1e6:.0f} µs per round trip"
        )
        client.close()
    finally:
        server.kill()
        server.wait()


if __name__ == "__main__":
    main()
