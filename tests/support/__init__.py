"""What the tests (and ``benchmarks/``) share: one copy of each helper.

- ``paths``: the repository and the stand-ins' locations (``REPO_ROOT``, ``FAKE_CODEX_PATH``).
- ``env``: environments for child processes (``child_env``, ``plain_env``, ``fake_codex_env``).
- ``waiting``: waiting on a condition with a deadline (``wait_until``, ``async_wait_until``).
- ``procfs``: reading /proc (``pid_alive``, ``worker_processes``, ``parent_pid``, ``kill_workers``).
- ``processes``: starting and always stopping real processes (workers, pools, the CLI).
- ``tasks``: reading and filling the queue the way tests do (``ended``, ``submit``).
- ``pool_doubles``: stand-in worker processes for driving a supervisor by hand
  (``FakeProcess``, ``FakeLauncher``, ``become_ready``).
- ``fixtures``: the shared pytest fixtures (a private home, settings, stores, a stand-in Ollama);
  the root ``conftest.py`` registers them.

The stand-ins themselves (the fake Ollama server, the fake ``codex``) stay in ``tests.fakes``.
"""
