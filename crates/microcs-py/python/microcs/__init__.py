"""Call a local service by name.

One process serves a name with a handler; another calls that name and gets the handler's
answer. No ports, no broker: names live in a private runtime directory, requests travel over a
Unix socket. Payloads are bytes (or text) on the wire; nothing is ever pickled.

Serve::

    import microcs

    def step(board: bytes) -> bytes:
        return board.upper()

    microcs.Server(step, "LIFE_GEN").start_listening()   # Ctrl-C stops it and frees the name

Call, from another process::

    with microcs.Client("LIFE_GEN", timeout=5.0) as client:
        print(client.request(b"give me some data back"))

or from asyncio, with many calls in flight over one connection::

    async with microcs.AsyncClient("LIFE_GEN") as client:
        replies = await asyncio.gather(*(client.request(b"%d" % i) for i in range(1000)))

Across machines, the same names and calls go over a NATS broker: a server given
``nats="nats://broker:4222"`` is also a NATS micro service there, and a client given that URL
(or ``MICROCS_NATS_URL`` in its environment) calls a local instance when one runs and goes over
NATS otherwise; ``transport="local"|"nats"`` forces one or the other. Credentials come from the
environment only (``MICROCS_NATS_USER``/``MICROCS_NATS_PASSWORD``, ``MICROCS_NATS_TOKEN``,
``MICROCS_NATS_CREDS``, ``MICROCS_NATS_CA``)::

    microcs.Server(step, "LIFE_GEN", nats="nats://broker:4222", transport="nats").serve()

    with microcs.Client("LIFE_GEN", nats="nats://broker:4222") as client:
        client.request(b"..#..")

The work is done by the Rust library ``microcs``; the GIL is released during every wait.
"""

from __future__ import annotations

import atexit as _atexit

from ._errors import (
    Closed,
    Error,
    FrameTooLarge,
    InvalidConfig,
    InvalidName,
    NameTaken,
    NoService,
    StartFailed,
    PermissionDenied,
    ProtocolError,
    RemoteError,
    TimedOut,
)
from ._microcs import (
    DEFAULT_TIMEOUT,
    AsyncClient,
    AsyncItemStream,
    Client,
    ItemStream,
    Request,
    Server,
    ServiceInfo,
    __version__,
    list_services,
    runtime_dir,
)
from ._microcs import _stop_all

__all__ = [
    "__version__",
    "AsyncClient",
    "AsyncItemStream",
    "Client",
    "Closed",
    "DEFAULT_TIMEOUT",
    "Error",
    "FrameTooLarge",
    "InvalidConfig",
    "InvalidName",
    "ItemStream",
    "NameTaken",
    "NoService",
    "StartFailed",
    "PermissionDenied",
    "ProtocolError",
    "RemoteError",
    "Request",
    "Server",
    "ServiceInfo",
    "TimedOut",
    "list_services",
    "runtime_dir",
]

# Servers still running when the interpreter exits are stopped first, so that their names are
# freed and their threads do not call handlers in a finalising interpreter.
_atexit.register(_stop_all)
