"""A service as systemd socket activation starts it: ``socket_activated.py NAME``, with the
listening socket as descriptor 3 and ``LISTEN_PID``/``LISTEN_FDS`` set. Prints ``READY <pid>``
once it serves; method ``pid`` answers its pid, ``env`` the value of a variable (or "unset").
"""

from __future__ import annotations

import os
import sys

import microcs

name = sys.argv[1]


def pid(data: bytes) -> bytes:
    return str(os.getpid()).encode()


def env(data: bytes) -> bytes:
    return os.environ.get(data.decode(), "unset").encode()


server = microcs.Server(lambda data: data, name, methods={"pid": pid, "env": env}, socket_activation=True)
server.start()
print(f"READY {os.getpid()}", flush=True)
server.serve()
