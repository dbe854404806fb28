"""A client whose call waits (method ``watch``) until Ctrl-C: it prints ``waiting``, and on
KeyboardInterrupt prints ``interrupted``, makes one more call on the same client to show it is
still usable, prints its answer, and re-raises.

Usage: interruptible_client.py NAME MARKER  (MARKER: the file ``watch`` touches once cancelled)
"""

from __future__ import annotations

import sys

import microcs

name, marker = sys.argv[1], sys.argv[2]
client = microcs.Client(name, timeout=60)
print("waiting", flush=True)
try:
    client.call("watch", marker.encode())
except KeyboardInterrupt:
    print("interrupted", flush=True)
    print(client.request(b"still usable").decode(), flush=True)
    raise
