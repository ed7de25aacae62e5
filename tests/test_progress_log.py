"""Logs that read well anywhere: plain lines when stderr is not a terminal, the progress bar when it is."""

import fcntl
import os
import pty
import re
import struct
import subprocess
import sys
import termios
import threading

from tests.conftest import ROOT, run_cli

ARGS = ["model=mlp", "model.hidden=[16]", "trainer.steps=200", "trainer.log_every=50", "trainer.eval_every=100",
        "checkpoint.every=100"]
LINE = re.compile(r"step (\d+)/200: loss \d+\.\d{4}, \d+\.\d steps/s, \d+ examples/s, ETA \d+:\d\d:\d\d$")


def test_without_a_terminal_one_plain_line_per_log_interval(tmp_path):
    proc = run_cli([*ARGS, f"hydra.run.dir={tmp_path}"])  # stdout and stderr are pipes
    out = proc.stdout + proc.stderr
    assert "\r" not in out and "it/s" not in out
    steps = [int(m.group(1)) for line in out.splitlines() if (m := LINE.search(line))]
    assert steps == [50, 100, 150, 200], out


def test_on_a_terminal_the_progress_bar_stays(tmp_path):
    primary, secondary = pty.openpty()
    fcntl.ioctl(secondary, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 120, 0, 0))  # a new pty has 0 columns
    proc = subprocess.Popen([sys.executable, "-m", "train", *ARGS, f"hydra.run.dir={tmp_path}"], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=secondary, text=True,
                            env=os.environ | {"PYTHONPATH": str(ROOT)})
    os.close(secondary)
    terminal = []

    def drain() -> None:  # read the terminal while the run writes, so that it never blocks on a full pty
        while True:
            try:
                chunk = os.read(primary, 4096)
            except OSError:  # EIO: the run closed its end
                return
            if not chunk:
                return
            terminal.append(chunk)

    reader = threading.Thread(target=drain)
    reader.start()
    stdout = proc.communicate(timeout=300)[0]
    reader.join(timeout=30)
    os.close(primary)
    bar = b"".join(terminal).decode(errors="replace")
    assert proc.returncode == 0, stdout + bar
    assert "\r" in bar and "200/200" in bar and "steps_s=" in bar
    assert not any(LINE.search(line) for line in stdout.splitlines())
