"""Helpers of ``microcs.Server`` for async handlers, called by the extension module.

A server with ``async def`` handlers (or async generators) runs them on an event loop of its
own, in a thread the server starts (``run_loop``). The server's tokio tasks queue each step (a
coroutine, or an async generator's next item via ``anext_item``) and wake the loop through a
socket it watches; the loop starts it as a task and sends its outcome back from the task's done
callback. No thread waits for a coroutine.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, Awaitable
from typing import Any


#: How long the loop, once stopped, lets the tasks it cancels wind down before it closes anyway
#: (the server's grace period has passed by then): a coroutine that swallows ``CancelledError``
#: must not hold up ``stop()`` or the interpreter's exit.
WIND_DOWN = 1.0


class Raised:
    """A ``BaseException`` that is not an ``Exception`` (``SystemExit``, ``KeyboardInterrupt``,
    ``GeneratorExit``) raised by a handler, carried out of its task as a value: asyncio would let
    it out of ``run_forever()`` and end the server's loop. The server answers it as it answers any
    exception (500 with its type and message)."""

    __slots__ = ("exc",)

    def __init__(self, exc: BaseException) -> None:
        self.exc = exc


def run_loop(loop: asyncio.AbstractEventLoop) -> None:
    """Runs ``loop`` until stopped, then cancels what still runs on it and closes it."""
    asyncio.set_event_loop(loop)
    try:
        loop.run_forever()
        left = asyncio.all_tasks(loop)
        for task in left:
            task.cancel()
        if left:
            loop.run_until_complete(asyncio.wait(left, timeout=WIND_DOWN))
        loop.run_until_complete(_bounded(loop.shutdown_asyncgens()))
    finally:
        asyncio.set_event_loop(None)
        loop.close()


async def _bounded(aw: Awaitable[None]) -> None:
    try:
        await asyncio.wait_for(aw, WIND_DOWN)
    except (asyncio.TimeoutError, Exception):
        pass


async def run_step(aw: Awaitable[Any]) -> Any:
    """Awaits a coroutine handler: its result, its exception, or a :class:`Raised`."""
    try:
        return await aw
    except (Exception, asyncio.CancelledError):
        raise
    except BaseException as e:
        return Raised(e)


async def anext_item(agen: AsyncGenerator[Any, None]) -> Any:
    """The next item of an async generator handler (``StopAsyncIteration`` at its end), or a
    :class:`Raised`."""
    return await run_step(agen.__anext__())


async def aclose(agen: AsyncGenerator[Any, None]) -> None:
    """Closes an async generator handler whose stream ended early (``GeneratorExit`` in it)."""
    await agen.aclose()
