"""A WebSocket echo server over TLS for agentgate's HTTP tests (test only).

Echoes every message back on any path and appends "OPEN <path>" and
"MSG <path> <n bytes>" lines to --log, so a test can prove a refused
upgrade never arrived. Needs the `websockets` package (tests/agent/.venv).

Usage: python ws_echo.py --cert C --key K --log FILE  (prints the port when ready)
"""

import argparse
import asyncio
import ssl

from websockets.asyncio.server import serve


async def main():
    p = argparse.ArgumentParser()
    p.add_argument("--cert", required=True)
    p.add_argument("--key", required=True)
    p.add_argument("--log", required=True)
    a = p.parse_args()

    def log(line):
        with open(a.log, "a", encoding="utf-8") as f:
            f.write(line + "\n")

    async def echo(ws):
        path = ws.request.path
        log(f"OPEN {path}")
        async for msg in ws:
            log(f"MSG {path} {len(msg)}")
            await ws.send(msg)

    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(a.cert, a.key)
    async with serve(echo, "127.0.0.1", 0, ssl=ctx) as server:
        port = server.sockets[0].getsockname()[1]
        print(port, flush=True)
        await asyncio.Future()


if __name__ == "__main__":
    asyncio.run(main())
