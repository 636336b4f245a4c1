"""Every knob of koubou-mcp: its env var, its default and its validation, in one place.

``Settings.from_env`` reads the environment once at start; CLI flags are applied on top with
``Settings.with_overrides``. Everything downstream receives a ``Settings`` instance: nothing
else reads the environment (except what a worker is told by its supervisor, ``WORKER_ID`` and
``KOUBOU_SUPERVISOR_PID``, read in ``cli.py``). The environments of child processes are built
here too (``child_environment``, ``codex_environment``).
"""

from __future__ import annotations

import dataclasses
import fnmatch
import math
import os
import re
import socket
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

SANDBOX_MODES = ("read-only", "workspace-write", "danger-full-access")
TRANSPORTS = ("stdio", "streamable-http")
#: The shortest bearer token accepted for the HTTP transport, characters
MIN_HTTP_TOKEN_CHARS = 16
PRIORITY_MIN, PRIORITY_MAX = 1, 10


def make_private_dir(path: Path) -> None:
    """Create ``path`` and any missing parent with mode 0700: what lives under KOUBOU_HOME
    (prompts, results, logs) is the user's alone. ``mkdir -p`` would give parents the umask's
    mode instead. Existing directories are left as they are."""
    missing = []
    current = path
    while not current.exists():
        missing.append(current)
        if current.parent == current:
            break
        current = current.parent
    for directory in reversed(missing):
        try:
            directory.mkdir(mode=0o700)
        except FileExistsError:
            pass  # another process made it meanwhile


class ConfigError(ValueError):
    """A setting has a value we cannot use. The message names the setting and what is accepted."""


@dataclass(frozen=True)
class Knob:
    """Documentation of one setting: its env var, CLI flag and help text."""

    env: str
    flag: str | None
    help: str


