"""The shared fixtures: a private KOUBOU_HOME per test, settings, stores on SQLite and PostgreSQL,
and a stand-in Ollama. The root ``conftest.py`` registers this module as a pytest plugin.

PostgreSQL tests use ``KOUBOU_TEST_DATABASE_URL`` (``.ci/run`` sets it); each test gets its own
schema, dropped afterwards. Without the variable they skip and say why.
"""

from __future__ import annotations

import os
import secrets
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from koubou_mcp.config import Settings
from koubou_mcp.store import Store, open_store
from tests.fakes.ollama_server import FakeOllama
from tests.support.procfs import kill_pools_and_workers, koubou_processes_under

PG_URL = os.environ.get("KOUBOU_TEST_DATABASE_URL", "")


@pytest.fixture(autouse=True, scope="session")
def _default_home_in_a_throwaway_place(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """The default home is per user (``$XDG_STATE_HOME/koubou``): point XDG_STATE_HOME, for
    this process and every child it starts, at a throwaway directory, so that nothing a test
    runs with the default home lands in the real user's home. Fails the session if the real
    default home appeared anyway."""
    real = Path.home() / ".local" / "state" / "koubou"
    existed = real.exists()
    saved = os.environ.get("XDG_STATE_HOME")
    os.environ["XDG_STATE_HOME"] = str(tmp_path_factory.mktemp("xdg-state"))
    try:
        yield
    finally:
        if saved is None:
            del os.environ["XDG_STATE_HOME"]
        else:
            os.environ["XDG_STATE_HOME"] = saved
    if not existed and real.exists():
        pytest.fail(f"the tests created {real} in the real user's home")


@pytest.fixture(autouse=True, scope="session")
def _no_pool_outlives_the_session(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """The safety net under every test: a server's background pool outlives the server by
    design, so at the end of the session every pool and worker whose KOUBOU_HOME lies in the
    session's temporary directories is killed, and named, so that the test that left it can be
    fixed."""
    yield
    base = tmp_path_factory.getbasetemp()
    left = koubou_processes_under(base)
    for home in {where for _, where in left}:
        kill_pools_and_workers(Path(home))
    if left:  # after the capture ends: straight to the terminal
        print(f"\nkilled {len(left)} koubou processes the tests left running: "
              + ", ".join(f"pid {pid} ({home})" for pid, home in left), file=sys.__stderr__)


@pytest.fixture(autouse=True)
def _no_pool_outlives_its_test(request: pytest.FixtureRequest) -> Iterator[None]:
    """After each test that had a temporary directory: kill any pool or worker still running
    with its KOUBOU_HOME there (a detached pool would otherwise linger for minutes, using a
    core of this small machine, while later tests run)."""
    if "tmp_path" not in request.fixturenames:
        yield
        return
    tmp_path: Path = request.getfixturevalue("tmp_path")
    yield
    for home in {where for _, where in koubou_processes_under(tmp_path)}:
        kill_pools_and_workers(Path(home))


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def home(tmp_path: Path) -> Path:
    path = tmp_path / "home"
    path.mkdir(mode=0o700)  # private whatever the umask: koubou-mcp refuses a shared home
    return path


@pytest.fixture
def settings(home: Path) -> Settings:
    """Settings on a private home, with short intervals so tests move quickly."""
    return Settings.from_env(
        {}, home=str(home), heartbeat_s=0.2, lease_s=3.0, poll_s=0.5, retry_base_s=0.05,
        retry_max_s=0.2, idle_timeout_s=1.0, drain_grace_s=5.0,
        codex_env_pass="FAKE_CODEX_*",  # the stand-in Codex is steered by these
    )


def _pg_schema_url(base: str, schema: str) -> str:
    sep = "&" if "?" in base else "?"
    return f"{base}{sep}options=-csearch_path%3D{schema}"


@pytest.fixture
def pg_url() -> Iterator[str]:
    """A PostgreSQL URL whose search_path is a fresh schema of this test's own."""
    if not PG_URL:
        pytest.skip("PostgreSQL tests need KOUBOU_TEST_DATABASE_URL "
                    "(e.g. postgresql+psycopg://postgres@127.0.0.1:5432/test)")
    import psycopg

    schema = f"t_{secrets.token_hex(6)}"
    plain = PG_URL.replace("postgresql+psycopg://", "postgresql://")
    with psycopg.connect(plain, autocommit=True) as conn:
        conn.execute(f'CREATE SCHEMA "{schema}"')
    try:
        yield _pg_schema_url(PG_URL, schema)
    finally:
        with psycopg.connect(plain, autocommit=True) as conn:
            conn.execute(f'DROP SCHEMA "{schema}" CASCADE')


@pytest.fixture(params=["sqlite", "postgresql"])
def store_settings(request: pytest.FixtureRequest, settings: Settings) -> Settings:
    """Settings for each store: the same contract tests run on SQLite and PostgreSQL."""
    if request.param == "sqlite":
        return settings
    url = request.getfixturevalue("pg_url")
    return settings.with_overrides(database_url=url)


def _opened(settings: Settings) -> Iterator[Store]:
    s = open_store(settings.database_url, settings.run_dir)
    try:
        yield s
    finally:
        s.close()


@pytest.fixture
def store(store_settings: Settings) -> Iterator[Store]:
    """The store of each kind in turn (SQLite, then PostgreSQL)."""
    yield from _opened(store_settings)


@pytest.fixture
def sqlite_store(settings: Settings) -> Iterator[Store]:
    """The SQLite store of ``settings``, for tests that are about something else than storage."""
    yield from _opened(settings)


@pytest.fixture
def fake_ollama() -> Iterator[FakeOllama]:
    """A stand-in Ollama in this process, serving the default model."""
    with FakeOllama(models=["gpt-oss:20b"]) as fake:
        yield fake
