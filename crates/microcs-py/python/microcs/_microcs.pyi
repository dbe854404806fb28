"""Type stubs of the extension module (the Rust part of ``microcs``)."""

import os
from asyncio import Future
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from types import TracebackType
from typing import Any, Generic, Literal, TypeVar, final, overload

from typing_extensions import Self, TypeAlias

#: What a handler receives: ``bytes``, or ``str`` for a server made with ``text=True``.
_P = TypeVar("_P", bytes, str)
_R = TypeVar("_R", bound="Answer")

#: What a handler may return (``str`` is sent as UTF-8); also what a streaming handler yields.
Reply: TypeAlias = bytes | bytearray | memoryview | str
#: How a handler answers: a reply (a plain function), an awaitable of one (``async def``: run on
#: the server's event loop), or items (a generator or an async generator function: a stream).
Answer: TypeAlias = Reply | Awaitable[Reply] | Iterator[Reply] | AsyncIterator[Reply]
#: What may be sent as a payload.
Payload: TypeAlias = bytes | bytearray | memoryview
#: A handler: ``f(payload)`` or ``f(payload, request)``; ``def``, ``async def``, a generator or
#: an async generator function (told apart with ``inspect`` when it is registered).
Handler: TypeAlias = Callable[[_P], Answer] | Callable[[_P, Request], Answer]
_PathLike: TypeAlias = str | os.PathLike[str]
#: Where a server serves or a client calls: ``"auto"`` (default), ``"local"`` or ``"nats"``.
_Transport: TypeAlias = Literal["auto", "local", "nats"]
#: Where a request went or came from.
_Via: TypeAlias = Literal["local", "nats"]

DEFAULT_TIMEOUT: float
__version__: str

@final
class Request:
    """One call, as a handler that takes a second parameter receives it."""

    @property
    def method(self) -> str | None:
        """The method the caller named, or None for the default handler."""
    @property
    def payload(self) -> bytes:
        """The request payload, as bytes."""
    @property
    def pid(self) -> int:
        """Process id of the caller (from the kernel, cannot be forged); 0 over NATS."""
    @property
    def uid(self) -> int:
        """User id of the caller; 4294967295 (no real user) over NATS."""
    @property
    def gid(self) -> int:
        """Group id of the caller; 4294967295 over NATS."""
    @property
    def via(self) -> _Via:
        """How the call came: ``"local"`` (the Unix socket) or ``"nats"``."""
    @property
    def id(self) -> int:
        """The request id the caller chose."""
    @property
    def remaining(self) -> float | None:
        """Seconds left before the caller's deadline (0.0 once passed), or None."""
    @property
    def deadline(self) -> float | None:
        """The caller's deadline on the ``time.monotonic()`` clock, or None."""
    def is_cancelled(self) -> bool:
        """True once nobody wants the answer (cancelled, disconnected, or past the deadline)."""

@final
class MethodDecorator(Generic[_P]):
    """Returned by ``Server.method(name)``: registers the function it decorates."""

    @overload
    def __call__(self, func: Callable[[_P], _R]) -> Callable[[_P], _R]: ...
    @overload
    def __call__(self, func: Callable[[_P, Request], _R]) -> Callable[[_P, Request], _R]: ...

