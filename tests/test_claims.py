"""The chapter's claims table, measured: each figure the README quotes is recomputed here, so it cannot go stale."""

import pytest

from scripts.claims import CLAIMS, markdown, measure


@pytest.fixture(scope="module")
def claims() -> dict[str, dict]:
    """Every claim measured once (about half a minute on 2 busy cores)."""
    return {r["name"]: r for r in measure(list(CLAIMS))}


def test_lenet_turns_28x28_into_256_features(claims):
    assert claims["lenet_features"]["values"]["features"] == 256 == 16 * 4 * 4


def test_mlp_hidden_layers_are_linear_layers_but_the_output_one(claims):
    v = claims["mlp_hidden_layers"]["values"]
    assert v["hidden_layers"] == v["linear_layers"] - 1 == v["configured"] == 2


def test_doubling_both_channel_counts_quadruples_conv_parameters_and_flops(claims):
    v = claims["conv_cost"]["values"]
    assert v["params_ratio"] == 4.0
    assert v["flops_ratio"] == pytest.approx(4.0, rel=0.01)


def test_bottleneck_saves_about_17x_over_two_3x3_convs_at_256_channels(claims):
    v = claims["bottleneck"]["values"]
    assert v["params_ratio"] == pytest.approx(16.8, abs=0.1)
    assert v["macs_ratio"] == pytest.approx(16.9, abs=0.1)  # (2 * 9 * 256^2) / (256*64 + 9*64^2 + 64*256)


def test_resnet50_features_parameters_and_macs(claims):
    v = claims["resnet50"]["values"]
    assert v["features"] == [7, 7, 2048]
    assert v["params"] == 25_557_032  # torchvision's resnet50: 25.6M
    assert v["gmacs"] == pytest.approx(4.09, abs=0.01)  # torchvision's 4.09 GMACs


def test_gpt_model_x_has_6_4b_non_embedding_parameters_one_third_attention(claims):
    v = claims["gpt_model_x"]["values"]
    d, layers = 4096, 32
    assert v["non_embedding"] == pytest.approx(12 * d * d * layers, rel=0.001)  # 6.44B
    assert v["attention_share"] == pytest.approx(1 / 3, abs=0.001)
    assert v["feed_forward_share"] == pytest.approx(2 / 3, abs=0.001)


def test_teacher_forcing_scores_every_position_in_one_call(claims):
    v = claims["teacher_forcing"]["values"]
    assert v["train_calls"] == 1 and v["positions_scored"] == v["generation_calls"] == v["logits_shape"][1]
    assert v["max_abs_diff"] < 1e-4  # the parallel pass computes exactly what step-by-step generation sees


def test_markdown_table_has_one_row_per_claim(claims):
    table = markdown(list(claims.values()), "2026-01-01", "2-core CPU").splitlines()
    assert len(table) == 2 + len(CLAIMS)
    assert all(row.count("|") == 4 for row in table)
