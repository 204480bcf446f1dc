"""
Real WebSocket peers through a proxy, for test_websocket.py: a websockets
echo server on 127.0.0.1, and two real clients that reach it through the
proxy each as it does: aiohttp with a plain ``GET ws://`` and Upgrade,
websockets with CONNECT.

    python ws_peers.py PROXY_URL

Prints one JSON object: what each client got back, and the paths the server
was asked for.  Run as its own process: both libraries run on asyncio,
the tests on Twisted's reactor.
"""

from __future__ import annotations

import asyncio
import json
import sys

import aiohttp
import websockets
from websockets.asyncio.server import ServerConnection


async def main(proxy: str) -> dict[str, object]:
    paths: list[str] = []

    async def echo(ws: ServerConnection) -> None:
        paths.append(ws.request.path if ws.request is not None else "")
        async for message in ws:
            await ws.send(message.upper() if isinstance(message, str) else message[::-1])

    async with websockets.serve(echo, "127.0.0.1", 0) as server:
        port = server.sockets[0].getsockname()[1]
        got: dict[str, object] = {"paths": paths, "port": port}

        timeout = aiohttp.ClientTimeout(total=20)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            async with session.ws_connect(f"ws://127.0.0.1:{port}/aiohttp", proxy=proxy) as ws:
                replies: list[object] = []
                for i in range(3):
                    await ws.send_str(f"hello {i}")
                    replies.append((await ws.receive(timeout=10)).data)
                # Larger than a socket read, both ways.
                await ws.send_bytes(bytes(range(256)) * 1024)
                data = (await ws.receive(timeout=10)).data
                replies.append(len(data) if data == (bytes(range(256)) * 1024)[::-1] else "bad")
                got["aiohttp"] = replies

        async with websockets.connect(
            f"ws://127.0.0.1:{port}/websockets", proxy=proxy, open_timeout=10
        ) as client:
            await client.send("via connect")
            got["websockets"] = [await asyncio.wait_for(client.recv(), 10)]
    return got


if __name__ == "__main__":
    # Bounded as a whole, so that the test waiting on this process never hangs.
    print(json.dumps(asyncio.run(asyncio.wait_for(main(sys.argv[1]), 60))))