@final
class Server(Generic[_P]):
    """Serves a name with a Python handler.

    The name is claimed when the object is created (``NameTaken`` if a live server has it).
    ``start_listening()``/``serve()`` serve on this thread until ``stop()`` or Ctrl-C;
    ``start()`` (or ``with``) serves in background threads. Each request runs its handler on
    a server thread, which takes the GIL only for the handler.

    A generator function (``yield``) answers with a stream: each item goes to the caller of
    ``Client.stream()`` as the caller makes room for it (each ``next()`` of the generator runs
    on the server thread with the GIL); when the caller cancels or leaves, the generator is
    closed (``GeneratorExit`` at its ``yield``). A streaming method called with ``call()``
    answers ``RemoteError`` 400; a plain handler asked for a stream answers with one item.

    ``async def`` handlers and async generator functions run on an asyncio event loop that the
    server owns: a thread of its own, started by ``start()``/``serve()`` when any handler is
    async and stopped after the server drained. Such a server is served by the library's
    async (tokio) server: each request is a task on that loop, no thread waits for it, and
    ``max_in_flight`` defaults to 1024 per connection (128 for a server of plain handlers,
    which runs a thread per request); its plain handlers and generators run on a pool of
    threads. When the caller cancels, or its deadline passes, the coroutine's task is
    cancelled: ``asyncio.CancelledError`` is raised at its ``await``.

    With ``nats="nats://host:4222"`` the same handlers are also a NATS micro service on that
    broker (service ``name``, subjects ``name`` and ``name.<method>``, queue group ``q``); the
    broker is connected by the constructor. ``transport="nats"`` serves on NATS only (no local
    name is claimed, so several instances may run on one machine); ``"local"`` ignores ``nats``.
    On NATS the name may hold only letters, digits, ``-`` and ``_``, and ``version`` must be
    SemVer. Credentials come from ``MICROCS_NATS_USER``/``MICROCS_NATS_PASSWORD``,
    ``MICROCS_NATS_TOKEN`` or ``MICROCS_NATS_CREDS``, a private CA from ``MICROCS_NATS_CA``;
    a server never takes its URL from ``MICROCS_NATS_URL``.

    With ``shared=True`` the server joins ``name`` as one of several *instances* (each a process
    of its own, e.g. from ``multiprocessing``): clients connect to the least-loaded live one and
    skip dead ones, so a CPU-bound handler scales past the GIL. By default a server owns its
    name alone (a second one raises ``NameTaken``); exclusive servers and instances never mix.

    With ``socket_activation=True`` it serves on the listening socket systemd passed
    (``LISTEN_FDS``; the ``.socket`` unit's ``ListenStream=`` must be the name's socket,
    ``%t/microcs/NAME.sock``; see docs/ACTIVATION.md), or binds its own when none was passed.

    With ``shared_memory=True`` it offers shared memory to clients that ask (docs/PROTOCOL.md
    § 18); ``shm_ring`` is then the size in bytes of each of a connection's two rings (default
    256 KiB; a power of two from 4 KiB to 64 MiB, else ``InvalidConfig``).
    """

    @overload
    def __init__(
        self: Server[bytes],
        handler: Handler[bytes] | None,
        name: str,
        *,
        text: Literal[False] = False,
        methods: Mapping[str, Handler[bytes]] | None = None,
        runtime_dir: _PathLike | None = None,
        max_frame: int | None = None,
        max_connections: int | None = None,
        max_in_flight: int | None = None,
        grace_period: float | None = None,
        version: str | None = None,
        description: str | None = None,
        metadata: Mapping[str, str] | None = None,
        nats: str | None = None,
        transport: _Transport | None = None,
        shared: bool = False,
        shared_memory: bool = False,
        shm_ring: int | None = None,
        idle_timeout: float | None = None,
        socket_activation: bool = False,
    ) -> None: ...
    @overload
    def __init__(
        self: Server[str],
        handler: Handler[str] | None,
        name: str,
        *,
        text: Literal[True],
        methods: Mapping[str, Handler[str]] | None = None,
        runtime_dir: _PathLike | None = None,
        max_frame: int | None = None,
        max_connections: int | None = None,
        max_in_flight: int | None = None,
        grace_period: float | None = None,
        version: str | None = None,
        description: str | None = None,
        metadata: Mapping[str, str] | None = None,
        nats: str | None = None,
        transport: _Transport | None = None,
        shared: bool = False,
        shared_memory: bool = False,
        shm_ring: int | None = None,
        idle_timeout: float | None = None,
        socket_activation: bool = False,
    ) -> None: ...
    @property
    def name(self) -> str:
        """The service name."""
    @property
    def text(self) -> bool:
        """Whether handlers receive ``str`` (True) or ``bytes`` (False)."""
    @property
    def running(self) -> bool:
        """True while serving."""
    @overload
    def method(self, name: str) -> MethodDecorator[_P]: ...
    @overload
    def method(self, name: str, handler: Callable[[_P], _R]) -> Callable[[_P], _R]: ...
    @overload
    def method(self, name: str, handler: Callable[[_P, Request], _R]) -> Callable[[_P, Request], _R]: ...
    def start(self) -> None:
        """Serves in background threads and returns at once; nothing if already serving."""
    def serve(self, timeout: float | None = None) -> None:
        """Serves until ``stop()``, ``timeout`` seconds, the idle timeout (``idle_timeout=``
        seconds, else ``MICROCS_IDLE_TIMEOUT``: that long without requests), or Ctrl-C (which then raises
        ``KeyboardInterrupt`` after stopping and freeing the name). Raises ``NameTaken`` (with
        ``owner_pid``) if the server lost its name: its runtime files were removed and another
        server owns the name now (while it is free, the server takes it back by itself)."""
    def start_listening(self, timeout: float | None = None) -> None:
        """The original course project's name for ``serve()``."""
    def stop(self) -> None:
        """Stops serving, lets running handlers finish, frees the name. Idempotent."""
    def stats(self) -> dict[str, Any]:
        """The ``$stats`` counters (requests, errors, timings per endpoint)."""
    def __enter__(self) -> Self: ...
    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
        /,
    ) -> None: ...

