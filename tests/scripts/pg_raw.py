"""Raw Postgres v3 client for hostile-input tests: SCRAM-SHA-256 login, then
sends one malformed thing and reports what came back, as one JSON line.

usage: pg_raw.py HOST PORT USER DB PASSWORD CASE
"""
import base64, hashlib, hmac, json, os, socket, struct, sys

host, port, user, db, password, case = sys.argv[1:7]


def recvn(s, n):
    out = b""
    while len(out) < n:
        chunk = s.recv(n - len(out))
        if not chunk:
            raise EOFError
        out += chunk
    return out


def recv_msg(s):
    hdr = recvn(s, 5)
    n = struct.unpack("!I", hdr[1:])[0]
    return hdr[:1], recvn(s, n - 4)


def msg(t, body):
    return t + struct.pack("!I", len(body) + 4) + body


def login(s):
    body = struct.pack("!I", 196608) + b"user\0" + user.encode() + b"\0database\0" + db.encode() + b"\0\0"
    s.sendall(struct.pack("!I", len(body) + 4) + body)
    t, b = recv_msg(s)
    assert t == b"R" and struct.unpack("!I", b[:4])[0] == 10, (t, b)
    nonce = base64.b64encode(os.urandom(18)).decode()
    first_bare = "n=,r=" + nonce
    init = ("n,," + first_bare).encode()
    s.sendall(msg(b"p", b"SCRAM-SHA-256\0" + struct.pack("!I", len(init)) + init))
    t, b = recv_msg(s)
    server_first = b[4:].decode()
    attrs = dict(kv.split("=", 1) for kv in server_first.split(","))
    salted = hashlib.pbkdf2_hmac("sha256", password.encode(), base64.b64decode(attrs["s"]), int(attrs["i"]))
    ck = hmac.new(salted, b"Client Key", "sha256").digest()
    stored = hashlib.sha256(ck).digest()
    without_proof = "c=biws,r=" + attrs["r"]
    auth = (first_bare + "," + server_first + "," + without_proof).encode()
    sig = hmac.new(stored, auth, "sha256").digest()
    proof = base64.b64encode(bytes(a ^ b for a, b in zip(ck, sig))).decode()
    s.sendall(msg(b"p", (without_proof + ",p=" + proof).encode()))
    while True:
        t, b = recv_msg(s)
        if t == b"Z":
            return
        if t == b"E":
            raise SystemExit("login failed: " + repr(b))


def drain(s):
    """Everything the proxy sends until it closes (or 5 s pass)."""
    s.settimeout(5)
    got = b""
    closed = False
    try:
        while True:
            chunk = s.recv(65536)
            if not chunk:
                closed = True
                break
            got += chunk
    except (socket.timeout, ConnectionResetError):
        pass
    return got, closed


s = socket.create_connection((host, int(port)))
if case == "garbage-before-startup":
    s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
else:
    login(s)
    payload = {
        "bad-length": b"Q" + struct.pack("!i", 2) + b"DELETE FROM customers\0",
        "huge-length": b"Q" + struct.pack("!i", 0x7FFFFFF0) + b"DELETE FROM customers\0",
        "unknown-type": msg(b"z", b"DELETE FROM customers\0"),
        "no-terminator": msg(b"Q", b"DELETE FROM customers"),
        "garbage-after-startup": os.urandom(64),
        # Within the protocol, over the proxy's configured SQL limit (4 KiB).
        "over-sql-limit": msg(b"Q", b"DELETE FROM customers WHERE name = '" + b"x" * 8000 + b"'\0"),
    }[case]
    s.sendall(payload)
got, closed = drain(s)
codes = []
i = 0
while i + 5 <= len(got):
    t = got[i : i + 1]
    n = struct.unpack("!I", got[i + 1 : i + 5])[0]
    body = got[i + 5 : i + 1 + n]
    if t == b"E":
        for f in body.split(b"\0"):
            if f[:1] == b"C":
                codes.append(f[1:].decode())
    i += 1 + n
print(json.dumps({"sqlstates": codes, "closed": closed, "text": got.decode("latin1")}))
