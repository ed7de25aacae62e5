"""A config cannot run code: only callables defined in archlab's packages, or in the packages a user names in
ARCHLAB_TARGETS, are built from it. A crafted run directory or command line is refused with one line naming the
key and the target, before anything is opened; a model in the user's own package trains once opted in."""

import json
import os
import shutil
import textwrap
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from scripts.sample import load
from tests.conftest import ROOT, run_cli
from train import loop, targets
from train.config import check_group_choices, compose, group_options

TINY = ["model=mlp", "model.hidden=[8]", "data=digits", "trainer.steps=2", "trainer.eval_every=2",
        "trainer.log_every=1", "checkpoint.every=2", "trainer.batch_size=16", "trainer.eval_batch_size=16"]
REFUSED = "is not allowed (valid: a callable defined in models., data., train.optim. or in your own package, with " \
          "ARCHLAB_TARGETS=mypkg in the environment)"
NO_OPT_IN = {"ARCHLAB_TARGETS": ""}


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A real run directory: a tiny MLP trained on digits for 2 steps."""
    directory = tmp_path_factory.mktemp("run")
    run_cli([*TINY, f"hydra.run.dir={directory}"], env=NO_OPT_IN)
    return directory


@pytest.fixture
def victim(tmp_path) -> Path:
    """The file a crafted config tries to truncate."""
    path = tmp_path / "precious.txt"
    path.write_text("results that must survive\n")
    return path


def crafted(run_dir: Path, tmp_path: Path, edit) -> Path:
    """A copy of `run_dir` whose config `edit(cfg)` changed, with the model's `${data.*}` replaced by numbers."""
    copy = tmp_path / "shared_run"
    shutil.copytree(run_dir, copy)
    cfg = OmegaConf.load(copy / ".hydra" / "config.yaml")
    cfg.model = OmegaConf.to_container(cfg.model, resolve=True)
    edit(cfg)
    (copy / ".hydra" / "config.yaml").write_text(OmegaConf.to_yaml(cfg))
    return copy


def open_for_writing(victim: Path) -> dict:
    return {"_target_": "builtins.open", "_args_": [str(victim), "w"]}


def assert_refused(proc, key: str, target: str) -> None:
    """Exit 1 with one line naming the key and the target, no traceback."""
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1] == f"error: {key}={target} {REFUSED}"


def test_crafted_run_directory_is_refused_by_every_script_that_reads_it(run_dir, tmp_path, victim):
    shared = crafted(run_dir, tmp_path, lambda cfg: setattr(cfg, "data", open_for_writing(victim)))
    before = victim.read_bytes()
    for args, module in [([str(shared), "--prompt", "x"], "scripts/sample.py"),
                         ([str(shared)], "scripts/model_table.py"),
                         (["export", str(shared), str(tmp_path / "hf")], "scripts/convert.py"),
                         ([*TINY, f"trainer.init_from={shared}", f"hydra.run.dir={tmp_path / 'finetune'}"], "train")]:
        proc = run_cli(args, module=module, env=NO_OPT_IN, check=False)
        assert_refused(proc, "data._target_", "builtins.open")
        assert victim.read_bytes() == before, module
    assert not (tmp_path / "hf").exists()


