"""A test server, run as its own process: ``serve.py MODE NAME [--nats URL] [--transport WAY]``.

With ``--nats`` it also serves on that NATS broker; ``--transport nats`` serves there only. With
``PEER_SHM=1`` it offers shared memory (``Server(shared_memory=True)``), with rings of
``PEER_SHM_RING`` bytes when set. With
``PEER_LITE=1`` in its environment it is served by the pure-Python ``microcs_lite`` instead of the
compiled package (no NATS then).

Modes:
  bytes   default handler echoes bytes; methods below
  text    text=True: default handler answers "echo: <message>"
  small   like bytes, with max_frame=1024 (requests over 1 KiB are refused before sending)
  grace   like bytes, with a short grace period (1 s)
  binary  like bytes, but the default handler answers 0xff 0xfe + payload (not UTF-8)
  streams like bytes, with the streaming and async methods below too
  gen     like streams, but the default handler is a generator: one item per word of the payload
  async   like streams, but the default handler is ``async def`` (echoes the payload)

Methods (all modes): upper, request (the Request's fields as JSON), fail (raises ValueError),
custom (raises RemoteError 400), none (returns None), binary (returns non-UTF-8 bytes), slow
(payload "SECONDS [MARKER]": touches MARKER, sleeps), watch (touches the file named by the payload
once the caller cancels), concurrency (sleeps 0.3 s, reports the most handlers seen
running at once), big (a reply of int(payload) bytes), stop (stops the server), pid.

Streaming and async methods (modes streams, gen and async): count (a generator: payload
"N [MARKER]" yields b"0" .. b"N-1"; touches MARKER if closed early), acount (the same as an async
generator), slowcount (payload "N SECONDS": yields b"0" .. b"N-1", sleeping SECONDS after each),
forever (yields b"tick" every 10 ms until closed), asleep (``async def``: payload
"SECONDS [MARKER]" awaits asyncio.sleep, touching MARKER if cancelled), arequest (``async def``
taking the Request: its method and payload), acall (an object whose ``__call__`` is async:
upper-cases).
"""

from __future__ import annotations

import asyncio
import importlib
import json
import os
import sys
import threading
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any, Union, cast

if os.environ.get("PEER_LITE"):
    # The same server over the pure-Python implementation (python/microcs_lite.py, found through
    # PYTHONPATH): it has the API this script uses, so `microcs` below is that module.
    sys.modules["microcs"] = importlib.import_module("microcs_lite")
import microcs  # noqa: E402

mode, name = sys.argv[1], sys.argv[2]
text = mode == "text"
Payload = Union[bytes, str]


def as_bytes(data: Payload) -> bytes:
    return data.encode() if isinstance(data, str) else data


def echo_bytes(data: bytes) -> bytes:
    return data


def not_text(data: bytes) -> bytes:
    return b"\xff\xfe" + data


def echo_text(message: str) -> str:
    return "echo: " + message


def upper(data: Payload) -> bytes:
    return as_bytes(data).upper()


def request_info(data: Payload, req: microcs.Request) -> str:
    return json.dumps(
        {
            "payload": as_bytes(data).decode(errors="replace"),
            "payload_type": type(data).__name__,
            "req_payload": req.payload.decode(errors="replace"),
            "method": req.method,
            "pid": req.pid,
            "uid": req.uid,
            "gid": req.gid,
            "via": req.via,
            "id": req.id,
            "remaining": req.remaining,
            "deadline": req.deadline,
            "monotonic": time.monotonic(),
            "cancelled": req.is_cancelled(),
            "repr": repr(req),
        }
    )


def fail(data: Payload) -> bytes:
    raise ValueError("bad board: " + as_bytes(data).decode(errors="replace"))


def custom(data: Payload) -> bytes:
    raise microcs.RemoteError("send a board to step", code=400)


def none(data: Payload) -> bytes:
    return cast(bytes, None)  # deliberately wrong, to see what the caller gets


def binary(data: Payload) -> bytes:
    return b"\xff\xfe not text"


def slow(data: Payload) -> bytes:
    # "SECONDS [MARKER]": touch MARKER (so a test knows the handler runs), then sleep.
    seconds, _, marker = as_bytes(data).decode().partition(" ")
    if marker:
        open(marker, "w").close()
    time.sleep(float(seconds or "1"))
    return b"slept"


_lock = threading.Lock()
_running = 0
_most = 0


