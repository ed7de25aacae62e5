"""The model table: per-stage parameters, FLOPs from XLA's cost analysis, shapes, the split by kind."""

import json

import pytest

import models  # noqa: F401  (sets nnx's sharding mode before any model is built)
from scripts.model_table import abstract_model, example_inputs, module_outputs, parameter_tree, parameters_by_kind, \
    table_rows
from tests.conftest import run_cli
from train.config import compose


def test_resnet50_table_from_the_command_line(tmp_path):
    result = run_cli(["model=resnet50", "data=imagenet2012", f"hydra.run.dir={tmp_path}"],
                     module="scripts/model_table.py")
    assert result.stdout.strip().splitlines()[-1] == "total parameters: 25,557,032"
    table = json.loads((tmp_path / "model_table.json").read_text())
    assert table["features"] == [[7, 7, 2048]]
    assert [r["output"] for r in table["rows"] if r["name"].count(".") == 1] == [
        [[56, 56, 256]], [[28, 28, 512]], [[14, 14, 1024]], [[7, 7, 2048]]]
    assert table["conv_macs_per_example"] == pytest.approx(4.089e9, rel=1e-3)  # torchvision: 4.09 GMACs
    assert 3.9e9 < table["flops_per_example"] / 2 < 4.2e9
    bottleneck, plain = table["bottleneck_vs_plain"].values()
    assert plain["params"] / bottleneck["params"] == pytest.approx(16.8, abs=0.1)
    assert plain["flops"] / bottleneck["flops"] > 15


def test_rows_expand_stages_into_blocks_and_add_up():
    cfg = compose(["model=resnet20"])
    model, order = abstract_model(cfg.model)
    tree = parameter_tree(model, order)
    rows = table_rows(tree, module_outputs(model, example_inputs(cfg.data)))
    assert [r["name"] for r in rows if r["depth"] == 0] == ["stem", "stages", "head"]
    assert [r["name"] for r in rows if r["depth"] == 2][:3] == ["stages.0.0", "stages.0.1", "stages.0.2"]
    assert sum(r["params"] for r in rows if r["depth"] == 0) == 272_186  # 1 input channel: 288 fewer than RGB
    assert sum(r["params"] for r in rows if r["depth"] == 2) == next(r["params"] for r in rows if r["name"] == "stages")
    assert next(r["output"] for r in rows if r["name"] == "stages.2") == [[7, 7, 64]]


def test_vit_parameters_split_one_third_attention_two_thirds_feed_forward():
    model, _ = abstract_model(compose(["model=vit_b16", "data=imagenet2012"]).model)
    kinds = parameters_by_kind(model)
    d, d_ff, depth = 768, 3072, 12
    assert kinds["attention"] == depth * 4 * (d * d + d)
    assert kinds["feed-forward"] == depth * (2 * d * d_ff + d_ff + d)
    assert kinds["embedding"] == 16 * 16 * 3 * d + d + d + 197 * d  # patches (+ bias), [CLS], positions
    assert kinds["norm"] == (2 * depth + 1) * 2 * d
    assert sum(kinds.values()) == 86_567_656
