"""microcs_lite and a name served by several instances, across real processes.

The instances are the Rust test peer (``microcs-peer serve`` / ``serve-tokio`` with
``PEER_SHARED=1``: each joins the name in a slot of its own) and the pure server with
``shared=True``. The pure client must pick among them as the Rust clients do (fewest
connections, ready slots only, never a dead one), and the pure server must join or be refused
exactly as the Rust one is.
"""

from __future__ import annotations

import os
import subprocess
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

import microcs
import microcs_lite as lite
from conftest import rust_binary, stop_process

Instance = Callable[..., "subprocess.Popen[bytes]"]


@pytest.fixture
def rust_instance(runtime_dir: Path, name: str) -> Iterator[Instance]:
    """Starts a Rust instance of `name` (``blocking`` or ``tokio``) and waits until it serves;
    stops it after the test (if it still runs)."""
    procs: list[subprocess.Popen[bytes]] = []

    def start(kind: str = "blocking", shared: bool = True, of: str = name) -> subprocess.Popen[bytes]:
        mode = "serve" if kind == "blocking" else "serve-tokio"
        env = dict(os.environ, PEER_SHARED="1") if shared else dict(os.environ)
        if not shared:
            env.pop("PEER_SHARED", None)
        proc = subprocess.Popen([str(rust_binary("microcs-peer")), mode, of], env=env,
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        procs.append(proc)
        assert proc.stdout is not None
        assert proc.stdout.readline().decode().strip() == f"READY {proc.pid}"
        return proc

    yield start
    for p in procs:
        if p.stdin is not None and p.poll() is None:
            p.stdin.close()  # microcs-peer serves until its stdin closes
        stop_process(p)


def _slots(name: str, runtime_dir: Path) -> dict[int, int]:
    """pid -> slot of each listed instance of `name`, as the pure module lists them."""
    out = {}
    for s in lite.list_services(runtime_dir):
        if s.name == name:
            assert s.instance is not None and s.pid is not None, s
            out[s.pid] = s.instance
    return out


def _pid(c: lite.Client) -> int:
    return int(c.call("pid"))


def _wait(what: str, cond: Callable[[], bool], limit: float = 20.0) -> None:
    end = time.monotonic() + limit
    while not cond():
        assert time.monotonic() < end, f"timed out waiting for {what}"
        time.sleep(0.05)


def test_the_pure_client_spreads_over_rust_instances_and_never_picks_a_dead_one(
    rust_instance: Instance, name: str, runtime_dir: Path
) -> None:
    procs = [rust_instance("blocking"), rust_instance("tokio"), rust_instance("blocking")]
    slots = _slots(name, runtime_dir)
    assert sorted(slots) == sorted(p.pid for p in procs) and sorted(slots.values()) == [0, 1, 2]
    # Six clients connecting one after the other: each goes to an instance with the fewest
    # connections (the counter each instance keeps in its slot file), so two each.
    clients = [lite.Client(name, timeout=10) for _ in range(6)]
    on = [_pid(c) for c in clients]
    assert Counter(on) == {p.pid: 2 for p in procs}, on
    for c, pid in zip(clients, on):
        assert c.server_pid == pid
        assert c.socket_path == str(runtime_dir / f"{name}@{slots[pid]}.sock")
    listed = [s for s in lite.list_services(runtime_dir) if s.name == name]
    assert [(s.instance, s.connections) for s in listed] == [(0, 2), (1, 2), (2, 2)]
    assert sorted(s.pid or 0 for s in listed) == sorted(s.pid or 0 for s in microcs.list_services(runtime_dir) if s.name == name)

    # One killed with SIGKILL: its files stay, but nobody holds its lock, so it is never picked.
    victim = procs.pop(1)
    victim.kill()
    victim.wait(timeout=10)
    assert (runtime_dir / f"{name}@{slots[victim.pid]}.sock").exists()
    survivors = {p.pid for p in procs}
    # Its clients' next request provably did not run (their connection was dead before it was
    # written): sent again, once, to another instance; nobody sees an error.
    for c in clients:
        assert _pid(c) in survivors
        assert c.request(b"still here") == b"still here"
    for _ in range(10):
        with lite.Client(name, timeout=10) as c:
            assert _pid(c) in survivors
    for c in clients:
        c.close()
    for p in procs:
        assert p.stdin is not None
        p.stdin.close()
        assert p.wait(timeout=20) == 0
    with pytest.raises(lite.NoService):
        lite.Client(name, timeout=2)
    left = sorted(f for f in os.listdir(runtime_dir) if f.startswith(name))
    assert left == [f"{name}@{slots[victim.pid]}.lock", f"{name}@{slots[victim.pid]}.sock"], left
    assert lite.list_services(runtime_dir) == []  # and listing reclaims the crashed one's files
    assert [f for f in os.listdir(runtime_dir) if f.startswith(name)] == []


def test_pure_clients_move_to_a_new_instance(rust_instance: Instance, name: str) -> None:
    first = rust_instance("blocking")
    clients = [lite.Client(name, timeout=10) for _ in range(4)]
    assert {_pid(c) for c in clients} == {first.pid}
    second = rust_instance("tokio")

    # The clients look again about once a second: two of the four move, and stay.
    def moved() -> bool:
        return sum(_pid(c) == second.pid for c in clients) == 2

    _wait("half of the clients to move to the new instance", moved)
    for c in clients:
        c.close()


def test_the_pure_server_joins_rust_instances_or_is_refused_as_the_rust_one_is(
    rust_instance: Instance, name: str, runtime_dir: Path
) -> None:
    rust = rust_instance("blocking")
    pure = lite.Server(None, name, shared=True, methods={"pid": lambda _p: str(os.getpid())})
    with pure:
        assert pure.instance == 1 and pure.socket_path == str(runtime_dir / f"{name}@1.sock")
        assert _slots(name, runtime_dir) == {rust.pid: 0, os.getpid(): 1}
        # Clients of both implementations spread over both kinds of instance.
        rust_clients = [microcs.Client(name, timeout=10) for _ in range(4)]
        assert Counter(int(rc.call("pid")) for rc in rust_clients) == {rust.pid: 2, os.getpid(): 2}
        for rc in rust_clients:
            rc.close()
        pure_clients = [lite.Client(name, timeout=10) for _ in range(4)]
        assert Counter(_pid(c) for c in pure_clients) == {rust.pid: 2, os.getpid(): 2}
        for c in pure_clients:
            c.close()
        # An exclusive server is refused, by either implementation, naming the instances.
        with pytest.raises(lite.NameTaken, match="2 shared instances") as e:
            lite.Server(lambda p: p, name)
        assert str(rust.pid) in str(e.value) and str(os.getpid()) in str(e.value)
        with pytest.raises(microcs.NameTaken, match="2 shared instances"):
            microcs.Server(lambda p: p, name)
    # The pure instance left its slot and nothing else; the Rust one serves on.
    assert _slots(name, runtime_dir) == {rust.pid: 0}
    with lite.Client(name, timeout=10) as c:
        assert _pid(c) == rust.pid
    assert rust.stdin is not None
    rust.stdin.close()
    assert rust.wait(timeout=20) == 0
    assert [f for f in os.listdir(runtime_dir) if f.startswith(name)] == [], "the last instance cleans up"

    # A name a Rust server owns exclusively: no pure instance can join, and the error says who.
    other = f"{name}_X"
    owner = rust_instance("tokio", shared=False, of=other)
    with pytest.raises(lite.NameTaken, match="exclusive server") as e2:
        lite.Server(lambda p: p, other, shared=True)
    assert e2.value.owner_pid == owner.pid
    with lite.Client(other, timeout=10) as c:
        assert c.server_pid == owner.pid and c.socket_path == str(runtime_dir / f"{other}.sock")
