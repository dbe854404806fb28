"""The GIL is released during blocking waits; the server serves connections at once."""

from __future__ import annotations

import threading
import time

import microcs
from conftest import ServerFactory


def test_other_threads_run_during_a_blocking_request(server: ServerFactory, name: str) -> None:
    server("bytes")
    ticks = 0
    stop = threading.Event()

    def ticker() -> None:
        nonlocal ticks
        while not stop.is_set():
            ticks += 1
            # Pure Python work between ticks: it only progresses while this thread holds the GIL.
            sum(range(1000))

    with microcs.Client(name, timeout=30) as c:
        t = threading.Thread(target=ticker)
        t.start()
        try:
            time.sleep(0.05)
            before = ticks
            assert c.call("slow", b"1") == b"slept"
            during = ticks - before
        finally:
            stop.set()
            t.join(timeout=10)
    # If the request held the GIL for its whole second, the ticker would be frozen.
    assert during > 100, f"the other thread ran only {during} times during a 1 s request"


def test_threads_sharing_a_client_take_turns(server: ServerFactory, name: str) -> None:
    server("bytes")
    with microcs.Client(name, timeout=30) as c:
        results: dict[int, bytes] = {}

        def work(i: int) -> None:
            for j in range(50):
                msg = f"{i}-{j}".encode()
                assert c.request(msg) == msg
            results[i] = b"ok"

        threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        assert results == {i: b"ok" for i in range(4)}


def test_a_python_server_runs_handlers_of_several_connections_at_once(
    server: ServerFactory, name: str
) -> None:
    server("bytes")
    clients = [microcs.Client(name, timeout=30) for _ in range(4)]
    answers: list[int] = []
    lock = threading.Lock()

    def call(c: microcs.Client) -> None:
        most = int(c.call("concurrency"))
        with lock:
            answers.append(most)

    threads = [threading.Thread(target=call, args=(c,)) for c in clients]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    for c in clients:
        c.close()
    assert len(answers) == 4
    # Each handler sleeps 0.3 s (releasing the GIL); they overlapped.
    assert max(answers) >= 2, answers
