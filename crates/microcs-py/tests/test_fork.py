"""A client used after ``os.fork()``: each process gets only its own replies.

The blocking ``Client`` reconnects in the child (the parent keeps the connection it made);
``AsyncClient`` does the same on a runtime of the child's own. The child never reads, writes or
shuts down the parent's connection.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import sys
from collections.abc import Callable

import pytest

import microcs
from conftest import ServerFactory

pytestmark = pytest.mark.filterwarnings(
    # Python 3.12+ warns that forking a process with threads (the server's, asyncio's) may
    # deadlock; what these tests check is exactly that microcs's own state does not.
    "ignore:This process .* is multi-threaded, use of fork\\(\\) may lead to deadlocks:DeprecationWarning"
)


def _own_replies(c: microcs.Client, who: bytes, n: int) -> None:
    for i in range(n):
        m = who + b"-%d" % i
        got = c.request(m)
        assert got == m, (m, got)


def _fork_and_check(work: Callable[[bytes], None]) -> None:
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            work(b"child")
        except BaseException as e:  # anything: the child must report, never run pytest on
            print(f"child failed: {e!r}", file=sys.stderr, flush=True)
            code = 1
        os._exit(code)
    try:
        work(b"parent")
    finally:
        _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, "the child got a reply that was not its own, or an error"


def test_the_issue_snippet_both_processes_get_their_own_replies(server: ServerFactory, name: str) -> None:
    server("bytes")
    c = microcs.Client(name, timeout=5.0)
    c.request(b"warm")
    _fork_and_check(lambda who: _own_replies(c, who, 200))
    # The parent's connection is still the one it made, and still works.
    pid_before = c.server_pid
    _own_replies(c, b"parent-after", 10)
    assert c.server_pid == pid_before
    c.close()


# The module-level client of a multiprocessing pool, created in the parent before the pool
# forks its workers (what a program's global `client = microcs.Client(...)` does).
_POOL_CLIENT: microcs.Client | None = None


def _pool_work(i: int) -> tuple[int, bytes]:
    assert _POOL_CLIENT is not None
    m = b"job-%d-pid-%d" % (i, os.getpid())
    return os.getpid(), _POOL_CLIENT.request(m) + b"|" + m


def test_a_fork_pool_with_a_module_level_client(server: ServerFactory, name: str) -> None:
    global _POOL_CLIENT
    server("bytes")
    _POOL_CLIENT = microcs.Client(name, timeout=5.0)
    try:
        assert _POOL_CLIENT.request(b"warm") == b"warm"  # connected before the fork
        ctx = multiprocessing.get_context("fork")
        with ctx.Pool(4) as pool:
            results = pool.map(_pool_work, range(400), chunksize=5)
        pids = set()
        for pid, got in results:
            reply, sent = got.split(b"|")
            assert reply == sent, got
            pids.add(pid)
        assert len(pids) > 1, "the jobs should have been spread over several workers"
        assert _POOL_CLIENT.request(b"parent") == b"parent"
    finally:
        _POOL_CLIENT.close()
        _POOL_CLIENT = None


def test_an_async_client_reconnects_in_the_child(server: ServerFactory, name: str) -> None:
    server("bytes")
    c = microcs.AsyncClient(name, timeout=5.0)

    async def own_replies(who: bytes, n: int) -> None:
        for i in range(n):
            m = who + b"-%d" % i
            assert await c.request(m) == m

    asyncio.run(own_replies(b"warm", 1))  # connected, on the parent's runtime
    _fork_and_check(lambda who: asyncio.run(own_replies(who, 100)))
    asyncio.run(own_replies(b"parent-after", 10))
    c.close()
