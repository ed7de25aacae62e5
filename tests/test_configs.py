"""Every config group composes; overrides reach the config; bad options fail with one clear line."""

import os
import re
import subprocess
import sys

import numpy as np
import pytest
from omegaconf import OmegaConf

from tests.conftest import ROOT, run_cli
from train.config import compose, default_compute_dtype, group_options
from train.writers import read_metrics


def test_defaults_compose_to_lenet_on_digits():
    cfg = compose()
    assert cfg.model._target_ == "models.lenet.LeNet"
    assert cfg.data._target_ == "data.digits.Digits"
    assert cfg.model.num_classes == cfg.data.num_classes == 10


def test_command_line_overrides_reach_the_config():
    cfg = compose(["model=mlp", "model.hidden=[512,512]", "optim.lr=1e-3", "trainer.steps=2000", "mesh.data=1",
                   "optim=sgd", "checkpoint.every=7"])
    assert list(cfg.model.hidden) == [512, 512]
    assert cfg.optim.lr == 1e-3 and cfg.optim._target_ == "train.optim.sgd"
    assert cfg.trainer.steps == 2000 and cfg.mesh.data == 1 and cfg.checkpoint.every == 7
    assert cfg.model.in_features == 28 * 28  # interpolated from the data config


@pytest.mark.parametrize("group", ["optim", "trainer", "mesh", "data"])
def test_every_option_of_small_groups_composes(group):
    for option in group_options(group):
        cfg = compose([f"{group}={option}"])
        assert OmegaConf.to_container(cfg[group], resolve=True)
        assert "_target_" in cfg[group] or group in ("trainer", "mesh")


def test_unknown_group_option_is_one_line_listing_valid_options():
    proc = run_cli(["model=nope"], check=False, timeout=60)
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "model=nope" in lines[0] and "lenet" in lines[0] and "mlp" in lines[0]


def test_cfg_job_prints_the_resolved_config():
    proc = run_cli(["model=mlp", "optim.lr=0.02", "--cfg", "job"], timeout=60)
    printed = OmegaConf.create(proc.stdout)
    assert printed.model._target_ == "models.mlp.MLP" and printed.optim.lr == 0.02


def test_compute_dtype_is_bfloat16_on_accelerators_and_float32_on_cpu():
    assert [default_compute_dtype(b) for b in ("cpu", "gpu", "tpu")] == ["float32", "bfloat16", "bfloat16"]
    cfg = compose(["model=gpt2_small"])
    assert cfg.model.dtype == cfg.trainer.compute_dtype == default_compute_dtype()
    assert compose(["model=gpt2_small", "trainer.compute_dtype=bfloat16"]).model.dtype == "bfloat16"


def after_runtime_apply(switches: str, code: str, xla_flags: str | None = None) -> str:
    """stdout of `code` run in a fresh Python after runtime.apply(SWITCHES), with XLA_FLAGS unset or `xla_flags`."""
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"} | ({"XLA_FLAGS": xla_flags} if xla_flags else {})
    script = f"import os; from train import runtime; runtime.apply(keep_freed_memory=False, {switches}); {code}"
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True, env=env).stdout


MATH = """
import sys, numpy as np, jax, jax.numpy as jnp
x = jnp.linspace(-20, 20, 10_001, dtype=jnp.float32)
ops = {"tanh": jnp.tanh, "exp": jnp.exp, "log": lambda v: jnp.log(jnp.abs(v) + 1e-3), "sin": jnp.sin,
       "rsqrt": lambda v: jax.lax.rsqrt(jnp.abs(v) + 1e-3), "erf": jax.scipy.special.erf, "gelu": jax.nn.gelu,
       "pow": lambda v: jnp.abs(v) ** 1.7, "dtanh": jax.vmap(jax.grad(jnp.tanh))}
np.savez(sys.argv[1], **{name: np.asarray(jax.jit(op)(x)) for name, op in ops.items()})
"""


