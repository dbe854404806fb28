"""The hostile-input cases of docs/RELIABILITY.md that apply to a server, against microcs_lite's.

Raw sockets speak (or break) the protocol byte by byte against a pure server in this process,
or in another (peers/serve.py under ``PEER_LITE``); after each case a well-behaved client is
still served.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Optional

import pytest

import microcs
import microcs_lite as lite
from conftest import LITE, ServerFactory

HELLO = lite.encode(lite.HELLO, 0, struct.pack(">I", lite.DEFAULT_MAX_PAYLOAD))
SYSTEM_NOT_RUN = lite.FLAG_SYSTEM | lite.FLAG_NOT_RUN
LiteServer = Callable[..., lite.Server]


@pytest.fixture
def serve(runtime_dir: Path, name: str) -> Iterator[LiteServer]:
    """Starts a pure server for `name` in this process (options as ``microcs_lite.Server``'s)."""
    servers: list[lite.Server] = []

    def start(handler: Optional[Callable[..., Any]] = None, **options: Any) -> lite.Server:
        s = lite.Server(handler or (lambda b: b), name, **options)
        s.start()
        servers.append(s)
        return s

    yield start
    for s in servers:
        s.stop()


def connect(runtime_dir: Path, name: str, hello: bool = True) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(20)
    s.connect(str(runtime_dir / f"{name}.sock"))
    if hello:
        s.sendall(HELLO)
        ack = frames(s, 1)[0]
        assert ack.kind == lite.HELLO_ACK
    return s


def frames(s: socket.socket, count: Optional[int] = None) -> list[lite.Frame]:
    """Reads `count` frames, or (None) every frame until the server closes."""
    buf = bytearray()
    out: list[lite.Frame] = []
    while count is None or len(out) < count:
        r = lite.decode(buf, lite.DEFAULT_MAX_PAYLOAD)
        if isinstance(r, tuple):
            out.append(r[0])
            del buf[: r[1]]
            continue
        try:
            data = s.recv(65536)
        except ConnectionResetError:
            data = b""
        if not data:
            assert count is None and not buf, f"closed after {len(out)} frames and {len(buf)} bytes"
            break
        buf += data
    return out


def still_served(name: str) -> None:
    with lite.Client(name, timeout=10) as c:
        assert c.request(b"still served") == b"still served"


BAD = {
    "giant length": (b"\xff\xff\xff\xff", 413),
    "http": (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", 413),
    "too short": (b"\x00\x00\x00\x03\x01\x02\x03", 400),
    "version 2": (bytes.fromhex("000000140207000000000000000000010000000000000000"), 505),
    "method too long": (bytes.fromhex("000000550103000000000000000000010000004100000000"), 400),
}


@pytest.mark.parametrize("case", sorted(BAD))
@pytest.mark.parametrize("after_hello", [False, True], ids=["first", "after-hello"])
def test_bytes_that_are_not_frames_get_an_error_then_a_close(
    serve: LiteServer, runtime_dir: Path, name: str, case: str, after_hello: bool
) -> None:
    serve()
    wire, status = BAD[case]
    s = connect(runtime_dir, name, hello=after_hello)
    s.sendall(wire)
    (err,) = frames(s)
    assert (err.kind, err.id, err.status, err.flags) == (lite.ERROR, 0, status, lite.FLAG_SYSTEM)
    still_served(name)


def test_a_declared_size_over_the_limit_is_refused_before_the_payload_comes(serve: LiteServer, runtime_dir: Path, name: str) -> None:
    serve(max_frame=1024)
    s = connect(runtime_dir, name)
    # Only the prefix and header of a 10 MB request go out: the answer comes without the payload.
    s.sendall(lite.encode_header(lite.REQUEST, 1, 0, 10_000_000, deadline_ms=1000))
    (err,) = frames(s)
    assert (err.status, err.payload) == (413, b"frame of 10000020 bytes is over the limit of 1024 bytes")
    still_served(name)


def test_random_bytes_and_truncated_frames_are_closed_quietly(serve: LiteServer, runtime_dir: Path, name: str) -> None:
    serve()
    s = connect(runtime_dir, name)
    try:
        s.sendall(os.urandom(1 << 20))
    except OSError:
        pass  # the server may close before it has all of it
    assert all(f.kind == lite.ERROR and f.id == 0 for f in frames(s))
    s = connect(runtime_dir, name)
    s.sendall(lite.encode(lite.REQUEST, 1, b"half of it", deadline_ms=1000)[:-4])
    s.shutdown(socket.SHUT_WR)
    assert frames(s) == []
    still_served(name)


def test_a_trickling_peer_is_cut_off_by_the_frame_timeout(serve: LiteServer, runtime_dir: Path, name: str) -> None:
    serve(frame_timeout=0.5)
    s = connect(runtime_dir, name)
    wire = lite.encode(lite.REQUEST, 1, b"x" * 100, deadline_ms=60_000)
    s.settimeout(0.1)
    answer = b""
    for i in range(len(wire) - 1):  # a byte every 100 ms: each read is quick, the frame is not
        s.sendall(wire[i : i + 1])
        try:
            answer = s.recv(65536)
            break
        except socket.timeout:
            continue
    assert answer, "the server waited for the whole trickled frame"
    s.settimeout(20)
    (err, *_) = lite.decode(answer, 1 << 16)  # type: ignore[misc]
    assert (err.id, err.status, err.payload) == (0, 408, b"frame not completed within 500ms")
    assert s.recv(100) == b""
    still_served(name)


def test_silent_connections_are_closed_after_the_handshake_timeout_and_capped(serve: LiteServer, runtime_dir: Path, name: str) -> None:
    serve(handshake_timeout=0.3)
    silent = connect(runtime_dir, name, hello=False)
    assert silent.recv(100) == b""  # closed without a frame
    # A flood of silent connections: the oldest make room, a real client is still served.
    flood = [connect(runtime_dir, name, hello=False) for _ in range(100)]
    still_served(name)
    for f in flood:
        f.close()


def test_the_first_frame_must_be_a_hello(serve: LiteServer, runtime_dir: Path, name: str) -> None:
    serve()
    s = connect(runtime_dir, name, hello=False)
    s.sendall(lite.encode(lite.PING, 1, b"hi"))
    (err,) = frames(s)
    assert (err.status, err.flags, err.payload) == (400, SYSTEM_NOT_RUN, b"expected a Hello frame first")


def test_bad_frames_get_per_request_errors_and_the_connection_stays(serve: LiteServer, runtime_dir: Path, name: str) -> None:
    serve()
    s = connect(runtime_dir, name)
    wire = b"".join([
        lite.encode(lite.REQUEST, 1, b"flags", flags=4, deadline_ms=1000),
        lite.encode(lite.REQUEST, 0, b"id 0", deadline_ms=1000),
        lite.encode(42, 5),
        lite.encode(lite.REPLY, 6, b"a reply?"),
        lite.encode(lite.HELLO, 7, b"\0\0\0\0"),
        lite.encode(lite.PING, 9, b"hi"),
        lite.encode(lite.PONG, 10),
        lite.encode(lite.CANCEL, 11),
        lite.encode(lite.REQUEST, 12, b"", b"\xff\xfe", deadline_ms=1000),
        *[lite.encode(lite.REQUEST, 100 + i, b"%d" % i, deadline_ms=60_000) for i in range(1000)],
    ])
    s.sendall(wire)
    got = {f.id: f for f in frames(s, 1007)}
    assert (got[1].status, got[1].flags, got[1].payload) == (400, SYSTEM_NOT_RUN, b"request has unknown flags 0x0004")
    assert (got[0].status, got[0].payload) == (400, b"request id 0 is reserved")
    assert (got[5].status, got[5].payload) == (400, b"unknown frame kind 42")
    assert got[6].payload == b"a client may not send Reply frames here"
    assert got[7].payload == b"a client may not send Hello frames here"
    assert (got[9].kind, got[9].payload) == (lite.PONG, b"hi")
    assert (got[12].status, got[12].payload) == (400, b"method name is not UTF-8")
    # A thousand requests in one write: a thousand replies, each to its own request.
    assert all(got[100 + i].kind == lite.REPLY and got[100 + i].payload == b"%d" % i for i in range(1000))
    # One frame a byte at a time, on the same connection.
    for b in lite.encode(lite.REQUEST, 2000, b"slowly", deadline_ms=60_000):
        s.send(bytes([b]))
    assert frames(s, 1)[0][:3] == (lite.REPLY, 0, 2000)


def test_a_duplicate_id_in_flight_is_refused_under_that_id(serve: LiteServer, runtime_dir: Path, name: str) -> None:
    def slow(b: bytes) -> bytes:
        time.sleep(0.5)
        return b

    serve(slow)
    s = connect(runtime_dir, name)
    s.sendall(lite.encode(lite.REQUEST, 3, b"first", deadline_ms=60_000) + lite.encode(lite.REQUEST, 3, b"again", deadline_ms=60_000))
    first, second = frames(s, 2)
    assert (first.id, first.status, first.payload) == (3, 400, b"request id 3 is already in flight")
    assert (second.id, second.kind, second.payload) == (3, lite.REPLY, b"first")


def test_requests_read_during_shutdown_are_not_run(serve: LiteServer, runtime_dir: Path, name: str) -> None:
    ran: list[bytes] = []

    def slow(b: bytes) -> bytes:
        ran.append(b)
        time.sleep(0.5)
        return b

    # One request at a time per connection: the second waits, unread, behind the first.
    server = serve(slow, max_in_flight=1)
    s = connect(runtime_dir, name)
    s.sendall(lite.encode(lite.REQUEST, 1, b"running", deadline_ms=60_000) + lite.encode(lite.REQUEST, 2, b"queued", deadline_ms=60_000))
    time.sleep(0.2)
    stopper = threading.Thread(target=server.stop)
    stopper.start()
    got = {f.id: f for f in frames(s)}  # both answered, then the connection closes
    stopper.join()
    assert (got[1].kind, got[1].payload) == (lite.REPLY, b"running")
    assert (got[2].status, got[2].flags, got[2].payload) == (503, SYSTEM_NOT_RUN, f"service '{name}' is shutting down".encode())
    assert ran == [b"running"]
    assert not (runtime_dir / f"{name}.sock").exists() and lite.list() == []


def test_the_connection_limit_answers_busy(serve: LiteServer, runtime_dir: Path, name: str) -> None:
    serve(max_connections=2)
    held = [connect(runtime_dir, name) for _ in range(2)]
    s = connect(runtime_dir, name, hello=False)
    (err,) = frames(s)
    assert (err.status, err.flags) == (503, SYSTEM_NOT_RUN)
    assert err.payload == f"service '{name}' is at its limit of 2 connections; try again later".encode()
    held[0].close()
    time.sleep(0.1)
    still_served(name)


OTHER_USER_CLIENT = """
import socket, struct, sys
s = socket.socket(socket.AF_UNIX)
s.settimeout(20)
s.connect(sys.argv[1])
try:
    s.sendall(struct.pack(">IBBHQHHI", 24, 1, 1, 0, 0, 0, 0, 0) + struct.pack(">I", 1 << 24))
except OSError:
    pass
data = b""
while True:
    try:
        more = s.recv(65536)
    except ConnectionResetError:  # the server closed without reading our hello
        more = b""
    if not more:
        break
    data += more
_, _, kind, flags, id, status, _, _ = struct.unpack_from(">IBBHQHHI", data)
print(kind, flags, id, status, data[24:].decode())
"""


def test_another_user_is_refused_before_a_byte_is_read(serve: LiteServer, runtime_dir: Path, name: str) -> None:
    if os.geteuid() != 0 or shutil.which("setpriv") is None or not os.path.exists("/usr/bin/python3"):
        pytest.skip("needs root, setpriv and /usr/bin/python3 to act as another user")
    serve()
    sock = runtime_dir / f"{name}.sock"
    # Let the other user reach the socket file, so that only the server's own check stands.
    os.chmod(runtime_dir, 0o711)
    os.chmod(sock, 0o777)
    try:
        done = subprocess.run(
            ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "/usr/bin/python3", "-S", "-c", OTHER_USER_CLIENT, str(sock)],
            capture_output=True, text=True, timeout=60,
        )
    finally:
        os.chmod(runtime_dir, 0o700)
    assert done.returncode == 0, done.stderr
    assert done.stdout == f"5 3 0 403 user 65534 may not use service '{name}' (it serves uid 0 only)\n"
    still_served(name)


@pytest.mark.usefixtures("lite")
def test_a_live_owner_keeps_its_name(server: ServerFactory, name: str, runtime_dir: Path) -> None:
    proc = server("bytes")
    for impl in (lite, microcs):
        with pytest.raises(impl.NameTaken) as e:
            impl.Server(lambda b: b, name)
        assert e.value.owner_pid == proc.pid
        assert f"the name '{name}' is taken by process {proc.pid}" in str(e.value)
    still_served(name)


def test_the_pure_server_keeps_a_name_from_the_compiled_one(server: ServerFactory, name: str) -> None:
    proc = server("bytes")  # the compiled package's server
    with pytest.raises(lite.NameTaken) as e:
        lite.Server(lambda b: b, name)
    assert e.value.owner_pid == proc.pid


@pytest.mark.usefixtures("lite")
def test_a_crashed_owners_name_is_reclaimed(server: ServerFactory, name: str, runtime_dir: Path) -> None:
    for reclaim_by_list in (True, False):
        proc = server("bytes")
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
        assert (runtime_dir / f"{name}.sock").exists() and (runtime_dir / f"{name}.lock").exists()
        with pytest.raises(lite.NoService, match="stale socket"):
            lite.Client(name)
        if reclaim_by_list:
            assert [s.name for s in lite.list()] == []  # never listed, and cleaned up
            assert not (runtime_dir / f"{name}.sock").exists()
        with lite.Server(lambda b: b + b"!", name):  # binds over whatever is left
            with lite.Client(name, timeout=10) as c:
                assert c.request(b"new") == b"new!"


def test_things_that_are_not_sockets_are_refused_and_kept(runtime_dir: Path, name: str) -> None:
    path = runtime_dir / f"{name}.sock"
    path.write_text("precious")
    with pytest.raises(lite.PermissionDenied, match="it is a regular file, not a socket"):
        lite.Server(lambda b: b, name)
    assert path.read_text() == "precious"
    path.unlink()
    path.mkdir()
    with pytest.raises(lite.PermissionDenied, match="it is a directory"):
        lite.Server(lambda b: b, name)
    assert path.is_dir()
    # The failed servers did not keep the name.
    path.rmdir()
    with lite.Server(lambda b: b, name):
        still_served(name)


def test_unsafe_runtime_directories_are_refused(name: str) -> None:
    d = Path(tempfile.mkdtemp(prefix="mcs-unsafe-", dir="/tmp"))
    try:
        for mode in (0o755, 0o777, 0o750):
            os.chmod(d, mode)
            for attempt in (lambda: lite.Server(lambda b: b, name, runtime_dir=d), lambda: lite.list_services(d)):
                with pytest.raises(lite.PermissionDenied, match=f"mode {mode:04o}") as e:
                    attempt()
                assert str(d) in str(e.value)
        os.chmod(d, 0o700)
        link = d.with_name(d.name + "-link")
        link.symlink_to(d)
        with pytest.raises(lite.PermissionDenied, match="it is a symlink"):
            lite.Server(lambda b: b, name, runtime_dir=link)
        link.unlink()
    finally:
        shutil.rmtree(d, ignore_errors=True)


RACER = """
import sys, time
import microcs_lite
try:
    server = microcs_lite.Server(lambda b: b"%d" % __import__("os").getpid(), sys.argv[1])
except microcs_lite.NameTaken as e:
    print("TAKEN", e.owner_pid, flush=True)
else:
    server.start()
    print("WON", __import__("os").getpid(), flush=True)
    sys.stdin.read()
    server.stop()
"""


def test_racing_servers_exactly_one_wins_and_is_reachable(runtime_dir: Path, name: str) -> None:
    env = dict(os.environ, PYTHONPATH=str(LITE))
    racers = [
        subprocess.Popen([sys.executable, "-S", "-c", RACER, name], stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env)
        for _ in range(12)
    ]
    try:
        lines = [p.stdout.readline().decode().split() for p in racers if p.stdout is not None]
        winners = [int(pid) for word, pid in lines if word == "WON"]
        assert len(winners) == 1, lines
        assert all(pid == str(winners[0]) for word, pid in lines if word == "TAKEN"), lines
        with lite.Client(name, timeout=10) as c:
            assert c.request(b"who") == b"%d" % winners[0]
    finally:
        for p in racers:
            if p.stdin is not None:
                p.stdin.close()
            p.wait(timeout=20)
            if p.stdout is not None:
                p.stdout.close()


def test_large_frames_split_anyhow_with_methods_and_small_frames_between(serve: LiteServer, runtime_dir: Path, name: str) -> None:
    server = serve(methods={"upper": lambda b: b.upper()})
    assert server.running
    s = connect(runtime_dir, name)
    big = os.urandom(300_000)
    frames_out = [
        lite.encode(lite.REQUEST, 1, big, deadline_ms=60_000),
        lite.encode(lite.REQUEST, 2, b"small", deadline_ms=60_000),
        lite.encode(lite.REQUEST, 3, b"x" * 200_000, b"upper", deadline_ms=60_000),
        lite.encode(lite.REQUEST, 4, big, deadline_ms=60_000),
    ]
    wire = b"".join(frames_out)
    # Pieces of every size, with pauses: headers, methods and payloads split at odd places.
    for cut in range(0, len(wire), 77_777):
        s.sendall(wire[cut : cut + 77_777])
        time.sleep(0.02)
    got = {f.id: f.payload for f in frames(s, 4)}
    assert got == {1: big, 2: b"small", 3: b"X" * 200_000, 4: big}
    # And the pure client, both ways, with payloads around the 64 KiB read size.
    with lite.Client(name, timeout=10) as c:
        for size in (65_535 - 24, 65_536 - 24, 65_537, 1 << 20, 10, (1 << 20) + 1):
            payload = os.urandom(size)
            assert c.request(payload) == payload
            assert c.call("upper", payload) == payload.upper()
