"""Environments for the child processes tests and benchmarks start."""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from tests.support.paths import REPO_ROOT

if TYPE_CHECKING:  # only for the annotation: the stand-ins import this module and stay light
    from koubou_mcp.config import Settings


def plain_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """Our environment without any ``KOUBOU_*``/``FAKE_CODEX*`` variable, with the checkout on
    PYTHONPATH, plus ``extra``: a child that sees none of the outer configuration."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("KOUBOU_", "FAKE_CODEX"))}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p)
    if extra:
        env.update(extra)
    return env


def child_env(settings: Settings, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """An environment that makes a child see ``settings`` (and nothing from the outer env)."""
    return plain_env({**settings.to_env(), **(extra or {})})


def fake_codex_env(base: Mapping[str, str] | None = None, **overrides: str) -> dict[str, str]:
    """An environment for running the fake Codex: ``base`` (default: ours) plus ``overrides``.

    The running interpreter's directory goes first on PATH, so the script's
    ``#!/usr/bin/env python3`` starts this same Python directly (no shim, fast).
    """
    env = dict(os.environ if base is None else base)
    python_dir = str(Path(sys.executable).parent)
    env["PATH"] = os.pathsep.join(p for p in (python_dir, env.get("PATH", "")) if p)
    env.update(overrides)
    return env
