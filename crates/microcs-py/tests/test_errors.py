"""Every exception class, produced for real across processes, with the library's message."""

from __future__ import annotations

import os
import shutil
import signal
import threading
import time
from pathlib import Path

import pytest

import microcs
from conftest import ServerFactory


def test_hierarchy_and_builtin_bases() -> None:
    kinds = [
        microcs.InvalidName,
        microcs.InvalidConfig,
        microcs.NoService,
        microcs.NameTaken,
        microcs.TimedOut,
        microcs.RemoteError,
        microcs.FrameTooLarge,
        microcs.ProtocolError,
        microcs.PermissionDenied,
        microcs.Closed,
    ]
    for k in kinds:
        assert issubclass(k, microcs.Error)
        assert k.__module__ == "microcs._errors"
    assert issubclass(microcs.TimedOut, TimeoutError)
    assert issubclass(microcs.InvalidName, ValueError)
    assert issubclass(microcs.InvalidConfig, ValueError)
    assert not issubclass(microcs.InvalidConfig, microcs.InvalidName)
    assert issubclass(microcs.PermissionDenied, PermissionError)
    assert issubclass(microcs.NoService, ConnectionError)
    assert issubclass(microcs.Closed, ConnectionError)


def test_invalid_name(runtime_dir: Path) -> None:
    for bad in ["a b", "../x", "", "x" * 200]:
        with pytest.raises(microcs.InvalidName) as e:
            microcs.Client(bad)
        assert "name" in str(e.value)
        with pytest.raises(microcs.InvalidName):
            microcs.Server(lambda b: b, bad)
    with pytest.raises(microcs.InvalidName, match="only letters, digits"):
        microcs.Server(None, "OK_NAME", methods={"no spaces": lambda b: b})
    # The failed constructor did not keep the name.
    with microcs.Server(lambda b: b, "OK_NAME") as s:
        with pytest.raises(microcs.InvalidName, match="reserved"):
            s.method("$ping", lambda b: b)


def test_invalid_method_name_from_the_client(server: ServerFactory, name: str) -> None:
    server("bytes")
    with microcs.Client(name, timeout=10) as c, pytest.raises(microcs.InvalidName):
        c.call("not a method", b"")


def test_no_service(runtime_dir: Path) -> None:
    with pytest.raises(microcs.NoService) as e:
        microcs.Client("NOBODY_HOME", timeout=5)
    assert str(e.value) == f"no service named 'NOBODY_HOME' is running (looked in {runtime_dir})"
    assert isinstance(e.value, ConnectionError)


def test_name_taken_names_the_owner(server: ServerFactory, name: str) -> None:
    proc = server("bytes")
    with pytest.raises(microcs.NameTaken) as e:
        microcs.Server(lambda b: b, name)
    assert e.value.owner_pid == proc.pid
    assert f"taken by process {proc.pid}" in str(e.value)
    # The live server was not disturbed.
    with microcs.Client(name, timeout=10) as c:
        assert c.request(b"still mine") == b"still mine"


def test_timed_out(server: ServerFactory, name: str) -> None:
    server("bytes")
    with microcs.Client(name, timeout=0.3) as c:
        with pytest.raises(microcs.TimedOut) as e:
            c.call("slow", b"3")
        assert isinstance(e.value, TimeoutError)
        assert e.value.may_have_run
        assert "did not answer within" in str(e.value)
        # The client is still usable afterwards; the late reply is not mistaken for this one.
        c.timeout = 10
        assert c.timeout == 10
        assert c.request(b"after") == b"after"


def test_remote_error_from_a_handler_exception(server: ServerFactory, name: str) -> None:
    server("bytes")
    with microcs.Client(name, timeout=10) as c:
        with pytest.raises(microcs.RemoteError) as e:
            c.call("fail", b"glider")
        assert e.value.code == 500
        assert e.value.message == "ValueError: bad board: glider"
        assert str(e.value) == f"service '{name}' answered with error 500: ValueError: bad board: glider"
        assert e.value.may_have_run
        # The server keeps serving, on this connection and on new ones.
        assert c.request(b"next") == b"next"
    with microcs.Client(name, timeout=10) as c:
        assert c.call("upper", b"new connection") == b"NEW CONNECTION"


def test_remote_error_with_a_chosen_code(server: ServerFactory, name: str) -> None:
    server("bytes")
    with microcs.Client(name, timeout=10) as c:
        with pytest.raises(microcs.RemoteError) as e:
            c.call("custom")
        assert (e.value.code, e.value.message) == (400, "send a board to step")
        with pytest.raises(microcs.RemoteError) as e:
            c.call("no_such_method", b"")
        assert e.value.code == 404
        assert "no_such_method" in e.value.message


