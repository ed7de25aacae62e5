"""Bad data files and mismatched model/data pairs: one line before training, naming the file or key and what fits."""

import os
import re
import shutil
import subprocess
import sys

import pytest
from omegaconf import OmegaConf

from data.tfds import TFDSImages
from data.tfds_digits import build
from data.text import ByteCorpus, TextCorpus
from tests.conftest import ROOT
from tests.test_errors import one_line_error
from train.config import compose
from train.datafit import check_vocabulary


@pytest.mark.parametrize("model, data, reason, fits, misfits", [
    ("gpt", "digits", "model.vocab_size takes ${data.vocab_size}, which data=digits does not have",
     {"bytes", "text", "selective_copy"}, {"digits", "numbers_en_fr", "functions"}),
    ("lenet", "bytes", "model.in_channels takes ${data.channels}, which data=bytes does not have",
     {"digits", "tfds", "random_images"}, {"bytes", "functions"}),
    ("transformer", "digits", "model.vocab_size takes ${data.vocab_size}, which data=digits does not have",
     {"numbers_en_fr", "wmt14_fr_en"}, {"bytes", "digits"}),
    ("gpt", "numbers_en_fr", "models.gpt.GPT reads next_token data, and data=numbers_en_fr is seq2seq",
     {"bytes", "text"}, {"numbers_en_fr", "wmt14_fr_en", "digits"}),
])
def test_a_model_with_data_it_cannot_read_names_the_datasets_that_fit(tmp_path, model, data, reason, fits, misfits):
    line = one_line_error([f"model={model}", f"data={data}", f"hydra.run.dir={tmp_path}"])
    assert line.startswith(f"error: model={model} cannot read data={data}: {reason} "), line
    listed = set(re.search(rf"\(datasets that fit model={model}: ([^)]*)\)$", line)[1].split(", "))
    assert fits <= listed and not listed & misfits, listed
    for name in listed:  # each one listed really composes with the model
        OmegaConf.to_container(compose([f"model={model}", f"data={name}"]).model, resolve=True)


@pytest.mark.parametrize("value, expected", [
    ("/nonexistent/corpus.txt", "data.path=/nonexistent/corpus.txt: no such file"),
    ("{dir}", "data.path={dir} is a directory"),
])
def test_a_missing_data_path_or_a_directory_is_one_line_naming_the_key(tmp_path, value, expected):
    value, expected = value.format(dir=tmp_path), expected.format(dir=tmp_path)
    line = one_line_error(["model=gpt", "data=bytes", f"data.path={value}", f"hydra.run.dir={tmp_path / 'run'}"])
    assert f"{expected} (valid: a text file, or null for the standard library's .py sources)" in line, line


def test_an_empty_or_short_data_path(tmp_path):
    """(The command line turns these ValueErrors into one line, as above.)"""
    with pytest.raises(ValueError, match="data.path is empty \\(valid: a text file"):
        ByteCorpus(path="")
    short = tmp_path / "short.txt"
    short.write_text("x" * 50)
    with pytest.raises(ValueError, match=f"data.path={short} holds 50 tokens, fewer than the 3,300 that "
                                         f"data.seq_len=32 and data.val_fraction=0.01 need"):
        TextCorpus(path=str(short), seq_len=32).train_batch(0, 2)


def test_an_unreadable_data_path_is_one_line(tmp_path):
    """As root, the run drops the capabilities that let root read any file (setpriv), so the mode bits count."""
    secret = tmp_path / "secret.txt"
    secret.write_text("x" * 20_000)
    secret.chmod(0)
    prefix = []
    if os.geteuid() == 0:
        if shutil.which("setpriv") is None:
            pytest.skip("running as root without setpriv: root reads any file")
        prefix = ["setpriv", "--inh-caps=-dac_override,-dac_read_search",
                  "--bounding-set=-dac_override,-dac_read_search"]
    proc = subprocess.run([*prefix, sys.executable, "-m", "train", "model=gpt", "data=bytes", f"data.path={secret}",
                           f"hydra.run.dir={tmp_path / 'run'}"], cwd=ROOT, capture_output=True, text=True,
                          timeout=120, env=os.environ | {"PYTHONPATH": str(ROOT)})
    assert proc.returncode != 0
    assert proc.stderr.strip().splitlines() == [
        f"error: data.path={secret} is not readable: permission denied (valid: a text file, or null for the "
        f"standard library's .py sources)"], proc.stderr


