"""The ``koubou-mcp`` command line's arguments: the parser, its subcommands and the value
checks of their flags. Every flag that is a setting names its environment variable in
``--help`` (``config.KNOBS``); ``cli`` runs the commands.
"""

from __future__ import annotations

import argparse
from typing import Any

from koubou_mcp import __version__
from koubou_mcp.config import KNOBS, PRIORITY_MAX, PRIORITY_MIN, TRANSPORTS
from koubou_mcp.models import TaskStatus, TaskType
from koubou_mcp.request import TASK_TYPES


def _env_help(name: str, text: str | None = None) -> str:
    knob = KNOBS[name]
    return f"{text or knob.help} (env {knob.env})"


def _positive_int(value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {value!r}") from None
    if number < 0:
        raise argparse.ArgumentTypeError(f"expected zero or more, got {number}")
    return number


def _seconds(value: str) -> float:
    try:
        number = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {value!r}") from None
    if not (number == number and number >= 0 and number != float("inf")):
        raise argparse.ArgumentTypeError(f"expected a finite number of seconds >= 0, got {value!r}")
    return number


def _add_store_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--home", help=_env_help("home"))
    p.add_argument("--database-url", help=_env_help("database_url"))


def _add_pool_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--min", dest="min_workers", type=_positive_int, help=_env_help("min_workers")
                   + "; default 1")
    p.add_argument("--max", dest="max_workers", type=_positive_int, help=_env_help("max_workers")
                   + "; default 5")
    p.add_argument("--threshold", dest="scale_up_threshold", type=_seconds,
                   help=_env_help("scale_up_threshold") + "; default 2")
    p.add_argument("--idle-timeout", dest="idle_timeout_s", type=_seconds,
                   help=_env_help("idle_timeout_s") + "; default 30")


def build_parser() -> argparse.ArgumentParser:
    """The `koubou-mcp` command line: every flag names its environment variable."""
    env_lines = "\n".join(f"  {k.env:28} {k.help}" for k in KNOBS.values())
    parser = argparse.ArgumentParser(
        prog="koubou-mcp",
        description="Delegate work from a coding agent to local models. With no command, "
                    "runs the MCP server on stdio (same as `koubou-mcp serve`).",
        epilog="Environment variables:\n" + env_lines + "\n  WORKER_ID                    "
               "id of a worker started with `koubou-mcp worker`",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"koubou-mcp {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    _add_pool_commands(sub)
    _add_task_commands(sub)
    _add_inspection_commands(sub)
    return parser


def _add_pool_commands(sub: Any) -> None:
    """serve, worker, pool: the processes that run tasks."""
    p = sub.add_parser("serve", help="run the MCP server (stdio by default) and its worker pool")
    _add_store_flags(p)
    _add_pool_flags(p)
    p.add_argument("--no-pool", action="store_true", default=None,
                   help=_env_help("no_pool", "front end only: do not start workers (a "
                                             "`koubou-mcp pool` elsewhere runs them)"))
    p.add_argument("--ollama-url", help=_env_help("ollama_url"))
    p.add_argument("--transport", choices=TRANSPORTS,
                   help=_env_help("transport", "MCP transport; streamable-http also serves the "
                                               "REST API and /metrics") + "; default stdio")
    p.add_argument("--host", dest="http_host",
                   help=_env_help("http_host", "HTTP bind address; anything but loopback "
                                               "needs KOUBOU_HTTP_TOKEN") + "; default 127.0.0.1")
    p.add_argument("--port", dest="http_port", type=_positive_int,
                   help=_env_help("http_port", "HTTP port") + "; default 8765")

    p = sub.add_parser("worker", help="run one worker process in the foreground")
    _add_store_flags(p)
    p.add_argument("--ollama-url", help=_env_help("ollama_url"))
    p.add_argument("--max-tasks", type=_positive_int, help="exit after this many tasks")

    p = sub.add_parser("pool", help="run the scaling worker pool in the foreground")
    _add_store_flags(p)
    _add_pool_flags(p)
    p.add_argument("--ollama-url", help=_env_help("ollama_url"))
    p.add_argument("--detached", action="store_true",
                   help="run as the background pool a server starts: log only to "
                        "logs/worker_pool.log, leave at once if another pool runs for this "
                        "home, exit after KOUBOU_POOL_LINGER seconds with no task and no "
                        "server attached")


def _add_delegation_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--workdir", help="the task's project directory, absolute: Codex works there "
                   "and --file paths are relative to it (default: this directory, or "
                   "KOUBOU_WORKDIR)")
    p.add_argument("--file", dest="files", action="append", metavar="PATH",
                   help="a text file the worker reads when the task runs and gives the model "
                        "under a header (repeat for more)")
    p.add_argument("--model", help="run on this model instead of the type's default")
    p.add_argument("--system", help="general tasks: a system prompt")
    p.add_argument("--option", dest="options", action="append", metavar="KEY=VALUE",
                   help="general tasks: a model option (temperature, top_p, num_ctx, seed); "
                        "repeat for more")
    p.add_argument("--output-schema", metavar="JSON",
                   help="general tasks: a JSON Schema the answer must fit (the JSON itself, or "
                        "@FILE); the parsed value is printed as result_json")


