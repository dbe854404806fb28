"""Shared memory (docs/PROTOCOL.md § 18) from Python: ``Client``/``AsyncClient(shared_memory=)``
and ``Server(shared_memory=)``, across processes, with the socket as the silent fallback."""

from __future__ import annotations

import asyncio

import pytest

import microcs
from conftest import ServerFactory


@pytest.fixture
def shm_server(server: ServerFactory, monkeypatch: pytest.MonkeyPatch) -> ServerFactory:
    """`server`, offering shared memory."""
    monkeypatch.setenv("PEER_SHM", "1")
    return server


def test_a_client_that_asks_moves_to_shared_memory_and_answers_as_on_the_socket(
    shm_server: ServerFactory, name: str
) -> None:
    shm_server("streams")
    with microcs.Client(name, shared_memory=True) as c:
        assert c.request(b"hello") == b"hello"
        assert c.local_transport == "shm"
        assert c.call("upper", b"abc") == b"ABC"
        # Larger than a ring (256 KiB) both ways.
        big = bytes(range(256)) * 8192
        assert c.request(big) == big
        assert len(c.call("big", b"3000000")) == 3_000_000
        assert list(c.stream("count", b"200")) == [str(i).encode() for i in range(200)]
        with pytest.raises(microcs.RemoteError):
            c.call("fail")
        assert c.info()["metadata"]["transport"] == "shm"
        stats = c.stats()["metadata"]
        assert (stats["connections_shm"], stats["connections_unix"]) == ("1", "0")


def test_without_asking_or_without_an_offer_the_socket_is_used(
    server: ServerFactory, name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    server("bytes")  # offers nothing
    with microcs.Client(name, shared_memory=True) as c:
        assert c.request(b"x") == b"x"
        assert c.local_transport == "unix"
    monkeypatch.setenv("PEER_SHM", "1")
    server("bytes", name=name + "_SHM")
    with microcs.Client(name + "_SHM") as c:
        assert c.local_transport == "unix", "off by default"
    monkeypatch.setenv("MICROCS_SHM", "1")
    with microcs.Client(name + "_SHM") as c:
        assert c.request(b"y") == b"y"
        assert c.local_transport == "shm", "MICROCS_SHM=1 asks"
    with microcs.Client(name + "_SHM", shared_memory=False) as c:
        assert c.local_transport == "unix", "the argument wins over the environment"


def test_async_client_over_shared_memory(shm_server: ServerFactory, name: str) -> None:
    shm_server("streams")

    async def main() -> tuple[list[bytes], str | None, list[bytes]]:
        async with microcs.AsyncClient(name, shared_memory=True) as c:
            replies = await asyncio.gather(*(c.call("upper", b"r%d" % i) for i in range(500)))
            items = [item async for item in c.stream("count", b"50")]
            return replies, c.local_transport, items

    replies, transport, items = asyncio.run(main())
    assert replies == [b"R%d" % i for i in range(500)]
    assert transport == "shm"
    assert items == [str(i).encode() for i in range(50)]


def test_a_python_server_offers_shared_memory_to_a_client_in_this_process(name: str, runtime_dir: object) -> None:
    def echo(data: bytes) -> bytes:
        return data

    with microcs.Server(echo, name, shared_memory=True) as server:
        server.start()
        with microcs.Client(name, shared_memory=True) as c:
            assert c.request(b"in one process") == b"in one process"
            assert c.local_transport == "shm"


def test_a_server_with_small_rings_carries_larger_frames_through_them(
    shm_server: ServerFactory, name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PEER_SHM_RING", "4096")  # Server(shm_ring=4096) in the serving process
    proc = shm_server("bytes")
    with microcs.Client(name, shared_memory=True) as c:
        for n in (100, 4096, 4097, 300_000):
            data = bytes(i % 251 for i in range(n))
            assert c.request(data) == data, n
        assert c.local_transport == "shm"
        # The server's region: a 4 KiB header page and two rings of 4 KiB.
        with open(f"/proc/{proc.pid}/maps") as maps:
            sizes = [int(b, 16) - int(a, 16) for a, b in
                     (line.split()[0].split("-") for line in maps if "microcs-shm" in line)]
        assert sizes == [4096 + 2 * 4096]


@pytest.mark.parametrize("size", [0, 1000, 5000, 2048, 128 << 20])
def test_a_ring_size_out_of_bounds_is_refused(name: str, runtime_dir: object, size: int) -> None:
    with pytest.raises(microcs.InvalidConfig, match="power of two from 4 KiB to 64 MiB"):
        microcs.Server(lambda data: data, name, shared_memory=True, shm_ring=size)
