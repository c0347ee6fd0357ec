"""Test-only webhook receiver: an HTTP server on loopback that answers the
first FAIL_FIRST POSTs with 500 and the rest with 204, checks each body's
HMAC-SHA256 against the X-Agentgate-Signature header as a real receiver
would, and prints one JSON line per POST:
{"attempt": n, "status": code, "signature_valid": bool, "body": {...}}

Usage: python3 webhook_receiver.py SECRET_FILE FAIL_FIRST
Prints {"port": PORT} first.
"""

import hashlib
import hmac
import json
import sys
from http.server import BaseHTTPRequestHandler, HTTPServer

MAX_BODY = 1 << 20

with open(sys.argv[1], "rb") as f:
    SECRET = f.read().rstrip(b"\r\n")
FAIL_FIRST = int(sys.argv[2])
attempts = 0


class Handler(BaseHTTPRequestHandler):
    def do_POST(self):  # noqa: N802 (http.server's naming)
        global attempts
        attempts += 1
        length = int(self.headers.get("Content-Length", "0"))
        if length > MAX_BODY:
            self.send_response(413)
            self.end_headers()
            return
        body = self.rfile.read(length)
        want = "sha256=" + hmac.new(SECRET, body, hashlib.sha256).hexdigest()
        got = self.headers.get("X-Agentgate-Signature", "")
        valid = hmac.compare_digest(want, got)
        status = 500 if attempts <= FAIL_FIRST else (204 if valid else 401)
        try:
            parsed = json.loads(body)
        except ValueError:
            parsed = None
        print(json.dumps({"attempt": attempts, "status": status,
                          "signature_valid": valid, "body": parsed}), flush=True)
        self.send_response(status)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass


server = HTTPServer(("127.0.0.1", 0), Handler)
print(json.dumps({"port": server.server_address[1]}), flush=True)
server.serve_forever()