def concurrency(data: Payload) -> str:
    global _running, _most
    with _lock:
        _running += 1
        _most = max(_most, _running)
    time.sleep(0.3)
    with _lock:
        _running -= 1
        return str(_most)


def watch(data: Payload, req: microcs.Request) -> bytes:
    # Waits (at most 20 s) until the caller cancels, then touches the marker file named by the
    # payload: the test sees that the cancellation reached the handler.
    give_up = time.monotonic() + 20
    while not req.is_cancelled() and time.monotonic() < give_up:
        time.sleep(0.005)
    if req.is_cancelled():
        open(as_bytes(data).decode(), "w").close()
    return b"not cancelled"


def big(data: Payload) -> bytes:
    return b"x" * int(as_bytes(data))


def pid(data: Payload) -> str:
    return str(os.getpid())


def touch(marker: str) -> None:
    if marker:
        open(marker, "w").close()


def count(data: Payload) -> Iterator[bytes]:
    n, _, marker = as_bytes(data).decode().partition(" ")
    try:
        for i in range(int(n)):
            yield b"%d" % i
    except GeneratorExit:
        touch(marker)  # closed before the end: the caller left
        raise


async def acount(data: Payload) -> AsyncIterator[bytes]:
    n, _, marker = as_bytes(data).decode().partition(" ")
    try:
        for i in range(int(n)):
            await asyncio.sleep(0)
            yield b"%d" % i
    except (GeneratorExit, asyncio.CancelledError):
        touch(marker)
        raise


def slowcount(data: Payload) -> Iterator[bytes]:
    n, _, seconds = as_bytes(data).decode().partition(" ")
    for i in range(int(n)):
        yield b"%d" % i
        time.sleep(float(seconds))


def forever(data: Payload) -> Iterator[bytes]:
    while True:
        yield b"tick"
        time.sleep(0.01)


async def asleep(data: Payload) -> bytes:
    seconds, _, marker = as_bytes(data).decode().partition(" ")
    try:
        await asyncio.sleep(float(seconds))
    except asyncio.CancelledError:
        touch(marker)  # the caller cancelled, or its deadline passed
        raise
    return b"slept"


async def arequest(data: Payload, req: microcs.Request) -> str:
    await asyncio.sleep(0)
    return f"{req.method} {as_bytes(data).decode()}"


class AsyncUpper:
    async def __call__(self, data: Payload) -> bytes:
        await asyncio.sleep(0)
        return as_bytes(data).upper()


async def echo_async(data: bytes) -> bytes:
    await asyncio.sleep(0)
    return data


def words(data: bytes) -> Iterator[bytes]:
    yield from data.split()


methods: dict[str, Any] = {
    "upper": upper,
    "request": request_info,
    "fail": fail,
    "custom": custom,
    "none": none,
    "binary": binary,
    "slow": slow,
    "concurrency": concurrency,
    "big": big,
    "watch": watch,
}
if mode in ("streams", "gen", "async"):
    methods.update(
        count=count,
        acount=acount,
        slowcount=slowcount,
        forever=forever,
        asleep=asleep,
        arequest=arequest,
        acall=AsyncUpper(),
    )

options: dict[str, Any] = {}
if os.environ.get("PEER_SHM") == "1":
    options["shared_memory"] = True  # offer shared memory to clients that ask
if os.environ.get("PEER_SHM_RING"):
    options["shm_ring"] = int(os.environ["PEER_SHM_RING"])  # bytes of each ring
if mode == "small":
    options["max_frame"] = 1024
if mode == "grace":
    options["grace_period"] = 1.0
flags = sys.argv[3:]
while flags:
    flag, value, *flags = flags
    if flag not in ("--nats", "--transport"):
        sys.exit(f"serve.py: unknown option {flag}")
    options[flag[2:]] = value

server: microcs.Server[bytes] | microcs.Server[str]
if text:
    server = microcs.Server(echo_text, name, text=True, methods=methods, **options)
else:
    default: Any = {"binary": not_text, "gen": words, "async": echo_async}.get(mode, echo_bytes)
    server = microcs.Server(default, name, methods=methods, **options)


def stop(data: Payload) -> bytes:
    server.stop()  # from inside a handler: returns at once, the server drains meanwhile
    return b"stopping"


# Added after construction (the decorator form is tested in test_server.py).
server.method("stop", stop)
server.method("pid", pid)
server.start_listening()
print("stopped cleanly", flush=True)
