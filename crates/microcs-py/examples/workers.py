"""Several worker processes behind one name: a CPU-bound Python handler past the GIL.

Each worker is a process of its own running ``microcs.Server(handler, name, shared=True)``, so
each has its own interpreter and GIL; callers connect to the least-loaded live worker and skip
dead ones. This script is the supervisor: it starts the workers with ``multiprocessing`` (the
``spawn`` start method, so no worker inherits the supervisor's threads), restarts a worker that
dies (with backoff), and on Ctrl-C or SIGTERM stops them all (each drains its requests) and
exits 0 — the name is free afterwards.

    python examples/workers.py LIFE_PY 2        # two workers serving the Game of Life
    microcs ls                                  # one row per instance
    printf '.#.\\n.#.\\n.#.\\n' | microcs call LIFE_PY -

``microcs serve NAME --instances N -- CMD`` does the same for a command line.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import sys
import time
from types import FrameType


def life_step(board: bytes) -> bytes:
    """One generation of Conway's Game of Life on rows of ``.`` and ``#`` (no wrap-around)."""
    rows = board.decode().split()
    h, w = len(rows), len(rows[0]) if rows else 0
    alive = [[c == "#" for c in r] for r in rows]
    out = []
    for y in range(h):
        line = []
        for x in range(w):
            n = 0
            for dy in (-1, 0, 1):
                yy = y + dy
                if 0 <= yy < h:
                    r = alive[yy]
                    for dx in (-1, 0, 1):
                        xx = x + dx
                        if (dy or dx) and 0 <= xx < w and r[xx]:
                            n += 1
            line.append("#" if n == 3 or (n == 2 and alive[y][x]) else ".")
        out.append("".join(line))
    return ("\n".join(out) + "\n").encode()


def worker(name: str) -> None:
    """One instance: serves until SIGTERM (or Ctrl-C), then drains and frees its slot."""
    import microcs

    server = microcs.Server(life_step, name, shared=True, methods={"pid": lambda _: str(os.getpid()).encode()})

    def stop(_sig: int, _frame: FrameType | None) -> None:
        server.stop()

    signal.signal(signal.SIGTERM, stop)
    # Ctrl-C at the terminal reaches the whole process group; the supervisor stops us in order.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    server.serve()


def supervise(name: str, processes: int) -> int:
    """Starts ``processes`` workers for ``name`` and keeps them running until SIGTERM/SIGINT."""
    ctx = multiprocessing.get_context("spawn")
    stopping = False

    def on_signal(_sig: int, _frame: FrameType | None) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    workers = [ctx.Process(target=worker, args=(name,), daemon=True) for _ in range(processes)]
    for p in workers:
        p.start()
    backoff = [0.25] * processes
    restart_at: list[float | None] = [None] * processes
    started = [time.monotonic()] * processes
    while not stopping:
        time.sleep(0.05)
        for i, p in enumerate(workers):
            if restart_at[i] is None and not p.is_alive():
                if time.monotonic() - started[i] > 10:
                    backoff[i] = 0.25
                print(
                    f"workers: worker {i} (pid {p.pid}) ended with {p.exitcode}; restarting in {backoff[i]}s",
                    file=sys.stderr,
                    flush=True,
                )
                restart_at[i] = time.monotonic() + backoff[i]
                backoff[i] = min(backoff[i] * 2, 30.0)
            elif (t := restart_at[i]) is not None and time.monotonic() >= t and not stopping:
                restart_at[i] = None
                workers[i] = ctx.Process(target=worker, args=(name,), daemon=True)
                workers[i].start()
                started[i] = time.monotonic()
                print(f"workers: restarted worker {i} as pid {workers[i].pid}", file=sys.stderr, flush=True)
    for p in workers:
        if p.is_alive():
            p.terminate()  # SIGTERM: the worker drains and frees its slot
    for p in workers:
        p.join(timeout=15)
        if p.is_alive():
            p.kill()
            p.join()
    print(f"workers: stopped the workers of '{name}'; the name is free", file=sys.stderr, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(supervise(sys.argv[1] if len(sys.argv) > 1 else "LIFE_PY", int(sys.argv[2]) if len(sys.argv) > 2 else 2))
