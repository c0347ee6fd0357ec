#!/usr/bin/env python3
"""Threaded TCP echo server for agentgate's end-to-end tests.

Usage: echo_server.py BIND_HOST [PEER_LOG]
Prints the port it listens on, then echoes every connection until EOF and
half-closes back. BIND_HOST "::" listens dual-stack. Each accepted peer
("host port") is appended to PEER_LOG when given.
"""
import socket
import sys
import threading

host = sys.argv[1]
peer_log = sys.argv[2] if len(sys.argv) > 2 else None
family = socket.AF_INET6 if ":" in host else socket.AF_INET
srv = socket.socket(family, socket.SOCK_STREAM)
srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
if family == socket.AF_INET6:
    srv.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
srv.bind((host, 0))
srv.listen(512)
print(srv.getsockname()[1], flush=True)
lock = threading.Lock()


def serve(conn, peer):
    if peer_log:
        with lock, open(peer_log, "a") as f:
            f.write(f"{peer[0]} {peer[1]}\n")
    with conn:
        while True:
            data = conn.recv(1 << 16)
            if not data:
                break
            conn.sendall(data)
        conn.shutdown(socket.SHUT_WR)


while True:
    c, p = srv.accept()
    threading.Thread(target=serve, args=(c, p), daemon=True).start()
