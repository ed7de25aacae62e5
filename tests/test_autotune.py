"""runtime.autotune: the train step compiled with YNNPACK and with Eigen dots, timed on real steps, the faster kept."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.conftest import run_cli
from train import autotune
from train import mesh as mesh_lib
from train.config import compose
from train.loop import make_train_step, setup


def test_the_fastest_window_wins_and_the_default_stays_within_the_margin():
    assert autotune.fastest({"ynnpack": [2.0, 2.1, 2.2], "eigen": [1.5, 3.0, 3.0]}) == "eigen"
    assert autotune.fastest({"ynnpack": [3.0, 3.1, 3.2], "eigen": [2.0, 2.0, 2.0]}) == "eigen"
    # eigen 3% faster: inside the margin, the configured default stays
    assert autotune.fastest({"ynnpack": [1.00, 1.2, 1.1], "eigen": [0.97, 1.3, 1.2]}) == "ynnpack"
    assert autotune.fastest({"ynnpack": [1.00, 1.0, 1.0], "eigen": [0.90, 1.0, 1.0]}) == "eigen"


def test_candidates_follow_the_runtime_switches_and_compile_to_different_dot_kernels():
    runtime = compose([]).runtime
    candidates = autotune.dot_candidates(runtime)
    assert list(candidates) == ["ynnpack", "eigen"]
    assert list(autotune.dot_candidates(compose(["runtime.ynn_dot_fusion_off=true"]).runtime)) == ["eigen"]
    assert "REDUCE" not in str(autotune.dot_candidates(compose(["runtime=ssm"]).runtime))  # its reductions: XLA's

    lowered = jax.jit(lambda a, b: jnp.tanh(a @ b)).lower(jnp.ones((64, 32)), jnp.ones((32, 16)))
    hlo = {name: lowered.compile(compiler_options=options).as_text() for name, options in candidates.items()}
    assert "__ynn_fusion" in hlo["ynnpack"] and "__ynn_fusion" not in hlo["eigen"]

    assert not autotune.applies(runtime, 10**6)  # off by default: runs stay bitwise repeatable
    auto = compose(["runtime.autotune=auto"]).runtime
    assert autotune.applies(auto, autotune.MIN_STEPS) and not autotune.applies(auto, autotune.MIN_STEPS - 1)
    assert autotune.applies(compose(["runtime.autotune=true"]).runtime, 10)
    assert not autotune.applies(compose(["runtime.autotune=false"]).runtime, 10**6)
    assert not autotune.applies(compose(["runtime.ynn_dot_fusion_off=true"]).runtime, 10**6)


def test_the_autotuned_step_trains_as_the_plain_step_and_keeps_one_program(tmp_path):
    exp = setup(compose(["model=mlp", "model.hidden=[64]", "trainer.batch_size=32"]), tmp_path)
    init = jax.jit(exp.init, out_shardings=exp.shardings)
    plain, plain_leaves = make_train_step(exp, flat=True), jax.tree.leaves(init())
    run_steps = 200
    tuned = autotune.Autotuned(make_train_step(exp, flat=True), autotune.dot_candidates(exp.cfg.runtime), run_steps)
    tuned_leaves = jax.tree.leaves(init())
    steps, tuned_at = 0, None  # the step that made the choice
    while tuned_at is None or steps < tuned_at + 3:
        batch = mesh_lib.global_batch(exp.dataset.train_batch(steps, 32), exp.mesh)
        plain_leaves, plain_sums = plain(plain_leaves, batch)
        tuned_leaves, tuned_sums = tuned(tuned_leaves, batch)
        assert float(tuned_sums["loss"]) == pytest.approx(float(plain_sums["loss"]), rel=1e-4)
        steps += 1
        if tuned.choice is not None and tuned_at is None:
            tuned_at = steps
    assert tuned.choice in ("ynnpack", "eigen")
    # a sub-millisecond step: windows of several steps, yet tuning within a quarter of the run
    assert 1 < tuned.window_steps and tuned_at <= run_steps // 4
    assert tuned_at == 2 * (autotune.SIZING_ROUNDS + autotune.ROUNDS * tuned.window_steps)
    assert all(len(s) == autotune.ROUNDS for s in tuned.seconds.values())  # no timing after the choice
    state = jax.tree.unflatten(jax.tree.structure(exp.abstract_state), tuned_leaves)
    assert int(state["step"]) == steps
    assert all(np.isfinite(np.asarray(p)).all() for p in jax.tree.leaves(state["params"]))


def test_a_cpu_run_logs_its_choice(tmp_path):
    proc = run_cli(["model=mlp", "model.hidden=[16]", "trainer.steps=12", "trainer.eval_every=12",
                    "trainer.log_every=6", "runtime.autotune=true", f"hydra.run.dir={tmp_path}"])
    assert "autotune: dots on " in proc.stderr + proc.stdout
