"""The pure-Python client (``microcs_lite.Client``, in this process) against the test server of
peers/serve.py in another process, served once by ``microcs_lite`` and once by the compiled
package (the Rust blocking server): the same calls, the same answers, the same exceptions."""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import microcs_lite as lite
from conftest import LITE, Interrupted, ServerFactory, interrupted_after, stop_process


@pytest.fixture(params=["lite", "compiled"])
def impl(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """Which implementation serves: the servers `server` starts read it from the environment."""
    if request.param == "lite":
        monkeypatch.setenv("PEER_LITE", "1")
        monkeypatch.setenv("PYTHONPATH", str(LITE))
    yield str(request.param)


def wait_for(path: Path, what: str) -> None:
    give_up = time.monotonic() + 20
    while not path.exists():
        assert time.monotonic() < give_up, f"{what} did not happen within 20 s"
        time.sleep(0.01)


def test_requests_methods_and_builtins(impl: str, server: ServerFactory, name: str) -> None:
    proc = server("bytes")
    with lite.Client(name, timeout=10) as c:
        assert c.server_pid == proc.pid
        assert c.request(b"abc") == b"abc"
        assert c.request(bytearray(b"\x00\xff")) == b"\x00\xff"
        assert c.request(b"") == b""
        assert c.call("upper", b"abc") == b"ABC"
        assert c.send_message("héllo") == "héllo"
        seen = json.loads(c.call("request", b"x"))
        assert (seen["method"], seen["pid"], seen["uid"], seen["payload_type"]) == ("request", os.getpid(), os.geteuid(), "bytes")
        # The deadline went with the request: what the handler sees is what is left of 10 s.
        assert 0 < seen["remaining"] <= 10
        ping = c.ping()
        assert (ping["type"], ping["name"], ping["metadata"]["pid"]) == ("io.nats.micro.v1.ping_response", name, str(proc.pid))
        info = c.info()
        assert [e["name"] for e in info["endpoints"]][:2] == ["default", "big"]
        assert {"name": "upper", "subject": f"{name}.upper", "queue_group": "q", "metadata": None} in info["endpoints"]
        stats = {e["name"]: e for e in c.stats()["endpoints"]}
        assert stats["upper"]["num_requests"] == 1 and stats["default"]["num_requests"] == 4
        assert c.stats()["id"] == ping["id"] == info["id"]
    with pytest.raises(lite.Closed):
        c.request(b"after close")


def test_handler_errors_are_remote_errors_with_their_codes(impl: str, server: ServerFactory, name: str) -> None:
    server("bytes")
    with lite.Client(name, timeout=10) as c:
        with pytest.raises(lite.RemoteError) as e:
            c.call("fail", b"x")
        assert (e.value.code, e.value.message, e.value.may_have_run) == (500, "ValueError: bad board: x", True)
        assert str(e.value) == f"service '{name}' answered with error 500: ValueError: bad board: x"
        with pytest.raises(lite.RemoteError) as e:
            c.call("custom")
        assert (e.value.code, e.value.message) == (400, "send a board to step")
        with pytest.raises(lite.RemoteError) as e:
            c.call("none")
        assert e.value.code == 500 and "NoneType" in e.value.message
        with pytest.raises(lite.RemoteError) as e:
            c.call("jump")
        assert e.value.code == 404 and e.value.may_have_run is False
        assert f"service '{name}' has no method 'jump' (it has: big, binary, " in e.value.message
        with pytest.raises(lite.InvalidName):
            c.call("not a method")
        # The connection survived all of it.
        assert c.request(b"still here") == b"still here"


def test_a_reply_that_is_not_text(impl: str, server: ServerFactory, name: str) -> None:
    server("binary")
    with lite.Client(name, timeout=10) as c, pytest.raises(lite.ProtocolError, match="not UTF-8 text"):
        c.send_message("x")


def test_payload_limits_both_ways(impl: str, server: ServerFactory, name: str) -> None:
    server("small")  # the server accepts requests of at most 1024 bytes
    with lite.Client(name, timeout=10, max_frame=1000) as c:
        assert c.request(b"x" * 1000) == b"x" * 1000
        with pytest.raises(lite.FrameTooLarge, match="nothing was sent") as e:
            c.request(b"x" * 1025)
        assert e.value.may_have_run is False
        # A reply over this client's own limit is refused by the server, after the handler ran.
        with pytest.raises(lite.FrameTooLarge) as e:
            c.call("big", b"1001")
        assert e.value.may_have_run is True
        assert c.call("big", b"1000") == b"x" * 1000


def test_a_mebibyte_each_way(impl: str, server: ServerFactory, name: str) -> None:
    server("bytes")
    payload = os.urandom(1 << 20)
    with lite.Client(name, timeout=20) as c:
        for _ in range(3):
            assert c.request(payload) == payload
        assert c.call("big", b"%d" % (4 << 20)) == b"x" * (4 << 20)


def test_no_service_at_once(runtime_dir: Path) -> None:
    with pytest.raises(lite.NoService, match=f"no service named 'NOBODY' is running \\(looked in {runtime_dir}\\)"):
        lite.Client("NOBODY", timeout=3600)
    with pytest.raises(lite.NoService):
        lite.Client("NOBODY", runtime_dir=runtime_dir / "missing")


def test_a_timeout_may_have_run_and_the_connection_keeps_working(
    impl: str, server: ServerFactory, name: str, tmp_path: Path
) -> None:
    server("bytes")
    with lite.Client(name, timeout=0.5) as c:
        pid = c.server_pid
        # Whichever side notices the shared deadline first speaks: the client's own timeout, or
        # the server's 408 (FLAG_SYSTEM, no FLAG_NOT_RUN); both say the request may have run.
        with pytest.raises(lite.TimedOut, match="the request may have run") as e:
            c.call("slow", b"2")
        assert e.value.may_have_run is True
        # Same connection; the late answer of the abandoned request is never taken for this one.
        assert c.request(b"after") == b"after"
        assert c.server_pid == pid
        assert json.loads(c.call("request"))["remaining"] <= 0.5


def test_an_interrupted_wait_cancels_the_request_on_the_server(
    impl: str, server: ServerFactory, name: str, tmp_path: Path
) -> None:
    server("bytes")
    marker = tmp_path / "cancelled"
    with lite.Client(name, timeout=60) as c:
        with interrupted_after(0.3), pytest.raises(Interrupted):
            c.call("watch", str(marker).encode())
        # Long before its 60 s deadline, the handler saw the Cancel the client sent.
        wait_for(marker, "the handler seeing the cancellation")
        assert c.request(b"after") == b"after"


def test_reconnects_after_the_server_restarts(impl: str, server: ServerFactory, name: str) -> None:
    first = server("bytes")
    with lite.Client(name, timeout=10) as c:
        assert c.request(b"one") == b"one"
        for how in ("terminate", "kill"):
            getattr(first, how)()
            first.wait(timeout=10)
            stop_process(first)
            first = server("bytes")
            # The old connection is dead before a byte of this request is written: it is sent
            # again, on a new connection, to the new server.
            assert c.request(b"two") == b"two"
            assert c.server_pid == first.pid


def test_a_server_killed_mid_request_may_have_run(impl: str, server: ServerFactory, name: str, tmp_path: Path) -> None:
    proc = server("bytes")
    marker = tmp_path / "running"
    with lite.Client(name, timeout=20) as c:
        def kill() -> None:
            wait_for(marker, "the handler starting")
            proc.kill()

        killer = threading.Thread(target=kill)
        killer.start()
        with pytest.raises(lite.Closed, match="the request may have run") as e:
            c.call("slow", f"10 {marker}".encode())
        killer.join()
        proc.wait(timeout=10)
        assert e.value.may_have_run is True
        # Not sent again: nobody serves the name now.
        with pytest.raises(lite.NoService):
            c.request(b"x")


def test_shutdown_drains_running_requests_and_does_not_run_new_ones(
    impl: str, server: ServerFactory, name: str, tmp_path: Path
) -> None:
    proc = server("bytes")
    marker = tmp_path / "running"
    slow, other = lite.Client(name, timeout=20), lite.Client(name, timeout=20)
    result: list[bytes] = []
    t = threading.Thread(target=lambda: result.append(slow.call("slow", f"1.0 {marker}".encode())))
    t.start()
    wait_for(marker, "the slow handler starting")
    assert other.call("stop") == b"stopping"
    # The name is free at once; `other`'s connection is shut for reading, so this request is
    # provably not run (EPIPE, or 503 FLAG_NOT_RUN), sent once more, and finds nobody.
    with pytest.raises(lite.NoService) as e:
        other.request(b"late")
    assert e.value.may_have_run is False
    t.join(timeout=20)
    assert result == [b"slept"]
    assert proc.wait(timeout=20) == 0


def test_list_shows_the_running_service(impl: str, server: ServerFactory, name: str, runtime_dir: Path) -> None:
    proc = server("bytes")
    (found,) = [s for s in lite.list() if s.name == name]
    assert (found.pid, found.uid, found.protocol_version, found.where) == (proc.pid, os.geteuid(), 1, ["local"])
    assert "upper" in found.methods and found.socket == str(runtime_dir / f"{name}.sock")
    assert time.time() - 60 < (found.started or 0) <= time.time()
    assert [s.name for s in lite.list_services(runtime_dir)] == [s.name for s in lite.list()]


def test_threads_take_turns_on_one_client(impl: str, server: ServerFactory, name: str) -> None:
    server("bytes")
    bad: list[str] = []
    with lite.Client(name, timeout=20) as c:
        def work(i: int) -> None:
            for j in range(100):
                msg = f"{i}-{j}".encode()
                if c.request(msg) != msg:
                    bad.append(msg.decode())

        threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
    assert bad == []


def test_slow_handlers_run_side_by_side(impl: str, server: ServerFactory, name: str) -> None:
    server("bytes")
    most: list[int] = []
    clients = [lite.Client(name, timeout=20) for _ in range(3)]
    threads = [threading.Thread(target=lambda c=c: most.append(int(c.call("concurrency")))) for c in clients]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=20)
    assert max(most) == 3
