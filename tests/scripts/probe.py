"""Escape probes for the containment tests: each tries one route out and
prints one JSON line {"probe", "ok", "error", ...}. Runs as any user with
/usr/bin/python3 (standard library only).

usage: probe.py NAME ARGS...
"""
import errno
import json
import os
import socket
import struct
import sys


def out(probe, ok, error=None, **extra):
    print(json.dumps({"probe": probe, "ok": ok, "error": error, **extra}), flush=True)


def attempt(probe, fn, **extra):
    try:
        res = fn()
        out(probe, True, **extra, **(res or {}))
    except OSError as e:
        out(probe, False, errno.errorcode.get(e.errno, str(e.errno)), **extra)


def dns_query(name, qtype=1, qid=0x4242):
    q = struct.pack(">HHHHHH", qid, 0x0100, 1, 0, 0, 0)
    for label in name.split("."):
        q += bytes([len(label)]) + label.encode()
    return q + b"\x00" + struct.pack(">HH", qtype, 1)


def dns_answer(msg):
    qid, flags, qd, an = struct.unpack(">HHHH", msg[:8])
    return {"id": qid, "rcode": flags & 0xF, "answers": an}


def main():
    name, args = sys.argv[1], sys.argv[2:]
    if name == "udp-sendto":
        host, port = args[0], int(args[1])
        fam = socket.AF_INET6 if ":" in host else socket.AF_INET
        s = socket.socket(fam, socket.SOCK_DGRAM)
        attempt(name, lambda: s.sendto(b"escape", (host, port)) and None, dst=f"{host}:{port}")
    elif name == "udp-connect":
        host, port = args[0], int(args[1])
        fam = socket.AF_INET6 if ":" in host else socket.AF_INET
        s = socket.socket(fam, socket.SOCK_DGRAM)
        attempt(name, lambda: s.connect((host, port)), dst=f"{host}:{port}")
    elif name in ("dns", "dns-connected"):
        resolver, qname = args[0], args[1]
        qtype = int(args[2]) if len(args) > 2 else 1
        fam = socket.AF_INET6 if ":" in resolver else socket.AF_INET
        s = socket.socket(fam, socket.SOCK_DGRAM)
        s.settimeout(5)

        def go():
            if name == "dns-connected":
                s.connect((resolver, 53))
                s.send(dns_query(qname, qtype))
                msg = s.recv(4096)
                src = s.getpeername()
            else:
                s.sendto(dns_query(qname, qtype), (resolver, 53))
                msg, src = s.recvfrom(4096)
            return {**dns_answer(msg), "from": f"{src[0]}:{src[1]}"}

        attempt(name, go)
    elif name == "socket":
        family, kind, proto = (int(a) for a in args)
        attempt(name, lambda: socket.socket(family, kind, proto).close(), family=family, type=kind, protocol=proto)
    elif name in ("unix-connect", "unix-sendto"):
        path = args[0]
        addr = "\0" + path[1:] if path.startswith("@") else path

        def go():
            if name == "unix-connect":
                socket.socket(socket.AF_UNIX, socket.SOCK_STREAM).connect(addr)
            else:
                socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM).sendto(b"escape", addr)

        attempt(name, go, path=path)
    elif name == "unix-pair-reconnect":
        # A datagram socketpair can be connected elsewhere afterwards.
        path = args[0]

        def go():
            a, _ = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
            a.connect(path)

        attempt(name, go, path=path)
    elif name == "io-uring":
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        params = ctypes.create_string_buffer(120)

        def go():
            fd = libc.syscall(425, 8, params)  # io_uring_setup(8, &params), x86_64
            if fd < 0:
                e = ctypes.get_errno()
                raise OSError(e, os.strerror(e))
            os.close(fd)

        attempt(name, go)
    elif name == "tcp-fastopen":
        host, port = args[0], int(args[1])
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)

        def go():
            # Blocking: sendto(MSG_FASTOPEN) connects, then sends.
            s.sendto(b"hello", socket.MSG_FASTOPEN, (host, port))
            s.settimeout(5)
            return {"echoed": s.recv(16).decode(), "peer": list(s.getpeername())}

        attempt(name, go)
    elif name == "mptcp":
        host, port = args[0], int(args[1])

        def go():
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM, 262)
            s.settimeout(5)
            s.connect((host, port))
            s.sendall(b"hello")
            return {"echoed": s.recv(16).decode()}

        attempt(name, go)
    elif name == "ptrace":
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        pid = int(args[0])

        def go():
            if libc.ptrace(16, pid, None, None) != 0:  # PTRACE_ATTACH
                e = ctypes.get_errno()
                raise OSError(e, os.strerror(e))
            os.waitpid(pid, 0)
            libc.ptrace(17, pid, None, None)  # PTRACE_DETACH

        attempt(name, go, pid=pid)
    else:
        sys.exit(f"unknown probe {name}")


main()
