"""Signals: Ctrl-C (SIGINT) on start_listening() stops the server cleanly and frees the name; a
waiting client call lets Python handle signals without overshooting its timeout."""

from __future__ import annotations

import signal
import threading
import time
from pathlib import Path

import pytest

import microcs
from conftest import PEERS, ServerFactory, run_python, stop_process


def assert_name_free(name: str, runtime_dir: Path) -> None:
    assert [s.name for s in microcs.list_services(runtime_dir)] == []
    assert sorted(p.name for p in runtime_dir.iterdir()) == [], "socket or lock file left behind"
    # The name can be claimed again at once.
    with microcs.Server(lambda b: b, name) as again:
        with microcs.Client(name, timeout=10) as client:
            assert client.request(b"mine now") == b"mine now"
        assert again.running


def test_ctrl_c_on_the_seed_server_frees_the_name(server: ServerFactory, runtime_dir: Path) -> None:
    proc = server("seed", name="LIFE_GEN", script=PEERS / "seed_server.py")
    with microcs.Client("LIFE_GEN", timeout=10) as client:
        assert client.send_message("before").endswith("before")
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=30) == -signal.SIGINT  # KeyboardInterrupt, re-raised by Python
    assert proc.stderr is not None
    assert "KeyboardInterrupt" in proc.stderr.read().decode()
    assert_name_free("LIFE_GEN", runtime_dir)


def test_ctrl_c_lets_a_running_request_finish(
    server: ServerFactory, runtime_dir: Path, name: str, tmp_path: Path
) -> None:
    proc = server("grace", name=name)
    client = microcs.Client(name, timeout=20)
    marker = tmp_path / "handler-started"
    results: list[bytes] = []
    caller = threading.Thread(target=lambda: results.append(client.call("slow", f"0.5 {marker}".encode())))
    caller.start()
    give_up = time.monotonic() + 20
    while not marker.exists():
        assert time.monotonic() < give_up, "the handler never started"
        time.sleep(0.01)
    proc.send_signal(signal.SIGINT)
    caller.join(timeout=30)
    assert results == [b"slept"], "the running request was not answered"
    assert proc.wait(timeout=30) == -signal.SIGINT
    client.close()
    assert_name_free(name, runtime_dir)


def test_ctrl_c_stops_a_waiting_call(server: ServerFactory, name: str, tmp_path: Path) -> None:
    server("bytes")
    marker = tmp_path / "cancelled"
    caller = run_python(PEERS / "interruptible_client.py", name, str(marker))
    try:
        assert caller.stdout is not None
        assert caller.stdout.readline() == b"waiting\n"
        time.sleep(0.3)  # the call is sent and waits for `watch`, which waits for a cancel
        sent = time.monotonic()
        caller.send_signal(signal.SIGINT)
        assert caller.wait(timeout=30) == -signal.SIGINT  # KeyboardInterrupt, re-raised
        took = time.monotonic() - sent
        out = caller.stdout.read()
        assert out == b"interrupted\nstill usable\n", out
        assert caller.stderr is not None and b"KeyboardInterrupt" in caller.stderr.read()
        assert took < 5, f"the call took {took:.1f} s to stop (its timeout is 60 s)"
        # The server heard the cancel: the handler saw is_cancelled() and touched the marker.
        give_up = time.monotonic() + 10
        while not marker.exists():
            assert time.monotonic() < give_up, "the cancel never reached the handler"
            time.sleep(0.01)
    finally:
        stop_process(caller)


def test_frequent_signals_do_not_stretch_a_call_past_its_timeout(server: ServerFactory, name: str) -> None:
    server("bytes")
    ticks: list[int] = []
    old = signal.signal(signal.SIGALRM, lambda *_: ticks.append(1))
    signal.setitimer(signal.ITIMER_REAL, 0.02, 0.02)
    try:
        client = microcs.Client(name, timeout=1)
        started = time.monotonic()
        with pytest.raises(microcs.TimedOut):
            client.call("slow", b"6")
        took = time.monotonic() - started
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0, 0)
        signal.signal(signal.SIGALRM, old)
    assert len(ticks) >= 10, f"only {len(ticks)} signals: the test did not test anything"
    assert took < 3, f"a 1 s call took {took:.1f} s under a signal every 20 ms"
    assert client.request(b"after") == b"after"


def test_a_signal_handler_may_close_the_client_but_not_call_it(server: ServerFactory, name: str) -> None:
    server("bytes")
    client = microcs.Client(name, timeout=10)
    seen: list[str] = []

    def handler(*_: object) -> None:
        try:
            client.request(b"from the handler")
        except RuntimeError as e:
            seen.append(str(e))
        client.close()  # deferred until the call returns
        seen.append(f"closed={client.closed}")
        raise KeyboardInterrupt

    old = signal.signal(signal.SIGALRM, handler)
    signal.setitimer(signal.ITIMER_REAL, 0.3)
    try:
        with pytest.raises(KeyboardInterrupt):
            client.call("slow", b"5")
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0, 0)
        signal.signal(signal.SIGALRM, old)
    assert len(seen) == 2 and "in a call on this thread" in seen[0], seen
    assert seen[1] == "closed=True"
    assert client.closed
    with pytest.raises(microcs.Closed):
        client.request(b"x")
