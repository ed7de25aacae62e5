"""Universal approximation: a wider single hidden layer fits sin(3x) better between its training points."""

import json

import numpy as np
import pytest
from flax import nnx

import models  # noqa: F401  (sets nnx's sharding mode before any model is built)
from data.functions import TargetFunction
from models.mlp import MLP
from scripts.uat import mlp_params, run_uat, width_for_budget
from tests.conftest import run_cli
from train.config import compose


def test_held_out_points_lie_between_training_points_and_batches_are_pure():
    data = TargetFunction("sin3x", num_points=64)
    assert np.all((data.test_x[:, 0] > data.train_x[:-1, 0]) & (data.test_x[:, 0] < data.train_x[1:, 0]))
    np.testing.assert_allclose(data.test_y[:, 0], np.sin(3 * data.test_x[:, 0]), atol=1e-6)
    a, b = data.train_batch(7, 16), TargetFunction("sin3x", num_points=64).train_batch(7, 16)
    np.testing.assert_array_equal(a["x"], b["x"])
    grid2d = TargetFunction("sin_cos", num_points=64)
    assert grid2d.train_x.shape == (64, 2) and grid2d.test_x.shape == (49, 2)
    with pytest.raises(ValueError, match="num_points 60"):
        TargetFunction("sin_cos", num_points=60)


@pytest.mark.parametrize("in_features, depth, budget", [(1, 1, 1000), (1, 3, 1000), (2, 4, 300)])
def test_depth_sweep_widths_match_the_parameter_budget(in_features, depth, budget):
    width = width_for_budget(in_features, depth, budget)
    mlp = nnx.eval_shape(lambda: MLP(in_features, [width] * depth, 1, rngs=nnx.Rngs(0)))
    counted = sum(x.size for x in nnx.to_flat_state(nnx.state(mlp, nnx.Param)).leaves)
    assert counted == mlp_params(in_features, [width] * depth)
    assert abs(counted - budget) <= mlp_params(in_features, [width + 1] * depth) - counted


def test_one_hidden_layer_error_falls_as_width_grows(tmp_path):
    cfg = compose(["targets=[sin3x]", "widths=[2,8,32]", "depths=[]"], config_name="uat")
    run_uat(cfg, tmp_path)
    records = json.loads((tmp_path / "uat.json").read_text())
    assert [(r["target"], r["depth"], r["width"]) for r in records] == [("sin3x", 1, 2), ("sin3x", 1, 8),
                                                                        ("sin3x", 1, 32)]
    narrow, mid, wide = (r["test_mse"] for r in records)
    assert narrow > 4 * mid > 16 * wide, (narrow, mid, wide)
    assert narrow > 0.2  # two tanh units cannot follow three periods: most of sin(3x)'s variance (0.5) is left
    assert all(r["train_mse"] < 2 * r["test_mse"] + 1e-4 and r["test_mse"] < 2 * r["train_mse"] + 1e-4
               for r in records)  # held-out points between the training points: no overfitting to speak of


def test_cli_writes_records_and_figure(tmp_path):
    run_cli(["targets=[sin_cos]", "widths=[4]", "depths=[1,2]", "param_budgets=[100]", "trainer.steps=50",
                  f"hydra.run.dir={tmp_path}"], module="scripts/uat.py")
    records = json.loads((tmp_path / "uat.json").read_text())
    assert [(r["sweep"], r["depth"]) for r in records] == [("width", 1), ("depth", 1), ("depth", 2)]
    for r in records:
        assert {"target", "width", "depth", "params", "train_mse", "test_mse"} <= r.keys()
        assert r["params"] == mlp_params(2, [r["width"]] * r["depth"])
    assert (tmp_path / "uat.png").stat().st_size > 10_000
