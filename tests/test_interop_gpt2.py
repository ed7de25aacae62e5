"""GPT-2 interop: a transformers GPT2LMHeadModel with small random weights, imported by scripts/convert.py,
gives the same logits and greedy continuation; exported back, it loads in transformers unchanged."""

import json
import subprocess
import sys

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from models.gpt import generate  # noqa: E402
from scripts.convert import export_checkpoint, import_checkpoint  # noqa: E402
from train.pretrained import load_model  # noqa: E402

CONFIG = dict(vocab_size=300, n_positions=32, n_embd=32, n_layer=2, n_head=4, bos_token_id=0, eos_token_id=0)


def close(ours, reference) -> None:
    """Within 1e-5 of the largest reference value, the parity tolerance of the interop tests."""
    reference = np.asarray(reference)
    np.testing.assert_allclose(np.asarray(ours), reference, rtol=0, atol=1e-5 * np.abs(reference).max())


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """(HF model, its saved directory, the archlab run imported from it, token batch)."""
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(**CONFIG, initializer_range=0.2)).eval()
    src = tmp_path_factory.mktemp("hf") / "gpt2"
    model.save_pretrained(src)
    run = tmp_path_factory.mktemp("runs") / "gpt2"
    import_checkpoint(src, run)
    tokens = np.random.default_rng(0).integers(0, CONFIG["vocab_size"], (2, 12)).astype(np.int32)
    return model, src, run, tokens


def hf_logits(model, tokens) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(tokens).long()).logits.numpy()


def test_imported_gpt2_matches_transformers(reference):
    model, _, run, tokens = reference
    cfg, ours = load_model(run)
    assert cfg.model.norm_eps == 1e-5 and cfg.data.vocab_size == CONFIG["vocab_size"]
    close(ours(tokens), hf_logits(model, tokens))
    prompt = tokens[:, :4]
    with torch.no_grad():
        expected = model.generate(torch.from_numpy(prompt).long(), max_new_tokens=8, do_sample=False,
                                  pad_token_id=0).numpy()
    np.testing.assert_array_equal(np.asarray(generate(ours, prompt, 8, temperature=0.0)), expected)


def test_export_round_trip_loads_in_transformers(reference, tmp_path):
    model, _, run, tokens = reference
    export_checkpoint(run, tmp_path / "out")
    reloaded = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "out").eval()
    close(hf_logits(reloaded, tokens), hf_logits(model, tokens))
    assert json.loads((tmp_path / "out" / "config.json").read_text())["n_layer"] == CONFIG["n_layer"]


def test_sample_reads_an_imported_run(reference):
    _, _, run, _ = reference
    out = subprocess.run([sys.executable, "scripts/sample.py", str(run), "--prompt", "ab", "--max_new_tokens", "5",
                          "--temperature", "0"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("---- sample 0 ----\nab")


def test_bad_imports_fail_in_one_line_and_write_nothing(reference, tmp_path):
    _, src, run, _ = reference
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text(json.dumps({"architectures": ["BertForMaskedLM"], "model_type": "bert"}))
    with pytest.raises(ValueError, match="architecture BertForMaskedLM is not supported .supported: GPT2LMHeadModel"):
        import_checkpoint(bad, tmp_path / "r1")
    (bad / "config.json").write_text((src / "config.json").read_text())
    with pytest.raises(ValueError, match="no weights .valid: model.safetensors or pytorch_model.bin"):
        import_checkpoint(bad, tmp_path / "r2")
    config = json.loads((src / "config.json").read_text()) | {"n_embd": 64}
    (bad / "config.json").write_text(json.dumps(config))
    (bad / "model.safetensors").symlink_to(src / "model.safetensors")
    with pytest.raises(ValueError, match=r"tensor transformer.h.0.attn.c_attn.bias has shape \(96,\), "
                                         r"config.json implies \(192,\)"):
        import_checkpoint(bad, tmp_path / "r3")
    with pytest.raises(ValueError, match="already holds a checkpoint"):
        import_checkpoint(src, run)
    assert not any((tmp_path / r).exists() for r in ("r1", "r2", "r3"))
    cli = subprocess.run([sys.executable, "scripts/convert.py", "import", str(bad), str(tmp_path / "r4")],
                         capture_output=True, text=True, timeout=300)
    assert cli.returncode == 1 and cli.stderr.strip().count("\n") == 0 and cli.stderr.startswith("error: ")


def test_fine_tuning_starts_from_the_imported_weights(reference, tmp_path):
    """trainer.init_from: one step at learning rate 0 leaves the imported function unchanged."""
    model, _, run, tokens = reference
    text = tmp_path / "corpus.txt"
    text.write_text("the quick brown fox jumps over the lazy dog\n" * 400)
    model_args = ["model=gpt", "model.num_layers=2", "model.d_model=32", "model.num_heads=4", "data=text",
                  f"data.path={text}", "data.seq_len=32", "data.vocab_size=300"]
    train = [sys.executable, "-m", "train", *model_args, "trainer.steps=1", "trainer.batch_size=2",
             "trainer.eval_batch_size=2", "optim.lr=0.0", f"trainer.init_from={run}"]
    out = subprocess.run([*train, f"hydra.run.dir={tmp_path / 'tuned'}"], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    close(load_model(tmp_path / "tuned")[1](tokens), hf_logits(model, tokens))
    wrong = subprocess.run([*train, "model.norm_eps=1e-6", f"hydra.run.dir={tmp_path / 'wrong'}"],
                           capture_output=True, text=True, timeout=600)
    assert wrong.returncode == 1 and "norm_eps differ (valid: the same model; add ++model.norm_eps=1e-05)" \
        in wrong.stderr, wrong.stderr[-2000:]
    resumed_in_place = subprocess.run([*train, f"hydra.run.dir={run}"], capture_output=True, text=True, timeout=600)
    assert resumed_in_place.returncode == 1 and "holds imported weights" in resumed_in_place.stderr


def test_model_table_describes_an_imported_run(reference):
    _, _, run, _ = reference
    out = subprocess.run([sys.executable, "scripts/model_table.py", str(run)], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    expected = sum(p.numel() for p in reference[0].parameters())  # tied: the output layer is the embedding
    assert f"total parameters: {expected:,}" in out.stdout


def test_sharded_safetensors_import_like_one_file(reference, tmp_path):
    model, src, _, tokens = reference
    from safetensors.numpy import load_file, save_file

    tensors = load_file(src / "model.safetensors")
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[:5], "model-00002-of-00002.safetensors": names[5:]}
    sharded = tmp_path / "sharded"
    sharded.mkdir()
    for file, keys in shards.items():
        save_file({k: tensors[k] for k in keys}, sharded / file, metadata={"format": "pt"})
    index = {"metadata": {}, "weight_map": {k: file for file, keys in shards.items() for k in keys}}
    (sharded / "model.safetensors.index.json").write_text(json.dumps(index))
    (sharded / "config.json").write_text((src / "config.json").read_text())
    import_checkpoint(sharded, tmp_path / "run")
    close(load_model(tmp_path / "run")[1](tokens), hf_logits(model, tokens))