@final
class Client:
    """A connection to a named service; every wait releases the GIL.

    Connects at once (``NoService`` if nobody serves the name; when a service definition for it
    exists, the service is started first, unless ``activate=False`` or ``MICROCS_NO_ACTIVATION``
    is set: ``StartFailed`` if that fails). Of a name served by several instances it connects to
    the least-loaded one, or to slot ``instance`` only. One request at a time goes over
    the connection; threads sharing a ``Client`` take turns. While a call waits for its answer,
    signal handlers run (every 0.1 s, on the main thread): Ctrl-C raises ``KeyboardInterrupt``,
    the request is cancelled on the server, and the client stays usable. A handler may
    ``close()`` the client it interrupted (effective when the call returns) but not call it
    (``RuntimeError``). A call over NATS is not
    interrupted (it ends at the latest at its timeout).

    With ``nats="nats://host:4222"`` (or ``MICROCS_NATS_URL`` in the environment) a local
    instance is used when one is running and the NATS broker otherwise; ``transport`` forces
    ``"local"`` or ``"nats"`` (default: ``MICROCS_TRANSPORT``, else ``"auto"``). Credentials come
    from the URL (``nats://user:password@host``, percent-encoded) or the
    ``MICROCS_NATS_*`` environment variables; there are no credential arguments.

    After ``os.fork()`` (a ``multiprocessing`` pool with the ``fork`` start method, say) a client
    made in the parent keeps working in every process: the child's first call leaves the
    parent's connection alone and connects anew, so each process gets only its own replies.
    """

    def __init__(
        self,
        name: str,
        timeout: float = 30.0,
        *,
        runtime_dir: _PathLike | None = None,
        max_frame: int | None = None,
        nats: str | None = None,
        transport: _Transport | None = None,
        stream_window: tuple[int, int] | None = None,
        activate: bool | None = None,
        instance: int | None = None,
        shared_memory: bool | None = None,
    ) -> None: ...
    def request(self, payload: Payload) -> bytes:
        """Sends ``payload`` to the default handler; returns the reply."""
    def call(self, method: str, payload: Payload | None = None) -> bytes:
        """Calls the method ``method`` with ``payload``; returns the reply."""
    def stream(self, method: str, payload: Payload | None = None, *, limit: float | None = None) -> ItemStream:
        """Calls ``method`` (``""``: the default handler) and returns an iterator of the items
        it answers with. The timeout bounds each wait for an item; ``limit`` (seconds) bounds
        the whole stream. The client makes no other call until the stream ends or is closed
        (breaking out of a ``for`` loop closes it and cancels it on the server)."""
    def send_message(self, message: str) -> str:
        """Sends text to the default handler; returns the reply as text."""
    def ping(self) -> dict[str, Any]:
        """The service's ``$ping`` answer."""
    def info(self) -> dict[str, Any]:
        """The service's ``$info`` answer (name, version, endpoints)."""
    def stats(self) -> dict[str, Any]:
        """The service's ``$stats`` answer."""
    @property
    def name(self) -> str:
        """The service name."""
    @property
    def timeout(self) -> float:
        """Seconds each request may take."""
    @timeout.setter
    def timeout(self, value: float) -> None: ...
    @property
    def server_pid(self) -> int | None:
        """The server's process id (None while disconnected, and over NATS)."""
    @property
    def via(self) -> _Via:
        """Where the last request went (before any, where the next one would go)."""
    @property
    def nats_url(self) -> str | None:
        """The NATS broker this client uses or falls back to (password masked), or None."""
    @property
    def closed(self) -> bool:
        """True once ``close()`` was called."""
    @property
    def local_transport(self) -> Literal["shm", "unix"] | None:
        """What carries the frames to the local service: ``"shm"`` (shared memory, when both
        sides asked for it: ``shared_memory=True`` here or ``MICROCS_SHM=1``, and
        ``Server(shared_memory=True)``), ``"unix"`` (the socket), or None while not connected
        locally."""
    def close(self) -> None:
        """Closes the connection; later calls raise ``Closed``. Idempotent."""
    def __enter__(self) -> Self: ...
    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
        /,
    ) -> None: ...

