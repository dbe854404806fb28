"""Streams and async handlers across processes: generator, async-generator and ``async def``
handlers in the server of peers/serve.py; ``Client.stream`` and ``AsyncClient.stream`` here."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

import microcs
from conftest import Interrupted, ServerFactory, interrupted_after


def wait_for_file(path: Path, seconds: float = 10.0) -> bool:
    give_up = time.monotonic() + seconds
    while time.monotonic() < give_up:
        if path.exists():
            return True
        time.sleep(0.01)
    return False


def test_a_generator_method_streams_its_items(server: ServerFactory, name: str) -> None:
    server("streams")
    with microcs.Client(name, timeout=10) as c:
        assert list(c.stream("count", b"5")) == [b"0", b"1", b"2", b"3", b"4"]
        assert list(c.stream("count", b"0")) == []
        # An async generator too, and the connection serves plain calls between streams.
        assert c.call("upper", b"between") == b"BETWEEN"
        assert list(c.stream("acount", b"3")) == [b"0", b"1", b"2"]
        # More items than one window (64) holds: credit flows back as they are taken.
        assert [int(i) for i in c.stream("count", b"1000")] == list(range(1000))


def test_a_generator_default_handler_streams(server: ServerFactory, name: str) -> None:
    server("gen")
    with microcs.Client(name, timeout=10) as c:
        assert list(c.stream("", b"one two three")) == [b"one", b"two", b"three"]
        with pytest.raises(microcs.RemoteError) as e:
            c.request(b"one two")
        assert e.value.code == 400 and "stream()" in str(e.value)


def test_a_plain_method_asked_for_a_stream_answers_one_item(server: ServerFactory, name: str) -> None:
    server("streams")
    with microcs.Client(name, timeout=10) as c, c.stream("upper", b"abc") as items:
        assert list(items) == [b"ABC"]


def test_calling_a_streaming_method_with_call_is_remote_error_400(server: ServerFactory, name: str) -> None:
    server("streams")
    with microcs.Client(name, timeout=10) as c:
        for method in ("count", "acount"):
            with pytest.raises(microcs.RemoteError) as e:
                c.call(method, b"3")
            assert e.value.code == 400 and not e.value.may_have_run, e.value
            assert "call it with stream()" in e.value.message


def test_breaking_out_of_the_loop_cancels_on_the_server(server: ServerFactory, name: str, tmp_path: Path) -> None:
    server("streams")
    with microcs.Client(name, timeout=10) as c:
        for method in ("count", "acount"):
            marker = tmp_path / method
            seen = []
            for item in c.stream(method, f"1000000 {marker}".encode()):
                seen.append(item)
                if len(seen) == 3:
                    break
            assert seen == [b"0", b"1", b"2"]
            # The generator was closed there (GeneratorExit or CancelledError in it), long before
            # its million items, and the client makes calls again at once.
            assert c.call("upper", b"next") == b"NEXT"
            assert wait_for_file(marker), f"{method}: the server's generator was not closed"


def test_an_open_stream_holds_the_client(server: ServerFactory, name: str) -> None:
    server("streams")
    with microcs.Client(name, timeout=10) as c:
        items = c.stream("count", b"10")
        assert next(items) == b"0"
        with pytest.raises(microcs.InvalidConfig, match="reading a stream"):
            c.call("upper", b"x")
        items.close()
        items.close()  # idempotent
        with pytest.raises(StopIteration):
            next(items)
        assert c.call("upper", b"x") == b"X"


def test_a_server_killed_mid_stream_raises_a_typed_error(server: ServerFactory, name: str) -> None:
    proc = server("streams")
    with microcs.Client(name, timeout=10) as c:
        items = c.stream("forever")
        assert next(items) == b"tick"
        proc.kill()
        proc.wait(timeout=10)
        with pytest.raises(microcs.Error) as e:
            for _ in range(100_000):  # what was on the wire before the kill, then the loss
                next(items)
        assert e.value.may_have_run, e.value
        # The client is usable again (it reconnects on the next call, and finds nobody).
        with pytest.raises(microcs.NoService):
            c.call("upper", b"x")


def test_the_whole_stream_limit_and_the_wait_for_each_item(server: ServerFactory, name: str) -> None:
    server("streams")
    with microcs.Client(name, timeout=10) as c:
        started = time.monotonic()
        with pytest.raises(microcs.TimedOut):
            for _ in c.stream("forever", limit=0.5):
                pass
        assert 0.4 < time.monotonic() - started < 8
    # The timeout bounds each wait: a stream whose next item takes longer fails, one that is
    # slow but steady does not.
    with microcs.Client(name, timeout=0.5) as c:
        assert list(c.stream("slowcount", b"4 0.1")) == [b"0", b"1", b"2", b"3"]
        items = c.stream("slowcount", b"2 3")
        assert next(items) == b"0"
        with pytest.raises(microcs.TimedOut):
            next(items)
        assert c.call("upper", b"x") == b"X"


def test_a_signal_during_a_wait_for_an_item(server: ServerFactory, name: str) -> None:
    server("streams")
    with microcs.Client(name, timeout=30) as c:
        items = c.stream("slowcount", b"2 20")
        assert next(items) == b"0"
        started = time.monotonic()
        with interrupted_after(0.3), pytest.raises(Interrupted):
            next(items)
        assert time.monotonic() - started < 5
        # The stream was cancelled and the client is usable.
        with pytest.raises(StopIteration):
            next(items)
        assert c.call("upper", b"x") == b"X"


def test_async_for_over_a_stream(server: ServerFactory, name: str) -> None:
    server("gen")
    asyncio.run(_async_for(name))


async def _async_for(name: str) -> None:
    async with microcs.AsyncClient(name, timeout=10) as c:
        assert [i async for i in c.stream("", b"a b c")] == [b"a", b"b", b"c"]
        assert [i async for i in c.stream("acount", b"4")] == [b"0", b"1", b"2", b"3"]
        assert [int(i) async for i in c.stream("count", b"500")] == list(range(500))
        # Streams share the connection with plain calls in flight.
        upper, items = await asyncio.gather(c.call("upper", b"x"), _collect(c.stream("count", b"3")))
        assert (upper, items) == (b"X", [b"0", b"1", b"2"])
        with pytest.raises(microcs.RemoteError) as e:
            await c.call("count", b"1")
        assert e.value.code == 400


async def _collect(items: microcs.AsyncItemStream) -> list[bytes]:
    return [i async for i in items]


def test_cancelling_the_consuming_task_cancels_the_stream(
    server: ServerFactory, name: str, tmp_path: Path
) -> None:
    server("streams")
    asyncio.run(_cancel_consumers(name, tmp_path))


async def _cancel_consumers(name: str, tmp_path: Path) -> None:
    async with microcs.AsyncClient(name, timeout=10) as c:
        for method in ("count", "acount"):
            marker = tmp_path / method
            got: list[bytes] = []

            async def consume() -> None:
                async for item in c.stream(method, f"1000000 {marker}".encode()):
                    got.append(item)
                    if len(got) == 2:
                        await asyncio.sleep(30)  # cancelled here

            task = asyncio.ensure_future(consume())
            while len(got) < 2:
                await asyncio.sleep(0.01)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            assert await asyncio.to_thread(wait_for_file, marker), method
        # aclose() ends a stream too.
        marker = tmp_path / "aclosed"
        items = c.stream("count", f"1000000 {marker}".encode())
        assert await items.__anext__() == b"0"
        await items.aclose()
        assert await asyncio.to_thread(wait_for_file, marker)
        with pytest.raises(StopAsyncIteration):
            await items.__anext__()


def test_async_def_handlers(server: ServerFactory, name: str) -> None:
    server("async")
    with microcs.Client(name, timeout=10) as c:
        assert c.request(b"echo me") == b"echo me"
        assert c.call("asleep", b"0.01") == b"slept"
        assert c.call("arequest", b"hi") == b"arequest hi"
        assert c.call("acall", b"obj") == b"OBJ"
        # An async handler asked for a stream answers with one item.
        assert list(c.stream("acall", b"one")) == [b"ONE"]


def test_async_def_handlers_run_concurrently(server: ServerFactory, name: str) -> None:
    server("streams")

    async def main() -> tuple[float, list[bytes]]:
        async with microcs.AsyncClient(name, timeout=60) as c:
            await c.call("asleep", b"0")  # connected
            started = time.monotonic()
            replies = await asyncio.gather(*(c.call("asleep", b"0.3") for _ in range(1000)))
            return time.monotonic() - started, replies

    took, replies = asyncio.run(main())
    assert replies == [b"slept"] * 1000
    # 1,000 coroutines on the server's loop, all admitted at once on one connection (an async
    # server's default max_in_flight is 1024): about one sleep (0.3 s; ~0.25 s measured for
    # 0.2 s sleeps). One after the other it would take 300 s, and a thread per request with the
    # blocking server's 128 per connection eight sleeps (2.4 s). Wide margin for a loaded machine.
    assert took < 1.2, took


def test_cancellation_reaches_the_coroutine(server: ServerFactory, name: str, tmp_path: Path) -> None:
    server("streams")
    # The caller's deadline passes (its timeout).
    marker = tmp_path / "deadline"
    with microcs.Client(name, timeout=0.3) as c:
        with pytest.raises(microcs.TimedOut):
            c.call("asleep", f"20 {marker}".encode())
    assert wait_for_file(marker), "the coroutine never saw CancelledError at the deadline"

    # The caller cancels (an asyncio timeout around the call).
    marker = tmp_path / "cancelled"

    async def cancel_one() -> None:
        async with microcs.AsyncClient(name, timeout=30) as ac:
            with pytest.raises(asyncio.TimeoutError):
                await asyncio.wait_for(ac.call("asleep", f"20 {marker}".encode()), 0.3)
            # A call that is not cancelled is not disturbed.
            assert await ac.call("asleep", b"0.01") == b"slept"

    asyncio.run(cancel_one())
    assert wait_for_file(marker), "the coroutine never saw CancelledError when cancelled"
