"""A service as activation starts it (docs/ACTIVATION.md): ``activated.py NAME``.

Appends its pid to the file ``$PEER_STARTS`` (to count starts), waits ``$PEER_DELAY`` seconds
(a slow start), then serves NAME (the default handler echoes; method ``pid`` answers its pid)
until its idle timeout, which it gets from ``MICROCS_IDLE_TIMEOUT`` as set by the activator;
then prints ``IDLE <pid>``, so the test can see in the log that ``serve()`` returned.
"""

from __future__ import annotations

import os
import sys
import time

import microcs

name = sys.argv[1]
with open(os.environ["PEER_STARTS"], "a") as f:
    f.write(f"{os.getpid()}\n")
# PEER_DELAY: seconds to wait before claiming the name (a slow start).
time.sleep(float(os.environ.get("PEER_DELAY", "0")))


def pid(data: bytes) -> bytes:
    return str(os.getpid()).encode()


server = microcs.Server(lambda data: data, name, methods={"pid": pid})
server.serve()
print(f"IDLE {os.getpid()}", flush=True)
