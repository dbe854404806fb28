"""microcs_lite and the Rust implementation, across real processes, both ways.

The pure client calls the Rust blocking and tokio servers (``microcs-peer serve`` and
``serve-tokio``, the integration tests' peer) and ``microcs serve``; the Rust client
(``microcs-peer call``) and the CLI (``call``, ``ls``, ``ping``, ``info``, ``stats``) call the pure
server (peers/serve.py under ``PEER_LITE``). The binaries come from `rust_binary` (skipped when
absent, unless the run requires them).
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

import microcs_lite as lite
from conftest import Interrupted, ServerFactory, interrupted_after, rust_binary, stop_process, wait_for_service

RustServer = Callable[[str], "subprocess.Popen[bytes]"]


@pytest.fixture
def rust_server(runtime_dir: Path, name: str) -> Iterator[RustServer]:
    """Starts a Rust server for `name`: ``blocking``, ``tokio`` (microcs-peer) or ``cli``
    (``microcs serve --echo``); waits until it serves; stops it after the test."""
    procs: list[subprocess.Popen[bytes]] = []

    def start(kind: str) -> subprocess.Popen[bytes]:
        if kind == "cli":
            argv = [str(rust_binary("microcs")), "serve", name, "--echo"]
        else:
            argv = [str(rust_binary("microcs-peer")), "serve" if kind == "blocking" else "serve-tokio", name]
        proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        procs.append(proc)
        wait_for_service(name, runtime_dir, proc)
        return proc

    yield start
    for p in procs:
        if p.stdin is not None:
            p.stdin.close()  # microcs-peer serves until its stdin closes
        stop_process(p)


def run(*argv: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("kind", ["blocking", "tokio"])
def test_the_pure_client_calls_the_rust_servers(rust_server: RustServer, name: str, kind: str) -> None:
    proc = rust_server(kind)
    with lite.Client(name, timeout=10) as c:
        assert c.server_pid == proc.pid
        assert c.request(b"hello") == b"hello"
        payload = os.urandom(1 << 20)
        assert c.request(payload) == payload
        assert c.call("big", b"%d" % (3 << 20)) == b"x" * (3 << 20)
        assert c.send_message("héllo") == "héllo"
        # The deadline went with the request, rounded up to whole milliseconds.
        assert 9000 < int(c.call("deadline_ms")) <= 10000
        assert c.call("peer").decode().split() == [str(os.getpid()), str(os.geteuid()), str(os.getegid())]
        with pytest.raises(lite.RemoteError) as e:
            c.call("fail")
        assert (e.value.code, e.value.message, e.value.may_have_run) == (418, "i am a teapot", True)
        with pytest.raises(lite.RemoteError) as e:
            c.call("panic")
        assert e.value.code == 500 and "boom in handler" in e.value.message
        with pytest.raises(lite.RemoteError) as e:
            c.call("jump")
        assert e.value.code == 404 and e.value.may_have_run is False
        info = c.info()
        assert (info["name"], info["version"], info["description"]) == (name, "1.2.3", "test peer")
        assert c.ping()["type"] == "io.nats.micro.v1.ping_response"
        stats = {ep["name"]: ep for ep in c.stats()["endpoints"]}
        assert stats["fail"]["num_errors"] == 1
    with lite.Client(name, timeout=10, max_frame=1000) as small:
        with pytest.raises(lite.FrameTooLarge) as e2:
            small.call("big", b"1001")
        assert e2.value.may_have_run is True


@pytest.mark.parametrize("kind", ["blocking", "tokio"])
def test_timeouts_and_cancels_reach_the_rust_servers(rust_server: RustServer, name: str, kind: str, tmp_path: Path) -> None:
    rust_server(kind)
    with lite.Client(name, timeout=0.3) as c:
        with pytest.raises(lite.TimedOut) as e:
            c.call("sleep_ms", b"3000")
        assert e.value.may_have_run is True
        c.timeout = 10
        assert c.request(b"the same connection") == b"the same connection"
    # A Cancel written by the pure client, long before the deadline, reaches the Rust handler.
    log = tmp_path / "cancel.log"

    with lite.Client(name, timeout=60) as c:
        with interrupted_after(0.3), pytest.raises(Interrupted):
            c.call("wait_cancel", str(log).encode())
        assert c.request(b"after") == b"after"
    end = time.monotonic() + 20
    while not (log.exists() and log.read_text().startswith("cancelled ")):
        assert time.monotonic() < end, "the Rust handler never saw the cancellation"
        time.sleep(0.01)
    assert int(log.read_text().split()[1]) < 30_000


@pytest.mark.parametrize("kind", ["blocking", "tokio"])
def test_the_pure_client_reconnects_to_a_restarted_rust_server(rust_server: RustServer, name: str, kind: str) -> None:
    first = rust_server(kind)
    with lite.Client(name, timeout=10) as c:
        assert c.request(b"one") == b"one"
        assert first.stdin is not None
        first.stdin.close()  # a graceful stop: the name is freed, the connection closed
        first.wait(timeout=20)
        second = rust_server(kind)
        assert c.request(b"two") == b"two"
        assert c.server_pid == second.pid


def test_the_pure_client_calls_microcs_serve(rust_server: RustServer, name: str) -> None:
    rust_server("cli")
    with lite.Client(name, timeout=10) as c:
        assert c.request(b"echo me") == b"echo me"
        assert c.send_message("text") == "text"
        assert c.ping()["name"] == name
        assert [e["name"] for e in c.info()["endpoints"]] == ["default"]


@pytest.mark.usefixtures("lite")
def test_the_rust_client_calls_the_pure_server(server: ServerFactory, name: str, runtime_dir: Path) -> None:
    proc = server("bytes")
    peer = str(rust_binary("microcs-peer"))
    done = run(peer, "call", name, "hello")
    assert (done.returncode, done.stdout) == (0, "hello\n"), done.stderr
    done = run(peer, "call-method", name, "upper", "abc")
    assert (done.returncode, done.stdout) == (0, "ABC\n"), done.stderr
    done = run(peer, "call-method", name, "fail", "x")
    assert done.returncode == 1
    assert done.stderr.startswith("Remote: ") and "500: ValueError: bad board: x" in done.stderr
    done = run(peer, "call-dir", name, str(runtime_dir), "explicit dir")
    assert (done.returncode, done.stdout) == (0, "explicit dir\n"), done.stderr
    # It is the pure server that answered.
    with lite.Client(name, timeout=10) as c:
        assert c.ping()["metadata"]["library"] == f"microcs-lite {lite.__version__}"
        assert c.server_pid == proc.pid


@pytest.mark.usefixtures("lite")
def test_the_cli_calls_lists_pings_and_inspects_the_pure_server(server: ServerFactory, name: str, runtime_dir: Path) -> None:
    proc = server("bytes")
    cli = str(rust_binary("microcs"))
    done = run(cli, "call", name, "hi")
    assert (done.returncode, done.stdout) == (0, "hi"), done.stderr
    done = run(cli, "--json", "call", name, "-m", "upper", "hi")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["reply"] == "HI"
    done = run(cli, "call", name, "-m", "fail", "board")
    assert done.returncode == 1 and "ValueError: bad board: board" in done.stderr
    done = run(cli, "call", name, "-m", "jump")
    assert done.returncode == 1 and "has no method 'jump'" in done.stderr
    done = run(cli, "call", name, "-m", "slow", "5", "-t", "300ms")
    assert done.returncode == 1 and "may have run" in done.stderr, done.stderr

    done = run(cli, "--json", "ls")
    assert done.returncode == 0, done.stderr
    (svc,) = [s for s in json.loads(done.stdout)["services"] if s["name"] == name]
    assert (svc["pid"], svc["uid"], svc["protocol_version"], svc["version"]) == (proc.pid, os.geteuid(), 1, "0.1.0")
    assert "upper" in svc["methods"] and svc["socket"] == str(runtime_dir / f"{name}.sock")
    # ls asked the service for its $stats: the handlers that ran are counted (the 404 was refused
    # before any ran; the slow one still sleeps).
    assert svc["requests"] == 3 and svc["errors"] == 1, svc
    done = run(cli, "ls")
    assert done.returncode == 0 and name in done.stdout

    done = run(cli, "--json", "ping", name, "-c", "3", "-i", "0")
    assert done.returncode == 0, done.stderr
    ping = json.loads(done.stdout)
    assert (ping["sent"], ping["received"], ping["pid"]) == (3, 3, proc.pid)

    done = run(cli, "--json", "info", name)
    assert done.returncode == 0, done.stderr
    info = json.loads(done.stdout)
    assert info["type"] == "io.nats.micro.v1.info_response" and info["endpoints"][0]["name"] == "default"
    done = run(cli, "--json", "stats", name)
    assert done.returncode == 0, done.stderr
    stats = {e["name"]: e for e in json.loads(done.stdout)["endpoints"]}
    assert stats["upper"]["num_requests"] == 1 and stats["fail"]["last_error"] == "ValueError: bad board: board"
    done = run(cli, "info", name)
    assert done.returncode == 0 and "upper" in done.stdout
