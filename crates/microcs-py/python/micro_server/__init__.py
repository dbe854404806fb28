"""The original course project's server module, now backed by microcs.

It runs the project's code unchanged::

    import micro_server
    server = micro_server(call_back_function, 'LIFE_GEN')
    server.start_listening()

The module itself is callable (``micro_server(...)``), and ``from micro_server import
micro_server`` works too. The callback receives each message as ``str`` and returns the ``str``
(or ``bytes``) to send back. The result is a ``microcs.Server`` created with ``text=True``:
``start_listening()`` serves until Ctrl-C, which stops the server and frees the name.
"""

from __future__ import annotations

import sys
import types
from typing import Any, Callable, Union

import microcs

__all__ = ["micro_server"]


def micro_server(
    call_back_function: Callable[[str], Union[str, bytes]], name: str, **options: Any
) -> microcs.Server[str]:
    """Claims ``name`` and returns a text server that answers with ``call_back_function``.

    ``options`` are passed to ``microcs.Server`` (``runtime_dir``, ``max_frame``, ...).
    """
    return microcs.Server(call_back_function, name, text=True, **options)


class _CallableModule(types.ModuleType):
    """Makes ``import micro_server; micro_server(...)`` work, as in the original project."""

    def __call__(
        self, call_back_function: Callable[[str], Union[str, bytes]], name: str, **options: Any
    ) -> microcs.Server[str]:
        return micro_server(call_back_function, name, **options)


sys.modules[__name__].__class__ = _CallableModule
