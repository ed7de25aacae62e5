"""Where metrics go: metrics.jsonl (one JSON object per line), TensorBoard events, and curves.png."""

import datetime
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from tensorboardX import SummaryWriter  # noqa: E402


class MetricWriter:
    """Appends `{"step": s, "train/loss": ..., ...}` lines to metrics.jsonl and scalars to TensorBoard."""

    def __init__(self, run_dir: Path, enabled: bool = True):
        self.path = run_dir / "metrics.jsonl"
        self.enabled = enabled
        self.tb = SummaryWriter(str(run_dir / "tensorboard")) if enabled else None

    def write(self, step: int, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": step, **metrics}) + "\n")
        for name, value in metrics.items():
            self.tb.add_scalar(name, value, step)

    def drop_after(self, step: int) -> None:
        """Forget lines logged after `step`: a resumed run rewrites them from its checkpoint."""
        if self.enabled and self.path.exists():
            lines = [l for l in self.path.read_text().splitlines() if json.loads(l)["step"] <= step]
            self.path.write_text("".join(l + "\n" for l in lines))

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def progress_line(step: int, total: int, metrics: dict[str, float]) -> str:
    """One plain log line for a window, where a terminal would show the progress bar: step, loss, rates, ETA."""
    parts = [f"loss {metrics['train/loss']:.4f}"]
    rate = metrics.get("train/steps_per_sec")
    if rate:  # absent for a window of the compiling first step alone
        eta = datetime.timedelta(seconds=round((total - step) / rate))
        parts += [f"{rate:.1f} steps/s", f"{metrics['train/examples_per_sec']:.0f} examples/s", f"ETA {eta}"]
    return f"step {step}/{total}: " + ", ".join(parts)


def read_metrics(path: Path) -> list[dict]:
    """The records of a metrics.jsonl file."""
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def train_minutes(records: list[dict]) -> float:
    """Training time from a run's logged step rates (read_metrics): holds for a run resumed, or trained elsewhere."""
    train = [r for r in records if "train/steps_per_sec" in r]
    steps = [r["step"] for r in train]
    return sum((b - a) / r["train/steps_per_sec"] for a, b, r in zip([0, *steps], steps, train)) / 60


def plot_curves(metrics_path: Path, out_path: Path) -> None:
    """Loss and accuracy against step, train and eval, one panel each."""
    records = read_metrics(metrics_path)
    panels = [("loss", ["train/loss", "eval/loss"]), ("accuracy", ["train/accuracy", "eval/accuracy"])]
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