@final
class AsyncClient:
    """An asyncio client: many requests in flight over one connection.

    Every call returns an ``asyncio.Future`` of the running loop; awaiting thousands at once
    costs no thread per call. Connects on first use, on ``await client.connect()``, or on
    entering ``async with``. Cancelling a call's future tells the server to cancel the work.
    A client serves one event loop at a time: the one it was first used on, until that loop is
    closed.

    ``nats`` and ``transport`` as for ``Client`` (``MICROCS_NATS_URL`` applies too). Over NATS,
    cancelling a call stops waiting for it; the broker does not carry the cancellation.

    After ``os.fork()``, a client made in the parent connects anew in the child (on a runtime of
    the child's own, for the child's event loop) and never touches the parent's connection.
    """

    def __init__(
        self,
        name: str,
        timeout: float = 30.0,
        *,
        runtime_dir: _PathLike | None = None,
        max_frame: int | None = None,
        nats: str | None = None,
        transport: _Transport | None = None,
        stream_window: tuple[int, int] | None = None,
        activate: bool | None = None,
        shared_memory: bool | None = None,
    ) -> None: ...
    def connect(self) -> Future[AsyncClient]:
        """Connects now (``NoService`` if nobody serves the name); resolves to the client."""
    def request(self, payload: Payload) -> Future[bytes]:
        """Sends ``payload`` to the default handler; resolves to the reply."""
    def call(self, method: str, payload: Payload | None = None) -> Future[bytes]:
        """Calls the method ``method`` with ``payload``; resolves to the reply."""
    def stream(
        self, method: str, payload: Payload | None = None, *, limit: float | None = None
    ) -> AsyncItemStream:
        """Calls ``method`` (``""``: the default handler); an async iterator of the items it
        answers with, opened by the first ``__anext__``. The timeout bounds each wait for an
        item; ``limit`` bounds the whole stream. Cancelling the task that waits for an item
        cancels the stream on the server, as do ``aclose()`` and dropping the iterator."""
    def send_message(self, message: str) -> Future[str]:
        """Sends text to the default handler; resolves to the reply as text."""
    def ping(self) -> Future[dict[str, Any]]:
        """The service's ``$ping`` answer."""
    def info(self) -> Future[dict[str, Any]]:
        """The service's ``$info`` answer."""
    def stats(self) -> Future[dict[str, Any]]:
        """The service's ``$stats`` answer."""
    @property
    def name(self) -> str:
        """The service name."""
    @property
    def timeout(self) -> float:
        """Seconds each request may take."""
    @property
    def closed(self) -> bool:
        """True once ``close()`` was called."""
    @property
    def local_transport(self) -> Literal["shm", "unix"] | None:
        """What carries the frames to the local service: ``"shm"`` (shared memory, when both
        sides asked for it: ``shared_memory=True`` here or ``MICROCS_SHM=1``, and
        ``Server(shared_memory=True)``), ``"unix"`` (the socket), or None while not connected
        locally."""
    @property
    def via(self) -> _Via | None:
        """Where the last request went (before any, where the next one would go); None until
        connected."""
    def close(self) -> None:
        """Later calls raise ``Closed``; calls already in flight still complete."""
    def __aenter__(self) -> Future[AsyncClient]: ...
    def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
        /,
    ) -> Future[None]: ...

