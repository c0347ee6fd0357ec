"""A small HTTPS API for agentgate's HTTP tests (test only).

Serves over TLS with the certificate and key it is given, and appends every
request it receives ("METHOD PATH") to the --log file, so a test can prove a
denied request never arrived. Routes:
  GET  /customers            JSON with customers' SSNs (Content-Length; gzip when ?gzip=1;
                             ?enc=br|zstd through the Debian CLIs; ?enc=x-unknown: bytes in
                             a coding nobody reads)
  GET  /customers/chunked    the same JSON, chunked
  GET  /stream               server-sent events carrying an SSN
  GET  /image                application/octet-stream bytes
  anything else              {"ok": true, "method": ..., "path": ..., "body_bytes": n}

Usage: python https_upstream.py --cert C --key K --log FILE  (prints the port when ready)
"""

import argparse
import gzip
import json
import ssl
import subprocess
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

CUSTOMERS = {
    "customers": [
        {"id": 1, "name": "Ada", "ssn": "123-45-6789", "email": "ada@bank.example", "passport": "X93P0417"},
        {"id": 2, "name": "Bob", "ssn": "234-56-7890", "card": "4111 1111 1111 1111", "passport": "K20Q7781"},
    ]
}


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "upstream/1"

    def log_message(self, fmt, *args):
        pass

    def _log(self):
        with open(self.server.log, "a", encoding="utf-8") as f:
            f.write(f"{self.command} {self.path}\n")

    def _send(self, status, body, ctype="application/json", headers=()):
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        for k, v in headers:
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(body)

    def _body(self):
        n = int(self.headers.get("Content-Length") or 0)
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            data = b""
            while True:
                size = int(self.rfile.readline().strip() or b"0", 16)
                if size == 0:
                    self.rfile.readline()
                    return data
                data += self.rfile.read(size)
                self.rfile.readline()
        return self.rfile.read(n) if n else b""

    def do_GET(self):
        self._log()
        data = json.dumps(CUSTOMERS).encode()
        if self.path.startswith("/customers/chunked"):
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            for i in range(0, len(data), 16):
                part = data[i : i + 16]
                self.wfile.write(b"%x\r\n%s\r\n" % (len(part), part))
            self.wfile.write(b"0\r\n\r\n")
        elif self.path.startswith("/customers"):
            enc = next((e for e in ("br", "zstd", "x-unknown") if f"enc={e}" in self.path), None)
            if enc == "x-unknown":
                self._send(200, b"\x00\x01" + data[::-1], headers=[("Content-Encoding", enc)])
            elif enc and enc in self.headers.get("Accept-Encoding", ""):
                tool = {"br": ["brotli", "-c"], "zstd": ["zstd", "-q", "-c"]}[enc]
                body = subprocess.run(tool, input=data, capture_output=True, check=True).stdout
                self._send(200, body, headers=[("Content-Encoding", enc)])
            elif "gzip=1" in self.path and "gzip" in self.headers.get("Accept-Encoding", ""):
                self._send(200, gzip.compress(data), headers=[("Content-Encoding", "gzip")])
            else:
                self._send(200, data)
        elif self.path.startswith("/stream"):
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            events = [
                b'data: {"delta": "the ssn is 123-45-6789"}\n\n',
                b"data: [DONE]\n\n",
            ]
            for e in events:
                for i in range(0, len(e), 11):
                    part = e[i : i + 11]
                    self.wfile.write(b"%x\r\n%s\r\n" % (len(part), part))
                    self.wfile.flush()
            self.wfile.write(b"0\r\n\r\n")
        elif self.path.startswith("/image"):
            self._send(200, bytes(range(256)), ctype="application/octet-stream")
        else:
            self._echo(b"")

    def _echo(self, body):
        out = {"ok": True, "method": self.command, "path": self.path, "body_bytes": len(body)}
        self._send(200, json.dumps(out).encode())

    def do_POST(self):
        body = self._body()
        self._log()
        self._echo(body)

    do_PUT = do_POST
    do_DELETE = do_POST
    do_PATCH = do_POST


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--cert", required=True)
    p.add_argument("--key", required=True)
    p.add_argument("--log", required=True)
    a = p.parse_args()
    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.log = a.log
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(a.cert, a.key)
    server.socket = ctx.wrap_socket(server.socket, server_side=True)
    print(server.server_address[1], flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    sys.exit(0)


if __name__ == "__main__":
    main()