# The order here is the order of the README's configuration table.
KNOBS: dict[str, Knob] = {
    "home": Knob("KOUBOU_HOME", "--home", "directory for the database, logs and run files "
                 "(default $XDG_STATE_HOME/koubou, else ~/.local/state/koubou)"),
    "database_url": Knob(
        "KOUBOU_DATABASE_URL", "--database-url",
        "SQLAlchemy URL of the task store (sqlite:///… or postgresql+psycopg://…)",
    ),
    "ollama_url": Knob(
        "KOUBOU_OLLAMA_URL", "--ollama-url", "base URL of the Ollama server (falls back to OLLAMA_HOST)"
    ),
    "general_model": Knob("KOUBOU_GENERAL_MODEL", None, "Ollama model for `general` tasks"),
    "code_model": Knob("KOUBOU_CODE_MODEL", None, "model Codex uses for `code` tasks"),
    "models": Knob("KOUBOU_MODELS", None, "models a task may name, comma-separated (default: the "
                   "general and code models plus what Ollama lists)"),
    "codex_bin": Knob("KOUBOU_CODEX_BIN", None, "the Codex CLI executable (name on PATH or path)"),
    "codex_sandbox": Knob(
        "KOUBOU_CODEX_SANDBOX", None,
        "Codex sandbox: read-only, workspace-write, or danger-full-access (only when named)",
    ),
    "workdir": Knob("KOUBOU_WORKDIR", None, "directory Codex works in (its -C)"),
    "codex_env_pass": Knob(
        "KOUBOU_CODEX_ENV_PASS", None,
        "more environment variables Codex may see, comma-separated names or NAME_* patterns "
        "(it gets PATH, HOME, locale, terminal, CODEX_*, OLLAMA_* and no KOUBOU_* variable)",
    ),
    "code_timeout_s": Knob("KOUBOU_CODE_TIMEOUT", None, "default time limit of a `code` task, s"),
    "general_timeout_s": Knob(
        "KOUBOU_GENERAL_TIMEOUT", None, "default time limit of a `general` task, s"
    ),
    "max_timeout_s": Knob("KOUBOU_MAX_TIMEOUT", None, "largest time limit a task may ask for, s"),
    "max_attempts": Knob("KOUBOU_MAX_ATTEMPTS", None, "runs of a task before it fails for good"),
    "max_prompt_chars": Knob("KOUBOU_MAX_PROMPT_CHARS", None, "longest accepted prompt, characters"),
    "max_files_bytes": Knob("KOUBOU_MAX_FILES_BYTES", None, "most bytes the files of one task "
                            "may hold in all"),
    "sqlite_busy_timeout_s": Knob("KOUBOU_SQLITE_BUSY_TIMEOUT", None, "seconds a SQLite "
                                  "writer waits for the lock before the call fails (and is "
                                  "tried again later)"),
    "lease_s": Knob(
        "KOUBOU_LEASE", None, "seconds a claimed task stays reserved without a worker heartbeat"
    ),
    "heartbeat_s": Knob("KOUBOU_HEARTBEAT", None, "seconds between worker heartbeats"),
    "poll_s": Knob("KOUBOU_POLL", None, "seconds an idle worker waits before looking again anyway"),
    "poll_max_s": Knob("KOUBOU_POLL_MAX", None, "longest that idle wait grows to while nothing "
                       "happens (doubling from KOUBOU_POLL), s"),
    "retry_base_s": Knob("KOUBOU_RETRY_BASE", None, "first retry backoff after a transient error, s"),
    "retry_max_s": Knob("KOUBOU_RETRY_MAX", None, "longest retry backoff, s"),
    "min_workers": Knob("KOUBOU_MIN_WORKERS", "--min", "fewest workers the pool keeps"),
    "max_workers": Knob("KOUBOU_MAX_WORKERS", "--max", "most workers the pool runs (and most "
                        "model slots it learns)"),
    "ollama_parallel": Knob("KOUBOU_OLLAMA_PARALLEL", None, "generations the model server runs at "
                            "once (its OLLAMA_NUM_PARALLEL); 0 = find out by measuring"),
    "max_wait_s": Knob("KOUBOU_MAX_WAIT", None, "longest a task may wait for a model slot before "
                       "it fails, s (its time limit counts only the run)"),
    "scale_up_threshold": Knob(
        "KOUBOU_SCALE_UP_THRESHOLD", "--threshold", "pending tasks per worker before growing"
    ),
    "idle_timeout_s": Knob(
        "KOUBOU_IDLE_TIMEOUT", "--idle-timeout", "seconds a worker idles before it is retired"
    ),
    "stats_interval_s": Knob(
        "KOUBOU_STATS_INTERVAL", None, "seconds between statistics blocks in worker_pool.log"
    ),
    "drain_grace_s": Knob(
        "KOUBOU_DRAIN_GRACE", None, "seconds a stopping worker may spend finishing its task"
    ),
    "pool_linger_s": Knob(
        "KOUBOU_POOL_LINGER", None, "seconds a background pool stays with no task and no "
        "server attached before it exits"
    ),
    "sync_wait_s": Knob(
        "KOUBOU_SYNC_WAIT", None, "default wait of a sync delegate_task before it returns, s"
    ),
    "log_level": Knob("KOUBOU_LOG_LEVEL", None, "DEBUG, INFO, WARNING or ERROR"),
    "hostname": Knob(
        "KOUBOU_HOSTNAME", None, "name this machine's workers record in `workers.host`"
    ),
    "transport": Knob("KOUBOU_TRANSPORT", "--transport", "serve: MCP transport, stdio or "
                      "streamable-http (MCP at /mcp plus the REST API and /metrics)"),
    "http_host": Knob("KOUBOU_HTTP_HOST", "--host", "serve over HTTP: bind address (anything "
                      "but loopback needs KOUBOU_HTTP_TOKEN)"),
    "http_port": Knob("KOUBOU_HTTP_PORT", "--port", "serve over HTTP: TCP port"),
    "http_token": Knob("KOUBOU_HTTP_TOKEN", None, "serve over HTTP: bearer token every request "
                       f"must send (at least {MIN_HTTP_TOKEN_CHARS} characters)"),
    "http_max_connections": Knob("KOUBOU_HTTP_MAX_CONNECTIONS", None, "serve over HTTP: most "
                                 "open connections; past it a new one gets 503"),
    "http_header_timeout_s": Knob("KOUBOU_HTTP_HEADER_TIMEOUT", None, "serve over HTTP: seconds "
                                  "a request's headers, and then its body, may take to arrive"),
    "http_sessions_per_client": Knob("KOUBOU_HTTP_SESSIONS_PER_CLIENT", None, "serve over HTTP: "
                                     "most open MCP sessions of one client address"),
    "http_session_idle_s": Knob("KOUBOU_HTTP_SESSION_IDLE", None, "serve over HTTP: seconds an "
                                "MCP session may go unused before it is closed"),
    "no_pool": Knob("KOUBOU_NO_POOL", "--no-pool", "serve: front end only, start no workers "
                    "(true/false; a `koubou-mcp pool` elsewhere runs them)"),
}


