"""Scale-out on one machine: FSDP + tensor parallelism on 8 fake devices, bfloat16 compute, gradient accumulation."""

import json
import os

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from tests.conftest import run_cli
from train import mesh as mesh_lib
from train.config import compose
from train.loop import make_train_step, run, setup
from train.writers import read_metrics

GPT = ["model=gpt", "data=bytes", "model.num_layers=2", "model.d_model=64", "model.num_heads=4",
            "data.seq_len=32", "data.eval_windows=32", "trainer.batch_size=16", "trainer.steps=20",
            "trainer.log_every=1", "trainer.eval_every=20", "checkpoint.every=20", "optim.warmup_steps=5"]


def test_gpt_on_mesh_2x2x2_follows_single_device_and_is_sharded(tmp_path):
    flags = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    proc = run_cli([*GPT, "mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2"], module="tests/scripts/train_and_report.py",
                   env={"XLA_FLAGS": flags})
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["devices"] == 8 and report["mesh"] == {"data": 2, "fsdp": 2, "tensor": 2}

    single = run(compose(GPT), tmp_path)
    assert single["eval/loss"] < 5.0
    losses = [r["train/loss"] for r in read_metrics(tmp_path / "metrics.jsonl") if "train/loss" in r]
    assert len(losses) == 20 and losses[-1] < losses[0]
    np.testing.assert_allclose(report["losses"], losses, rtol=0, atol=1e-4)

    shards = report["shards"]
    embed = next(v for k, v in shards.items() if "token_embed" in k)
    assert embed == [[256, 64], [128, 32]]  # (vocab over tensor, embed over fsdp)
    mlp_in = [v for k, v in shards.items() if "mlp" in k and v[0] == [64, 256]]
    assert mlp_in and all(v[1] == [32, 128] for v in mlp_in)  # (embed over fsdp, hidden over tensor)
    heads = [v for k, v in shards.items() if "attn" in k and len(v[0]) == 2]
    assert heads and all(v[1] == [32, 32] for v in heads)  # q/k/v/out split over heads and fsdp


def test_bfloat16_compute_trains_with_float32_master_weights(tmp_path):
    final = run(compose([*GPT, "trainer.compute_dtype=bfloat16"]), tmp_path)
    losses = [r["train/loss"] for r in read_metrics(tmp_path / "metrics.jsonl") if "train/loss" in r]
    assert losses[-1] < losses[0] - 0.5
    assert np.isfinite(final["eval/loss"])
    params = ocp.StandardCheckpointer().restore(tmp_path / "checkpoints" / "20" / "state")["params"]
    assert {x.dtype for x in jax.tree.leaves(params)} == {np.dtype("float32")}


@pytest.mark.parametrize("accum", [4])
def test_gradient_accumulation_equals_one_larger_batch(tmp_path, accum):
    """SGD (no momentum) makes the update the gradient itself, so this compares gradients directly."""
    params, losses = [], []
    for k in (1, accum):
        exp = setup(compose(["model=mlp", "optim=sgd", "optim.momentum=0", "optim.weight_decay=0",
                                  "optim.warmup_steps=0", "trainer.batch_size=32", f"trainer.grad_accum={k}"]),
                    tmp_path / str(k))
        state = jax.jit(exp.init, out_shardings=exp.shardings)()
        before = [np.asarray(x) for x in jax.tree.leaves(state["params"])]
        state, sums = make_train_step(exp)(state, mesh_lib.global_batch(exp.dataset.train_batch(0, 32), exp.mesh))
        params.append([np.asarray(x) - b for x, b in zip(jax.tree.leaves(state["params"]), before)])
        losses.append(float(sums["loss"] / sums["count"]))
    assert losses[0] == pytest.approx(losses[1], abs=1e-6)
    assert any(np.abs(u).max() > 1e-4 for u in params[0])
    for a, b in zip(*params, strict=True):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-7)


