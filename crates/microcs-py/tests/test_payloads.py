"""Text versus bytes, what handlers may return, and large payloads."""

from __future__ import annotations

import json

import pytest

import microcs
from conftest import ServerFactory


def test_bytes_server_receives_bytes_and_may_answer_str(server: ServerFactory, name: str) -> None:
    server("bytes")
    with microcs.Client(name, timeout=10) as c:
        assert c.request(b"\x00\x01binary\xff") == b"\x00\x01binary\xff"
        info = json.loads(c.call("request", b"abc"))
        assert info["payload_type"] == "bytes"
        assert c.send_message("héllo wörld") == "héllo wörld"
        # bytearray and memoryview are accepted as payloads too.
        assert c.request(bytearray(b"ba")) == b"ba"
        assert c.request(memoryview(b"xmvx")[1:3]) == b"mv"
        assert c.request(b"") == b""


def test_text_server_receives_str(server: ServerFactory, name: str) -> None:
    server("text")
    with microcs.Client(name, timeout=10) as c:
        assert c.send_message("grüße") == "echo: grüße"
        assert c.request("grüße".encode()) == "echo: grüße".encode()
        info = json.loads(c.call("request", "ünï".encode()))
        assert info["payload_type"] == "str"
        assert info["payload"] == "ünï"
        # Bytes that are not UTF-8 cannot reach a text handler: the caller is told, nothing runs.
        with pytest.raises(microcs.RemoteError) as e:
            c.request(b"\xff\xfe")
        assert e.value.code == 400
        assert "not UTF-8" in e.value.message
        assert c.send_message("still here") == "echo: still here"


def test_str_payload_to_request_is_a_type_error(server: ServerFactory, name: str) -> None:
    server("bytes")
    with microcs.Client(name, timeout=10) as c:
        with pytest.raises(TypeError, match="send_message"):
            c.request("text")  # type: ignore[arg-type]
        with pytest.raises(TypeError, match="not int"):
            c.request(42)  # type: ignore[arg-type]


def test_a_handler_returning_none_is_reported_to_the_caller(server: ServerFactory, name: str) -> None:
    server("bytes")
    with microcs.Client(name, timeout=10) as c:
        with pytest.raises(microcs.RemoteError) as e:
            c.call("none", b"")
        assert e.value.code == 500
        assert "returned NoneType" in e.value.message
        assert c.request(b"fine") == b"fine"


def test_8_mib_payload_round_trip(server: ServerFactory, name: str) -> None:
    server("bytes")
    payload = bytes(range(256)) * (8 * 1024 * 1024 // 256)
    assert len(payload) == 8 * 1024 * 1024
    with microcs.Client(name, timeout=60) as c:
        assert c.request(payload) == payload
        assert c.call("upper", payload) == payload.upper()
        big = c.call("big", str(8 * 1024 * 1024).encode())
        assert big == b"x" * (8 * 1024 * 1024)


def test_payloads_are_never_unpickled(server: ServerFactory, name: str) -> None:
    import pickle

    class Boom:
        def __reduce__(self) -> tuple[object, tuple[str]]:
            return (print, ("unpickled!",))

    evil = pickle.dumps(Boom())
    proc = server("bytes")
    with microcs.Client(name, timeout=10) as c:
        assert c.request(evil) == evil
        assert json.loads(c.call("request", evil))["payload_type"] == "bytes"
        assert c.call("stop") == b"stopping"
    assert proc.wait(timeout=30) == 0
    assert proc.stdout is not None
    assert proc.stdout.read() == b"stopped cleanly\n"  # and not "unpickled!"


def test_large_payloads_of_changing_sizes_reuse_no_stale_bytes(server: ServerFactory, name: str) -> None:
    # The client reads a large reply into the vector of the one before when it is big enough,
    # and the server copies a large reply into the request's vector and reads the next large
    # request into the last reply's: every size order, and replies whose content differs from
    # the request, must come back exact.
    server("bytes")
    with microcs.Client(name, timeout=60) as c:
        for size in (1 << 20, 2 << 20, 100_000, 70_000, 1 << 20, 65_536, 3_000_000):
            payload = bytes((i * 7 + size) % 251 for i in range(251)) * (size // 251) + b"t" * (size % 251)
            assert len(payload) == size
            assert c.request(payload) == payload
            assert c.call("upper", payload) == payload.upper()
            assert c.call("big", str(size // 2).encode()) == b"x" * (size // 2)
            # A small answer between large ones.
            assert c.request(b"small") == b"small"