def default_home(env: Mapping[str, str]) -> Path:
    """The per-user home: ``$XDG_STATE_HOME/koubou``, else ``~/.local/state/koubou``.

    One home per user, not per project: every session of the user shares one queue and one pool
    (the GPU is one per machine), and nothing lands in the user's repositories. As the XDG Base
    Directory spec asks, a relative ``XDG_STATE_HOME`` is ignored.
    """
    state = env.get("XDG_STATE_HOME", "").strip()
    if state and os.path.isabs(state):
        return Path(state) / "koubou"
    user_home = env.get("HOME", "").strip()
    base = Path(user_home) if os.path.isabs(user_home) else Path.home()
    return base / ".local" / "state" / "koubou"


@dataclass(frozen=True)
class Settings:
    """Validated configuration. Durations carry their unit in the name."""

    home: Path = field(default_factory=lambda: default_home(os.environ))
    database_url: str = ""  # empty means sqlite under home; resolved in __post_init__
    ollama_url: str = "http://127.0.0.1:11434"
    general_model: str = "gpt-oss:20b"
    code_model: str = "gpt-oss:20b"
    models: str = ""  # empty: the general and code models plus what Ollama lists
    codex_bin: str = "codex"
    codex_sandbox: str = "read-only"
    workdir: Path = field(default_factory=Path.cwd)
    codex_env_pass: str = ""
    code_timeout_s: float = 120.0
    general_timeout_s: float = 60.0
    max_timeout_s: float = 3600.0
    max_attempts: int = 3
    max_prompt_chars: int = 200_000
    max_files_bytes: int = 400_000
    sqlite_busy_timeout_s: float = 60.0
    lease_s: float = 30.0
    heartbeat_s: float = 1.0
    poll_s: float = 1.0
    poll_max_s: float = 10.0
    retry_base_s: float = 2.0
    retry_max_s: float = 60.0
    min_workers: int = 1
    max_workers: int = 5
    ollama_parallel: int = 0
    max_wait_s: float = 7200.0
    scale_up_threshold: float = 2.0
    idle_timeout_s: float = 30.0
    stats_interval_s: float = 30.0
    drain_grace_s: float = 30.0
    pool_linger_s: float = 600.0
    sync_wait_s: float = 60.0
    log_level: str = "INFO"
    hostname: str = field(default_factory=socket.gethostname)
    transport: str = "stdio"
    http_host: str = "127.0.0.1"
    http_port: int = 8765
    http_token: str = field(default="", repr=False)  # a secret: kept out of reprs and logs
    http_max_connections: int = 256
    http_header_timeout_s: float = 10.0
    http_sessions_per_client: int = 16
    http_session_idle_s: float = 300.0
    no_pool: bool = False
    #: The environment Codex runs in (``codex_environment``): not a knob, derived from the
    #: environment this process started with and ``codex_env_pass``.
    codex_env: Mapping[str, str] = field(
        default_factory=lambda: codex_environment(os.environ), repr=False, compare=False
    )

    def __post_init__(self) -> None:
        if not self.database_url:
            object.__setattr__(
                self, "database_url", f"sqlite:///{self.home / 'db' / 'koubou.db'}"
            )
        self.validate()

    # -- derived paths -------------------------------------------------------------------
    @property
    def logs_dir(self) -> Path:
        return self.home / "logs"

    @property
    def worker_logs_dir(self) -> Path:
        return self.logs_dir / "workers"

    def worker_log(self, worker_id: str) -> Path:
        """A worker's log: its stderr when a supervisor started it, else its log file."""
        return self.worker_logs_dir / f"{worker_id}.log"

    @property
    def pool_log(self) -> Path:
        """The supervisor's lines and statistics (``koubou-mcp pool`` or a hosted pool)."""
        return self.logs_dir / "worker_pool.log"

    @property
    def server_log(self) -> Path:
        """The MCP server's log (its stderr goes to the client)."""
        return self.logs_dir / "mcp_server.log"

    @property
    def run_dir(self) -> Path:
        return self.home / "run"

    def child_groups_dir(self, worker_id: str) -> Path:
        """Where a worker notes the process groups of its running Codex children."""
        return self.run_dir / "children" / worker_id

    @property
    def codex_env_patterns(self) -> tuple[str, ...]:
        """The names and ``NAME_*`` patterns of ``codex_env_pass``."""
        return tuple(p for p in (part.strip() for part in self.codex_env_pass.split(",")) if p)

    @property
    def model_list(self) -> tuple[str, ...]:
        """The models of ``KOUBOU_MODELS``; empty when it is not set."""
        return tuple(name.strip() for name in self.models.split(",") if name.strip())

    # -- validation ----------------------------------------------------------------------
    def validate(self) -> None:
        """Raise ConfigError naming the first setting that is out of bounds."""

        def need(cond: bool, name: str, what: str) -> None:
            if not cond:
                raise ConfigError(f"{_describe(name)} {what} (got {getattr(self, name)!r})")

        need(self.database_url.split(":", 1)[0].split("+", 1)[0] in ("sqlite", "postgresql"),
             "database_url", "must start with sqlite:/// or postgresql+psycopg://")
        parsed = urlparse(self.ollama_url)
        need(parsed.scheme in ("http", "https") and bool(parsed.netloc), "ollama_url",
             "must be an http(s) URL such as http://127.0.0.1:11434")
        for name in ("general_model", "code_model", "codex_bin"):
            need(bool(getattr(self, name).strip()), name, "must not be empty")
        for pattern in self.codex_env_patterns:
            if not _ENV_PATTERN.fullmatch(pattern):
                raise ConfigError(f"{_describe('codex_env_pass')} must list variable names "
                                  f"(letters, digits, _) or NAME_* patterns, comma-separated "
                                  f"(got {pattern!r})")
            if pattern.upper().startswith("KOUBOU_"):
                raise ConfigError(f"{_describe('codex_env_pass')} must not name koubou-mcp's own "
                                  f"variables (its token and database URL stay out of Codex's "
                                  f"reach; got {pattern!r})")
        need(self.codex_sandbox in SANDBOX_MODES, "codex_sandbox",
             f"must be one of {', '.join(SANDBOX_MODES)}")
        for name in ("code_timeout_s", "general_timeout_s", "max_timeout_s", "lease_s",
                     "sqlite_busy_timeout_s", "heartbeat_s", "poll_s", "poll_max_s",
                     "retry_base_s", "retry_max_s", "scale_up_threshold",
                     "stats_interval_s", "sync_wait_s"):
            value = getattr(self, name)
            need(math.isfinite(value) and value > 0, name, "must be a positive number")
        for name in ("idle_timeout_s", "drain_grace_s", "pool_linger_s"):
            value = getattr(self, name)
            need(math.isfinite(value) and value >= 0, name, "must be zero or a positive number")
        need(self.code_timeout_s <= self.max_timeout_s and
             self.general_timeout_s <= self.max_timeout_s, "max_timeout_s",
             "must be at least the code and general timeouts")
        need(self.heartbeat_s * 3 <= self.lease_s, "lease_s",
             "must be at least three heartbeats long (KOUBOU_HEARTBEAT x 3)")
        need(1 <= self.max_attempts <= 100, "max_attempts", "must be an integer from 1 to 100")
        need(1 <= self.max_prompt_chars <= 10_000_000, "max_prompt_chars",
             "must be an integer from 1 to 10000000")
        need(1 <= self.max_files_bytes <= 100_000_000, "max_files_bytes",
             "must be an integer from 1 to 100000000")
        need(all(name.isprintable() and len(name) <= 200 for name in self.model_list), "models",
             "must be model names separated by commas")
        need(0 <= self.min_workers <= 256, "min_workers", "must be an integer from 0 to 256")
        need(1 <= self.max_workers <= 256, "max_workers", "must be an integer from 1 to 256")
        need(0 <= self.ollama_parallel <= 256, "ollama_parallel",
             "must be an integer from 0 (find out by measuring) to 256")
        need(math.isfinite(self.max_wait_s) and self.max_wait_s > 0, "max_wait_s",
             "must be a positive number")
        need(self.min_workers <= self.max_workers, "min_workers",
             f"must not exceed the maximum ({self.max_workers})")
        need(self.log_level in ("DEBUG", "INFO", "WARNING", "ERROR"), "log_level",
             "must be DEBUG, INFO, WARNING or ERROR")
        need(self.transport in TRANSPORTS, "transport", f"must be {' or '.join(TRANSPORTS)}")
        need(bool(self.http_host) and not any(c.isspace() for c in self.http_host),
             "http_host", "must be a host name or IP address such as 127.0.0.1")
        need(1 <= self.http_max_connections <= 100_000, "http_max_connections",
             "must be an integer from 1 to 100000")
        need(1 <= self.http_sessions_per_client <= 10_000, "http_sessions_per_client",
             "must be an integer from 1 to 10000")
        for name in ("http_header_timeout_s", "http_session_idle_s"):
            value = getattr(self, name)
            need(math.isfinite(value) and value > 0, name, "must be a positive number")
        need(1 <= self.http_port <= 65535, "http_port", "must be an integer from 1 to 65535")
        token = self.http_token
        if token and (len(token) < MIN_HTTP_TOKEN_CHARS or not token.isascii()
                      or not all(c.isprintable() and not c.isspace() for c in token)):
            # the value itself is a secret: never echo it
            raise ConfigError(f"{_describe('http_token')} must be at least "
                              f"{MIN_HTTP_TOKEN_CHARS} printable ASCII characters without spaces "
                              f"(got {len(token)} characters)")
        need(0 < len(self.hostname) <= 255 and self.hostname.isprintable(), "hostname",
             "must be printable text of 1 to 255 characters")

    # -- construction --------------------------------------------------------------------
    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
        """Build settings from environment variables, then apply keyword overrides (CLI flags).

        Unset or empty variables keep the default. Raises ConfigError on the first bad value.
        """
        env = os.environ if env is None else env
        values: dict[str, Any] = {}
        types = {f.name: f.type for f in fields(cls)}
        for name, knob in KNOBS.items():
            raw = env.get(knob.env, "").strip()
            if name == "ollama_url" and not raw:
                raw = _ollama_host_to_url(env.get("OLLAMA_HOST", "").strip())
            if raw:
                values[name] = _parse(name, raw, str(types[name]))
        for name, value in overrides.items():
            if value is None:
                continue
            if name not in KNOBS:
                raise ConfigError(f"unknown setting {name!r}")
            values[name] = (_parse(name, value, str(types[name]))
                            if isinstance(value, str) and str(types[name]) != "str" else value)
        if "home" in values:
            values["home"] = Path(values["home"]).expanduser().absolute()
        else:
            values["home"] = default_home(env)
        if "workdir" in values:
            values["workdir"] = Path(values["workdir"]).expanduser().absolute()
        settings = cls(**values)  # validated, codex_env_pass included
        return dataclasses.replace(
            settings, codex_env=codex_environment(env, settings.codex_env_patterns)
        )

    def with_overrides(self, **overrides: Any) -> Settings:
        """A copy with some settings replaced (None means keep), validated again."""
        kept = {k: v for k, v in overrides.items() if v is not None}
        return dataclasses.replace(self, **kept)

    def to_env(self) -> dict[str, str]:
        """The environment that makes a child process see exactly these settings."""
        out: dict[str, str] = {}
        for name, knob in KNOBS.items():
            value = getattr(self, name)
            out[knob.env] = str(value)
        return out