def test_the_suites_compile_level_computes_what_the_default_level_does(tmp_path):
    """tests/conftest.py compiles at LLVM -O2, not XLA's default -O3, for speed: XLA's math and a GPT's first steps
    agree to float32 rounding at the two levels (at -O0 tanh, sin, log and rsqrt are off by 1e-4 to 1e-2)."""
    args = ["model=gpt", "data=bytes", "model.num_layers=2", "trainer.steps=4", "trainer.batch_size=4",
            "trainer.log_every=1", "trainer.eval_every=4", "checkpoint.every=4"]
    others = re.sub(r"--xla_backend_optimization_level=\S+", "", os.environ.get("XLA_FLAGS", ""))
    math, steps = {}, {}
    for level in (2, 3):
        env = {"XLA_FLAGS": f"{others} --xla_backend_optimization_level={level}"}
        subprocess.run([sys.executable, "-c", MATH, str(tmp_path / f"{level}.npz")], cwd=ROOT, check=True,
                       env=os.environ | env)
        math[level] = np.load(tmp_path / f"{level}.npz")
        run_cli([*args, f"hydra.run.dir={tmp_path / str(level)}"], env=env)
        records = read_metrics(tmp_path / str(level) / "metrics.jsonl")
        steps[level] = [(r["train/loss"], r["train/grad_norm"]) for r in records if "train/loss" in r]
    for name in math[3]:
        np.testing.assert_allclose(math[2][name], math[3][name], rtol=1e-6, atol=1e-30, err_msg=name)
    assert len(steps[3]) == 4
    np.testing.assert_allclose(steps[2], steps[3], rtol=1e-6)


def test_runtime_switches_hand_convolutions_dots_and_reductions_back_to_xla():
    out = after_runtime_apply("ynn_conv_fusion_off=True, compilation_cache=False, ynn_dot_fusion_off=True, "
                              "ynn_reduce_fusion_off=True", "print(os.environ['XLA_FLAGS'])")
    assert out.strip() == "--xla_cpu_experimental_ynn_fusion_type=-individual_convolution,-individual_dot,-reduce"


@pytest.mark.parametrize("on", [True, False])
def test_runtime_cpu_kernels_switches_archlab_cpu_convolutions(on):
    code = ("import jax; from flax import nnx; from models.layers import cpu_conv; "
            "conv = nnx.Conv(16, 16, (3, 3), conv_general_dilated=cpu_conv, rngs=nnx.Rngs(0)); "
            "print('archlab_conv_forward' in str(jax.make_jaxpr(lambda x: conv(x))(jax.numpy.ones((1, 5, 5, 16)))))")
    out = after_runtime_apply(f"ynn_conv_fusion_off=True, compilation_cache=False, cpu_kernels={on}", code)
    assert out.strip() == str(on)


def test_the_ssm_runtime_splits_the_cpu_and_xla_takes_its_reductions_back():
    """runtime=ssm (the state space models' XLA scan, where archlab's kernels are off): two CPU devices, and XLA,
    not YNNPACK, compiles a reduction. Mamba and Simba themselves run the default runtime, where the scan kernel
    applies."""
    from train.config import compose

    ssm = compose(["model=mamba", "data=bytes", "runtime=ssm"]).runtime
    assert ssm.ynn_reduce_fusion_off and ssm.cpu_devices == 2
    for model in (["model=mamba", "data=bytes"], ["model=simba"]):
        assert compose(model).runtime == compose(["model=gpt", "data=bytes"]).runtime

    def reduction_fusions(reduce_off: bool) -> str:
        return after_runtime_apply(
            f"ynn_conv_fusion_off=False, compilation_cache=False, ynn_reduce_fusion_off={reduce_off}",
            "import jax, jax.numpy as jnp; x = jnp.ones((16, 256, 16)); "
            "print(jax.jit(lambda a: jnp.sum(a * a, axis=-1)).lower(x).compile().as_text())")

    assert "__ynn_fusion" in reduction_fusions(False)
    assert "__ynn_fusion" not in reduction_fusions(True)


def test_a_runtime_switch_that_is_not_a_boolean_is_a_one_line_error():
    proc = run_cli(["runtime.ynn_reduce_fusion_off=maybe"], check=False, timeout=60)
    assert proc.returncode == 1
    assert proc.stderr.strip() == ("error: runtime.ynn_reduce_fusion_off=maybe is not a switch "
                                   "(valid: true, false)")


