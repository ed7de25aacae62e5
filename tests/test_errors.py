"""Bad input gets one clear line naming the value and what would be valid, before any compile."""

import json
import os
import re
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp

import pytest
from omegaconf import OmegaConf

from tests.conftest import run_cli
from train.config import check_model_values, compose
from train.loop import build, check_config


def one_line_error(args, env=None, after_progress: bool = False) -> str:
    proc = run_cli(args, check=False, timeout=120, env=env)
    assert proc.returncode != 0, proc.stdout
    lines = [l for l in proc.stderr.strip().splitlines() if not (after_progress and "|" in l and "/40" in l)]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: ")
    assert "Traceback" not in proc.stdout + proc.stderr
    return lines[0]


def test_missing_required_value(tmp_path):
    line = one_line_error(["data.seed=???", f"hydra.run.dir={tmp_path}"])
    assert "missing required value(s): data.seed" in line


def test_d_model_not_divisible_by_heads(tmp_path):
    line = one_line_error(["model=gpt", "data=bytes", "model.d_model=100", "model.num_heads=3",
                                f"hydra.run.dir={tmp_path}"])
    assert "100" in line and "3" in line


def test_batch_not_divisible_by_data_parallel_devices(tmp_path):
    flags = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4"
    line = one_line_error(["trainer.batch_size=30", f"hydra.run.dir={tmp_path}"], env={"XLA_FLAGS": flags})
    assert "trainer.batch_size=30" in line and "4 data-parallel devices" in line


def test_mesh_that_does_not_fit_the_devices(tmp_path):
    line = one_line_error(["mesh.data=3", f"hydra.run.dir={tmp_path}"])
    assert "'data': 3" in line and "1 are present" in line


def test_checkpoint_from_a_different_model_shape(tmp_path):
    args = ["model=mlp", "model.hidden=[32]", "trainer.steps=2", "checkpoint.every=2", f"hydra.run.dir={tmp_path}"]
    run_cli(args)
    line = one_line_error([*args[:-3], "model.hidden=[16]", *args[-2:]])
    assert "checkpoint 2" in line and "model.hidden=[32] (now [16])" in line


def test_unwritable_output_directory(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    line = one_line_error([f"hydra.run.dir={blocker}/run"])
    assert str(blocker) in line and "hydra.run.dir=PATH" in line


@pytest.mark.parametrize("override, expected", [("trainer.steps=0", "trainer.steps=0"),
                                                ("trainer.grad_accum=0", "trainer.grad_accum=0 must be a positive"),
                                                ("trainer.steps=1.5", "trainer.steps=1.5 is not valid (valid: int)"),
                                                ("trainer.objective=eval/f1", "trainer.objective=eval/f1 is not a "
                                                 "metric of this run (valid: eval/loss, eval/accuracy)"),
                                                ("distributed.num_processes=two", "distributed.num_processes=two is "
                                                 "not valid (valid: int | None, as train.mesh.initialize_distributed"),
                                                ("trainer.nan_policy=ignore", "valid: stop, skip"),
                                                ("model.activation=swishy", "swishy"),
                                                ("trainer.profile=[5,3]", "trainer.profile=[5, 3] is not a step range"),
                                                ("trainer.profile=7", "valid: [START,STOP]")])
def test_bad_values(tmp_path, override, expected):
    assert expected in one_line_error(["model=mlp", override, f"hydra.run.dir={tmp_path}"])


def test_a_bad_tfds_cache_setting_names_its_three_values(tmp_path):
    line = one_line_error(["data=tfds", "data.cache=maybe", f"hydra.run.dir={tmp_path}"])
    assert line == ("error: data.cache=maybe is not valid (valid: true, false, auto, as data.tfds.TFDSImages "
                    "declares cache)")


def test_non_finite_loss_stops_with_the_step_and_keeps_the_last_checkpoint(tmp_path):
    """Warmup starts at lr 0, so step 1 is finite and checkpointed; lr 1e9 then blows the loss up."""
    args = ["model=mlp", "trainer.steps=40", "trainer.log_every=1", "checkpoint.every=1", "checkpoint.keep=50",
                 "optim=sgd", "optim.warmup_steps=2", "optim.lr=1e9", f"hydra.run.dir={tmp_path}"]
    line = one_line_error(args, after_progress=True)
    match = re.search(r"non-finite loss or gradient norm at step (\d+); stopped \(last good checkpoint: step (\d+)",
                      line)
    assert match and "trainer.nan_policy=skip" in line, line
    bad, good = int(match[1]), int(match[2])
    assert good == bad - 1
    saved = sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit())
    assert saved[-1] == good
    params = ocp.StandardCheckpointer().restore(tmp_path / "checkpoints" / str(good) / "state")["params"]
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(params))


