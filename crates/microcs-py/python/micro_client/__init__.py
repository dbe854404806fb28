"""The original course project's client module, now backed by microcs.

It runs the project's code unchanged::

    import micro_client
    client = micro_client('LIFE_GEN')
    response_data = client.send_message("Give me some data back!!")

The module itself is callable (``micro_client(...)``), and ``from micro_client import
micro_client`` works too. The result is a ``microcs.Client``: ``send_message(str) -> str``, and
all of ``microcs.Client`` besides.
"""

from __future__ import annotations

import sys
import types
from typing import Any

import microcs

__all__ = ["micro_client"]


def micro_client(name: str, timeout: float = microcs.DEFAULT_TIMEOUT, **options: Any) -> microcs.Client:
    """Connects to the service ``name`` (``microcs.NoService`` if nobody serves it)."""
    return microcs.Client(name, timeout, **options)


class _CallableModule(types.ModuleType):
    """Makes ``import micro_client; micro_client(...)`` work, as in the original project."""

    def __call__(self, name: str, timeout: float = microcs.DEFAULT_TIMEOUT, **options: Any) -> microcs.Client:
        return micro_client(name, timeout, **options)


sys.modules[__name__].__class__ = _CallableModule
