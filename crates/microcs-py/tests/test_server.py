"""Server features: methods, the Request object, start/stop/serve, context managers."""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

import pytest

import microcs
from conftest import PEERS, ServerFactory, wait_gone


def test_request_object_tells_method_peer_and_deadline(server: ServerFactory, name: str) -> None:
    server("bytes")
    with microcs.Client(name, timeout=7.5) as c:
        sent_at = time.monotonic()
        info = json.loads(c.call("request", b"board"))
    assert info["method"] == "request"
    assert info["payload"] == info["req_payload"] == "board"
    assert (info["pid"], info["uid"], info["gid"]) == (os.getpid(), os.getuid(), os.getgid())
    assert info["id"] >= 1
    assert 0 < info["remaining"] <= 7.5
    # The deadline is on the monotonic clock (shared by processes on one machine).
    assert sent_at < info["deadline"] <= sent_at + 7.5 + 0.5
    assert info["deadline"] > info["monotonic"]
    assert info["cancelled"] is False
    assert info["repr"].startswith("<microcs.Request id=")


def test_default_handler_sees_no_method(runtime_dir: Path, name: str) -> None:
    seen: list[str | None] = []

    def handler(data: bytes, req: microcs.Request) -> bytes:
        seen.append(req.method)
        return data

    with microcs.Server(handler, name), microcs.Client(name, timeout=10) as c:
        assert c.request(b"x") == b"x"
    assert seen == [None]


def test_methods_by_dict_by_decorator_and_by_call(runtime_dir: Path, name: str) -> None:
    server = microcs.Server(None, name, methods={"one": lambda b: b"1" + b})

    @server.method("two")
    def two(data: bytes) -> bytes:
        return b"2" + data

    def three(data: bytes, req: microcs.Request) -> str:
        return f"3{data.decode()}{req.method}"

    assert server.method("three", three) is three
    assert two(b"direct") == b"2direct"  # the decorator returns the function itself
    with pytest.raises(microcs.InvalidName, match="twice"):
        server.method("two", two)
    with server:
        assert [sorted(s.methods) for s in microcs.list_services() if s.name == name] == [["one", "three", "two"]]
        with microcs.Client(name, timeout=10) as c:
            assert c.call("one", b"a") == b"1a"
            assert c.call("two", b"b") == b"2b"
            assert c.call("three", b"c") == b"3cthree"
            with pytest.raises(microcs.RemoteError) as e:
                c.request(b"no default")
            assert e.value.code == 404
            assert "no default handler" in e.value.message
            assert {ep["name"] for ep in c.info()["endpoints"]} >= {"one", "two", "three"}
            assert c.ping()["name"] == name
            assert c.server_pid == os.getpid()
        with pytest.raises(RuntimeError, match="before start"):
            server.method("four", lambda b: b)
        assert sum(ep["num_requests"] for ep in server.stats()["endpoints"]) >= 4


def test_handler_must_be_callable(runtime_dir: Path, name: str) -> None:
    with pytest.raises(TypeError, match="callable"):
        microcs.Server("not a function", name)  # type: ignore[call-overload]
    with pytest.raises(TypeError, match="mapping"):
        microcs.Server(None, name, methods=[1, 2])  # type: ignore[call-overload]


def test_context_manager_serves_and_frees_the_name(runtime_dir: Path, name: str) -> None:
    with microcs.Server(lambda b: b[::-1], name) as server:
        assert server.running
        with microcs.Client(name, timeout=10) as c:
            assert c.request(b"abc") == b"cba"
    assert not server.running
    assert "stopped" in repr(server)
    wait_gone(name, runtime_dir)
    assert list(runtime_dir.iterdir()) == []
    with pytest.raises(microcs.NoService):
        microcs.Client(name, timeout=5)


def test_an_unstarted_server_frees_the_name_on_stop(runtime_dir: Path, name: str) -> None:
    server = microcs.Server(lambda b: b, name)
    # Claimed (a second server is refused) but not listed until it serves.
    with pytest.raises(microcs.NameTaken):
        microcs.Server(lambda b: b, name)
    assert microcs.list_services() == []
    server.stop()
    assert microcs.list_services() == []
    microcs.Server(lambda b: b, name).stop()


def test_serve_returns_after_its_timeout(runtime_dir: Path, name: str) -> None:
    server = microcs.Server(lambda b: b, name)
    server.serve(timeout=0.2)
    assert not server.running
    assert microcs.list_services() == []


def test_stop_from_another_thread_ends_start_listening(runtime_dir: Path, name: str) -> None:
    server = microcs.Server(lambda b: b, name)
    stopper = threading.Timer(0.3, server.stop)
    stopper.start()
    server.start_listening()  # returns once stopped
    stopper.join()
    assert microcs.list_services() == []


def test_stop_from_a_handler_in_another_process(server: ServerFactory, name: str, runtime_dir: Path) -> None:
    proc = server("bytes")
    with microcs.Client(name, timeout=10) as c:
        assert c.call("stop") == b"stopping"
    assert proc.wait(timeout=30) == 0
    assert proc.stdout is not None
    assert proc.stdout.read() == b"stopped cleanly\n"
    wait_gone(name, runtime_dir)


def test_list_services_and_runtime_dir(server: ServerFactory, name: str, runtime_dir: Path) -> None:
    proc = server("bytes")
    assert microcs.runtime_dir() == str(runtime_dir)
    (info,) = microcs.list_services()
    assert (info.name, info.pid, info.uid) == (name, proc.pid, os.getuid())
    assert "upper" in info.methods and "stop" in info.methods
    assert info.socket == str(runtime_dir / f"{name}.sock")
    # A local service reports everything (only NATS services may leave some of it None).
    assert info.started is not None and abs(info.started - time.time()) < 3600
    assert info.protocol_version is not None and info.protocol_version >= 1
    assert (info.where, info.host) == (["local"], None)
    assert name in repr(info)
    assert microcs.list_services(runtime_dir=runtime_dir)[0].name == name


def test_many_servers_in_one_process(runtime_dir: Path, name: str) -> None:
    servers = [microcs.Server(lambda b, i=i: b + str(i).encode(), f"{name}.{i}") for i in range(5)]
    for s in servers:
        s.start()
    for i in range(5):
        with microcs.Client(f"{name}.{i}", timeout=10) as c:
            assert c.request(b"n") == f"n{i}".encode()
    for s in servers:
        s.stop()
    assert microcs.list_services() == []


def test_interpreter_exit_stops_a_background_server(
    server: ServerFactory, name: str, runtime_dir: Path
) -> None:
    proc = server("-", script=PEERS / "exit_while_serving.py")
    client = microcs.Client(name, timeout=10)  # an open connection while the server exits
    assert client.request(b"x") == b"x"
    assert client.request(b"bye") == b"bye"
    assert proc.wait(timeout=30) == 0
    assert proc.stdout is not None and proc.stderr is not None
    assert proc.stdout.read() == b"leaving without stop()\n"
    assert proc.stderr.read() == b""
    wait_gone(name, runtime_dir)
    assert list(runtime_dir.iterdir()) == []
    with pytest.raises((microcs.Closed, microcs.NoService)):
        client.request(b"after exit")
    client.close()
