"""Fixtures: a private runtime directory per test, unique names, server processes.

Every test runs under a watchdog (``faulthandler``) and every wait is bounded, so a hang fails
the run with the stacks of all threads instead of blocking CI.
"""

from __future__ import annotations

import faulthandler
import itertools
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import contextlib
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

import microcs

PEERS = Path(__file__).parent / "peers"
ROOT = Path(__file__).resolve().parents[3]
#: The pure-Python implementation (``microcs_lite`` and the seed's two modules over it), kept at
#: the repository root so that it can be copied as is; the tests import it from there. Last on
#: the path: its micro_server/micro_client must not shadow the installed package's.
LITE = ROOT / "python"
sys.path.append(str(LITE))
#: Longest any single test may run before the watchdog dumps all stacks and exits.
WATCHDOG_SECONDS = 120
_names = itertools.count()


@pytest.fixture(autouse=True)
def watchdog() -> Iterator[None]:
    faulthandler.dump_traceback_later(WATCHDOG_SECONDS, exit=True)
    yield
    faulthandler.cancel_dump_traceback_later()


@pytest.fixture
def runtime_dir(monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A fresh private runtime directory, used by this process and the servers it starts.

    Short (under /tmp), since a socket path must fit in 108 bytes.
    """
    d = Path(tempfile.mkdtemp(prefix="mcs-py-", dir="/tmp"))
    monkeypatch.setenv("MICROCS_RUNTIME_DIR", str(d))
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def name(request: pytest.FixtureRequest) -> str:
    """A service name unique to this test."""
    return f"PYTEST_{os.getpid()}_{next(_names)}"


def wait_for_service(name: str, runtime_dir: Path, proc: subprocess.Popen[bytes] | None = None) -> None:
    """Waits (at most 20 s) until `name` accepts connections.

    A name is listed once its server serves; the connection attempt also proves the server is
    the one this test started (and not, say, a process still shutting down).
    """
    give_up = time.monotonic() + 20
    while time.monotonic() < give_up:
        if any(s.name == name for s in microcs.list_services(runtime_dir)):
            try:
                microcs.Client(name, timeout=10, runtime_dir=runtime_dir).close()
                return
            except microcs.NoService:
                pass
        if proc is not None and proc.poll() is not None:
            out, err = proc.communicate(timeout=5)
            raise AssertionError(f"server exited with {proc.returncode}: {err.decode(errors='replace')}")
        time.sleep(0.02)
    raise AssertionError(f"service {name!r} did not appear in {runtime_dir} within 20 s")


def wait_gone(name: str, runtime_dir: Path) -> None:
    """Waits (at most 20 s) until `name` is no longer listed."""
    give_up = time.monotonic() + 20
    while time.monotonic() < give_up:
        if not any(s.name == name for s in microcs.list_services(runtime_dir)):
            return
        time.sleep(0.02)
    raise AssertionError(f"service {name!r} still listed after 20 s")


def _default_sigint() -> None:
    # A shell running this suite in the background (as CI harnesses may) starts it with SIGINT
    # ignored, which children inherit and Python then respects: give the servers the default
    # disposition, so that Python turns Ctrl-C into KeyboardInterrupt as in a terminal.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def run_python(script: Path, *args: str, cwd: Path | None = None) -> subprocess.Popen[bytes]:
    """Starts `script` with this interpreter (and this environment) as a separate process."""
    return subprocess.Popen(
        [sys.executable, str(script), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=cwd,
        preexec_fn=_default_sigint,
    )


def stop_process(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
    for stream in (proc.stdout, proc.stderr):
        if stream is not None:
            stream.close()


ServerFactory = Callable[..., "subprocess.Popen[bytes]"]


@pytest.fixture
def server(runtime_dir: Path, name: str) -> Iterator[ServerFactory]:
    """Starts ``peers/serve.py MODE NAME [ARGS]`` in another process; waits until it serves.

    Called with the mode (and optional extra arguments); the name is this test's `name` unless
    ``name=`` is given. Every process started is stopped after the test.
    """
    procs: list[subprocess.Popen[bytes]] = []

    def start(mode: str, *args: str, name: str = name, script: Path = PEERS / "serve.py") -> subprocess.Popen[bytes]:
        proc = run_python(script, mode, name, *args)
        procs.append(proc)
        wait_for_service(name, runtime_dir, proc)
        return proc

    yield start
    for p in procs:
        stop_process(p)


@pytest.fixture
def lite(monkeypatch: pytest.MonkeyPatch) -> Path:
    """Servers started by `server` from now on run on ``microcs_lite`` (``PEER_LITE``), which
    they import from `LITE`. Returns `LITE`."""
    monkeypatch.setenv("PEER_LITE", "1")
    monkeypatch.setenv("PYTHONPATH", str(LITE))
    return LITE


def rust_binary(name: str) -> Path:
    """A binary of the Rust workspace (``microcs``, ``microcs-peer``) for interoperability tests.

    Looked for in ``MICROCS_TEST_BIN_DIR`` (``./scripts/test python`` builds them and sets it),
    else in the cargo target directory's ``debug/``. Without it the test is skipped, saying why
    — unless ``MICROCS_REQUIRE_RUST_PEERS=1`` (the test script), where that is a failure, as
    test_nats.py does for its broker.
    """
    dirs = [os.environ.get("MICROCS_TEST_BIN_DIR", "")]
    dirs.append(os.path.join(os.environ.get("CARGO_TARGET_DIR", str(ROOT / "target")), "debug"))
    for d in filter(None, dirs):
        path = Path(d) / name
        if os.access(path, os.X_OK):
            return path
    reason = f"no {name} binary in {' or '.join(filter(None, dirs))} (cargo build -p microcs-cli -p microcs --features microcs/tokio --bins)"
    if os.environ.get("MICROCS_REQUIRE_RUST_PEERS") == "1":
        pytest.fail(f"MICROCS_REQUIRE_RUST_PEERS=1 but {reason}", pytrace=False)
    pytest.skip(reason)


class Interrupted(Exception):
    """Raised in the main thread by `interrupted_after`, as a signal handler would (Ctrl-C)."""


@contextlib.contextmanager
def interrupted_after(seconds: float) -> Iterator[None]:
    """Within the block, a SIGUSR1 arrives after `seconds` and its handler raises `Interrupted`
    in whatever the main thread is waiting in."""

    def interrupt(signum: int, frame: object) -> None:
        raise Interrupted()

    old = signal.signal(signal.SIGUSR1, interrupt)
    timer = threading.Timer(seconds, os.kill, (os.getpid(), signal.SIGUSR1))
    timer.start()
    try:
        yield
    finally:
        timer.cancel()
        signal.signal(signal.SIGUSR1, old)