def test_a_runtime_autotune_that_is_not_true_false_or_auto_is_a_one_line_error():
    proc = run_cli(["runtime.autotune=always"], check=False, timeout=60)
    assert proc.returncode == 1
    assert proc.stderr.strip() == "error: runtime.autotune=always is not valid (valid: true, false, auto)"


def test_the_data_parallel_runtimes_split_the_cpu_into_two_devices_and_an_explicit_count_wins():
    """runtime=data_parallel (and ssm, which extends it): two XLA CPU devices, the batch split over them by the
    mesh's data axis, each device's Eigen kernels single-threaded. Every model's own config keeps one device."""
    for overrides in (["model=mamba", "data=bytes", "runtime=ssm"], ["model=vit_tiny", "runtime=data_parallel"],
                      ["model=transformer", "data=numbers_en_fr", "runtime=data_parallel"]):
        assert compose(overrides).runtime.cpu_devices == 2, overrides
    for overrides in (["model=gpt", "data=bytes"], ["model=lenet"], ["model=resnet20"], ["model=mlp"],
                      ["model=vit_tiny"], ["model=transformer", "data=numbers_en_fr"], ["model=mamba", "data=bytes"],
                      ["model=simba"], ["model=simba", "runtime=ssm", "runtime.cpu_devices=1"]):
        assert compose(overrides).runtime.cpu_devices == 1, overrides

    def devices(xla_flags: str | None) -> list[str]:
        return after_runtime_apply("ynn_conv_fusion_off=False, compilation_cache=False, cpu_devices=2",
                                   "import jax; print(jax.device_count(), os.environ['XLA_FLAGS'])", xla_flags).split()

    count, *flags = devices(None)
    assert count == "2" and "--xla_cpu_multi_thread_eigen=false" in flags
    assert devices("--xla_force_host_platform_device_count=3")[0] == "3"


def test_a_cpu_device_count_that_is_not_a_positive_integer_is_a_one_line_error():
    proc = run_cli(["runtime.cpu_devices=0"], check=False, timeout=60)
    assert proc.returncode == 1
    assert proc.stderr.strip() == ("error: runtime.cpu_devices=0 is not valid (valid: a positive integer, the number "
                                   "of CPU devices the step is split over)")


def test_a_batch_the_split_cpu_cannot_divide_names_the_runtime_switch():
    proc = run_cli(["model=simba", "runtime=ssm", "trainer.batch_size=7"], check=False, timeout=120)
    assert proc.returncode == 1
    assert proc.stderr.strip() == ("error: trainer.batch_size=7 is not divisible by the 2 data-parallel devices (mesh "
                                   "data x fsdp = 2 x 1); use a multiple of 2, or runtime.cpu_devices=1 (this config "
                                   "splits the CPU into 2 devices)")


def test_a_cpu_split_that_came_too_late_is_said_in_the_log(tmp_path, caplog):
    """In a process whose JAX already runs (a sweep's later jobs, this test), runtime.cpu_devices cannot apply."""
    import jax

    from train.loop import setup

    assert jax.local_device_count() == 1
    with caplog.at_level("WARNING", logger="train.loop"):
        setup(compose(["model=vit_tiny", "model.depth=1", "runtime=data_parallel"]), tmp_path)
    assert ("runtime.cpu_devices=2 did not apply: JAX had started with 1 CPU device(s) (XLA_FLAGS, or an earlier job "
            "of this process: a sweep's jobs share the first one's)") in caplog.messages


def test_every_shipped_model_and_experiment_passes_the_config_checks():
    """The type checks of check_config (tests/test_errors.py) hold every value the shipped configs set: each model
    with the first dataset it reads, each experiment, each optimizer."""
    from train.datafit import check_model_reads_data
    from train.loop import check_config

    runs = [[f"+experiment={name}"] for name in group_options("experiment")]
    for model in group_options("model"):
        for data in group_options("data"):
            try:
                check_model_reads_data(compose([f"model={model}", f"data={data}"]))
            except ValueError:
                continue
            runs.append([f"model={model}", f"data={data}"])
            break
        else:
            pytest.fail(f"model={model} reads no shipped dataset")
    runs += [[f"optim={name}"] for name in group_options("optim")]
    for overrides in runs:
        cfg = compose(overrides)
        if not OmegaConf.missing_keys(cfg):  # data=text and the like want a path: check_missing's own test
            check_config(cfg)
