"""Servers and clients on a real NATS broker: ``nats=url``, ``transport=``, MICROCS_NATS_*.

The broker is the one in ``MICROCS_TEST_NATS_URL`` (``./scripts/test nats`` starts one and sets
it), else a ``nats-server`` this module starts on a free loopback port. Without either the tests
are skipped, saying why — unless ``MICROCS_REQUIRE_NATS=1`` (CI), where that is a failure.

Servers run in processes of their own with runtime directories of their own (or, in-process, with
no local name at all), and clients use yet another runtime directory: a reply can only have come
over the broker.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import NoReturn

import pytest

import microcs
from conftest import PEERS, _default_sigint, stop_process

#: The uid a request that came over NATS reports: ``(uid_t)-1``, which no real user has.
NO_UID = 2**32 - 1


def _nats_server_binary() -> str | None:
    found = shutil.which("nats-server")
    if found is None and os.access("/usr/sbin/nats-server", os.X_OK):
        found = "/usr/sbin/nats-server"
    return found


def _unavailable(reason: str) -> NoReturn:
    """Skips the test, or fails it when the run requires NATS."""
    if os.environ.get("MICROCS_REQUIRE_NATS") == "1":
        pytest.fail(f"MICROCS_REQUIRE_NATS=1 but {reason}", pytrace=False)
    pytest.skip(reason)


class Broker:
    """A ``nats-server`` of our own on a free loopback port (``-p -1``: it picks, its log says)."""

    def __init__(self, binary: str, *args: str) -> None:
        self.log = tempfile.NamedTemporaryFile(prefix="mcs-nats-", suffix=".log")
        self.proc = subprocess.Popen(
            [binary, "-a", "127.0.0.1", "-p", "-1", *args],
            stdin=subprocess.DEVNULL,
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        give_up = time.monotonic() + 20
        while True:
            text = Path(self.log.name).read_text(errors="replace")
            m = re.search(r"Listening for client connections on 127\.0\.0\.1:(\d+)", text)
            if m:
                self.url = f"nats://127.0.0.1:{m.group(1)}"
                return
            if self.proc.poll() is not None or time.monotonic() > give_up:
                self.stop()
                raise AssertionError(f"nats-server did not start:\n{text}")
            time.sleep(0.05)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self.log.close()


@pytest.fixture(scope="module")
def nats_url() -> Iterator[str]:
    """The broker's URL: MICROCS_TEST_NATS_URL, else a nats-server started for this module."""
    given = os.environ.get("MICROCS_TEST_NATS_URL", "").strip()
    if given:
        yield given
        return
    binary = _nats_server_binary()
    if binary is None:
        _unavailable(
            "no NATS broker: MICROCS_TEST_NATS_URL is not set and nats-server is not installed "
            "(./scripts/test nats provides both)"
        )
    broker = Broker(binary)
    yield broker.url
    broker.stop()


@pytest.fixture(autouse=True)
def clean_nats_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """No MICROCS_NATS_* or MICROCS_TRANSPORT from the caller's environment: each test sets what
    it means to."""
    for var in list(os.environ):
        if var.startswith("MICROCS_NATS_") or var == "MICROCS_TRANSPORT":
            monkeypatch.delenv(var)


