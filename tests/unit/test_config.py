"""Settings: defaults, env vars, validation messages that name the variable."""

from __future__ import annotations

from pathlib import Path

import pytest

from koubou_mcp.config import KNOBS, ConfigError, Settings


def test_defaults_follow_the_seed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    s = Settings.from_env({"HOME": "/home/ann"})
    assert s.home == Path("/home/ann/.local/state/koubou")
    assert s.database_url == "sqlite:////home/ann/.local/state/koubou/db/koubou.db"
    assert s.ollama_url == "http://127.0.0.1:11434"
    assert (s.general_model, s.code_model, s.codex_bin) == ("gpt-oss:20b", "gpt-oss:20b", "codex")
    assert s.codex_sandbox == "read-only"
    assert (s.code_timeout_s, s.general_timeout_s, s.max_attempts) == (120.0, 60.0, 3)
    assert (s.min_workers, s.max_workers, s.scale_up_threshold, s.idle_timeout_s) == (1, 5, 2.0, 30.0)
    assert s.workdir == tmp_path


def test_the_default_home_is_per_user_under_xdg_state_home_not_the_start_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    env = {"HOME": "/home/ann", "XDG_STATE_HOME": "/var/state/ann"}
    assert Settings.from_env(env).home == Path("/var/state/ann/koubou")
    # the XDG spec: a relative XDG_STATE_HOME is ignored
    assert Settings.from_env({**env, "XDG_STATE_HOME": "rel/state"}).home == Path(
        "/home/ann/.local/state/koubou")
    assert Settings.from_env({**env, "XDG_STATE_HOME": " "}).home == Path(
        "/home/ann/.local/state/koubou")
    assert Settings.from_env({**env, "KOUBOU_HOME": str(tmp_path / "mine")}).home == (
        tmp_path / "mine")
    assert Settings.from_env(env, home="proj/.koubou").home == tmp_path / "proj" / ".koubou"


def test_the_log_files_live_under_the_home_s_logs_directory(tmp_path: Path) -> None:
    s = Settings.from_env({}, home=str(tmp_path))
    assert s.server_log == tmp_path / "logs" / "mcp_server.log"
    assert s.pool_log == tmp_path / "logs" / "worker_pool.log"
    assert s.worker_log("worker_1") == tmp_path / "logs" / "workers" / "worker_1.log"


def test_env_vars_set_every_knob(tmp_path: Path) -> None:
    s = Settings.from_env({
        "KOUBOU_HOME": str(tmp_path / "h"), "KOUBOU_MAX_WORKERS": "9", "KOUBOU_MIN_WORKERS": "2",
        "KOUBOU_CODE_TIMEOUT": "30.5", "KOUBOU_CODEX_SANDBOX": "workspace-write",
        "KOUBOU_GENERAL_MODEL": "llama3.2", "KOUBOU_LOG_LEVEL": "debug",
    })
    assert s.home == tmp_path / "h"
    assert s.database_url == f"sqlite:///{tmp_path}/h/db/koubou.db"
    assert (s.max_workers, s.min_workers, s.code_timeout_s) == (9, 2, 30.5)
    assert (s.codex_sandbox, s.general_model, s.log_level) == ("workspace-write", "llama3.2", "DEBUG")


@pytest.mark.parametrize(("host", "url"), [
    ("0.0.0.0", "http://127.0.0.1:11434"),
    ("gpu-box:11500", "http://gpu-box:11500"),
    ("https://ollama.example", "https://ollama.example:11434"),
])
def test_ollama_host_is_the_fallback_for_the_ollama_url(host: str, url: str) -> None:
    assert Settings.from_env({"OLLAMA_HOST": host}).ollama_url == url
    assert Settings.from_env({"OLLAMA_HOST": host,
                              "KOUBOU_OLLAMA_URL": "http://x:1"}).ollama_url == "http://x:1"


