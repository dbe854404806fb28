"""Serves NAME in the background and leaves the interpreter without stopping the server.

`exit_while_serving.py MODE NAME`: the handler echoes; after the request b"bye" the main
thread returns, and the interpreter's exit must stop the server and free the name.
"""

from __future__ import annotations

import sys
import threading

import microcs

name = sys.argv[2]
bye = threading.Event()


def handler(data: bytes) -> bytes:
    if data == b"bye":
        bye.set()
    return data


server = microcs.Server(handler, name)
server.start()
bye.wait(60)
print("leaving without stop()", flush=True)