@pytest.mark.parametrize("remat", ["full", "dots_saveable"])
def test_rematerialised_blocks_give_the_same_loss_and_gradients(remat):
    def loss_and_grads(policy):
        exp = setup(compose([*GPT, f"model.remat={policy}"]), "/tmp/archlab-remat-test")
        state = jax.jit(exp.init)()
        batch = mesh_lib.global_batch(exp.dataset.train_batch(0, 16), exp.mesh)

        def loss(params):
            from flax import nnx
            from train.tasks import metric_sums
            sums = metric_sums("next_token", nnx.merge(exp.graphdef_train, params, state["model_state"], copy=True),
                               batch)
            return sums["loss"] / sums["count"]
        return jax.jit(jax.value_and_grad(loss))(state["params"])

    (l0, g0), (l1, g1) = loss_and_grads("none"), loss_and_grads(remat)
    assert float(l0) == pytest.approx(float(l1), abs=1e-6)
    for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g1), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


def test_the_loops_flat_step_equals_the_step_on_the_state_tree(tmp_path):
    """make_train_step(flat=True), which the train loop runs on the state's leaves, is the same update."""
    exp = setup(compose(GPT), tmp_path)
    batches = [mesh_lib.global_batch(exp.dataset.train_batch(s, 16), exp.mesh) for s in (0, 1)]
    init = jax.jit(exp.init, out_shardings=exp.shardings)
    state, leaves = init(), jax.tree.leaves(init())
    tree_step, flat_step = make_train_step(exp), make_train_step(exp, flat=True)
    for batch in batches:
        state, sums = tree_step(state, batch)
        leaves, flat_sums = flat_step(leaves, batch)
        assert float(flat_sums["loss"]) == pytest.approx(float(sums["loss"]), rel=1e-6)
    assert len(leaves) == len(jax.tree.leaves(state)) and int(state["step"]) == 2
    def values(x):
        return np.asarray(jax.random.key_data(x) if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key) else x)

    for a, b in zip(jax.tree.leaves(state), leaves, strict=True):
        np.testing.assert_allclose(values(a), values(b), rtol=1e-6, atol=1e-7)
    assert jax.tree.structure(jax.tree.unflatten(jax.tree.structure(state), leaves)) == jax.tree.structure(state)


def test_the_cpu_split_into_two_devices_follows_one_device_and_its_checkpoint_resumes_on_one(tmp_path):
    """runtime.cpu_devices=2 from the command line: the batch split over 2 CPU devices gives one device's losses
    (up to the all-reduce's order), and its checkpoint resumes in a run on one device."""
    args = ["model=mlp", "model.hidden=[32]", "trainer.batch_size=16", "trainer.log_every=1", "trainer.eval_every=10",
            "checkpoint.every=10"]
    env = {"XLA_FLAGS": ""}  # the device count comes from the switch alone
    split, single = tmp_path / "split", tmp_path / "single"
    proc = run_cli([*args, "trainer.steps=10", "runtime.cpu_devices=2", f"hydra.run.dir={split}"], env=env)
    log = proc.stdout + proc.stderr
    assert "mesh {'data': 2, 'fsdp': 1, 'tensor': 1}" in log
    run_cli([*args, "trainer.steps=10", f"hydra.run.dir={single}"], env=env)
    losses = [[r["train/loss"] for r in read_metrics(d / "metrics.jsonl") if "train/loss" in r] for d in (split, single)]
    assert len(losses[0]) == 10 and losses[0][-1] < losses[0][0]
    np.testing.assert_allclose(losses[0], losses[1], rtol=0, atol=1e-5)

    proc = run_cli([*args, "trainer.steps=20", "runtime.cpu_devices=1", f"hydra.run.dir={split}"], env=env)
    log = proc.stdout + proc.stderr
    assert "resumed from step 10" in log and "mesh {'data': 1, 'fsdp': 1, 'tensor': 1}" in log
    assert len([r for r in read_metrics(split / "metrics.jsonl") if "train/loss" in r]) == 20