@pytest.mark.parametrize("args, expected", [
    (["model=resnet20", "model.scan_layers=true"], "model.scan_layers is not a setting of model=resnet20 (valid: "),
    (["model=resnet20", "+model.scan_layers=true"],
     "model.scan_layers is not an argument of models.resnet.ResNet (valid: stage_sizes, widths, "),
    (["model=mamba", "data=bytes", "model.scan=nope"],
     "unknown scan 'nope' (valid: associative, sequential, chunked, pallas)"),
])
def test_model_options_a_model_does_not_have(tmp_path, args, expected):
    assert expected in one_line_error([*args, f"hydra.run.dir={tmp_path}"])


@pytest.mark.parametrize("args, expected", [
    (["nosuchkey=1"], "error: nosuchkey is not a setting (valid: checkpoint, data, distributed, mesh, model, optim, "
                      "runtime, trainer; +nosuchkey=VALUE adds one)"),
    (["trainer.epochs=3"], "error: trainer.epochs is not a setting of trainer=default (valid: batch_size, "),
    (["checkpoint.evry=3"], "error: checkpoint.evry is not a setting of checkpoint (valid: async_save, every, keep)"),
    (["runtime=ssm", "runtime.cpu_device=1"],  # ssm extends data_parallel, which extends default
     "error: runtime.cpu_device is not a setting of runtime=ssm (valid: autotune, compilation_cache, cpu_devices"),
])
def test_a_key_the_config_does_not_have_is_one_line(tmp_path, args, expected):
    """Checked before Hydra composes (its own message is five lines); `+KEY=VALUE` adds a key instead."""
    assert one_line_error([*args, f"hydra.run.dir={tmp_path}"]).startswith(expected)


def test_a_model_config_that_picks_a_runtime_is_checked_against_that_runtime(tmp_path):
    """A model config of the user's (--config-dir) may select another group's option, as Hydra allows: the key
    check reads the options it picks."""
    (tmp_path / "model").mkdir()
    mamba = (Path(__file__).parents[1] / "conf" / "model" / "mamba.yaml").read_text()
    (tmp_path / "model" / "my_mamba.yaml").write_text(
        "defaults:\n  - override /runtime@_global_.runtime: ssm\n  - _self_\n" + mamba)
    error = one_line_error(["--config-dir", str(tmp_path), "model=my_mamba", "data=bytes", "runtime.cpu_device=1",
                            f"hydra.run.dir={tmp_path / 'run'}"])
    assert error.startswith("error: runtime.cpu_device is not a setting of runtime=ssm (valid: autotune, ")


@pytest.mark.parametrize("args, expected", [
    (["model=gpt", "data=bytes", "model.d_model=abc"],
     "model.d_model=abc is not valid (valid: int, as models.gpt.GPT declares d_model)"),
    (["trainer.seed=true"], "trainer.seed=true is not valid (valid: int)"),  # a bool is no int to a config
    (["trainer.compute_dtype=fp8"], "trainer.compute_dtype=fp8 is not valid (valid: float32, bfloat16)"),
    (["optim.lr=fast"], "optim.lr=fast is not valid (valid: float, as train.optim.adamw declares lr)"),
    (["model=gpt", "data=bytes", "data.seq_len=long"],  # named where it is set, not where model.max_len reads it
     "data.seq_len=long is not valid (valid: int, as data.text.ByteCorpus declares seq_len)"),
    (["model=mlp", "model.hidden=[64,wide]"],
     "model.hidden=[64,wide] is not valid (valid: Sequence[int], as models.mlp.MLP declares hidden)"),
    (["mesh.data=all"], "mesh.data=all is not valid (valid: int, as train.mesh.make_mesh declares data)"),
    (["checkpoint.keep=[3]"], "checkpoint.keep=[3] is not valid (valid: int)"),
    (["+trainer.epochs=3"], "trainer.epochs is not a setting of trainer (valid: steps, batch_size, "),
    (["+optim.momentum=0.9"], "optim.momentum is not an argument of train.optim.adamw (valid: lr, total_steps, "),
])
def test_a_value_of_the_wrong_type_names_the_type_its_setting_takes(args, expected):
    """Checked against the signature of what the group builds (or the settings' types) before anything is built:
    the wrong type otherwise surfaces as a traceback from deep inside JAX or optax, or not at all."""
    with pytest.raises(ValueError) as e:
        check_config(compose(args))
    assert str(e.value).startswith(expected), e.value


@pytest.mark.parametrize("args, expected", [
    (["model=mlp", "model.hidden=[64,0]"], "model.hidden=[64,0] is not valid (valid: positive sizes)"),
    (["model=gpt", "data=bytes", "model.num_heads=0"], "model.num_heads=0 is not valid (valid: positive sizes)"),
    (["model=gpt", "data=bytes", "data.seq_len=0"], "model.max_len=0 (= ${data.seq_len}) is not valid"),
    (["model=gpt", "data=bytes", "model.dropout=1.5"],
     "model.dropout=1.5 is not valid (valid: a rate, 0 <= dropout < 1)"),
])
def test_a_model_size_or_rate_out_of_range_is_one_line(args, expected):
    with pytest.raises(ValueError) as e:
        check_config(compose(args))
    assert str(e.value).startswith(expected), e.value