def test_frame_too_large(server: ServerFactory, name: str) -> None:
    server("small")
    with microcs.Client(name, timeout=10) as c:
        with pytest.raises(microcs.FrameTooLarge) as e:
            c.request(b"x" * 2048)
        assert "over service" in str(e.value) and "nothing was sent" in str(e.value)
        assert c.request(b"x" * 1024) == b"x" * 1024
    # A reply over the client's own limit is refused by the server, which tells the client.
    with microcs.Client(name, timeout=10, max_frame=100) as c:
        with pytest.raises(microcs.FrameTooLarge):
            c.call("big", b"5000")
        assert c.call("big", b"100") == b"x" * 100


def test_protocol_error_for_a_reply_that_is_not_text(server: ServerFactory, name: str) -> None:
    server("binary")  # its default handler answers with bytes that are not UTF-8
    with microcs.Client(name, timeout=10) as c:
        assert c.request(b"abc") == b"\xff\xfeabc"
        with pytest.raises(microcs.ProtocolError) as e:
            c.send_message("hello")
        assert "not UTF-8" in str(e.value)
        # Nothing is lost: the connection still works.
        assert c.call("upper", b"ok") == b"OK"


def test_permission_denied_for_an_unsafe_runtime_dir(runtime_dir: Path) -> None:
    os.chmod(runtime_dir, 0o777)
    try:
        with pytest.raises(microcs.PermissionDenied) as e:
            microcs.Server(lambda b: b, "ANY_NAME")
        assert "0777" in str(e.value)
        assert isinstance(e.value, PermissionError)
        with pytest.raises(microcs.PermissionDenied):
            microcs.list_services()
        with pytest.raises(microcs.PermissionDenied):
            microcs.Client("ANY_NAME", timeout=5)
    finally:
        os.chmod(runtime_dir, 0o700)


def test_closed_after_close(server: ServerFactory, name: str) -> None:
    server("bytes")
    c = microcs.Client(name, timeout=10)
    assert not c.closed
    c.close()
    c.close()  # idempotent
    assert c.closed
    with pytest.raises(microcs.Closed) as e:
        c.request(b"x")
    assert "closed" in str(e.value)
    assert isinstance(e.value, ConnectionError)


def test_closed_when_the_server_dies_mid_request(server: ServerFactory, name: str, tmp_path: Path) -> None:
    proc = server("bytes")
    c = microcs.Client(name, timeout=20)
    errors: list[BaseException] = []
    marker = tmp_path / "handler-started"

    def call() -> None:
        try:
            c.call("slow", f"10 {marker}".encode())
        except BaseException as e:  # the test inspects it
            errors.append(e)

    t = threading.Thread(target=call)
    t.start()
    give_up = time.monotonic() + 20
    while not marker.exists():
        assert time.monotonic() < give_up, "the handler never started"
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    t.join(timeout=30)
    assert len(errors) == 1
    assert isinstance(errors[0], microcs.Closed), repr(errors[0])
    assert errors[0].may_have_run
    c.close()


def test_closed_when_starting_a_stopped_server(runtime_dir: Path, name: str) -> None:
    s = microcs.Server(lambda b: b, name)
    s.stop()
    with pytest.raises(microcs.Closed, match="was stopped"):
        s.start()
    with pytest.raises(microcs.Closed):
        s.method("late", lambda b: b)


def test_a_stopped_server_is_named_as_holding_the_name(server: ServerFactory, name: str) -> None:
    proc = server("bytes")
    os.kill(proc.pid, signal.SIGSTOP)
    try:
        with pytest.raises(microcs.TimedOut) as e:
            microcs.Client(name, timeout=1)
        message = str(e.value)
        assert f"service '{name}' (pid {proc.pid}) holds the name but is not answering" in message
        assert message.endswith("stopped or overloaded?")
        assert "microcs service" not in message
    finally:
        os.kill(proc.pid, signal.SIGCONT)
    with microcs.Client(name, timeout=10) as c:
        assert c.request(b"awake") == b"awake"


def test_serve_raises_name_taken_when_the_name_was_taken_while_its_files_were_gone(
    server: ServerFactory, name: str, runtime_dir: Path
) -> None:
    first = server("bytes")
    # Stopped, the first server cannot look before this process owns the name.
    os.kill(first.pid, signal.SIGSTOP)
    try:
        shutil.rmtree(runtime_dir)
        second = microcs.Server(lambda b: b, name)
        second.start()
    finally:
        os.kill(first.pid, signal.SIGCONT)
    try:
        _, err = first.communicate(timeout=20)
        assert first.returncode == 1
        text = err.decode(errors="replace")
        assert f"NameTaken: service '{name}' stops" in text, text
        assert f"now belongs to process {os.getpid()}" in text, text
        assert [s.pid for s in microcs.list_services(runtime_dir) if s.name == name] == [os.getpid()]
        with microcs.Client(name, timeout=10) as c:
            assert c.request(b"mine") == b"mine"
    finally:
        second.stop()