@pytest.mark.parametrize(("env", "says"), [
    ({"KOUBOU_MAX_WORKERS": "many"}, "KOUBOU_MAX_WORKERS (--max) must be an integer"),
    ({"KOUBOU_MAX_WORKERS": "0"}, "KOUBOU_MAX_WORKERS (--max) must be an integer from 1"),
    ({"KOUBOU_MIN_WORKERS": "6"}, "must not exceed the maximum (5)"),
    ({"KOUBOU_CODE_TIMEOUT": "-1"}, "KOUBOU_CODE_TIMEOUT must be a positive number"),
    ({"KOUBOU_GENERAL_TIMEOUT": "nan"}, "KOUBOU_GENERAL_TIMEOUT must be a finite number"),
    ({"KOUBOU_CODEX_SANDBOX": "yolo"}, "read-only, workspace-write, danger-full-access"),
    ({"KOUBOU_OLLAMA_URL": "ftp://x"}, "KOUBOU_OLLAMA_URL (--ollama-url) must be an http(s) URL"),
    ({"KOUBOU_DATABASE_URL": "mysql://x"}, "sqlite:/// or postgresql+psycopg://"),
    ({"KOUBOU_MAX_ATTEMPTS": "0"}, "KOUBOU_MAX_ATTEMPTS must be an integer from 1 to 100"),
    ({"KOUBOU_LOG_LEVEL": "loud"}, "DEBUG, INFO, WARNING or ERROR"),
    ({"KOUBOU_HEARTBEAT": "20"}, "three heartbeats"),
])
def test_bad_values_are_refused_naming_the_variable(env: dict[str, str], says: str) -> None:
    with pytest.raises(ConfigError) as info:
        Settings.from_env(env)
    assert says in str(info.value)


def test_overrides_from_flags_beat_the_environment() -> None:
    s = Settings.from_env({"KOUBOU_MAX_WORKERS": "3"}, max_workers=7)
    assert s.max_workers == 7
    with pytest.raises(ConfigError, match="--max"):
        Settings.from_env({}, max_workers=0)


def test_to_env_round_trips_the_settings(tmp_path: Path) -> None:
    s = Settings.from_env({"KOUBOU_HOME": str(tmp_path)}, max_workers=8, idle_timeout_s=2.5)
    assert Settings.from_env(s.to_env()) == s


def test_every_knob_has_an_env_var_named_koubou() -> None:
    assert all(k.env.startswith("KOUBOU_") for k in KNOBS.values())
    assert len({k.env for k in KNOBS.values()}) == len(KNOBS)


def test_codex_gets_an_allow_listed_environment_and_never_koubous_own_variables() -> None:
    env = {
        "PATH": "/usr/bin", "HOME": "/home/ann", "LANG": "C.UTF-8", "LC_ALL": "C", "TERM": "xterm",
        "CODEX_HOME": "/home/ann/.codex", "OLLAMA_HOST": "127.0.0.1:11434",
        "KOUBOU_HTTP_TOKEN": "s" * 32, "KOUBOU_DATABASE_URL": "postgresql+psycopg://u:pw@db/k",
        "AWS_SECRET_ACCESS_KEY": "x", "GOOGLE_APPLICATION_CREDENTIALS": "/k.json",
        "OPENAI_API_KEY": "sk-x", "DATABASE_URL": "postgresql://u:pw@db/k",
        "MY_TOOL_HOME": "/opt/tool", "MY_TOOL_CACHE": "/c", "OTHER": "1",
        "KOUBOU_CODEX_ENV_PASS": "MY_TOOL_*, OTHER",
    }
    codex_env = Settings.from_env(env).codex_env
    assert codex_env == {
        "PATH": "/usr/bin", "HOME": "/home/ann", "LANG": "C.UTF-8", "LC_ALL": "C", "TERM": "xterm",
        "CODEX_HOME": "/home/ann/.codex", "OLLAMA_HOST": "127.0.0.1:11434",
        "MY_TOOL_HOME": "/opt/tool", "MY_TOOL_CACHE": "/c", "OTHER": "1",
    }
    assert "s" * 32 not in repr(Settings.from_env(env))


@pytest.mark.parametrize("value", ["KOUBOU_HTTP_TOKEN", "koubou_*", "PATH,*", "A-B", "X*Y"])
def test_the_codex_pass_list_refuses_koubous_variables_and_what_is_not_a_name(value: str) -> None:
    with pytest.raises(ConfigError, match="KOUBOU_CODEX_ENV_PASS"):
        Settings.from_env({"KOUBOU_CODEX_ENV_PASS": value})
