"""Real training on the offline digits reaches the stated accuracy; outputs land in the run directory."""

import json
import time

import jax
import jax.numpy as jnp
import pytest

from data.digits import Digits
from train.loop import run
from train.writers import read_metrics, train_minutes


@pytest.mark.parametrize("model, steps, bar", [("mlp", 300, 0.90), ("lenet", 300, 0.95)])
def test_training_on_digits_reaches_accuracy(cfg_for, tmp_path, model, steps, bar):
    cfg = cfg_for(f"model={model}", f"trainer.steps={steps}", "trainer.eval_every=150", "checkpoint.every=150")
    start = time.perf_counter()
    final = run(cfg, tmp_path)
    elapsed = time.perf_counter() - start
    assert final["eval/accuracy"] >= bar
    records = read_metrics(tmp_path / "metrics.jsonl")
    assert 0 < 60 * train_minutes(records) < elapsed  # training windows only, not set-up
    assert [r["step"] for r in records if "eval/accuracy" in r] == [150, 300]
    assert all("train/loss" in r and "train/steps_per_sec" in r for r in records if "train/accuracy" in r)
    assert (tmp_path / "curves.png").stat().st_size > 0
    assert json.loads((tmp_path / "final_metrics.json").read_text()) == final
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()) == ["150", "300"]
    assert any((tmp_path / "tensorboard").iterdir())


class SlowDigits(Digits):
    """Digits whose loader takes 100 ms a batch, 5-30 times an MLP step: the device waits for input."""

    def train_batch(self, step, batch_size, shard=(0, 1)):
        time.sleep(0.1)
        return super().train_batch(step, batch_size, shard)


def test_input_wait_counts_the_time_the_device_waits_for_a_slow_loader(cfg_for, tmp_path, monkeypatch):
    monkeypatch.setenv("ARCHLAB_TARGETS", "tests")
    run(cfg_for("model=mlp", "data._target_=tests.test_train.SlowDigits", "trainer.steps=30", "trainer.log_every=10",
                "trainer.eval_every=1000"), tmp_path)
    waits = [r["train/input_wait"] for r in read_metrics(tmp_path / "metrics.jsonl") if "train/input_wait" in r]
    assert len(waits) == 3 and all(0.5 < w < 1 for w in waits)


def test_profile_writes_a_trace_of_the_chosen_steps(cfg_for, tmp_path):
    run(cfg_for("model=mlp", "trainer.steps=6", "trainer.log_every=2", "trainer.profile=[2,4]"), tmp_path)
    traces = list((tmp_path / "profile").glob("plugins/profile/*/*.xplane.pb"))
    assert len(traces) == 1 and traces[0].stat().st_size > 0
    records = read_metrics(tmp_path / "metrics.jsonl")
    assert records[0]["step"] == 0 and records[0]["train/first_step_seconds"] > 0
    assert all(0 <= r["train/input_wait"] < 1 for r in records if "train/steps_per_sec" in r)


def test_step_metrics_travel_as_one_array_and_sum_by_name():
    """The loop's step returns its metric sums as one array (one transfer per step); a window sums them by name,
    the first non-finite step as a minimum."""
    from train.loop import MetricSums, window_sums

    pack = jax.jit(MetricSums.pack)
    steps = [pack({"loss": jnp.float32(loss), "count": jnp.int32(4), "first_nonfinite": jnp.int32(first)})
             for loss, first in [(2.5, 9), (1.5, 7), (0.5, 12)]]
    assert [len(jax.tree.leaves(s)) for s in steps] == [1, 1, 1]
    assert steps[0].names == ("count", "first_nonfinite", "loss")
    assert float(steps[1]["loss"]) == 1.5
    assert window_sums(jax.device_get(steps)) == {"count": 12.0, "first_nonfinite": 7.0, "loss": 4.5}


def busy_step(seconds: float):
    """A jitted step of about `seconds` of matrix products (not a host callback: one makes dispatch synchronous)."""
    w = jnp.eye(256)
    products = lambda n: jax.jit(lambda x: jax.lax.fori_loop(0, n, lambda i, y: jnp.tanh(y @ w), x))
    probe, x = products(64), jnp.ones((256, 256))
    probe(x).block_until_ready()
    best = float("inf")
    for _ in range(3):  # the fastest: a step slowed by the other tests' load is longer, never shorter, than asked
        start = time.perf_counter()
        probe(x).block_until_ready()
        best = min(best, time.perf_counter() - start)
    return products(max(1, round(64 * seconds / best)))


def test_the_loop_runs_at_most_two_steps_ahead_and_one_when_steps_are_long():
    """Asynchronous dispatch would queue steps up to the next log, and on CPU each queued step holds its own working
    memory (Throttle): a step is dispatched only once the one before the last has finished, and after the last
    has finished if steps are long."""
    from train.loop import LONG_STEP_SECONDS, Throttle

    for seconds, long in [(LONG_STEP_SECONDS / 5, False), (8 * LONG_STEP_SECONDS, True)]:
        step, throttle, x, outs = busy_step(seconds), Throttle(), jnp.ones((256, 256)), []
        for _ in range(6):
            x = step(x)
            throttle(x)
            outs.append(x)
            assert all(out.is_ready() for out in outs[:-1]), seconds  # the newest and the next at most in flight
            if long:
                assert outs[-1].is_ready()  # a long step runs alone
