"""Text data: byte corpus windows and splits, numbers split by number, tokenizers, TFDS errors, short runs."""

import sysconfig
from pathlib import Path

import numpy as np
import pytest

from data.text import (BOS, EOS, ByteCorpus, NumbersEnFr, SentencePieceTokenizer, TFDSText, number_pair, stdlib_sources,
                       token_counts)
from tests.conftest import run_cli
from train.loop import run

TEXT = "".join(f"def f{i}(x):\n    return x * {i} + {i % 7}\n\n" for i in range(2000))


@pytest.fixture(scope="module")
def text_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("text") / "corpus.py"
    path.write_text(TEXT)
    return path


def test_byte_windows_are_slices_of_the_train_split_and_a_function_of_seed_and_step(text_file):
    data = ByteCorpus(path=str(text_file), seq_len=32, val_fraction=0.1, seed=3)
    assert len(data.train) + len(data.val) == len(TEXT.encode())
    batch = data.train_batch(5, 8)["tokens"]
    assert batch.shape == (8, 33) and batch.dtype == np.int32
    train = data.train.tobytes()
    assert all(bytes(row.astype(np.uint8)) in train for row in batch)
    np.testing.assert_array_equal(ByteCorpus(path=str(text_file), seq_len=32, val_fraction=0.1, seed=3)
                                  .train_batch(5, 8)["tokens"], batch)
    assert not np.array_equal(data.train_batch(6, 8)["tokens"], batch)
    shards = [data.train_batch(5, 8, (i, 2))["tokens"] for i in range(2)]
    np.testing.assert_array_equal(np.concatenate(shards), batch)


def test_byte_eval_windows_come_from_the_validation_split(text_file):
    data = ByteCorpus(path=str(text_file), seq_len=32, val_fraction=0.1, eval_windows=20)
    batches = list(data.eval_batches(8))
    assert [b["tokens"].shape for b in batches] == [(8, 33)] * 3
    assert sum(b["mask"].sum() for b in batches) == 20
    val = data.val.tobytes()
    assert all(bytes(row.astype(np.uint8)) in val for b in batches for row in b["tokens"])


def test_unigram_loss_is_the_cross_entropy_of_byte_frequencies(tmp_path):
    path = tmp_path / "ab.txt"
    path.write_text("ab" * 500)
    data = ByteCorpus(path=str(path), seq_len=4, val_fraction=0.5)
    # 500 training bytes, 250 of 'a' and of 'b'; add-one counts over 256 bytes: p = 251 / 756 each.
    assert data.unigram_loss() == pytest.approx(-np.log(251 / 756))


@pytest.mark.parametrize("dtype", [np.uint8, np.int32])
def test_token_counts_over_chunks_are_bincounts(dtype):
    tokens = np.random.default_rng(0).integers(0, 9, size=1000).astype(dtype)
    for chunk in (1, 7, 1000, 4096):  # chunk boundaries anywhere; one chunk; more than the tokens
        np.testing.assert_array_equal(token_counts(tokens, 12, chunk=chunk), np.bincount(tokens, minlength=12))
    np.testing.assert_array_equal(token_counts(tokens, 4, chunk=7), np.bincount(tokens))  # ids past minlength


def test_default_corpus_is_the_standard_library():
    data = ByteCorpus()
    assert len(data.train) > 10_000_000
    assert b"def " in data.val.tobytes() and b"import " in data.train[:100_000].tobytes()


def test_default_corpus_reads_the_standard_librarys_py_files_in_path_order_and_no_installed_package(tmp_path,
                                                                                                   monkeypatch):
    for name, text in {"b/c.py": "c", "a.py": "a", "b/a.py": "ba", "site-packages/x.py": "x", "b/notes.txt": "n",
                       "b/dist-packages/y.py": "y"}.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    monkeypatch.setattr(sysconfig, "get_paths", lambda: {"stdlib": str(tmp_path)})
    assert stdlib_sources() == b"a" + b"ba" + b"c"


def test_too_short_text_is_a_one_line_error(tmp_path):
    path = tmp_path / "short.txt"
    path.write_text("x" * 100)
    with pytest.raises(ValueError, match=f"data.path={path} holds 100 bytes, fewer than the 6,500 that "
                                         f"data.seq_len=64 and data.val_fraction=0.01 need"):
        ByteCorpus(path=str(path), seq_len=64)


def test_numbers_are_split_by_number():
    data = NumbersEnFr(max_number=5000, test_fraction=0.1)
    assert len(data.test_numbers) == 500
    assert not set(data.test_numbers) & set(data.train_numbers)
    assert set(data.test_numbers) | set(data.train_numbers) == set(range(5000))
    seen = np.concatenate([data.train_batch(step, 64)["src"] for step in range(80)])  # over one epoch
    test_src = {data.detokenize(row) for b in data.eval_batches(128) for row, m in zip(b["src"], b["mask"]) if m}
    assert not {data.detokenize(row) for row in seen} & test_src