def _add_task_commands(sub: Any) -> None:
    """submit, status, tasks, cancel: one task at a time."""
    p = sub.add_parser("submit", help="add a task to the queue")
    _add_store_flags(p)
    p.add_argument("prompt", help="the prompt, or - to read it from stdin")
    p.add_argument("--type", choices=TASK_TYPES, default=TaskType.GENERAL.value,
                   help="default general")
    p.add_argument("--priority", type=int, default=5,
                   help=f"{PRIORITY_MIN} (lowest) to {PRIORITY_MAX} (highest); default 5")
    p.add_argument("--timeout", type=_seconds, help="time limit of the task in seconds; default "
                   "KOUBOU_GENERAL_TIMEOUT / KOUBOU_CODE_TIMEOUT")
    p.add_argument("--idempotency-key", help="return the unfinished task with this key instead "
                   "of adding a duplicate")
    p.add_argument("--wait", action="store_true", help="wait for the task to end and print it; "
                   "exit 1 if it failed")
    p.add_argument("--wait-timeout", type=_seconds, help="stop waiting after this many seconds "
                   "(the task goes on); default: wait until it ends")
    p.add_argument("--json", action="store_true", help="print the task as one JSON object")
    _add_delegation_flags(p)

    p = sub.add_parser("submit-batch", help="add several tasks at once, all or none")
    _add_store_flags(p)
    p.add_argument("file", help="a JSON list of tasks (objects with the fields of "
                                "POST /task/delegate but sync and wait_s), or - for stdin")
    p.add_argument("--json", action="store_true", help="print the tasks as a JSON list")

    p = sub.add_parser("wait", help="wait until tasks end and print them")
    _add_store_flags(p)
    p.add_argument("task_ids", nargs="+", metavar="TASK_ID")
    p.add_argument("--any", action="store_true", help="return as soon as one task ends "
                                                      "(default: when all have)")
    p.add_argument("--timeout", type=_seconds, help="stop waiting after this many seconds (the "
                   "tasks go on); default: wait until they end")
    p.add_argument("--json", action="store_true", help="print what wait_tasks returns, as JSON")

    p = sub.add_parser("status", help="show one task")
    _add_store_flags(p)
    p.add_argument("task_id")
    p.add_argument("--json", action="store_true", help="print the task as one JSON object")

    p = sub.add_parser("tasks", help="list tasks, newest first")
    _add_store_flags(p)
    p.add_argument("--status", choices=[s.value for s in TaskStatus])
    p.add_argument("--limit", type=_positive_int, default=20, help="default 20, at most 1000")
    p.add_argument("--json", action="store_true", help="print {tasks, counts} as JSON")

    p = sub.add_parser("cancel", help="cancel a pending or running task")
    _add_store_flags(p)
    p.add_argument("task_id")
    p.add_argument("--json", action="store_true", help="print the task as one JSON object")


def _add_inspection_commands(sub: Any) -> None:
    """stats, stop, load-test, top, doctor: looking at (and stopping) the pool."""
    p = sub.add_parser("stats", help="print the pool's statistics block now")
    _add_store_flags(p)
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("stop", help="stop the pool running for this KOUBOU_HOME, gracefully")
    _add_store_flags(p)
    p.add_argument("--timeout", type=_seconds, default=60.0,
                   help="seconds to wait for it to drain; default 60")

    p = sub.add_parser("load-test", help="send N mixed tasks and report throughput, latencies "
                                          "and the pool's size (the seed's load_test.py)")
    _add_store_flags(p)
    p.add_argument("-n", "--count", type=_positive_int, default=50, help="tasks to send; default 50")
    p.add_argument("--code-share", type=float, default=0.3,
                   help="share of `code` tasks, 0 to 1; default 0.3")
    p.add_argument("--url", help="send through a running server's REST API instead of the store "
                                 "(e.g. http://127.0.0.1:8765)")
    p.add_argument("--token", help="bearer token for --url (env KOUBOU_HTTP_TOKEN)")
    p.add_argument("--timeout", type=_seconds, default=600.0,
                   help="stop following the tasks after this many seconds; default 600")
    p.add_argument("--seed", type=int, help="random seed, for a repeatable mix")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")

    p = sub.add_parser("top", help="watch the pool live: workers, the queue, recent results "
                                    "(q or Ctrl-C to quit)")
    _add_store_flags(p)
    p.add_argument("--interval", type=_seconds, default=1.0,
                   help="seconds between refreshes; default 1")
    p.add_argument("--once", action="store_true", help="print the view once and exit")

    p = sub.add_parser("doctor", help="check the database, Ollama and the Codex CLI")
    _add_store_flags(p)
    p.add_argument("--ollama-url", help=_env_help("ollama_url"))
    p.add_argument("--json", action="store_true")
