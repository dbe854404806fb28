"""Serve the name ECHO: the default handler echoes, the method "upper" shouts, the method "who"
tells the caller who it is. Ctrl-C stops it and frees the name.

    python examples/echo_server.py        # then, elsewhere: python examples/echo_client.py
"""

from __future__ import annotations

import microcs


def echo(data: bytes) -> bytes:
    return data


server = microcs.Server(echo, "ECHO")


@server.method("upper")
def upper(data: bytes) -> bytes:
    return data.upper()


@server.method("who")
def who(data: bytes, request: microcs.Request) -> str:
    return f"pid {request.pid}, uid {request.uid}, {request.remaining:.1f} s left"


if __name__ == "__main__":
    print("serving ECHO; Ctrl-C to stop")
    try:
        server.start_listening()
    except KeyboardInterrupt:
        print("stopped; the name is free")
