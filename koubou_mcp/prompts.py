"""The server's MCP prompts: what Claude Code offers as slash commands
(``/mcp__koubou__<name>``). Each turns a short request of the user into instructions for the
agent to delegate the right way (fan out with ``delegate_tasks``, pass ``files`` instead of
pasting them, collect with ``wait_tasks``). Plain functions returning the message text;
``server.py`` registers them."""

from __future__ import annotations

import shlex
from collections.abc import Callable


def _paths(paths: str) -> list[str]:
    """Paths as the user typed them: separated by spaces or newlines, quoted when they hold
    spaces."""
    try:
        return shlex.split(paths)
    except ValueError:  # an unbalanced quote: take the words as they are
        return paths.split()


def summarize_files(paths: str, focus: str = "") -> str:
    """Summarize each file with the local model, in parallel, without reading the files into
    this conversation."""
    files = _paths(paths)
    if not files:
        return ("Ask me which files to summarize (no paths were given), then follow the "
                "summarize_files instructions of the koubou server.")
    listed = "\n".join(f"- {f}" for f in files)
    about = f" Focus on: {focus.strip()}." if focus.strip() else ""
    return (
        "Summarize each of these files with koubou's local model, without reading them "
        f"yourself:\n{listed}\n\n"
        "Call the koubou tool delegate_tasks once, with one task per file: prompt \"Summarize "
        f"this file: what it is for, its main parts, anything surprising.{about}\" and files "
        "set to that one path (the worker reads the file; do not paste its contents). Then "
        "call wait_tasks with the returned task_ids and mode \"all\"; if it returns before all "
        "have ended, call it again. Report each file's summary under its path, and say which "
        "tasks failed and why."
    )


def delegate(task: str) -> str:
    """Hand a well-specified piece of work to the local model."""
    if not task.strip():
        return "Ask me what to delegate to koubou's local model (no task was given)."
    return (
        f"Delegate this to koubou's local model: {task.strip()}\n\n"
        "Write one self-contained prompt for it (the local model sees nothing of this "
        "conversation): the goal, the constraints and the expected form of the answer. Pass "
        "the files it needs in files instead of pasting them; use type \"code\" if it must "
        "edit files in the project, \"general\" otherwise. Call delegate_task with sync true "
        "for something short, else without and poll get_status. Review the result before "
        "using it, and tell me what came back."
    )


def pool_status() -> str:
    """How the local pool is doing, in a few lines."""
    return (
        "Read the koubou://health resource of the koubou server and call its list_tasks "
        "tool. Tell me in a few lines: whether the pool is ok, how many workers are busy, "
        "what is queued or running, the model servers' slots in use, and any problem with "
        "the fix the health document gives."
    )


#: name -> (the function, its title)
PROMPTS: dict[str, tuple[Callable[..., str], str]] = {
    "summarize_files": (summarize_files, "Summarize files with the local model"),
    "delegate": (delegate, "Delegate a task to the local model"),
    "pool_status": (pool_status, "How is the local pool doing?"),
}

__all__ = ["PROMPTS", "delegate", "pool_status", "summarize_files"]