@final
class ItemStream:
    """The items of a stream, from ``Client.stream()``: an iterator of ``bytes``.

    Holds its client's connection until the stream ends, fails (the usual exceptions), or is
    closed: ``close()``, ``with``, or dropping it (leaving a ``for`` loop early), which cancels
    the stream on the server. Ctrl-C during a wait raises ``KeyboardInterrupt`` and cancels it.
    """

    def __iter__(self) -> Self: ...
    def __next__(self) -> bytes: ...
    def close(self) -> None:
        """Ends the stream here (cancelled on the server if it runs); idempotent."""
    def __enter__(self) -> Self: ...
    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
        /,
    ) -> None: ...

@final
class AsyncItemStream:
    """The items of a stream, from ``AsyncClient.stream()``: an async iterator of ``bytes``."""

    def __aiter__(self) -> Self: ...
    def __anext__(self) -> Future[bytes]: ...
    def aclose(self) -> Future[None]:
        """Ends the stream here (cancelled on the server if it runs); resolves at once."""

@final
class ServiceInfo:
    """A running service instance, as ``list_services()`` reports it.

    What a service found only on NATS does not report is None (microcs servers report their
    pid, uid, protocol version and host; other NATS micro services may not).
    """

    @property
    def name(self) -> str: ...
    @property
    def where(self) -> list[_Via]:
        """Where it was found: ``["local"]``, ``["nats"]``, or ``["local", "nats"]`` for a local
        server that also serves on NATS (the same instance)."""
    @property
    def pid(self) -> int | None: ...
    @property
    def uid(self) -> int | None: ...
    @property
    def host(self) -> str | None:
        """The host it runs on, as it reports it over NATS (None for a local-only service)."""
    @property
    def started(self) -> float | None:
        """Start time, in seconds since the Unix epoch (as ``time.time()``)."""
    @property
    def protocol_version(self) -> int | None: ...
    @property
    def version(self) -> str: ...
    @property
    def id(self) -> str: ...
    @property
    def methods(self) -> list[str]: ...
    @property
    def socket(self) -> str | None:
        """The Unix socket (None for a service found on NATS only)."""
    @property
    def instance(self) -> int | None:
        """The slot of a local instance of a name served by several (``shared=True``); None
        for an exclusive server."""
    @property
    def connections(self) -> int | None:
        """A local instance's open connections, as it records them (None otherwise)."""

def list_services(
    runtime_dir: _PathLike | None = None, *, nats: str | None = None, timeout: float = 1.0
) -> list[ServiceInfo]:
    """The services running for this user and, with ``nats``, the NATS micro services on that
    broker (answers gathered for at most ``timeout`` seconds), sorted by name."""

def runtime_dir() -> str:
    """The runtime directory used when none is given."""

def _stop_all() -> None: ...
