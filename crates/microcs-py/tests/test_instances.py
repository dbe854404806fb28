"""Several servers behind one name (``shared=True``), and the multiprocessing pattern of
``examples/workers.py``: workers in processes of their own, restarted when they die."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable
from pathlib import Path

import pytest

import microcs
from conftest import run_python, rust_binary, stop_process

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def _instances(name: str, runtime_dir: Path) -> list[microcs.ServiceInfo]:
    return [s for s in microcs.list_services(runtime_dir) if s.name == name]


def _pids(name: str, runtime_dir: Path) -> set[int]:
    return {s.pid for s in _instances(name, runtime_dir) if s.pid is not None}


def test_shared_servers_share_a_name_and_never_mix_with_an_exclusive_one(runtime_dir: Path, name: str) -> None:
    a = microcs.Server(lambda p: b"a:" + p, name, shared=True)
    b = microcs.Server(lambda p: b"b:" + p, name, shared=True)
    with a, b:
        a.start()
        b.start()
        listed = _instances(name, runtime_dir)
        assert [s.instance for s in listed] == [0, 1]
        assert all(s.pid == os.getpid() for s in listed)
        # One client after the other: the least-loaded instance, so both are reached.
        clients = [microcs.Client(name, timeout=5) for _ in range(4)]
        answers = {c.request(b"x") for c in clients}
        assert answers == {b"a:x", b"b:x"}
        assert sorted(s.connections or 0 for s in _instances(name, runtime_dir)) == [2, 2]
        # One instance, asked by its slot.
        assert microcs.Client(name, timeout=5, instance=1).request(b"y") == b"b:y"
        with pytest.raises(microcs.NoService):
            microcs.Client(name, timeout=5, instance=7)
        for c in clients:
            c.close()
        with pytest.raises(microcs.NameTaken, match="2 shared instances") as e:
            microcs.Server(lambda p: p, name)
        assert e.value.owner_pid == os.getpid()
    assert _instances(name, runtime_dir) == []
    # Exclusive first: an instance cannot join.
    with microcs.Server(lambda p: p, name) as owner:
        owner.start()
        with pytest.raises(microcs.NameTaken, match="exclusive server"):
            microcs.Server(lambda p: p, name, shared=True)


def _pids_answering(name: str, n: int) -> set[int]:
    clients = [microcs.Client(name, timeout=10) for _ in range(n)]
    try:
        return {int(c.call("pid")) for c in clients}
    finally:
        for c in clients:
            c.close()


def _wait(what: str, cond: Callable[[], bool], limit: float = 30.0) -> None:
    give_up = time.monotonic() + limit
    while time.monotonic() < give_up:
        if cond():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def test_workers_example_serves_from_processes_restarts_a_killed_one_and_stops_cleanly(
    runtime_dir: Path, name: str
) -> None:
    proc = run_python(EXAMPLES / "workers.py", name, "2")
    try:
        _wait("two workers", lambda: len(_instances(name, runtime_dir)) == 2)
        pids = _pids(name, runtime_dir)
        assert os.getpid() not in pids and proc.pid not in pids, "each worker is a process of its own"
        assert _pids_answering(name, 4) == pids
        board = b".#.\n.#.\n.#.\n"
        assert microcs.Client(name, timeout=10).request(board) == b"...\n###\n...\n"

        victim = sorted(pids)[0]
        os.kill(victim, signal.SIGKILL)
        # Once dead (its slot's lock dies with it), it is skipped at once; then replaced.
        _wait("the killed worker's slot to be free", lambda: victim not in _pids(name, runtime_dir))
        assert victim not in _pids_answering(name, 4)
        _wait(
            "a restarted worker",
            lambda: len(ps := _pids(name, runtime_dir)) == 2 and victim not in ps,
        )
        new_pids = _pids(name, runtime_dir)
        assert len(new_pids - pids) == 1

        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
        err = proc.stderr.read().decode() if proc.stderr else ""
        assert "restarting in" in err and "the name is free" in err, err
        assert _instances(name, runtime_dir) == []
        assert list(runtime_dir.iterdir()) == []
        with pytest.raises(microcs.NoService):
            microcs.Client(name, timeout=2)
    finally:
        stop_process(proc)


def test_a_call_starts_a_service_from_its_definition(
    runtime_dir: Path, name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    microcs_bin = rust_binary("microcs")
    defs = tmp_path / "services"
    defs.mkdir(mode=0o700)
    (defs / f"{name}.toml").write_text(f'command = ["{microcs_bin}", "serve", "{name}", "--echo"]\n')
    (defs / f"{name}.toml").chmod(0o600)
    monkeypatch.setenv("MICROCS_SERVICES_DIR", str(defs))
    monkeypatch.delenv("MICROCS_NO_ACTIVATION", raising=False)
    try:
        with pytest.raises(microcs.NoService):
            microcs.Client(name, timeout=10, activate=False)
        assert _instances(name, runtime_dir) == [], "not started"
        assert microcs.Client(name, timeout=10).request(b"hi") == b"hi"
        (started,) = _instances(name, runtime_dir)
        assert started.pid not in (None, os.getpid())
        # A definition whose command fails: StartFailed (a NoService) with its exit status.
        (defs / "BROKEN_X.toml").write_text('command = ["sh", "-c", "echo nope >&2; exit 4"]\n')
        (defs / "BROKEN_X.toml").chmod(0o600)
        with pytest.raises(microcs.StartFailed, match="exit status: 4") as e:
            microcs.Client("BROKEN_X", timeout=10)
        assert isinstance(e.value, microcs.NoService) and "nope" in str(e.value)
    finally:
        for s in microcs.list_services(runtime_dir):
            if s.pid is not None:
                os.kill(s.pid, signal.SIGTERM)
