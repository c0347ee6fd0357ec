"""A scripted, OpenAI-compatible model for agentgate's agent scenario (test and demo only).

It serves `POST /v1/chat/completions` (non-streaming) on loopback and plays the
model's side of one conversation: it reads the conversation it is sent, counts the
tool results in it, and answers with the next step of SCRIPT (a tool call), then a
final message that quotes what the tools returned. No model, no network: the point
is that the real OpenAI Agents SDK drives real tool calls through agentgate.

Every request's tool results are appended as JSON lines to the file named by
--transcript, so a test can check what reached "the model" (masked values only).

With --script FILE the plan is read from FILE (a JSON list of [tool, arguments]) at
each request instead of SCRIPT, so a test can give each agent run its own plan.

Usage: python model_stub.py --port 0 --transcript FILE [--script FILE] [--tls-cert C --tls-key K]
(prints the port when ready)
"""

import argparse
import json
import sys
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

# The agent's plan, one tool call per step (tool name, arguments).
SCRIPT = [
    ("query", {"sql": "SELECT id, name, email, ssn, card FROM customers ORDER BY id LIMIT 3"}),
    ("query", {"sql": "DROP TABLE customers"}),
    ("query", {"sql": "UPDATE customers SET balance = balance + 100 WHERE id = 2"}),
]

# Largest request body accepted (the SDK sends the whole conversation each turn).
MAX_BODY = 1 << 20


class Handler(BaseHTTPRequestHandler):
    server_version = "model-stub/1"

    def log_message(self, fmt, *args):  # quiet: the test reads stdout
        pass

    def _send(self, status, body):
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_POST(self):
        if self.path.rstrip("/") not in ("/v1/chat/completions", "/chat/completions"):
            self._send(404, {"error": {"message": f"no route {self.path}"}})
            return
        length = int(self.headers.get("Content-Length") or 0)
        if length <= 0 or length > MAX_BODY:
            self._send(413, {"error": {"message": "body missing or too large"}})
            return
        try:
            request = json.loads(self.rfile.read(length))
        except ValueError:
            self._send(400, {"error": {"message": "body is not JSON"}})
            return
        messages = request.get("messages") or []
        results = [m.get("content") for m in messages if m.get("role") == "tool"]
        with open(self.server.transcript, "a", encoding="utf-8") as f:
            f.write(json.dumps({"step": len(results), "tool_results": results}) + "\n")
        step = len(results)
        script = SCRIPT
        if self.server.script:
            with open(self.server.script, encoding="utf-8") as f:
                script = [tuple(s) for s in json.load(f)]
        if step < len(script):
            name, args = script[step]
            message = {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "id": f"call_{step + 1}",
                        "type": "function",
                        "function": {"name": name, "arguments": json.dumps(args)},
                    }
                ],
            }
            finish = "tool_calls"
        else:
            summary = "; ".join(str(r)[:200] for r in results)
            message = {"role": "assistant", "content": f"Done. Tool results: {summary}"}
            finish = "stop"
        self._send(
            200,
            {
                "id": f"chatcmpl-stub-{step}",
                "object": "chat.completion",
                "created": int(time.time()),
                "model": request.get("model") or "stub",
                "choices": [{"index": 0, "message": message, "finish_reason": finish}],
                "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
            },
        )


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--transcript", required=True)
    p.add_argument("--script", help="JSON list of [tool, arguments], read at each request")
    p.add_argument("--tls-cert", help="serve HTTPS with this certificate (and --tls-key)")
    p.add_argument("--tls-key")
    a = p.parse_args()
    server = ThreadingHTTPServer(("127.0.0.1", a.port), Handler)
    server.transcript = a.transcript
    server.script = a.script
    if a.tls_cert:
        import ssl

        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(a.tls_cert, a.tls_key)
        server.socket = ctx.wrap_socket(server.socket, server_side=True)
    print(server.server_address[1], flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    sys.exit(0)


if __name__ == "__main__":
    main()
