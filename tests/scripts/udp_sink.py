"""A fake DNS resolver and datagram sink for the containment tests.

usage: udp_sink.py RESOLVER_ADDR SINK_ADDR...
Answers every DNS query on RESOLVER_ADDR:53 with one A record (192.0.2.1).
Prints one JSON line per datagram received on any socket:
{"on": "ADDR:PORT", "from": "...", "name": QNAME or null, "bytes": N}.
Prints "ready" once all sockets are bound. Standard library only.
"""
import json
import select
import socket
import struct
import sys


def bind(spec, default_port):
    host, _, port = spec.rpartition(":") if not spec.startswith("[") else (spec[1:spec.index("]")], None, spec[spec.index("]") + 2:] or default_port)
    host = host or spec
    fam = socket.AF_INET6 if ":" in host else socket.AF_INET
    s = socket.socket(fam, socket.SOCK_DGRAM)
    s.bind((host, int(port or default_port)))
    return s


def qname(msg):
    try:
        i, labels = 12, []
        while msg[i]:
            labels.append(msg[i + 1:i + 1 + msg[i]].decode())
            i += 1 + msg[i]
        return ".".join(labels), i + 5
    except (IndexError, UnicodeDecodeError):
        return None, None


def main():
    resolver = bind(sys.argv[1] + ":53" if ":" not in sys.argv[1] else sys.argv[1], 53)
    sinks = [bind(a, 0) for a in sys.argv[2:]]
    print("ready", flush=True)
    socks = [resolver, *sinks]
    while True:
        for s in select.select(socks, [], [])[0]:
            msg, src = s.recvfrom(65535)
            name, end = qname(msg) if s is resolver else (None, None)
            here = s.getsockname()
            print(json.dumps({"on": f"{here[0]}:{here[1]}", "from": f"{src[0]}:{src[1]}",
                              "name": name, "bytes": len(msg)}), flush=True)
            if s is resolver and name is not None:
                qid = msg[:2]
                answer = (qid + struct.pack(">HHHHH", 0x8180, 1, 1, 0, 0) + msg[12:end]
                          + b"\xc0\x0c" + struct.pack(">HHIH", 1, 1, 60, 4) + bytes([192, 0, 2, 1]))
                s.sendto(answer, src)


main()