def test_text_data_that_is_not_utf8_or_a_tokenizer_that_is_not_one(tmp_path):
    binary = tmp_path / "weights.bin"
    binary.write_bytes(bytes(range(256)) * 100)
    with pytest.raises(ValueError, match=f"data.path={binary} is not UTF-8 text \\(byte 128 is 0x80\\)"):
        TextCorpus(path=str(binary), seq_len=16).train_batch(0, 2)
    assert ByteCorpus(path=str(binary), seq_len=16).train_batch(0, 2)["tokens"].shape == (2, 17)  # bytes are bytes
    not_json = tmp_path / "tokenizer.json"
    not_json.write_text("merges: []\n")
    with pytest.raises(ValueError, match=f"data.tokenizer={not_json} is not a tokenizer.json .*"
                                         f"\\(valid: a Hugging Face tokenizer.json, or null for bytes\\)"):
        TextCorpus(tokenizer=str(not_json))
    with pytest.raises(IsADirectoryError, match=f"data.tokenizer={tmp_path} is a directory"):
        TextCorpus(tokenizer=str(tmp_path))


def test_a_model_vocabulary_smaller_than_the_tokenizer_is_refused(tmp_path):
    cfg = compose(["model=gpt", "data=bytes", "data.vocab_size=100"])
    (tmp_path / "a.txt").write_text("abc" * 1000)
    with pytest.raises(ValueError, match="model.vocab_size=100 is smaller than the 256 tokens of the data's tokenizer"):
        check_vocabulary(cfg, ByteCorpus(path=str(tmp_path / "a.txt"), seq_len=8, val_fraction=0.1))


@pytest.fixture(scope="module")
def tfds_dir(tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("tfds")
    return data_dir, build(str(data_dir))


def record_file(version_dir: str, split: str) -> str:
    return os.path.join(version_dir, f"digits_tfds-{split}.array_record-00000-of-00001")


def test_a_truncated_tfds_record_file_is_one_line_before_training(tfds_dir, tmp_path):
    data_dir, version_dir = tfds_dir
    copy = tmp_path / "tfds"
    shutil.copytree(data_dir, copy)
    train_file = record_file(str(version_dir).replace(str(data_dir), str(copy)), "train")
    os.truncate(train_file, os.path.getsize(train_file) // 2)
    line = one_line_error(["data=tfds", "data.name=digits_tfds", f"data.data_dir={copy}",
                           f"hydra.run.dir={tmp_path / 'run'}"])
    assert f"record file {train_file} is truncated or corrupt" in line, line
    assert "prepare it again (python -m data.prepare digits_tfds" in line
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_a_corrupt_tfds_record_names_its_file(tfds_dir, tmp_path):
    data_dir, version_dir = tfds_dir
    copy = tmp_path / "tfds"
    shutil.copytree(data_dir, copy)
    test_file = record_file(str(version_dir).replace(str(data_dir), str(copy)), "test")
    size = os.path.getsize(test_file)
    with open(test_file, "r+b") as f:  # the footer stays whole, so the file opens; the records inside do not read
        f.seek(size // 4)
        f.write(b"\xff" * (size // 4))
    data = TFDSImages(name="digits_tfds", data_dir=str(copy))
    with pytest.raises(ValueError, match=f"TFDS dataset 'digits_tfds': record \\d+ in {test_file} is corrupt"):
        list(data.eval_batches(64))