@pytest.mark.parametrize("edit, env, key, target", [
    (lambda cfg, v: setattr(cfg, "data", {"_target_": "hydra.utils.get_method", "path": "builtins.open"}),
     {}, "data._target_", "hydra.utils.get_method"),
    (lambda cfg, v: setattr(cfg, "data", {"_target_": "hydra.utils.get_class", "path": "builtins.open"}),
     {}, "data._target_", "hydra.utils.get_class"),
    (lambda cfg, v: setattr(cfg, "data", {**open_for_writing(v), "_partial_": True}),
     {}, "data._target_", "builtins.open"),
    (lambda cfg, v: OmegaConf.update(cfg, "model.activation", open_for_writing(v)),  # inside an allowed target
     {}, "model.activation._target_", "builtins.open"),
    (lambda cfg, v: OmegaConf.update(cfg, "model.hidden", [8, open_for_writing(v)]),  # in a list argument
     {}, "model.hidden[1]._target_", "builtins.open"),
    (lambda cfg, v: setattr(cfg, "data", {**open_for_writing(v), "_target_": "${oc.env:SHARED_TARGET}"}),
     {"SHARED_TARGET": "builtins.open"}, "data._target_", "builtins.open"),
    (lambda cfg, v: (setattr(cfg, "reader", "builtins.open"),
                     setattr(cfg, "data", {**open_for_writing(v), "_target_": "${reader}"})),
     {}, "data._target_", "builtins.open"),
    (lambda cfg, v: OmegaConf.update(cfg, "model.activation",  # a string that a resolver decodes into a node
                                     f'${{oc.decode:"{{_target_: builtins.open, _args_: [{v}, w]}}"}}'),
     {}, "model.activation._target_", "builtins.open"),
    (lambda cfg, v: setattr(cfg, "data", {"_target_": ["builtins.open"]}),  # not a string
     {}, "data._target_", "['builtins.open']"),
])
def test_crafted_variants_are_refused_before_anything_is_opened(run_dir, tmp_path, victim, monkeypatch, edit, env,
                                                                key, target):
    monkeypatch.setenv("ARCHLAB_TARGETS", "")
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    shared = crafted(run_dir, tmp_path, lambda cfg: edit(cfg, victim))
    before = victim.read_bytes()
    with pytest.raises(SystemExit) as refusal:
        load(shared)  # what scripts/sample.py RUN_DIR does first
    assert str(refusal.value) == f"error: {key}={target} {REFUSED}"
    assert victim.read_bytes() == before


def test_a_path_through_an_allowed_module_to_a_callable_defined_elsewhere_is_refused(run_dir, tmp_path, victim,
                                                                                     monkeypatch):
    monkeypatch.setenv("ARCHLAB_TARGETS", "")
    shared = crafted(run_dir, tmp_path, lambda cfg: setattr(
        cfg, "data", {"_target_": "data.text.np.savetxt", "_args_": [str(victim), [0]]}))
    before = victim.read_bytes()
    with pytest.raises(SystemExit, match=r"^error: data._target_=data.text.np.savetxt is not allowed: it is numpy.savetxt"):
        load(shared)
    assert victim.read_bytes() == before


def test_command_line_targets_are_refused_before_anything_is_opened(tmp_path, victim):
    before = victim.read_bytes()
    proc = run_cli([*TINY, "+data.extra._target_=builtins.open", f"+data.extra._args_=[{victim},w]",
                    f"hydra.run.dir={tmp_path / 'run'}"], env=NO_OPT_IN, check=False)
    assert_refused(proc, "data.extra._target_", "builtins.open")
    assert victim.read_bytes() == before and not (tmp_path / "run" / "checkpoints").exists()


def test_command_line_target_replacing_an_allowed_one_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("ARCHLAB_TARGETS", "")
    with pytest.raises(ValueError, match=r"^model._target_=builtins.print is not allowed"):
        loop.setup(compose([*TINY, "model._target_=builtins.print"]), tmp_path)
    assert not tmp_path.joinpath(".hydra").exists()


@pytest.mark.parametrize("group", ["model", "data", "optim", "experiment"])
def test_every_shipped_config_is_allowed(group, monkeypatch):
    monkeypatch.setenv("ARCHLAB_TARGETS", "")
    for option in group_options(group):
        targets.check(compose([f"+experiment={option}" if group == "experiment" else f"{group}={option}"]))


# ---- Your own model, outside the repository ---------------------------------------------------------------

TINY_MODEL = '''
"""A one-hidden-layer MLP, as a researcher would write it in their own package."""

import jax
import jax.numpy as jnp
from flax import nnx


class Tiny(nnx.Module):
    def __init__(self, in_features: int, hidden: int, out_features: int, *, rngs: nnx.Rngs):
        self.fc1 = nnx.Linear(in_features, hidden, rngs=rngs)
        self.fc2 = nnx.Linear(hidden, out_features, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.fc2(jax.nn.relu(self.fc1(x.reshape(x.shape[0], -1))))
'''


@pytest.fixture
def user_project(tmp_path) -> Path:
    """tmp_path/mypkg/model.py (the model) and tmp_path/myconf/model/mymodel.yaml (its config)."""
    (tmp_path / "mypkg").mkdir()
    (tmp_path / "mypkg" / "__init__.py").write_text("")
    (tmp_path / "mypkg" / "model.py").write_text(TINY_MODEL)
    (tmp_path / "myconf" / "model").mkdir(parents=True)
    (tmp_path / "myconf" / "model" / "mymodel.yaml").write_text(textwrap.dedent("""\
        _target_: mypkg.model.Tiny
        in_features: ${data.in_features}
        hidden: 16
        out_features: ${data.num_classes}
        """))
    (tmp_path / "myconf" / "experiment").mkdir()
    (tmp_path / "myconf" / "experiment" / "widen.yaml").write_text(textwrap.dedent("""\
        # @package _global_
        hydra:
          job:
            env_set:
              ARCHLAB_TARGETS: mypkg
        """))
    return tmp_path


