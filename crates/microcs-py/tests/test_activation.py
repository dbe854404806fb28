"""Start on demand from Python, around the idle timeout: a Python service started from its
definition idles out, its ``serve()`` returns and the process exits, and the next call starts
it again; ``Server(idle_timeout=...)`` makes ``serve()`` return.
"""

from __future__ import annotations

import asyncio
import sys
import time
from pathlib import Path

import pytest

import microcs
from conftest import PEERS, wait_gone


@pytest.fixture
def services(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """This test's own directory of definitions (and nothing of the user's)."""
    d = tmp_path / "services"
    d.mkdir(mode=0o700)
    monkeypatch.setenv("MICROCS_SERVICES_DIR", str(d))
    monkeypatch.delenv("MICROCS_NO_ACTIVATION", raising=False)
    return d


def define_activated(services: Path, name: str, extra: str) -> None:
    """A definition that runs peers/activated.py NAME, recording its starts in ``starts``."""
    path = services / f"{name}.toml"
    path.write_text(
        f"command = ['{sys.executable}', '{PEERS / 'activated.py'}', '{name}']\n"
        f"env = {{ PEER_STARTS = '{services / 'starts'}' }}\n" + extra
    )
    path.chmod(0o600)


def starts(services: Path) -> list[int]:
    f = services / "starts"
    return [int(line) for line in f.read_text().split()] if f.exists() else []


def test_a_python_service_idles_out_exits_and_the_next_call_starts_it_again(
    runtime_dir: Path, services: Path, name: str
) -> None:
    define_activated(services, name, "idle_timeout = 1.0\nstart_timeout = 30.0\n")
    with microcs.Client(name, timeout=10) as c:
        assert c.request(b"hello") == b"hello"
        first = int(c.call("pid"))
    assert starts(services) == [first]
    # Idle for its timeout: serve() returns in the service (it prints IDLE and exits).
    wait_gone(name, runtime_dir)
    log = runtime_dir / f"{name}.log"
    give_up = time.monotonic() + 15
    while f"IDLE {first}" not in log.read_text() and time.monotonic() < give_up:
        time.sleep(0.05)
    assert f"IDLE {first}" in log.read_text(), log.read_text()

    async def again() -> bytes:
        return await microcs.AsyncClient(name, timeout=10).call("pid")

    second = int(asyncio.run(again()))
    assert second != first
    assert starts(services) == [first, second]


def test_a_server_with_an_idle_timeout_returns_from_serve(runtime_dir: Path, name: str) -> None:
    server = microcs.Server(lambda data: data, name, idle_timeout=0.5)
    t = time.monotonic()
    server.serve(timeout=30)
    # Returned by the idle timeout, not by serve's own 30 s.
    assert 0.5 <= time.monotonic() - t < 25
    assert not server.running
    assert not any(s.name == name for s in microcs.list_services(runtime_dir))


class _Alarm(Exception):
    pass


def test_a_signal_handler_interrupts_the_wait_for_a_start_and_the_start_goes_on(
    runtime_dir: Path, services: Path, name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    import os
    import signal

    # Slow to register: the service sleeps a second before it claims the name.
    define_activated(services, name, "start_timeout = '30s'\n")
    monkeypatch.setenv("PEER_DELAY", "1")

    def on_alarm(signum: int, frame: object) -> None:
        raise _Alarm()

    old = signal.signal(signal.SIGALRM, on_alarm)
    try:
        signal.setitimer(signal.ITIMER_REAL, 0.2)
        with pytest.raises(_Alarm):
            microcs.Client(name, timeout=10)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
    # The start went on; the next call finds it (or waits for it), and nothing started twice.
    with microcs.Client(name, timeout=30) as c:
        pid = int(c.call("pid"))
    assert starts(services) == [pid]
    os.kill(pid, signal.SIGKILL)
    wait_gone(name, runtime_dir)


def test_a_server_serves_on_the_socket_systemd_passes(runtime_dir: Path, name: str) -> None:
    import os
    import socket
    import subprocess

    path = runtime_dir / f"{name}.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen(16)
    ino = path.stat().st_ino
    wrapper = 'exec 3<&0 0</dev/null; LISTEN_PID=$$ LISTEN_FDS=1 exec "$0" "$1" "$2"'
    proc = subprocess.Popen(
        ["sh", "-c", wrapper, sys.executable, str(PEERS / "socket_activated.py"), name],
        stdin=listener.fileno(),
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == f"READY {proc.pid}"
        with microcs.Client(name, timeout=10, activate=False) as c:
            assert int(c.call("pid")) == proc.pid
            # Gone from the C environment and from os.environ (what subprocess passes on).
            assert c.call("env", b"LISTEN_FDS") == b"unset"
        assert path.stat().st_ino == ino, "it bound a socket of its own"
    finally:
        proc.kill()
        proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()
        listener.close()
