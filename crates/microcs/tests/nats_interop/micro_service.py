"""A NATS micro service written with nats-py's own `nats.micro`, for our client to call.

Usage: python micro_service.py NATS_URL SERVICE_NAME
Endpoints: `default` on subject NAME echoes; `upper` on NAME.upper upper-cases; `fail` on
NAME.fail answers the error 418 "i am a teapot". Prints "ready" once serving; stops when its
standard input closes.
"""

import asyncio
import sys

import nats
import nats.micro
from nats.micro.request import Request, ServiceError


async def main(url, name):
    nc = await nats.connect(url)
    svc = await nats.micro.add_service(nc, name=name, version="2.1.0", description="nats-py micro service")

    async def echo(req: Request):
        await req.respond(req.data)

    async def upper(req: Request):
        await req.respond(req.data.upper())

    async def fail(req: Request):
        raise ServiceError("418", "i am a teapot")

    await svc.add_endpoint(name="default", subject=name, handler=echo)
    await svc.add_endpoint(name="upper", subject=f"{name}.upper", handler=upper)
    await svc.add_endpoint(name="fail", subject=f"{name}.fail", handler=fail)
    await nc.flush()
    print("ready", flush=True)
    loop = asyncio.get_running_loop()
    await loop.run_in_executor(None, sys.stdin.read)
    await svc.stop()
    await nc.close()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2]))