#: Variables the Codex child needs whatever the setup: where programs are, whose home, the
#: locale and the terminal, temp and XDG directories, the TLS trust store.
CODEX_ENV_NAMES = frozenset({
    "PATH", "HOME", "USER", "LOGNAME", "SHELL", "TMPDIR", "TZ", "LANG", "LANGUAGE", "TERM",
    "COLORTERM", "NO_COLOR", "XDG_CONFIG_HOME", "XDG_CACHE_HOME", "XDG_DATA_HOME",
    "XDG_STATE_HOME", "XDG_RUNTIME_DIR", "SSL_CERT_FILE", "SSL_CERT_DIR", "OPENAI_BASE_URL",
})
#: Prefixes of variable families it may read: locale, Codex's own, the model server's.
CODEX_ENV_PREFIXES = ("LC_", "CODEX_", "OLLAMA_")
_ENV_PATTERN = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\*?")


def codex_environment(env: Mapping[str, str], extra: tuple[str, ...] = ()) -> dict[str, str]:
    """What the Codex child may see of ``env``: an allow-list, not a deny-list.

    Codex runs commands a model wrote, so it must not inherit koubou-mcp's bearer token, the
    database URL (with its password) or cloud credentials that happen to be exported. It gets
    the names above, plus ``extra`` (names, or ``NAME_*`` patterns, from
    KOUBOU_CODEX_ENV_PASS); a ``KOUBOU_*`` variable never, whatever ``extra`` says.
    """
    out: dict[str, str] = {}
    for name, value in env.items():
        if name.startswith("KOUBOU_"):
            continue
        if (name in CODEX_ENV_NAMES or name.startswith(CODEX_ENV_PREFIXES)
                or any(fnmatch.fnmatchcase(name, pattern) for pattern in extra)):
            out[name] = value
    return out


