"""A database agent on the OpenAI Agents SDK (`openai-agents` from PyPI), for
agentgate's end-to-end scenario and `cargo xtask demo`.

Its one tool runs SQL on PostgreSQL through psycopg; whatever the gateway does to
a statement (masks its results, holds it for an approver, refuses it) is what the
tool sees and hands back to the model. The model is whatever OpenAI-compatible
server AGENT_MODEL_URL names (the scripted tests/agent/model_stub.py here), with
tracing off and a dummy key: nothing leaves the host.

Environment: AGENT_MODEL_URL (e.g. http://127.0.0.1:8000/v1), AGENT_PG_URL (a libpq
connection string). Prints one JSON line per tool call, then {"final": ...}.
"""

import asyncio
import json
import os

import psycopg
from agents import (
    Agent,
    Runner,
    function_tool,
    set_default_openai_api,
    set_default_openai_client,
    set_tracing_disabled,
)
from openai import AsyncOpenAI

# Rows a tool result carries back to the model at most.
MAX_ROWS = 20


def emit(obj):
    print(json.dumps(obj, default=str), flush=True)


@function_tool
def query(sql: str) -> str:
    """Run one SQL statement on the customer database and return its result as JSON."""
    try:
        with psycopg.connect(os.environ["AGENT_PG_URL"], autocommit=True, connect_timeout=10) as conn:
            with conn.cursor() as cur:
                cur.execute(sql)
                if cur.description is not None:
                    cols = [d.name for d in cur.description]
                    rows = [dict(zip(cols, r)) for r in cur.fetchmany(MAX_ROWS)]
                    out = {"sql": sql, "ok": True, "rows": rows}
                else:
                    out = {"sql": sql, "ok": True, "status": cur.statusmessage}
    except psycopg.Error as e:
        diag = getattr(e, "diag", None)
        out = {
            "sql": sql,
            "ok": False,
            "sqlstate": getattr(e, "sqlstate", None),
            "error": (diag.message_primary if diag and diag.message_primary else str(e)),
        }
    emit({"tool": "query", **out})
    return json.dumps(out, default=str)


async def main():
    set_tracing_disabled(True)
    set_default_openai_api("chat_completions")
    client = AsyncOpenAI(base_url=os.environ["AGENT_MODEL_URL"], api_key="dummy-not-a-key", max_retries=0)
    set_default_openai_client(client, use_for_tracing=False)
    agent = Agent(
        name="customer-db-agent",
        instructions="You maintain the customer database. Use the query tool.",
        model="stub-model",
        tools=[query],
    )
    result = await Runner.run(agent, "Review the customers table, clean up, and credit customer 2.", max_turns=8)
    emit({"final": result.final_output})


if __name__ == "__main__":
    asyncio.run(main())