@pytest.fixture
def other_dir() -> Iterator[Path]:
    """A second runtime directory, for the side that must not see the other's local socket."""
    d = Path(tempfile.mkdtemp(prefix="mcs-py-other-", dir="/tmp"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


def wait_on_nats(name: str, url: str, proc: subprocess.Popen[bytes]) -> None:
    """Waits (at most 20 s) until the server process `proc` answers `name` over NATS.

    Its own answer, not just any instance's: other instances of the name may share the queue
    group, so ask until this one's pid comes back.
    """
    give_up = time.monotonic() + 20
    with microcs.Client(name, timeout=5, nats=url, transport="nats") as c:
        while True:
            try:
                if c.call("pid") == str(proc.pid).encode():
                    return
            except microcs.NoService:
                pass
            if proc.poll() is not None:
                _, err = proc.communicate(timeout=5)
                raise AssertionError(f"server exited with {proc.returncode}: {err.decode(errors='replace')}")
            if time.monotonic() > give_up:
                raise AssertionError(f"server {proc.pid} did not answer {name!r} on NATS at {url} within 20 s")
            time.sleep(0.01)


NatsServerFactory = Callable[..., "subprocess.Popen[bytes]"]


@pytest.fixture
def nats_server(nats_url: str, name: str) -> Iterator[NatsServerFactory]:
    """Starts ``peers/serve.py MODE NAME --nats URL --transport WAY`` in another process, with
    its own runtime directory unless one is given, and waits until it answers on NATS. Every
    process started is stopped after the test."""
    procs: list[subprocess.Popen[bytes]] = []
    dirs: list[Path] = []

    def start(
        mode: str = "bytes", transport: str = "nats", *, runtime_dir: Path | None = None
    ) -> subprocess.Popen[bytes]:
        if runtime_dir is None:
            runtime_dir = Path(tempfile.mkdtemp(prefix="mcs-py-srv-", dir="/tmp"))
            dirs.append(runtime_dir)
        proc = subprocess.Popen(
            [sys.executable, str(PEERS / "serve.py"), mode, name, "--nats", nats_url, "--transport", transport],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env={**os.environ, "MICROCS_RUNTIME_DIR": str(runtime_dir)},
            preexec_fn=_default_sigint,
        )
        procs.append(proc)
        wait_on_nats(name, nats_url, proc)
        return proc

    yield start
    for p in procs:
        stop_process(p)
    for d in dirs:
        shutil.rmtree(d, ignore_errors=True)


def test_nats_only_server_answers_a_client_with_another_runtime_dir(
    nats_server: NatsServerFactory, nats_url: str, name: str, runtime_dir: Path
) -> None:
    proc = nats_server("bytes", "nats")
    # Nothing local on this side: the reply can only come over the broker.
    assert microcs.list_services(runtime_dir) == []
    with microcs.Client(name, timeout=10, nats=nats_url) as c:
        assert c.via == "nats"
        assert c.nats_url == nats_url
        assert c.request(b"over the broker") == b"over the broker"
        assert c.call("upper", b"step") == b"STEP"
        assert c.call("pid") == str(proc.pid).encode()
        assert c.send_message("text") == "text"
        assert c.server_pid is None
        big = os.urandom(200_000)
        assert c.request(big) == big
        # What the handler saw: a call that came over NATS, with our deadline.
        seen = json.loads(c.call("request", b"who"))
        assert (seen["via"], seen["pid"], seen["uid"], seen["gid"]) == ("nats", 0, NO_UID, NO_UID)
        assert seen["method"] == "request" and seen["req_payload"] == "who"
        assert 0 < seen["remaining"] <= 10
        assert "via nats" in seen["repr"]
        # The built-in answers, as the NATS micro protocol has them.
        assert c.ping()["name"] == name
        info = c.info()
        assert info["type"] == "io.nats.micro.v1.info_response"
        assert {e["name"] for e in info["endpoints"]} >= {"default", "upper", "pid", "request"}
        assert info["metadata"]["pid"] == str(proc.pid)
        stats = c.stats()
        assert sum(e["num_requests"] for e in stats["endpoints"]) >= 6
        assert c.via == "nats"


def test_handler_errors_arrive_as_remote_error_with_code_and_message(
    nats_server: NatsServerFactory, nats_url: str, name: str
) -> None:
    nats_server("bytes", "nats")
    with microcs.Client(name, timeout=10, nats=nats_url, transport="nats") as c:
        with pytest.raises(microcs.RemoteError) as e:
            c.call("fail", b"x")
        assert (e.value.code, e.value.message) == (500, "ValueError: bad board: x")
        assert name in str(e.value)
        # A handler's own RemoteError keeps its code and message across the broker.
        with pytest.raises(microcs.RemoteError) as e:
            c.call("custom")
        assert (e.value.code, e.value.message) == (400, "send a board to step")
        # A method the service lacks has no subject on the broker: nobody answers it.
        with pytest.raises(microcs.NoService, match="method 'no_such_method'"):
            c.call("no_such_method")
        # The server goes on serving.
        assert c.request(b"still here") == b"still here"


def test_timeouts_and_oversize_payloads_keep_their_kinds(
    nats_server: NatsServerFactory, nats_url: str, name: str
) -> None:
    nats_server("bytes", "nats")
    with microcs.Client(name, timeout=0.5, nats=nats_url, transport="nats") as c:
        with pytest.raises(microcs.TimedOut) as t:
            c.call("slow", b"3")
        assert t.value.may_have_run
        # Over the broker's max_payload (1 MiB by default): refused before anything is sent.
        with pytest.raises(microcs.FrameTooLarge):
            c.request(b"x" * (2 << 20))
        c.timeout = 10
        assert c.request(b"after") == b"after"


def test_a_password_in_the_url_is_masked(nats_server: NatsServerFactory, nats_url: str, name: str) -> None:
    nats_server("bytes", "nats")
    # The test broker has no authorization: it accepts any user.
    url = nats_url.replace("nats://", "nats://someone:hunter2@")
    with microcs.Client(name, timeout=10, nats=url, transport="nats") as c:
        assert c.request(b"x") == b"x"
        assert c.nats_url == nats_url.replace("nats://", "nats://someone:***@")
        with pytest.raises(microcs.NoService) as e:
            c.call("missing")
        assert "hunter2" not in str(e.value) and "someone:***@" in str(e.value)


def test_no_responders_is_no_service(nats_url: str, name: str, runtime_dir: Path) -> None:
    # NATS only: the broker answers "no responders" at once.
    with microcs.Client(name, timeout=20, nats=nats_url, transport="nats") as c:
        start = time.monotonic()
        with pytest.raises(microcs.NoService) as e:
            c.request(b"anyone?")
        assert f"no service named '{name}' is answering on NATS at {nats_url}" in str(e.value)
        assert not e.value.may_have_run
        # Well before the 20 s timeout: nobody waited for an answer that could not come.
        assert time.monotonic() - start < 10
    # Local first: neither a local instance nor one on NATS.
    with microcs.Client(name, timeout=5, nats=nats_url) as c, pytest.raises(microcs.NoService):
        c.request(b"anyone?")


def test_async_client_over_nats(nats_server: NatsServerFactory, nats_url: str, name: str) -> None:
    nats_server("bytes", "nats")

    async def main() -> None:
        async with microcs.AsyncClient(name, timeout=30, nats=nats_url) as client:
            assert client.via == "nats"
            replies = await asyncio.gather(*(client.call("upper", b"req-%d" % i) for i in range(200)))
            assert replies == [b"REQ-%d" % i for i in range(200)]
            assert await client.send_message("hi") == "hi"
            assert (await client.info())["name"] == name
            with pytest.raises(microcs.RemoteError) as e:
                await client.call("fail", b"async")
            assert (e.value.code, e.value.message) == (500, "ValueError: bad board: async")
        async with microcs.AsyncClient(f"{name}_NOBODY", timeout=30, nats=nats_url, transport="nats") as nobody:
            with pytest.raises(microcs.NoService):
                await nobody.request(b"anyone?")

    asyncio.run(main())


def test_local_first_then_nats(
    nats_server: NatsServerFactory, nats_url: str, name: str, runtime_dir: Path, other_dir: Path
) -> None:
    # Serves both ways (auto): its local socket in `runtime_dir`, and NATS.
    proc = nats_server("bytes", "auto", runtime_dir=runtime_dir)
    with microcs.Client(name, timeout=10, nats=nats_url) as local:
        assert local.request(b"a") == b"a"
        assert local.via == "local"
        assert local.server_pid == proc.pid
        assert json.loads(local.call("request"))["via"] == "local"
    with microcs.Client(name, timeout=10, runtime_dir=other_dir, nats=nats_url) as remote:
        assert remote.request(b"b") == b"b"
        assert remote.via == "nats"
        assert json.loads(remote.call("request"))["via"] == "nats"
    # transport="nats" skips the local instance; "local" never uses NATS.
    with microcs.Client(name, timeout=10, nats=nats_url, transport="nats") as forced:
        assert forced.request(b"c") == b"c" and forced.via == "nats"
    with pytest.raises(microcs.NoService):
        microcs.Client(name, timeout=10, runtime_dir=other_dir, nats=nats_url, transport="local")

    # One instance, found both ways.
    (both,) = [s for s in microcs.list_services(runtime_dir, nats=nats_url) if s.name == name]
    assert both.where == ["local", "nats"]
    assert both.pid == proc.pid and both.socket == str(runtime_dir / f"{name}.sock")
    assert both.host is not None
    (elsewhere,) = [s for s in microcs.list_services(other_dir, nats=nats_url) if s.name == name]
    assert elsewhere.where == ["nats"] and elsewhere.id == both.id


def test_list_services_on_nats(nats_server: NatsServerFactory, nats_url: str, name: str, runtime_dir: Path) -> None:
    before = time.time()
    procs = [nats_server("bytes", "nats") for _ in range(2)]
    found = [s for s in microcs.list_services(nats=nats_url, timeout=2) if s.name == name]
    # Two instances of one name (NATS only: no local name was claimed by either).
    assert sorted(s.pid for s in found if s.pid is not None) == sorted(p.pid for p in procs)
    for s in found:
        assert s.where == ["nats"]
        assert (s.uid, s.socket) == (os.getuid(), None)
        assert s.started is not None and before - 5 < s.started < time.time() + 5
        assert s.protocol_version is not None and s.protocol_version >= 1
        assert s.version == "0.1.0"
        assert {"upper", "fail", "stop"} <= set(s.methods) and "default" not in s.methods
        assert s.host
        assert "where=nats" in repr(s)
    assert len({s.id for s in found}) == 2
    # Without nats=, only the local services (none here).
    assert [s for s in microcs.list_services() if s.name == name] == []


def test_microcs_nats_url_alone_reaches_nats(
    nats_server: NatsServerFactory, nats_url: str, name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    nats_server("bytes", "nats")
    monkeypatch.setenv("MICROCS_NATS_URL", nats_url)
    with microcs.Client(name, timeout=10) as c:
        assert c.request(b"env") == b"env" and c.via == "nats"

    async def main() -> bytes:
        async with microcs.AsyncClient(name, timeout=10) as client:
            return await client.request(b"async env")

    assert asyncio.run(main()) == b"async env"
    # MICROCS_TRANSPORT=local turns it off for clients that set no transport.
    monkeypatch.setenv("MICROCS_TRANSPORT", "local")
    with pytest.raises(microcs.NoService):
        microcs.Client(name, timeout=10)
    # A server never takes its URL from the environment.
    monkeypatch.delenv("MICROCS_TRANSPORT")
    with pytest.raises(microcs.InvalidConfig, match="never takes it from MICROCS_NATS_URL"):
        microcs.Server(lambda b: b, f"{name}_S", transport="nats")


def test_stopped_server_leaves_the_broker(nats_server: NatsServerFactory, nats_url: str, name: str) -> None:
    proc = nats_server("bytes", "nats")
    with microcs.Client(name, timeout=10, nats=nats_url, transport="nats") as c:
        assert c.request(b"x") == b"x"
        # Ctrl-C: the server stops, unsubscribes, and its process exits cleanly.
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == -signal.SIGINT  # KeyboardInterrupt, re-raised by Python
        assert proc.stderr is not None and b"KeyboardInterrupt" in proc.stderr.read()
        with pytest.raises(microcs.NoService):
            c.request(b"x")
    assert [s for s in microcs.list_services(nats=nats_url, timeout=0.5) if s.name == name] == []


def test_in_process_nats_only_servers(
    nats_url: str, name: str, runtime_dir: Path, other_dir: Path
) -> None:
    calls: list[str] = []

    def handler(data: bytes, req: microcs.Request) -> bytes:
        calls.append(req.via)
        return data[::-1]

    server = microcs.Server(handler, name, nats=nats_url, transport="nats")
    assert microcs.list_services() == []  # no local name claimed
    with server:
        with microcs.Client(name, timeout=10, runtime_dir=other_dir, nats=nats_url) as c:
            assert c.request(b"abc") == b"cba"
        assert server.stats()["endpoints"][0]["num_requests"] == 1
    assert calls == ["nats"]
    assert not server.running
    # Stopped: its subjects are gone from the broker.
    with microcs.Client(name, timeout=10, nats=nats_url, transport="nats") as c, pytest.raises(microcs.NoService):
        c.request(b"abc")
    # Another server may serve the name on NATS right away, and on the same machine a second
    # NATS-only instance of a name is allowed (nothing local is claimed).
    a = microcs.Server(lambda b: b"a", name, nats=nats_url, transport="nats")
    b = microcs.Server(lambda b: b"b", name, nats=nats_url, transport="nats")
    with a, b, microcs.Client(name, timeout=10, nats=nats_url, transport="nats") as c:
        assert {c.request(b"") for _ in range(100)} == {b"a", b"b"}


def test_shared_instances_on_nats_too_are_one_queue_group(nats_url: str, name: str, runtime_dir: Path) -> None:
    # Two instances of one name (shared=True) that also serve on NATS: each is a NATS micro
    # service of its own (its own id, its own counters), both in the name's queue group.
    a = microcs.Server(lambda b: b"a", name, shared=True, nats=nats_url)
    b = microcs.Server(lambda b: b"b", name, shared=True, nats=nats_url)
    with a, b:
        local = [s for s in microcs.list_services() if s.name == name]
        assert sorted(s.instance for s in local if s.instance is not None) == [0, 1]
        with microcs.Client(name, timeout=10, nats=nats_url, transport="nats") as c:
            assert {c.request(b"") for _ in range(100)} == {b"a", b"b"}
        on_nats = [s for s in microcs.list_services(nats=nats_url, timeout=2) if s.name == name and "nats" in s.where]
        assert sorted(s.id for s in on_nats) == sorted(s.id for s in local)
        counts = [srv.stats()["endpoints"][0]["num_requests"] for srv in (a, b)]
        assert sum(counts) == 100 and min(counts) > 0, counts
        assert {a.stats()["id"], b.stats()["id"]} == {s.id for s in local}
    assert [s for s in microcs.list_services() if s.name == name] == []
    assert [s for s in microcs.list_services(nats=nats_url, timeout=0.5) if s.name == name] == []


def test_async_handlers_on_nats_and_locally(nats_url: str, name: str, runtime_dir: Path, other_dir: Path) -> None:
    # A server with an async handler is the tokio server: on the local socket and on NATS.
    async def upper(data: bytes, req: microcs.Request) -> bytes:
        await asyncio.sleep(0.01)
        return data.upper() + b" via " + req.via.encode()

    def plain(data: bytes) -> bytes:
        return b"plain " + data

    with microcs.Server(plain, name, nats=nats_url, methods={"upper": upper}):
        with microcs.Client(name, timeout=10, runtime_dir=other_dir, nats=nats_url) as c:
            assert c.call("upper", b"abc") == b"ABC via nats"
            assert c.request(b"x") == b"plain x"
        with microcs.Client(name, timeout=10) as c:
            assert c.call("upper", b"abc") == b"ABC via local"
            assert c.request(b"y") == b"plain y"


def test_argument_errors(nats_url: str, name: str) -> None:
    with pytest.raises(microcs.InvalidConfig, match="'auto', 'local' or 'nats'"):
        microcs.Client(name, transport="tcp")  # type: ignore[arg-type]
    with pytest.raises(microcs.InvalidConfig, match="transport='nats' needs a NATS URL"):
        microcs.Client(name, transport="nats")
    with pytest.raises(ValueError, match="transport='nats' needs a NATS URL"):
        microcs.AsyncClient(name, transport="nats")
    with pytest.raises(microcs.InvalidConfig, match="not an empty string"):
        microcs.Client(name, nats=" ")
    with pytest.raises(microcs.InvalidName, match="no dots"):
        microcs.Server(lambda b: b, f"{name}.sub", nats=nats_url)
    with pytest.raises(microcs.InvalidConfig, match="not SemVer.*pass such a version="):
        microcs.Server(lambda b: b, name, nats=nats_url, version="1.0")
    with pytest.raises(microcs.InvalidName, match="method 'v1.step'"):
        microcs.Server(None, name, nats=nats_url, methods={"v1.step": lambda b: b})
    # None of those kept the name.
    with microcs.Server(lambda b: b, name, nats=nats_url):
        pass


def test_unreachable_broker_names_the_url(name: str, runtime_dir: Path) -> None:
    # A port nobody listens on: take a free one and close it.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        url = f"nats://127.0.0.1:{s.getsockname()[1]}"
    with pytest.raises(microcs.Error, match=re.escape(f"cannot connect to the NATS server at {url}")):
        microcs.Server(lambda b: b, name, nats=url, transport="nats")
    with pytest.raises(microcs.Error, match=re.escape(url)) as e:
        microcs.Client(name, timeout=5, nats=url)
    assert f"no service named '{name}' is running" in str(e.value)
    with pytest.raises(microcs.Error, match=re.escape(url)):
        microcs.list_services(nats=url)


def test_credentials_come_from_the_environment(
    name: str, runtime_dir: Path, other_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    binary = _nats_server_binary()
    if binary is None:
        _unavailable("nats-server is not installed (this test starts a broker that wants a token of its own)")
    broker = Broker(binary, "--auth", "s3cret-token")
    try:
        with pytest.raises(microcs.PermissionDenied, match="refused our credentials"):
            microcs.Server(lambda b: b, name, nats=broker.url, transport="nats")
        monkeypatch.setenv("MICROCS_NATS_TOKEN", "s3cret-token")
        with microcs.Server(lambda b: b + b"!", name, nats=broker.url, transport="nats"):
            with microcs.Client(name, timeout=10, runtime_dir=other_dir, nats=broker.url) as c:
                assert c.request(b"in") == b"in!"
            monkeypatch.setenv("MICROCS_NATS_TOKEN", "wrong")
            with pytest.raises(microcs.PermissionDenied) as e:
                microcs.Client(name, timeout=10, nats=broker.url, transport="nats").request(b"in")
            assert "wrong" not in str(e.value) and "s3cret" not in str(e.value)
    finally:
        broker.stop()
