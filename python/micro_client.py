"""The original course project's client module, over ``microcs_lite`` (pure Python).

Copy it next to your script with ``microcs_lite.py``; the project's code then runs unchanged::

    import micro_client
    client = micro_client('LIFE_GEN')
    response_data = client.send_message("Give me some data back!!")
"""

from __future__ import annotations

from typing import Any

import microcs_lite

__all__ = ["micro_client"]


def micro_client(name: str, timeout: float = microcs_lite.DEFAULT_TIMEOUT, **options: Any) -> microcs_lite.Client:
    """Connects to the service ``name`` (``NoService`` if nobody serves it)."""
    return microcs_lite.Client(name, timeout, **options)


microcs_lite._callable_module(__name__, micro_client)
