"""AsyncClient: asyncio integration, thousands of concurrent awaits over one connection."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

import pytest

import microcs
from conftest import ServerFactory


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_1000_concurrent_requests_over_one_connection(server: ServerFactory, name: str) -> None:
    server("bytes")

    async def main() -> tuple[list[bytes], int]:
        async with microcs.AsyncClient(name, timeout=60) as client:
            connected = open_fds()
            replies = await asyncio.gather(*(client.call("upper", b"req-%d" % i) for i in range(1000)))
            return replies, open_fds() - connected

    replies, extra_fds = asyncio.run(main())
    assert replies == [b"REQ-%d" % i for i in range(1000)]
    # All over the one connection made on entering: no socket (nor thread) per request.
    assert extra_fds == 0, f"{extra_fds} file descriptors opened for 1,000 requests"


def test_requests_overlap_on_the_server(server: ServerFactory, name: str) -> None:
    server("bytes")

    async def main() -> list[bytes]:
        async with microcs.AsyncClient(name, timeout=60) as client:
            return await asyncio.gather(*(client.call("concurrency") for _ in range(8)))

    most = max(int(r) for r in asyncio.run(main()))
    # Each handler sleeps 0.3 s; requests of one connection ran at the same time.
    assert most >= 2


def test_the_loop_keeps_running_during_a_call(server: ServerFactory, name: str) -> None:
    server("bytes")

    async def main() -> int:
        ticks = 0
        done = False

        async def ticker() -> None:
            nonlocal ticks
            while not done:
                ticks += 1
                await asyncio.sleep(0.001)

        t = asyncio.ensure_future(ticker())
        async with microcs.AsyncClient(name, timeout=30) as client:
            assert await client.call("slow", b"0.5") == b"slept"
        done = True
        await t
        return ticks

    assert asyncio.run(main()) > 10


def test_text_bytes_builtins_and_large_payloads(server: ServerFactory, name: str) -> None:
    server("text")

    async def main() -> None:
        client = microcs.AsyncClient(name, timeout=60)
        assert client.name == name and client.timeout == 60
        assert await client.send_message("grüße") == "echo: grüße"  # connects on first use
        assert await client.request(b"raw") == b"echo: raw"
        big = b"y" * (8 * 1024 * 1024)
        assert await client.call("upper", big) == big.upper()
        assert (await client.ping())["name"] == name
        assert {e["name"] for e in (await client.info())["endpoints"]} >= {"upper", "watch"}
        assert "endpoints" in await client.stats()
        assert await client.connect() is client
        client.close()
        assert client.closed
        assert "closed" in repr(client)

    asyncio.run(main())


def test_errors_arrive_as_exceptions(server: ServerFactory, name: str, runtime_dir: Path) -> None:
    server("binary")

    async def main() -> None:
        with pytest.raises(microcs.NoService):
            await microcs.AsyncClient("NOBODY_HERE").connect()
        with pytest.raises(microcs.InvalidName):
            microcs.AsyncClient("not a name")
        async with microcs.AsyncClient(name, timeout=0.5) as client:
            with pytest.raises(microcs.RemoteError) as e:
                await client.call("fail", b"x")
            assert (e.value.code, e.value.message) == (500, "ValueError: bad board: x")
            with pytest.raises(microcs.TimedOut):
                await client.call("slow", b"3")
            with pytest.raises(microcs.ProtocolError):
                await client.send_message("not text back")
            with pytest.raises(microcs.InvalidName):
                await client.call("bad method")
            with pytest.raises(TypeError):
                client.request("str")  # type: ignore[arg-type]
            # All of that left the connection usable.
            assert await client.call("upper", b"ok") == b"OK"
        with pytest.raises(microcs.Closed):
            await client.request(b"after close")

    asyncio.run(main())


def test_cancelling_a_call_cancels_the_handler(server: ServerFactory, name: str, tmp_path: Path) -> None:
    server("bytes")
    marker = tmp_path / "cancelled"

    async def main() -> None:
        async with microcs.AsyncClient(name, timeout=30) as client:
            with pytest.raises(asyncio.TimeoutError):
                await asyncio.wait_for(client.call("watch", str(marker).encode()), 0.3)
            # Other calls are unaffected.
            assert await client.request(b"still fine") == b"still fine"

    asyncio.run(main())
    give_up = time.monotonic() + 20
    while not marker.exists():
        assert time.monotonic() < give_up, "the handler never saw the cancellation"
        time.sleep(0.01)


def test_a_client_serves_one_event_loop_at_a_time(server: ServerFactory, name: str) -> None:
    server("bytes")
    client = microcs.AsyncClient(name, timeout=30)

    async def use() -> bytes:
        return await client.request(b"x")

    first = asyncio.new_event_loop()
    try:
        assert first.run_until_complete(use()) == b"x"
        # While its loop is open, the client refuses another.
        with pytest.raises(RuntimeError, match="another event loop"):
            asyncio.run(use())
    finally:
        first.close()
    # Once that loop is closed, the client moves on (asyncio.run() twice with one client).
    assert asyncio.run(use()) == b"x"
    assert asyncio.run(use()) == b"x"
    with pytest.raises(RuntimeError, match="no running event loop"):
        client.request(b"outside a loop")


def test_a_dropped_client_still_completes_its_calls(server: ServerFactory, name: str) -> None:
    server("bytes")

    async def main() -> bytes:
        fut = microcs.AsyncClient(name, timeout=30).call("slow", b"0.2")
        # The client object is gone from here on; its call keeps it alive until it completes.
        return await fut

    assert asyncio.run(main()) == b"slept"
