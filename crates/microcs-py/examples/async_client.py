"""Call the ECHO service of echo_server.py from asyncio: a thousand calls in flight at once,
over one connection, with a deadline for the lot."""

from __future__ import annotations

import asyncio
import sys

import microcs


async def main() -> None:
    async with microcs.AsyncClient("ECHO", timeout=10.0) as client:
        replies = await asyncio.wait_for(
            asyncio.gather(*(client.call("upper", b"call %d" % i) for i in range(1000))), timeout=30
        )
        print(len(replies), "replies, the last:", replies[-1])
        print(await client.send_message("text in, text out"))


try:
    asyncio.run(main())
except microcs.NoService as e:
    sys.exit(f"{e}\n(start it with: python examples/echo_server.py)")