def child_environment(settings: Settings, **extra: str) -> dict[str, str]:
    """The environment of a koubou-mcp process this one starts (a worker, a pool), with
    ``extra`` variables on top (``WORKER_ID=...``).

    The inherited environment carries PATH, HOME and the like, which the child and the Codex
    CLI a worker runs need (Codex itself then gets only ``codex_environment``'s allow-list);
    the settings override every KOUBOU_* knob, so the child sees exactly these settings.
    """
    env = dict(os.environ)
    env.update(settings.to_env())
    env["KOUBOU_HOME"] = str(settings.home)
    env.update(extra)
    return env


def _describe(name: str) -> str:
    knob = KNOBS.get(name)
    if knob is None:
        return name
    return f"{knob.env}" + (f" ({knob.flag})" if knob.flag else "")


_PARSERS: dict[str, Callable[[str], Any]] = {"int": int, "float": float}
_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


def _parse(name: str, raw: str, type_name: str) -> Any:
    if type_name == "bool":
        word = raw.strip().lower()
        if word not in _TRUE + _FALSE:
            raise ConfigError(f"{_describe(name)} must be true or false (got {raw!r})")
        return word in _TRUE
    if type_name in _PARSERS:
        try:
            value = _PARSERS[type_name](raw)
        except ValueError:
            kind = "an integer" if type_name == "int" else "a number"
            raise ConfigError(f"{_describe(name)} must be {kind} (got {raw!r})") from None
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{_describe(name)} must be a finite number (got {raw!r})")
        return value
    if name == "log_level":
        return raw.upper()
    return raw


def _ollama_host_to_url(host: str) -> str:
    """OLLAMA_HOST may be ``0.0.0.0``, ``host:port`` or a full URL, as Ollama itself accepts."""
    if not host:
        return ""
    if "://" not in host:
        host = "http://" + host
    parsed = urlparse(host)
    hostname = parsed.hostname or "127.0.0.1"
    if hostname == "0.0.0.0":  # a listen address, not somewhere to connect to  # noqa: S104
        hostname = "127.0.0.1"
    port = parsed.port or 11434
    return f"{parsed.scheme}://{hostname}:{port}"
