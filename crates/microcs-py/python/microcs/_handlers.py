"""Helpers of ``microcs.Server`` for async handlers, called by the extension module.

A server with ``async def`` handlers (or async generators) runs them on an event loop of its
own, in a thread the server starts (``run_loop``). The server's tokio tasks queue each step (a
coroutine, or an async generator's next item via ``anext_item``) and wake the loop through a
socket it watches; the loop starts it as a task and sends its outcome back from the task's done
callback. No thread waits for a coroutine.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator
from typing import Any


def run_loop(loop: asyncio.AbstractEventLoop) -> None:
    """Runs ``loop`` until stopped, then cancels what still runs on it and closes it."""
    asyncio.set_event_loop(loop)
    try:
        loop.run_forever()
        left = asyncio.all_tasks(loop)
        for task in left:
            task.cancel()
        if left:
            loop.run_until_complete(asyncio.gather(*left, return_exceptions=True))
        loop.run_until_complete(loop.shutdown_asyncgens())
    finally:
        asyncio.set_event_loop(None)
        loop.close()


async def anext_item(agen: AsyncGenerator[Any, None]) -> Any:
    """The next item of an async generator handler (``StopAsyncIteration`` at its end)."""
    return await agen.__anext__()


async def aclose(agen: AsyncGenerator[Any, None]) -> None:
    """Closes an async generator handler whose stream ended early (``GeneratorExit`` in it)."""
    await agen.aclose()
