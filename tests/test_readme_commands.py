"""Commands the README gives work after its setup (`pip install -e .`), run as it writes them."""

import json
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import tensorflow_datasets as tfds

from tests.conftest import run_cli
from train.writers import read_metrics


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_tensorboard_serves_the_scalars_of_a_run(tmp_path):
    run_dir = tmp_path / "outputs" / "mlp-digits"
    run_cli(["model=mlp", "model.hidden=[16]", "trainer.steps=20", "trainer.log_every=10", "trainer.eval_every=20",
             "checkpoint.every=20", f"hydra.run.dir={run_dir}"])
    logged = [(r["step"], r["train/loss"]) for r in read_metrics(run_dir / "metrics.jsonl") if "train/loss" in r]

    port = free_port()
    tensorboard = Path(sys.executable).parent / "tensorboard"  # the console script the base install provides
    server = subprocess.Popen([str(tensorboard), "--logdir", "outputs", "--host", "127.0.0.1", "--port", str(port)],
                              cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    query = urllib.parse.urlencode({"run": "mlp-digits/tensorboard", "tag": "train/loss"})
    url = f"http://127.0.0.1:{port}/data/plugin/scalars/scalars?{query}"
    try:
        deadline, served = time.time() + 120, None
        while time.time() < deadline and not served:
            assert server.poll() is None, server.stdout.read()
            try:
                with urllib.request.urlopen(url, timeout=5) as response:
                    served = json.loads(response.read())
            except (urllib.error.URLError, ConnectionError):  # not listening yet, or the run not loaded yet
                time.sleep(0.5)
        assert served, "tensorboard served no train/loss"
    finally:
        server.terminate()
        server.wait(timeout=30)
    assert [(step, round(value, 5)) for _, step, value in served] == [(s, round(v, 5)) for s, v in logged]


def test_tfds_digits_command_builds_the_dataset(tmp_path):
    """`python -m data.tfds_digits --data_dir DIR`: TFDS finds its builder's files although it runs as __main__."""
    proc = run_cli(["--data_dir", str(tmp_path)], module="data.tfds_digits")
    assert proc.stdout.strip().splitlines()[-1] == str(tmp_path / "digits_tfds" / "1.0.0")
    info = tfds.builder("digits_tfds", data_dir=str(tmp_path)).info
    assert (info.splits["train"].num_examples, info.splits["test"].num_examples) == (1438, 359)
