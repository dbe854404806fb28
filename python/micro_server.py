"""The original course project's server module, over ``microcs_lite`` (pure Python).

Copy it next to your script with ``microcs_lite.py``; the project's code then runs unchanged::

    import micro_server
    server = micro_server(call_back_function, 'LIFE_GEN')
    server.start_listening()

The callback receives each message as ``str`` and returns the ``str`` (or ``bytes``) to send back.
"""

from __future__ import annotations

from typing import Any, Callable, Union

import microcs_lite

__all__ = ["micro_server"]


def micro_server(
    call_back_function: Callable[[str], Union[str, bytes]], name: str, **options: Any
) -> microcs_lite.Server:
    """Claims ``name`` and returns a text server answering with ``call_back_function``."""
    return microcs_lite.Server(call_back_function, name, text=True, **options)


microcs_lite._callable_module(__name__, micro_server)
