"""Where things are: the repository and the stand-ins the tests run instead of the outside world."""

from __future__ import annotations

from pathlib import Path

#: the checkout's root (children get it on PYTHONPATH so ``tests`` and ``benchmarks`` import)
REPO_ROOT = Path(__file__).resolve().parents[2]
#: ``tests/fakes``: put it first on PATH to have the fake Codex found as ``codex``
FAKES_DIR = REPO_ROOT / "tests" / "fakes"
#: the executable standing in for the Codex CLI (its modes: ``FAKE_CODEX_*``, see the script)
FAKE_CODEX_PATH = FAKES_DIR / "codex"