USER_RUN = ["model=mymodel", "data=digits", "trainer.steps=20", "trainer.eval_every=20", "checkpoint.every=20",
            "trainer.batch_size=32", "trainer.log_every=10"]


def test_own_model_is_refused_without_the_opt_in_and_trains_with_it(user_project):
    env = {"PYTHONPATH": f"{ROOT}{os.pathsep}{user_project}"}
    args = ["--config-dir", str(user_project / "myconf"), *USER_RUN]
    refused = run_cli([*args, f"hydra.run.dir={user_project / 'refused'}"], env=env | NO_OPT_IN, check=False)
    assert_refused(refused, "model._target_", "mypkg.model.Tiny")

    widened = run_cli([*args, "+experiment=widen", f"hydra.run.dir={user_project / 'widened'}"],
                      env=env | NO_OPT_IN, check=False)
    assert widened.returncode == 1 and widened.stderr.strip().splitlines()[-1] == (
        "error: hydra.job.env_set.ARCHLAB_TARGETS is not allowed: a config cannot widen the allowed targets "
        "(valid: set ARCHLAB_TARGETS in the environment that starts the run)")

    run_cli([*args, f"hydra.run.dir={user_project / 'run'}"], env=env | {"ARCHLAB_TARGETS": "mypkg"})
    final = json.loads((user_project / "run" / "final_metrics.json").read_text())
    assert final["eval/accuracy"] > 0.3  # ten classes: chance is 0.1
    assert OmegaConf.load(user_project / "run" / ".hydra" / "config.yaml").model._target_ == "mypkg.model.Tiny"


def test_own_model_sweeps_from_a_config_folder_on_the_search_path(user_project):
    env = {"PYTHONPATH": f"{ROOT}{os.pathsep}{user_project}", "ARCHLAB_TARGETS": "mypkg"}
    run_cli(["-m", f"hydra.searchpath=[file://{user_project / 'myconf'}]", *USER_RUN, "optim.lr=0.001,0.01",
             f"hydra.sweep.dir={user_project / 'sweep'}"], env=env, timeout=600)
    finals = [json.loads(p.read_text()) for p in (user_project / "sweep").glob("*/final_metrics.json")]
    assert len(finals) == 2 and finals[0]["eval/loss"] != finals[1]["eval/loss"]


def test_opt_in_matches_whole_package_names_and_what_the_name_reaches(user_project, monkeypatch):
    monkeypatch.syspath_prepend(str(user_project))
    monkeypatch.setenv("ARCHLAB_TARGETS", "mypkg")
    targets.check({"model": {"_target_": "mypkg.model.Tiny"}})
    with pytest.raises(ValueError, match=r"^model._target_=mypkgs.model.Tiny is not allowed \(valid: a callable "
                                         r"defined in models., data., train.optim., mypkg. \(ARCHLAB_TARGETS=mypkg\)\)$"):
        targets.check({"model": {"_target_": "mypkgs.model.Tiny"}})
    with pytest.raises(ValueError, match=r"^model._target_=mypkg.model.jnp.tanh is not allowed: it is jax"):
        targets.check({"model": {"_target_": "mypkg.model.jnp.tanh"}})
    monkeypatch.setenv("ARCHLAB_TARGETS", "mypkg.model.Tiny")  # one callable, named exactly
    targets.check({"model": {"_target_": "mypkg.model.Tiny"}})


def test_group_options_include_the_users_config_folders(user_project):
    myconf = user_project / "myconf"
    for args in (["--config-dir", str(myconf)], [f"--config-dir={myconf}"], [f"hydra.searchpath=[file://{myconf}]"]):
        check_group_choices([*args, "model=mymodel", "+experiment=widen"])
        with pytest.raises(ValueError, match=r"^model=mymodle is not a config option \(valid: .*mlp, mymodel,"):
            check_group_choices([*args, "model=mymodle"])
    with pytest.raises(ValueError, match=r"^model=mymodel is not a config option"):
        check_group_choices(["model=mymodel"])
