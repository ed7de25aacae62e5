"""Text datasets, offline: a byte-level corpus, English -> French numbers, and TFDS text where it is prepared.

- `ByteCorpus` (data=bytes): next-token prediction on the bytes of any text file or, by default, of the
  `.py` sources of the running Python's standard library (tens of MB, on every install).
- `NumbersEnFr` (data=numbers_en_fr): translation of numbers written in English words into French words
  (num2words), split by number so that no test number is seen in training.
- `TFDSText` (data=lm1b, tiny_shakespeare, wmt14_fr_en): TFDS text read with `tfds.data_source`, tokenized to
  bytes or to a SentencePiece model trained offline on the train split and cached.
"""

import functools
import math
import os
import sysconfig
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import numpy as np

from data.sampling import Shard, eval_indices, host_rows, train_indices

PAD, BOS, EOS = 0, 1, 2  # specials of the seq2seq vocabularies (bytes are shifted past them)


# ---- Tokenizers ---------------------------------------------------------------------------------------


class ByteTokenizer:
    """UTF-8 bytes as tokens, shifted by `offset` to leave room for special ids (0 pad, 1 BOS, 2 EOS)."""

    def __init__(self, offset: int = 0):
        self.offset = offset
        self.vocab_size = 256 + offset

    def encode(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8"), np.uint8).astype(np.int32) + self.offset

    def decode(self, ids: Iterable[int]) -> str:
        ids = [int(i) - self.offset for i in ids if int(i) >= self.offset]
        return bytes(ids).decode("utf-8", errors="replace")


class SentencePieceTokenizer:
    """A SentencePiece unigram model (pad 0, BOS 1, EOS 2, unk 3) trained once on training text and cached."""

    def __init__(self, model_file: Path, texts: Callable[[], Iterator[str]] | None = None,
                 vocab_size: int = 8000):
        import sentencepiece as spm

        if not model_file.exists():
            if texts is None:
                raise FileNotFoundError(f"SentencePiece model {model_file} is missing and no training text was given")
            model_file.parent.mkdir(parents=True, exist_ok=True)
            spm.SentencePieceTrainer.train(
                sentence_iterator=texts(), model_prefix=str(model_file.with_suffix("")), vocab_size=vocab_size,
                pad_id=PAD, bos_id=BOS, eos_id=EOS, unk_id=3, character_coverage=1.0,
                input_sentence_size=1_000_000, shuffle_input_sentence=True, minloglevel=2)
        self.processor = spm.SentencePieceProcessor(model_file=str(model_file))
        self.vocab_size = self.processor.get_piece_size()
        self.offset = 3

    def encode(self, text: str) -> np.ndarray:
        return np.asarray(self.processor.encode(text), np.int32)

    def decode(self, ids: Iterable[int]) -> str:
        return self.processor.decode([int(i) for i in ids if int(i) > EOS])


class HFTokenizer:
    """A Hugging Face `tokenizers` tokenizer read from its tokenizer.json (e.g. GPT-2's byte-level BPE)."""

    def __init__(self, file: str | Path):
        from tokenizers import Tokenizer

        valid = "a Hugging Face tokenizer.json, or null for bytes"
        path = readable_file(file, "data.tokenizer", valid)
        try:
            self.tokenizer = Tokenizer.from_file(str(path))
        except Exception as e:  # noqa: BLE001  (the Rust parser raises a bare Exception)
            raise ValueError(f"data.tokenizer={file} is not a tokenizer.json ({str(e).splitlines()[0][:120]}) "
                             f"(valid: {valid})") from None
        self.vocab_size = self.tokenizer.get_vocab_size()

    def encode(self, text: str) -> np.ndarray:
        return np.array(self.tokenizer.encode(text).ids, np.int32)

    def decode(self, ids: Iterable[int]) -> str:
        return self.tokenizer.decode([int(i) for i in ids])


def until_eos(ids: Iterable[int]) -> list[int]:
    """The ids before the first EOS or padding, without BOS."""
    out = []
    for i in ids:
        if i in (EOS, PAD):
            break
        if i != BOS:
            out.append(int(i))
    return out


# ---- Byte corpus --------------------------------------------------------------------------------------


def stdlib_sources() -> bytes:
    """The `.py` files of the running Python's standard library (no site-packages), in sorted path order."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for folder, subfolders, names in os.walk(root):
        # pruned, not filtered afterwards: walking an installation's site-packages took 0.5 s of 0.6
        subfolders[:] = [d for d in subfolders if d not in ("site-packages", "dist-packages")]
        files += [Path(folder, name) for name in names if name.endswith(".py")]
    return b"".join(f.read_bytes() for f in sorted(files))


TEXT_VALID = "a text file, or null for the standard library's .py sources"


def readable_file(path: str | Path, key: str = "data.path", valid: str = TEXT_VALID) -> Path:
    """The file a config key names, opened once to check it; a one-line error naming the key when it cannot be."""
    if not str(path).strip():
        raise ValueError(f"{key} is empty (valid: {valid})")
    file = Path(path).expanduser()
    try:
        with file.open("rb"):
            return file
    except FileNotFoundError:
        raise FileNotFoundError(f"{key}={path}: no such file (valid: {valid})") from None
    except IsADirectoryError:
        raise IsADirectoryError(f"{key}={path} is a directory (valid: {valid})") from None
    except PermissionError:
        raise PermissionError(f"{key}={path} is not readable: permission denied (valid: {valid})") from None
    except OSError as e:
        raise OSError(f"{key}={path} cannot be read: {e.strerror} (valid: {valid})") from None


def check_length(length: int, unit: str, path: str | None, seq_len: int, val_fraction: float) -> None:
    """One-line error when a text of `length` tokens leaves a split shorter than one window of seq_len + 1."""
    if seq_len < 1:
        raise ValueError(f"data.seq_len={seq_len} is not valid (valid: a positive number of tokens)")
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"data.val_fraction={val_fraction} is not in (0, 1)")
    window = seq_len + 1
    need = max(math.ceil(window / val_fraction), math.ceil(window / (1.0 - val_fraction)))
    while min(int(need * val_fraction), need - int(need * val_fraction)) < window:
        need += 1
    num_val = int(length * val_fraction)
    if min(num_val, length - num_val) < window:
        source = f"data.path={path}" if path is not None else "the standard library's sources"
        raise ValueError(f"{source} holds {length:,} {unit}, fewer than the {need:,} that data.seq_len={seq_len} "
                         f"and data.val_fraction={val_fraction} need (valid: a longer text, a shorter data.seq_len "
                         f"or a larger data.val_fraction)")


def token_counts(tokens: np.ndarray, minlength: int, chunk: int = 1 << 20) -> np.ndarray:
    """How often each token id occurs, counted a chunk at a time: np.bincount widens its input to int64, and that
    copy of the whole default corpus (31 MB of bytes, 250 MB widened) took 1.3 s of the 1.4 its count did."""
    counts = np.zeros(minlength, np.int64)
    for start in range(0, len(tokens), chunk):
        part = np.bincount(tokens[start:start + chunk], minlength=len(counts))
        counts = np.pad(counts, (0, len(part) - len(counts))) + part
    return counts


def random_windows(stream: np.ndarray, length: int, batch_size: int, rng: np.random.Generator) -> np.ndarray:
    """`batch_size` windows of `length` tokens at uniformly random offsets of `stream`: (B, length)."""
    starts = rng.integers(0, len(stream) - length + 1, size=batch_size)
    return stream[starts[:, None] + np.arange(length)]


class ByteCorpus:
    """Byte-level language modelling on one text: the first (1 - val_fraction) trains, the rest validates."""

    task = "next_token"

    def __init__(self, path: str | None = None, seq_len: int = 256, val_fraction: float = 0.01,
                 eval_windows: int = 256, seed: int = 0, **metadata):
        text = stdlib_sources() if path is None else readable_file(path).read_bytes()  # any bytes
        data = np.frombuffer(text, np.uint8)
        check_length(len(data), "bytes", path, seq_len, val_fraction)
        num_val = int(len(data) * val_fraction)
        self.train, self.val = data[:-num_val], data[-num_val:]
        self.seq_len, self.eval_windows, self.seed = seq_len, eval_windows, seed
        self.tokenizer = ByteTokenizer()

    def train_batch(self, step: int, batch_size: int, shard: Shard = (0, 1)) -> dict[str, np.ndarray]:
        """Random windows of seq_len + 1 bytes; the offsets are a function of (seed, step) alone."""
        windows = random_windows(self.train, self.seq_len + 1, batch_size, np.random.default_rng([self.seed, step]))
        return {"tokens": windows[host_rows(batch_size, shard)].astype(np.int32)}

    def eval_batches(self, batch_size: int, shard: Shard = (0, 1)) -> Iterator[dict[str, np.ndarray]]:
        """`eval_windows` fixed windows spread evenly over the validation split."""
        length = self.seq_len + 1
        starts = np.linspace(0, len(self.val) - length, min(self.eval_windows, len(self.val) // length)).astype(int)
        for idx, mask in eval_indices(len(starts), batch_size, shard):
            yield {"tokens": self.val[starts[idx, None] + np.arange(length)].astype(np.int32), "mask": mask}

    def unigram_loss(self) -> float:
        """Cross-entropy (nats per byte) of the validation split under the training split's byte frequencies."""
        counts = token_counts(self.train, 256) + 1.0  # add-one: bytes unseen in training stay finite
        log_p = np.log(counts / counts.sum())
        return float(-np.mean(log_p[self.val]))

    def final_metrics(self, model) -> dict[str, float]:
        """The unigram baseline, logged beside the model's validation loss."""
        return {"unigram_loss": self.unigram_loss()}

    def detokenize(self, ids: Iterable[int]) -> str:
        return self.tokenizer.decode(ids)


class TextCorpus(ByteCorpus):
    """Next-token prediction on one text encoded by a tokenizer.json, or by bytes when `tokenizer` is null.

    The vocabulary of an imported language model (scripts/convert.py copies its tokenizer.json into the run
    directory). The text is tokenized on first use, so sampling, which needs only the tokenizer, never waits for it.
    """

    def __init__(self, tokenizer: str | None = None, path: str | None = None, seq_len: int = 256,
                 val_fraction: float = 0.01, eval_windows: int = 256, seed: int = 0, **metadata):
        if not 0.0 < val_fraction < 1.0:
            raise ValueError(f"data.val_fraction={val_fraction} is not in (0, 1)")
        self.tokenizer = ByteTokenizer() if tokenizer is None else HFTokenizer(tokenizer)
        self.path, self.val_fraction = path, val_fraction
        self.seq_len, self.eval_windows, self.seed = seq_len, eval_windows, seed

    @functools.cached_property
    def _splits(self) -> tuple[np.ndarray, np.ndarray]:
        text = stdlib_sources() if self.path is None else readable_file(self.path).read_bytes()
        try:
            lines = text.decode("utf-8").splitlines(keepends=True)
        except UnicodeDecodeError as e:
            raise ValueError(f"data.path={self.path} is not UTF-8 text (byte {e.start:,} is {text[e.start]:#04x}) "
                             f"(valid: a UTF-8 text file; data=bytes reads any file's bytes)") from None
        if isinstance(self.tokenizer, HFTokenizer):
            ids = [np.array(e.ids, np.int32) for e in self.tokenizer.tokenizer.encode_batch(lines)]
        else:
            ids = [self.tokenizer.encode(line) for line in lines]
        tokens = np.concatenate(ids) if ids else np.zeros(0, np.int32)
        check_length(len(tokens), "tokens", self.path, self.seq_len, self.val_fraction)
        num_val = int(len(tokens) * self.val_fraction)
        return tokens[:-num_val], tokens[-num_val:]

    @property
    def train(self) -> np.ndarray:
        return self._splits[0]

    @property
    def val(self) -> np.ndarray:
        return self._splits[1]

    def unigram_loss(self) -> float:
        counts = token_counts(self.train, self.tokenizer.vocab_size) + 1.0
        return float(-np.mean(np.log(counts / counts.sum())[self.val]))


# ---- Numbers, English -> French -----------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def number_pair(n: int) -> tuple[str, str]:
    """(English, French) words for n, e.g. 312 -> ("three hundred and twelve", "trois cent douze")."""
    from num2words import num2words

    return num2words(n, lang="en"), num2words(n, lang="fr")


class NumbersEnFr:
    """Translate 0..max_number-1 from English words to French words; test numbers are never trained on."""

    task = "seq2seq"

    def __init__(self, max_number: int = 100_000, test_fraction: float = 0.1, src_len: int = 56,
                 tgt_len: int = 62, seed: int = 0, **metadata):
        num_test = int(round(max_number * test_fraction))
        if not 0 < num_test < max_number:
            raise ValueError(f"numbers_en_fr: test_fraction {test_fraction} of {max_number} numbers leaves an "
                             f"empty split (valid: 1 / {max_number} <= test_fraction < 1)")
        perm = np.random.default_rng(seed).permutation(max_number)
        self.test_numbers, self.train_numbers = np.sort(perm[:num_test]), perm[num_test:]
        self.src_len, self.tgt_len, self.seed = src_len, tgt_len, seed
        self.tokenizer = ByteTokenizer(offset=3)

    def encode(self, numbers: np.ndarray) -> dict[str, np.ndarray]:
        """src (B, src_len): English bytes + padding; tgt (B, tgt_len + 1): BOS, French bytes, EOS, padding."""
        src = np.zeros((len(numbers), self.src_len), np.int32)
        tgt = np.zeros((len(numbers), self.tgt_len + 1), np.int32)
        for row, n in enumerate(numbers):
            en, fr = (self.tokenizer.encode(s) for s in number_pair(int(n)))
            if len(en) > self.src_len or len(fr) + 2 > self.tgt_len + 1:
                raise ValueError(f"numbers_en_fr: {int(n)} needs src_len >= {len(en)} and tgt_len >= {len(fr) + 1} "
                                 f"(have {self.src_len}, {self.tgt_len})")
            src[row, :len(en)] = en
            tgt[row, :len(fr) + 2] = [BOS, *fr, EOS]
        return {"src": src, "tgt": tgt}

    def train_batch(self, step: int, batch_size: int, shard: Shard = (0, 1)) -> dict[str, np.ndarray]:
        idx = train_indices(len(self.train_numbers), batch_size, step, self.seed, shard)
        return self.encode(self.train_numbers[idx])

    def eval_batches(self, batch_size: int, shard: Shard = (0, 1)) -> Iterator[dict[str, np.ndarray]]:
        for idx, mask in eval_indices(len(self.test_numbers), batch_size, shard):
            yield self.encode(self.test_numbers[idx]) | {"mask": mask}

    def detokenize(self, ids: Iterable[int]) -> str:
        return self.tokenizer.decode(until_eos(ids))

    def final_metrics(self, model) -> dict[str, float]:
        """Exact match and BLEU of greedy translations of every test number."""
        from models.transformer import translation_metrics

        return translation_metrics(model, self)


# ---- TFDS text ----------------------------------------------------------------------------------------


def record_text(record: dict, field: str) -> str:
    """One text field of a TFDS record (stored as UTF-8 bytes)."""
    value = record[field]
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


class TFDSText:
    """TFDS text, prepared in `data_dir`: language modelling on `text_field` (task next_token) or translation
    `src_field` -> `tgt_field` (task seq2seq), tokenized to bytes or to a cached SentencePiece model."""

    def __init__(self, name: str, data_dir: str, task: str, tokenizer: str = "bytes", vocab_size: int = 256,
                 seq_len: int = 256, src_len: int = 128, tgt_len: int = 128, text_field: str = "text",
                 src_field: str = "en", tgt_field: str = "fr", train_split: str = "train", test_split: str = "test",
                 eval_examples: int = 1000, spm_dir: str = "~/.cache/archlab/sentencepiece", seed: int = 0,
                 **metadata):
        from data.tfds import open_split

        if task not in ("next_token", "seq2seq"):
            raise ValueError(f"{name}: task {task!r} is not a text task (valid: next_token, seq2seq)")
        if tokenizer not in ("bytes", "sentencepiece"):
            raise ValueError(f"{name}: tokenizer {tokenizer!r} is not known (valid: bytes, sentencepiece)")
        self.name, self.task, self.seed, self.eval_examples = name, task, seed, eval_examples
        self.seq_len, self.src_len, self.tgt_len = seq_len, src_len, tgt_len
        self.fields = (text_field,) if task == "next_token" else (src_field, tgt_field)
        self.train = open_split(name, data_dir, train_split)
        self.test = open_split(name, data_dir, test_split)
        if tokenizer == "bytes":
            self.tokenizer = ByteTokenizer(offset=0 if task == "next_token" else 3)
        else:
            model_file = Path(spm_dir).expanduser() / name.replace("/", "_") / f"{train_split}_{vocab_size}.model"
            self.tokenizer = SentencePieceTokenizer(model_file, self._training_lines, vocab_size)
        if self.tokenizer.vocab_size != vocab_size:
            raise ValueError(f"{name}: data.vocab_size {vocab_size} does not match the {tokenizer} tokenizer's "
                             f"{self.tokenizer.vocab_size} (set data.vocab_size={self.tokenizer.vocab_size})")

    def _training_lines(self, max_records: int = 200_000) -> Iterator[str]:
        """Lines of the training split's text fields, for training SentencePiece."""
        for i in range(min(len(self.train), max_records)):
            for field in self.fields:
                yield from (line for line in record_text(self.train[i], field).splitlines() if line.strip())

    def _lm_rows(self, streams: list[np.ndarray], rng: np.random.Generator | None) -> dict[str, np.ndarray]:
        """Windows of seq_len + 1 tokens (a random one of a longer stream, the start when rng is None), padded;
        `loss_mask` drops the targets that are padding."""
        length = self.seq_len + 1
        tokens = np.zeros((len(streams), length), np.int32)
        loss_mask = np.zeros((len(streams), self.seq_len), np.float32)
        for row, ids in enumerate(streams):
            start = 0 if rng is None or len(ids) <= length else int(rng.integers(0, len(ids) - length + 1))
            ids = ids[start:start + length]
            tokens[row, :len(ids)], loss_mask[row, :len(ids) - 1] = ids, 1.0
        return {"tokens": tokens, "loss_mask": loss_mask}

    def _pairs(self, records: list[dict]) -> dict[str, np.ndarray]:
        """src (B, src_len) and tgt (B, tgt_len + 1) = BOS, tokens, EOS, padding; longer sentences are cut."""
        src = np.zeros((len(records), self.src_len), np.int32)
        tgt = np.zeros((len(records), self.tgt_len + 1), np.int32)
        for row, record in enumerate(records):
            s = self.tokenizer.encode(record_text(record, self.fields[0]))[:self.src_len]
            t = self.tokenizer.encode(record_text(record, self.fields[1]))[:self.tgt_len - 1]
            src[row, :len(s)] = s
            tgt[row, :len(t) + 2] = [BOS, *t, EOS]
        return {"src": src, "tgt": tgt}

    def train_batch(self, step: int, batch_size: int, shard: Shard = (0, 1)) -> dict[str, np.ndarray]:
        if self.task == "seq2seq":
            idx = train_indices(len(self.train), batch_size, step, self.seed, shard)
            return self._pairs([self.train[int(i)] for i in idx])
        rng = np.random.default_rng([self.seed, step])
        idx = rng.integers(0, len(self.train), size=batch_size)[host_rows(batch_size, shard)]
        return self._lm_rows([self.tokenizer.encode(record_text(self.train[int(i)], self.fields[0])) for i in idx],
                             rng)

    def eval_batches(self, batch_size: int, shard: Shard = (0, 1)) -> Iterator[dict[str, np.ndarray]]:
        """The first `eval_examples` test records; for language modelling, each cut into consecutive windows."""
        records = [self.test[i] for i in range(min(len(self.test), self.eval_examples))]
        if self.task == "seq2seq":
            data = self._pairs(records)
        else:
            streams = [self.tokenizer.encode(record_text(r, self.fields[0])) for r in records]
            # Windows overlap by one token, so every target of a record is predicted exactly once.
            data = self._lm_rows([ids[i:] for ids in streams for i in range(0, max(len(ids) - 1, 1), self.seq_len)],
                                 None)
        num = len(next(iter(data.values())))
        for idx, mask in eval_indices(num, batch_size, shard):
            yield {k: v[idx] for k, v in data.items()} | {"mask": mask}

    def detokenize(self, ids: Iterable[int]) -> str:
        return self.tokenizer.decode(until_eos(ids) if self.task == "seq2seq" else ids)

    def final_metrics(self, model) -> dict[str, float]:
        """For translation: exact match and BLEU of greedy decodes of the evaluation records."""
        if self.task != "seq2seq":
            return {}
        from models.transformer import translation_metrics

        return translation_metrics(model, self)
