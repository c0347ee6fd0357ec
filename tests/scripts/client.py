#!/usr/bin/env python3
"""Test client for agentgate's end-to-end tests. Prints one JSON object.

client.py MODE HOST PORT [options]
  MODE: blocking | asyncio
  --bytes N        send N bytes (random, 1 MiB pattern), half-close, read the echo
  --hold FILE      after a short exchange, print the JSON and keep the connection
                   open until FILE exists
  --concurrent N   open N connections at once (blocking mode), exchange a byte on
                   each, print, wait for --hold, close them all
  --two-writes MS  (blocking mode) write "first;" as soon as connected, "second;"
                   MS milliseconds later, half-close, read the echo to EOF
"""
import argparse
import asyncio
import hashlib
import json
import os
import random
import socket
import threading
import time

ap = argparse.ArgumentParser()
ap.add_argument("mode", choices=["blocking", "asyncio"])
ap.add_argument("host")
ap.add_argument("port", type=int)
ap.add_argument("--bytes", type=int, default=0)
ap.add_argument("--hold")
ap.add_argument("--concurrent", type=int, default=0)
ap.add_argument("--two-writes", type=int)
args = ap.parse_args()

CHUNK = random.Random(7).randbytes(1 << 20)


def chunks(total):
    sent = 0
    while sent < total:
        n = min(len(CHUNK), total - sent)
        yield CHUNK[:n]
        sent += n


def wait_hold():
    deadline = time.time() + 30
    while args.hold and not os.path.exists(args.hold) and time.time() < deadline:
        time.sleep(0.02)


def endpoints(sock):
    """Taken right after connect: after both directions close, asyncio's socket
    may no longer report a peer."""
    return {"pid": os.getpid(), "local": list(sock.getsockname()[:2]), "peer": list(sock.getpeername()[:2])}


def report(ends, **extra):
    out = dict(ends)
    out.update(extra)
    print(json.dumps(out), flush=True)


def blocking():
    if args.concurrent:
        socks = []
        for _ in range(args.concurrent):
            s = socket.create_connection((args.host, args.port), timeout=30)
            socks.append(s)
        for s in socks:
            s.sendall(b"x")
        ok = sum(1 for s in socks if s.recv(1) == b"x")
        print(json.dumps({"pid": os.getpid(), "opened": len(socks), "echoed": ok}), flush=True)
        wait_hold()
        for s in socks:
            s.close()
        return
    s = socket.create_connection((args.host, args.port), timeout=60)
    if args.two_writes is not None:
        s.sendall(b"first;")
        time.sleep(args.two_writes / 1000)
        s.sendall(b"second;")
        s.shutdown(socket.SHUT_WR)
        got = b""
        while d := s.recv(1 << 16):
            got += d
        print(json.dumps({"pid": os.getpid(), "echoed": got.decode()}), flush=True)
        return
    ends = endpoints(s)
    if args.hold:
        s.sendall(b"hello")
        got = s.recv(5)
        report(ends, echoed=got.decode())
        wait_hold()
        s.close()
        return
    sent_h, recv_h = hashlib.sha256(), hashlib.sha256()
    received = 0

    def send():
        for c in chunks(args.bytes):
            s.sendall(c)
            sent_h.update(c)
        s.shutdown(socket.SHUT_WR)

    t = threading.Thread(target=send)
    t.start()
    while True:
        d = s.recv(1 << 16)
        if not d:
            break
        recv_h.update(d)
        received += len(d)
    t.join()
    report(ends, sent=args.bytes, received=received, sent_sha256=sent_h.hexdigest(), recv_sha256=recv_h.hexdigest())
    s.close()


async def asyncio_main():
    reader, writer = await asyncio.open_connection(args.host, args.port)
    ends = endpoints(writer.get_extra_info("socket"))
    sent_h, recv_h = hashlib.sha256(), hashlib.sha256()

    async def send():
        for c in chunks(args.bytes):
            writer.write(c)
            sent_h.update(c)
            await writer.drain()
        writer.write_eof()

    async def recv():
        n = 0
        while True:
            d = await reader.read(1 << 16)
            if not d:
                return n
            recv_h.update(d)
            n += len(d)

    _, received = await asyncio.wait_for(asyncio.gather(send(), recv()), timeout=120)
    report(ends, sent=args.bytes, received=received, sent_sha256=sent_h.hexdigest(), recv_sha256=recv_h.hexdigest())
    writer.close()


if args.mode == "blocking":
    blocking()
else:
    asyncio.run(asyncio_main())
