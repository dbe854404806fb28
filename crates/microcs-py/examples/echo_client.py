"""Call the ECHO service of echo_server.py."""

from __future__ import annotations

import sys

import microcs

try:
    with microcs.Client("ECHO", timeout=5.0) as client:
        print(client.request(b"hello"))
        print(client.call("upper", b"hello"))
        print(client.call("who"))
        print(client.send_message("text in, text out"))
except microcs.NoService as e:
    sys.exit(f"{e}\n(start it with: python examples/echo_server.py)")
except microcs.Error as e:
    sys.exit(f"the call failed: {e}")