def test_a_model_of_your_own_may_take_zero_but_not_a_dropout_rate_outside_0_1():
    """Only archlab's models (`models.`) are known to take nothing but sizes as integers."""
    own = OmegaConf.create({"_target_": "mypkg.model.Tiny", "hidden": 64, "extra_tokens": 0})
    check_model_values(own)
    with pytest.raises(ValueError, match=r"^model.dropout=1.5 is not valid \(valid: a rate"):
        check_model_values(OmegaConf.merge(own, {"dropout": 1.5}))


@pytest.mark.parametrize("args, expected", [
    (["optim.lr=-1"], "optim.lr=-1 is negative (valid: 0 or more)"),
    (["optim.warmup_steps=-5"], "optim.warmup_steps=-5 is negative"),
    (["optim.b2=1.0"], "optim.b2=1.0 is not valid (valid: 0 <= b2 < 1)"),
    (["optim=sgd", "optim.momentum=1"], "optim.momentum=1 is not valid (valid: 0 <= momentum < 1)"),
    (["optim.clip_norm=0"], "optim.clip_norm=0 is not valid (valid: a positive norm, or null: no clipping)"),
])
def test_an_optimizer_setting_out_of_range_is_one_line(args, expected):
    """Each would train, silently wrong: a negative rate ascends the loss, b2 = 1 never updates its second moment,
    a clip norm of 0 was taken as no clipping."""
    with pytest.raises(ValueError) as e:
        build(compose(args).optim, total_steps=10)
    assert str(e.value).startswith(expected), e.value


def test_right_types_pass_the_check():
    """An int is a float, a tuple or list a sequence, null an optional value; nothing the shipped configs hold fails
    (tests/test_configs.py composes them all)."""
    check_config(compose(["optim.lr=1", "optim.clip_norm=1.0", "trainer.max_seconds=5", "trainer.profile=[1,3]",
                          "model=mlp", "model.hidden=[8,8]", "trainer.init_exclude=[head]"]))


def test_an_objective_a_dataset_adds_is_checked_at_the_end_and_the_results_are_kept(tmp_path):
    """A dataset's own final metrics (here the byte corpus' unigram loss) are known only after the run: a name that
    is not one of them fails there, in one line, with the run's results written."""
    line = one_line_error(["model=gpt", "data=bytes", "model.num_layers=1", "model.d_model=32", "model.num_heads=2",
                           "data.seq_len=16", "trainer.batch_size=4", "trainer.steps=2", "trainer.objective=eval/f1",
                           f"hydra.run.dir={tmp_path}"], after_progress=True)
    assert line.startswith("error: trainer.objective=eval/f1 is not a metric of this run (valid: eval/loss, "
                           "eval/accuracy, eval/bits_per_token, eval/unigram_loss)"), line
    assert "eval/unigram_loss" in json.loads((tmp_path / "final_metrics.json").read_text())


def test_a_non_finite_step_leaves_the_state_as_it_was(tmp_path):
    """The skipped step (trainer.nan_policy): parameters, optimizer moments and BatchNorm statistics stay the old
    ones, the step counter moves on; a finite step changes all three."""
    import jax.numpy as jnp

    from train import mesh as mesh_lib
    from train.config import compose
    from train.loop import make_train_step, setup

    exp = setup(compose(["model=resnet20", "model.stage_sizes=[1,1,1]", "trainer.batch_size=16",
                         "optim.warmup_steps=0"]), tmp_path)  # warmup would start at lr 0: no change to see
    state = jax.jit(exp.init, out_shardings=exp.shardings)()
    old = jax.tree.map(np.asarray, state)
    batch = exp.dataset.train_batch(0, 16)
    step = make_train_step(exp)
    bad = dict(batch, image=np.full_like(batch["image"], np.nan))
    skipped, sums = step(state, mesh_lib.global_batch(bad, exp.mesh))
    assert float(sums["nonfinite"]) == 1.0 and int(skipped["step"]) == int(old["step"]) + 1
    for part in ("params", "opt_state", "model_state"):
        jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, skipped[part]), old[part])
    taken, sums = step(skipped, mesh_lib.global_batch(batch, exp.mesh))
    assert float(sums["nonfinite"]) == 0.0
    for part in ("params", "opt_state", "model_state"):
        changed = [not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(jax.tree.map(np.asarray, taken[part])),
                                                            jax.tree.leaves(old[part]))]
        assert any(changed), part
    assert all(jnp.isfinite(x).all() for x in jax.tree.leaves(taken["params"]))
