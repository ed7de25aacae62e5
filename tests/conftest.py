"""Shared fixtures: composing configs as `python -m train` does, running the CLI in a subprocess."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from train.config import compose

ROOT = Path(__file__).resolve().parent.parent


def run_cli(args: list[str], *, env: dict | None = None, timeout: float = 300, module: str = "train",
            check: bool = True) -> subprocess.CompletedProcess:
    """`python -m train ARGS` (or another module/script) in a subprocess, from the repository root."""
    cmd = [sys.executable, *(["-m", module] if not module.endswith(".py") else [module]), *args]
    full_env = os.environ | {"PYTHONPATH": str(ROOT)} | (env or {})
    proc = subprocess.run(cmd, cwd=ROOT, env=full_env, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def quick(*overrides: str) -> list[str]:
    """Overrides that keep a test run small: no compilation cache writes racing between tests."""
    return ["runtime.compilation_cache=false", *overrides]


@pytest.fixture
def cfg_for():
    """Compose a config from overrides, as the command line would."""
    return lambda *overrides: compose(quick(*overrides))
