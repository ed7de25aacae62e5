"""Shared fixtures: composing configs as `python -m train` does, running the CLI in a subprocess, archlab's CPU
kernels on and off."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from models import cpu_kernels
from train import runtime
from train.config import compose

ROOT = Path(__file__).resolve().parent.parent

# Subprocess runs share one persistent compilation cache, kept out of the user's home.
os.environ.setdefault("XDG_CACHE_HOME", str(ROOT / ".pytest_cache" / "xdg"))

# Compiling is most of the suite's time: it compiles hundreds of small programs and runs most a few times. XLA's CPU
# code at LLVM's -O2 instead of its default -O3 takes the suite from 17 to 13 minutes here and computes the same (a
# model's first training steps bitwise or within 4e-7 relative; tests/test_configs.py checks). At -O0 XLA's tanh,
# log and rsqrt lose digits. Subprocesses inherit XLA_FLAGS; a level the user sets wins.
runtime.add_xla_flags("--xla_backend_optimization_level=2")

# On a GPU, XLA computes float32 dots in TF32 (10-bit mantissa) unless asked for more; the tests compare float32
# results with references at float32 tolerances, there as on the CPU. Subprocesses read the variable.
if runtime.accelerator_installed():
    import jax

    os.environ.setdefault("JAX_DEFAULT_MATMUL_PRECISION", "highest")
    jax.config.update("jax_default_matmul_precision", os.environ["JAX_DEFAULT_MATMUL_PRECISION"])


def run_cli(args: list[str], *, env: dict | None = None, timeout: float = 300, module: str = "train",
            check: bool = True) -> subprocess.CompletedProcess:
    """`python -m train ARGS` (or another module/script) in a subprocess, from the repository root."""
    cmd = [sys.executable, *(["-m", module] if not module.endswith(".py") else [module]), *args]
    full_env = os.environ | {"PYTHONPATH": str(ROOT)} | (env or {})
    proc = subprocess.run(cmd, cwd=ROOT, env=full_env, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


@pytest.fixture
def cfg_for():
    """Compose a config from overrides, as the command line would."""
    return lambda *overrides: compose([*overrides])


@pytest.fixture(params=["native", "xla"])
def kernels(request):
    """Each test twice: with archlab's CPU kernels (runtime.cpu_kernels=true, the default) and with XLA alone."""
    cpu_kernels.enable(request.param == "native")
    yield request.param
    cpu_kernels.enable(True)


# Module-scoped fixtures that train, build or compile something (3-50 s each on 2 busy cores). Under pytest-xdist
# each worker that runs a test using one sets it up again; `--dist loadgroup` (pyproject) keeps a module's users of
# them on one worker, so each is set up once.
SHARED_SETUPS = {"test_claims": {"claims"}, "test_shootout": {"images", "language"}, "test_transformer": {"model"},
                 "test_targets": {"run_dir"}, "test_resume": {"uninterrupted_dir"}, "test_soak": {"uninterrupted"},
                 "test_disk_full": {"uninterrupted"}}


@pytest.hookimpl(tryfirst=True)  # before xdist's own, which reads the groups into the test ids
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        module = item.module.__name__.rsplit(".", 1)[-1]
        if SHARED_SETUPS.get(module, set()).intersection(item.fixturenames):
            item.add_marker(pytest.mark.xdist_group(module))