def test_number_pairs_encode_and_decode():
    assert number_pair(312) == ("three hundred and twelve", "trois cent douze")
    data = NumbersEnFr(max_number=1000, src_len=40, tgt_len=40)
    batch = data.encode(np.array([312, 71]))
    assert batch["src"].shape == (2, 40) and batch["tgt"].shape == (2, 41)
    assert data.detokenize(batch["src"][0]) == "three hundred and twelve"
    assert batch["tgt"][1, 0] == BOS and EOS in batch["tgt"][1]
    assert data.detokenize(batch["tgt"][1]) == "soixante et onze"
    with pytest.raises(ValueError, match="needs src_len >= 24"):
        NumbersEnFr(max_number=1000, src_len=10).encode(np.array([312]))


def test_sentencepiece_is_trained_once_and_cached(tmp_path):
    lines = [f"the number {i} is written as {number_pair(i)[0]}" for i in range(2000)]
    model_file = tmp_path / "sp.model"
    sp = SentencePieceTokenizer(model_file, lambda: iter(lines), vocab_size=200)
    assert model_file.exists() and sp.vocab_size == 200
    ids = sp.encode("the number 42 is written as forty-two")
    assert ids.min() > EOS and sp.decode(ids) == "the number 42 is written as forty-two"
    assert SentencePieceTokenizer(model_file).encode("forty-two").tolist() == sp.encode("forty-two").tolist()


def test_missing_tfds_text_is_a_one_line_error_saying_how_to_prepare(tmp_path):
    with pytest.raises(FileNotFoundError) as info:
        TFDSText("wmt14_translate/fr-en", str(tmp_path), "seq2seq")
    message = str(info.value)
    assert "\n" not in message and "wmt14_translate/fr-en" in message and str(tmp_path) in message
    assert "python -m data.prepare wmt14_translate/fr-en" in message


def test_short_gpt_run_beats_the_unigram_baseline(cfg_for, text_file, tmp_path):
    cfg = cfg_for("model=gpt", "data=bytes", f"data.path={text_file}", "data.seq_len=32", "data.val_fraction=0.1",
                  "data.eval_windows=32", "model.num_layers=1", "model.d_model=32", "model.num_heads=2",
                  "trainer.batch_size=16", "trainer.steps=200", "trainer.eval_every=200", "trainer.log_every=50",
                  "trainer.eval_batch_size=16", "checkpoint.every=200", "optim.warmup_steps=20")
    final = run(cfg, tmp_path)
    assert final["eval/loss"] < final["eval/unigram_loss"] - 0.5
    assert final["eval/bits_per_token"] == pytest.approx(final["eval/loss"] / np.log(2))
    # The sampling command restores the run's checkpoint; greedy continuations of the same prompt agree.
    sample = run_cli([str(tmp_path), "--prompt", "def f1", "--temperature", "0", "--num_samples", "2",
                      "--max_new_tokens", "20"], module="scripts/sample.py").stdout.split("---- sample 1 ----\n")
    assert sample[0].startswith("---- sample 0 ----\ndef f1") and sample[1].startswith("def f1")
    assert sample[0].split("\n", 1)[1].rstrip("\n") == sample[1].rstrip("\n") and len(sample[1]) > 20


def target_unigram_loss(data: NumbersEnFr) -> float:
    """Cross-entropy of the test targets under the training targets' token frequencies (add-one)."""
    train = data.encode(data.train_numbers)["tgt"][:, 1:]
    test = data.encode(data.test_numbers)["tgt"][:, 1:]
    counts = np.bincount(train[train > 0], minlength=259) + 1.0
    return float(-np.mean(np.log(counts / counts.sum())[test[test > 0]]))


def test_short_transformer_run_beats_the_unigram_baseline_and_reports_translation_metrics(cfg_for, tmp_path):
    cfg = cfg_for("model=transformer", "data=numbers_en_fr", "data.max_number=2000", "model.num_layers=1",
                  "model.d_model=64", "model.d_ff=128", "trainer.batch_size=32", "trainer.steps=80",
                  "trainer.eval_every=80", "trainer.log_every=40", "trainer.eval_batch_size=100",
                  "optim.warmup_steps=10", "checkpoint.every=80")
    final = run(cfg, tmp_path)
    assert final["eval/loss"] < target_unigram_loss(NumbersEnFr(max_number=2000)) - 1.0
    assert 0.0 <= final["eval/exact_match"] <= 1.0 and 0.0 <= final["eval/bleu"] <= 100.0
    run_cli([str(tmp_path), "--prompt", "three hundred and twelve", "--beam_size", "2"], module="scripts/sample.py")
