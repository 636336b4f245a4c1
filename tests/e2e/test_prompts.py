"""The server's MCP prompts (Claude Code's slash commands), over stdio with the SDK's client
in both protocol eras: listed with their arguments, rendered with what the user typed, and
naming only tools and resources the server really has."""

from __future__ import annotations

import re

import pytest
from mcp import Client
from mcp.shared.exceptions import MCPError
from mcp_types import TextContent

from koubou_mcp.config import Settings
from koubou_mcp.prompts import PROMPTS
from tests.e2e.conftest import server_params

pytestmark = pytest.mark.anyio

MODES = ["legacy", "2026-07-28"]


def _text(result: object) -> str:
    messages = result.messages  # type: ignore[attr-defined]
    assert len(messages) == 1 and messages[0].role == "user"
    content = messages[0].content
    assert isinstance(content, TextContent)
    return content.text


@pytest.mark.parametrize("mode", MODES)
async def test_prompts_are_listed_and_render_what_the_user_typed(e2e_settings: Settings,
                                                                 mode: str) -> None:
    async with Client(server_params(e2e_settings, "--no-pool"), mode=mode) as client:
        listed = {p.name: p for p in (await client.list_prompts()).prompts}
        assert set(listed) == set(PROMPTS)
        arguments = {a.name: a.required for a in listed["summarize_files"].arguments or []}
        assert arguments == {"paths": True, "focus": False}
        for prompt in listed.values():
            assert prompt.title and prompt.description and "\n " not in prompt.description

        text = _text(await client.get_prompt(
            "summarize_files", {"paths": 'README.md "docs/my notes.md"', "focus": "security"}))
        assert "- README.md\n- docs/my notes.md" in text and "Focus on: security." in text
        assert "delegate_tasks" in text and "wait_tasks" in text

        tools = {t.name for t in (await client.list_tools()).tools}
        resources = {str(r.uri) for r in (await client.list_resources()).resources}
        for name in listed:
            args = {"paths": "a.py"} if name == "summarize_files" else (
                {"task": "write docstrings for util.py"} if name == "delegate" else {})
            rendered = _text(await client.get_prompt(name, args))
            # every tool or resource a prompt tells the agent to use exists
            named = set(re.findall(r"\b(?:delegate_tasks?|wait_tasks|get_status|list_tasks|"
                                   r"cancel_task)\b", rendered))
            assert named <= tools, (name, named - tools)
            for uri in re.findall(r"koubou://\w+", rendered):
                assert uri in resources, (name, uri)

        with pytest.raises(MCPError):
            await client.get_prompt("summarize_files", {})  # paths is required
        with pytest.raises(MCPError):
            await client.get_prompt("no_such_prompt", {})
