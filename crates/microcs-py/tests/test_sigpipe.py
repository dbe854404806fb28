"""SIGPIPE never kills a process that uses microcs, even one that restores its default action.

Python ignores SIGPIPE at start-up, which would hide the problem; the client here puts the
default action back, so a plain ``write`` to a socket whose server died would kill it. microcs
writes with ``MSG_NOSIGNAL``: the client gets an exception and goes on.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
from pathlib import Path

from conftest import ServerFactory

CLIENT = textwrap.dedent(
    """
    import signal, sys
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    import microcs
    client = microcs.Client(sys.argv[1], timeout=10)
    assert client.request(b"ping") == b"ping"
    print("connected", flush=True)
    sys.stdin.readline()                      # the test kills the server meanwhile
    try:
        client.request(b"after the server died")
    except microcs.Error as e:
        print("raised", type(e).__name__, flush=True)
    """
)


def test_a_dead_server_raises_instead_of_killing_the_client_with_sigpipe(
    server: ServerFactory, name: str, runtime_dir: Path
) -> None:
    srv = server("bytes")
    client = subprocess.Popen(
        [sys.executable, "-c", CLIENT, name],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert client.stdout is not None and client.stdin is not None
    assert client.stdout.readline().strip() == b"connected"
    srv.kill()
    srv.wait(timeout=10)
    client.stdin.write(b"go\n")
    client.stdin.flush()
    out, err = client.communicate(timeout=30)
    assert client.returncode != -signal.SIGPIPE, "the client was killed by SIGPIPE"
    assert client.returncode == 0, err.decode(errors="replace")
    assert out.strip() in (b"raised NoService", b"raised Closed"), out
