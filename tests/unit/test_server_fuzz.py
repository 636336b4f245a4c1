"""Random and hostile arguments to every MCP tool (property-based, in memory).

Whatever arrives, the server answers: a result, or a tool error whose message says what is
wrong. A rejected call stores nothing, and the server goes on serving.
"""

from __future__ import annotations

from typing import Any

import anyio
import pytest
from hypothesis import HealthCheck, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st
from mcp import Client
from mcp_types import TextContent

from koubou_mcp import queue
from koubou_mcp.config import Settings
from koubou_mcp.server import build_server
from koubou_mcp.store import open_store

ARGUMENTS = {
    "delegate_task": ["prompt", "type", "priority", "sync", "timeout_s", "wait_s",
                      "idempotency_key", "workdir", "files", "model", "system", "options",
                      "output_schema"],
    "delegate_tasks": ["tasks"],
    "wait_tasks": ["task_ids", "mode", "wait_s"],
    "get_status": ["task_id", "include_prompt"],
    "list_tasks": ["status", "limit"],
    "cancel_task": ["task_id"],
}

hostile_text = st.one_of(
    st.text(max_size=40),
    st.sampled_from(["--help", '-c model="x"', "$(touch /tmp/koubou_fuzz_pwned)", "; rm -rf ~",
                     "a\x00b", "\udc80", "task_nope", "", "   ", "general", "code", "pending"]),
    st.just("x" * 250_000),
)
values = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(10**12), max_value=10**12),
    st.floats(allow_nan=False, allow_infinity=False), st.sampled_from(["NaN", "Infinity", "-1"]),
    hostile_text, st.lists(st.integers(), max_size=3), st.dictionaries(st.text(max_size=5),
                                                                       st.integers(), max_size=2),
    st.lists(hostile_text, max_size=3), st.sampled_from(["/", "/etc", "/etc/passwd", "all", "any"]),
    st.lists(st.dictionaries(st.sampled_from(["prompt", "files", "model", "workdir", "bogus"]),
                             hostile_text, max_size=3), max_size=3),
)


@st.composite
def calls(draw: st.DrawFn) -> tuple[str, dict[str, Any]]:
    tool = draw(st.sampled_from(sorted(ARGUMENTS)))
    names = draw(st.lists(st.sampled_from([*ARGUMENTS[tool], "bogus_argument"]), unique=True,
                          max_size=len(ARGUMENTS[tool]) + 1))
    return tool, {name: draw(values) for name in names}


@pytest.fixture
def fuzz_settings(settings: Settings) -> Settings:
    # a sync call with nobody to run the task returns after this short wait
    return settings.with_overrides(sync_wait_s=0.05)


@hsettings(max_examples=120, deadline=None,
           suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(batch=st.lists(calls(), min_size=1, max_size=4))
def test_any_arguments_get_an_answer_and_rejected_calls_store_nothing(
    fuzz_settings: Settings, batch: list[tuple[str, dict[str, Any]]]
) -> None:
    store = open_store(fuzz_settings.database_url, fuzz_settings.run_dir)
    server = build_server(fuzz_settings, pool=False)

    async def run() -> None:
        async with Client(server) as client:
            for tool, arguments in batch:
                before = queue.counts_by_status(store)
                with anyio.fail_after(30):  # never a hang
                    result = await client.call_tool(tool, arguments)
                if result.is_error:
                    block = result.content[0]
                    assert isinstance(block, TextContent) and len(block.text) > 10, result
                    assert "Traceback" not in block.text
                    assert queue.counts_by_status(store) == before, "a rejected call changed data"
                else:
                    assert result.structured_content is not None
                    if tool == "delegate_task":
                        task = queue.get_task(store, result.structured_content["task_id"])
                        assert task.prompt == arguments["prompt"], "stored verbatim"
            tools = await client.list_tools()  # and the server goes on serving
            assert len(tools.tools) == len(ARGUMENTS)

    try:
        anyio.run(run)
    finally:
        store.close()
