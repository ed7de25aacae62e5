"""Where metrics go: metrics.jsonl (one JSON object per line), TensorBoard events, and curves.png.

The metric files are secondary to the run: one that cannot be written (a full disk) is dropped with one
warning naming it, and training and checkpoints go on (the checkpoint then says itself if space is short).
"""

import contextlib
import datetime
import json
import logging
import os
import socket
import time
from pathlib import Path
from typing import Callable

from tensorboard.compat.proto.event_pb2 import Event
from tensorboard.compat.proto.summary_pb2 import Summary
from tensorboard.summary.writer.record_writer import RecordWriter

log = logging.getLogger(__name__)


class MetricWriter:
    """Appends `{"step": s, "train/loss": ..., ...}` lines to metrics.jsonl and scalars to TensorBoard.

    TensorBoard events are written here, in the caller's thread, unbuffered, with TensorBoard's own record
    format and protos: a write error is then an OSError at the call, and no writer thread is left hanging
    (tensorboardX's thread hung on a full disk, and importing tensorboardX imported torch: 1-6 s per start).
    """

    def __init__(self, run_dir: Path, enabled: bool = True):
        self.path = run_dir / "metrics.jsonl"
        self.jsonl = enabled
        self.tb_dir = run_dir / "tensorboard"
        self.tb: RecordWriter | None = None
        if enabled:
            try:
                self.tb = open_event_file(self.tb_dir)
            except OSError as e:
                cannot_write(self.tb_dir, e)

    @staticmethod
    def _written(path: Path, write: Callable[[], object]) -> bool:
        """Whether `write()` succeeded; when it fails (a full disk), one warning naming the file."""
        try:
            write()
            return True
        except OSError as e:
            cannot_write(path, e)
            return False

    def write(self, step: int, metrics: dict[str, float]) -> None:
        if self.jsonl:
            self.jsonl = self._written(self.path, lambda: self._append(json.dumps({"step": step, **metrics}) + "\n"))
        if self.tb is not None and not self._written(self.tb_dir, lambda: self._tb_write(step, metrics)):
            with contextlib.suppress(OSError):
                self.tb.close()
            self.tb = None

    def _append(self, line: str) -> None:
        with open(self.path, "a") as f:
            f.write(line)

    def _tb_write(self, step: int, metrics: dict[str, float]) -> None:
        summary = Summary(value=[Summary.Value(tag=name, simple_value=float(value)) for name, value in metrics.items()])
        self.tb.write(Event(wall_time=time.time(), step=step, summary=summary).SerializeToString())

    def drop_after(self, step: int) -> None:
        """Forget lines logged after `step`: a resumed run rewrites them from its checkpoint.

        Written to a new file that replaces the old one, so that a kill or a full disk never loses the lines
        before `step`.
        """
        if self.jsonl and self.path.exists():
            kept = "".join(json.dumps(r) + "\n" for r in read_metrics(self.path) if r["step"] <= step)
            self.jsonl = self._written(self.path, lambda: replace_text(self.path, kept))

    def close(self) -> None:
        if self.tb is not None:
            self._written(self.tb_dir, self.tb.close)
            self.tb = None


def open_event_file(directory: Path) -> RecordWriter:
    """A new TensorBoard event file in `directory` (`events.out.tfevents.<time>.<host>`), its version record written."""
    directory.mkdir(parents=True, exist_ok=True)
    now = time.time()
    events = RecordWriter(open(directory / f"events.out.tfevents.{int(now):010d}.{socket.gethostname()}", "ab",
                               buffering=0))
    events.write(Event(wall_time=now, file_version="brain.Event:2").SerializeToString())
    return events


def cannot_write(path: Path, error: OSError) -> None:
    log.warning("%s cannot be written (%s); no more metrics go there, training and checkpoints go on", path,
                error.strerror or error)


def replace_text(path: Path, text: str) -> None:
    """Write `path` whole or not at all (a new file renamed over the old one)."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def progress_line(step: int, total: int, metrics: dict[str, float]) -> str:
    """One plain log line for a window, where a terminal would show the progress bar: step, loss, rates, ETA."""
    parts = [f"loss {metrics['train/loss']:.4f}"]
    rate = metrics.get("train/steps_per_sec")
    if rate:  # absent for a window of the compiling first step alone
        eta = datetime.timedelta(seconds=round((total - step) / rate))
        parts += [f"{rate:.1f} steps/s", f"{metrics['train/examples_per_sec']:.0f} examples/s", f"ETA {eta}"]
    return f"step {step}/{total}: " + ", ".join(parts)


def read_metrics(path: Path) -> list[dict]:
    """The records of a metrics.jsonl file (a last line cut short by a kill or a full disk is skipped)."""
    records = []
    for line in Path(path).read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def write_results(run_dir: Path, metrics_path: Path, final_metrics: dict[str, float]) -> None:
    """final_metrics.json (whole or not at all) and curves.png (skipped with a warning when it cannot be written)."""
    replace_text(run_dir / "final_metrics.json", json.dumps(final_metrics, indent=2) + "\n")
    try:
        plot_curves(metrics_path, run_dir / "curves.png")
    except OSError as e:
        cannot_write(run_dir / "curves.png", e)


def train_minutes(records: list[dict]) -> float:
    """Training time from a run's logged step rates (read_metrics): holds for a run resumed, or trained elsewhere."""
    train = [r for r in records if "train/steps_per_sec" in r]
    steps = [r["step"] for r in train]
    return sum((b - a) / r["train/steps_per_sec"] for a, b, r in zip([0, *steps], steps, train)) / 60


def plot_curves(metrics_path: Path, out_path: Path) -> None:
    """Loss and accuracy against step, train and eval, one panel each."""
    records = read_metrics(metrics_path)
    panels = [("loss", ["train/loss", "eval/loss"]), ("accuracy", ["train/accuracy", "eval/accuracy"])]
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # imported here: 0.4-0.6 s that a run's start need not wait for

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, (title, keys) in zip(axes, panels):
        for key in keys:
            points = [(r["step"], r[key]) for r in records if key in r]
            if points:
                ax.plot(*zip(*points), label=key, marker="o" if key.startswith("eval") else None)
        ax.set(xlabel="step", title=title)
        if title == "loss":
            ax.set_yscale("log")
        if ax.lines:
            ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out_path, dpi=100)
    plt.close(fig)
