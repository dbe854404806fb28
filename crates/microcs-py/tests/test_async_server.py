"""A server with async handlers (the library's tokio server) at its edges: streams of plain
generators past their deadline, the interpreter's exit while plain handlers run on the pool,
coroutines that swallow their cancellation, ``SystemExit`` in a coroutine, ``fork()`` after
``start()``. Each of these once failed (a review's findings); the servers run in processes of
their own where the process's fate is the point."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

import microcs


def run_script(code: str, runtime_dir: Path, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, MICROCS_RUNTIME_DIR=str(runtime_dir))
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def test_a_generator_stream_past_its_deadline_is_closed_and_holds_no_thread(
    runtime_dir: Path, name: str, tmp_path: Path
) -> None:
    closed = tmp_path / "closed"

    def endless(payload: bytes):  # type: ignore[no-untyped-def]
        try:
            while True:
                yield b"tick"
        finally:
            with closed.open("a") as f:
                f.write("x")

    async def coro(payload: bytes) -> bytes:
        return payload

    def plain(payload: bytes) -> bytes:
        return b"plain " + payload

    with microcs.Server(plain, name, methods={"endless": endless, "coro": coro}):
        with microcs.Client(name, timeout=10, stream_window=(1, 1 << 20)) as c:
            for _ in range(40):
                with pytest.raises(microcs.TimedOut):
                    for _item in c.stream("endless", b"", limit=0.05):
                        time.sleep(0.01)
            # Every generator was closed (its finally ran), and the server's plain handlers,
            # which share the pool with the generators, still answer.
            give_up = time.monotonic() + 10
            while len(closed.read_text() if closed.exists() else "") < 40 and time.monotonic() < give_up:
                time.sleep(0.01)
            assert len(closed.read_text()) == 40
            assert c.request(b"x") == b"plain x"
            assert c.call("coro", b"y") == b"y"


def test_the_interpreter_exits_cleanly_while_plain_handlers_run_on_the_pool(runtime_dir: Path, name: str) -> None:
    # A plain handler of an async server runs on tokio's blocking pool; the interpreter's exit
    # must wait for it rather than finalise under it (that aborted the process).
    caller = textwrap.dedent(f"""
        import asyncio, microcs
        async def main():
            async with microcs.AsyncClient({name!r}, timeout=30) as c:
                await asyncio.gather(*(c.request(b"") for _ in range(30)), return_exceptions=True)
        asyncio.run(main())
    """)
    code = f"""
        import subprocess, sys, time, microcs
        def slow(payload):
            time.sleep(0.5)
            return b"done"
        async def coro(payload):
            return payload
        s = microcs.Server(slow, {name!r}, methods={{"coro": coro}}, grace_period=0.2)
        s.start()
        caller = subprocess.Popen([sys.executable, "-c", {caller!r}])
        time.sleep(0.3)
        print("exiting", flush=True)
    """
    for _ in range(5):
        done = run_script(code, runtime_dir)
        assert done.returncode == 0, (done.returncode, done.stderr[-2000:])
        assert "exiting" in done.stdout


def test_a_coroutine_that_swallows_cancellation_does_not_hold_up_stop(runtime_dir: Path, name: str) -> None:
    async def stubborn(payload: bytes) -> bytes:
        for _ in range(200):
            try:
                await asyncio.sleep(0.1)
            except asyncio.CancelledError:
                pass  # ignores it, and goes on
        return b"late"

    server = microcs.Server(stubborn, name, grace_period=0.3)
    server.start()

    async def call() -> None:
        async with microcs.AsyncClient(name, timeout=60) as c:
            with pytest.raises(microcs.Error):
                await c.request(b"")

    caller = asyncio.new_event_loop()
    task = caller.create_task(call())
    caller.run_until_complete(asyncio.sleep(0.3))
    started = time.monotonic()
    server.stop()
    took = time.monotonic() - started
    caller.run_until_complete(task)
    caller.close()
    # The grace period (0.3 s), then the loop's wind-down (1 s), not the coroutine's 20 s.
    assert took < 5, took
    assert microcs.list_services() == []


def test_system_exit_in_a_coroutine_is_an_error_answer_and_the_server_goes_on(runtime_dir: Path, name: str) -> None:
    async def quits(payload: bytes) -> bytes:
        if payload == b"early":
            raise SystemExit(3)
        await asyncio.sleep(0)
        raise KeyboardInterrupt

    async def echo(payload: bytes) -> bytes:
        await asyncio.sleep(0)
        return payload

    async def agen(payload: bytes):  # type: ignore[no-untyped-def]
        yield b"one"
        raise SystemExit(4)

    with microcs.Server(echo, name, methods={"quits": quits, "agen": agen}):
        with microcs.Client(name, timeout=10) as c:
            with pytest.raises(microcs.RemoteError) as e:
                c.call("quits", b"early")
            assert e.value.code == 500 and "SystemExit: 3" in str(e.value)
            with pytest.raises(microcs.RemoteError) as e:
                c.call("quits", b"late")
            assert e.value.code == 500 and "KeyboardInterrupt" in str(e.value)
            items = c.stream("agen", b"")
            assert next(items) == b"one"
            with pytest.raises(microcs.RemoteError) as e:
                next(items)
            assert e.value.code == 500 and "SystemExit: 4" in str(e.value)
            # The server's event loop is still there.
            assert c.request(b"still") == b"still"


def test_a_forked_child_leaves_the_parents_async_server_alone(runtime_dir: Path, name: str) -> None:
    async def coro(payload: bytes) -> bytes:
        return b"coro " + payload

    with microcs.Server(lambda b: b"plain " + b, name, methods={"coro": coro}):
        with microcs.Client(name, timeout=10) as c:
            assert c.call("coro", b"1") == b"coro 1"
        started = time.monotonic()
        pid = os.fork()
        if pid == 0:  # the child: what its exit runs (atexit stops servers) must not hang
            code = 0
            try:
                with microcs.Client(name, timeout=10) as c:
                    code = 0 if c.call("coro", b"2") == b"coro 2" else 1
                microcs._microcs._stop_all()
            except BaseException:
                code = 2
            os._exit(code)  # not through pytest's machinery, which the child shares
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        assert time.monotonic() - started < 10
        # The parent still serves.
        with microcs.Client(name, timeout=10) as c:
            assert c.call("coro", b"3") == b"coro 3"
            assert c.request(b"4") == b"plain 4"
    assert microcs.list_services() == []


def test_async_with_on_a_name_nobody_serves_raises_no_service(runtime_dir: Path, name: str) -> None:
    async def main() -> None:
        async with microcs.AsyncClient(name, timeout=5):
            pass

    with pytest.raises(microcs.NoService):
        asyncio.run(main())
